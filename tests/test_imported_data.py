"""A model's own data in its own id space: ML-100K as CSV and as atomic files giving one Dataset, unknown ids skipped
and counted, files that match nothing refused, metadata columns from whatever the tables hold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from recsae_core.common.errors import DataError
from recsae_core.data.datasets import Dataset, load_dataset, locate_dataset
from recsae_core.data.imported import ImportReport, load_imported_dataset
from recsae_core.data.tables import read_atomic


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def refusal(*args: object, **kwargs: object) -> str:
    with pytest.raises(DataError) as info:
        load_imported_dataset(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- ML-100K, atomic and CSV ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ML-100K's shipped .inter/.item/.user files and the same rows written as CSV (token_seq values joined with
    '|', as a user's own export would be)."""
    folder = locate_dataset("ml-100k")
    out = tmp_path_factory.mktemp("ml100k-csv")
    files = {"atomic_" + role: folder / f"ml-100k.{suffix}" for role, suffix in SUFFIXES.items()}
    for role, suffix in SUFFIXES.items():
        table = read_atomic(folder / f"ml-100k.{suffix}")
        path = out / f"{role}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(table.columns)
            seq = [name for name, kind in table.types.items() if kind == "token_seq" and name != "movie_title"]
            for row in range(len(table)):
                writer.writerow(
                    "|".join(table.columns[name][row].split()) if name in seq else table.columns[name][row]
                    for name in table.columns
                )
        files["csv_" + role] = path
    return files


SUFFIXES = {"inter": "inter", "items": "item", "users": "user"}


def load_as(files: dict[str, Path], prefix: str, item_ids: list[str]) -> tuple[Dataset, ImportReport]:
    return load_imported_dataset(
        files[prefix + "inter"], item_ids, items=files[prefix + "items"], users=files[prefix + "users"]
    )


def test_ml100k_csv_and_atomic_give_the_same_dataset(ml100k_files):
    raw = load_dataset("ml-100k", min_rating=None, core=0)
    atomic, atomic_report = load_as(ml100k_files, "atomic_", raw.item_tokens)
    from_csv, csv_report = load_as(ml100k_files, "csv_", raw.item_tokens)
    assert atomic_report == csv_report
    assert atomic_report.as_dict() == {
        "rows_read": 100_000,
        "rows_kept": 100_000,
        "skipped_unknown_item": 0,
        "skipped_unknown_user": 0,
        "unknown_items": [],
        "unknown_users": [],
        "items_without_interactions": 0,
        "item_rows_matched": 1682,
        "item_rows_skipped": 0,
        "user_rows_matched": 943,
        "user_rows_skipped": 0,
    }
    for data in (atomic, from_csv):
        # The unfiltered MovieLens load is the same data: same dense ids, same rows once sorted into histories.
        order = np.lexsort((np.arange(raw.n_interactions), raw.timestamps, raw.users))
        assert data.user_tokens == raw.user_tokens and data.item_tokens == raw.item_tokens
        assert np.array_equal(data.users, raw.users[order]) and np.array_equal(data.items, raw.items[order])
        assert np.array_equal(data.timestamps, raw.timestamps[order])
        assert data.item_meta.titles == raw.item_meta.titles and data.item_meta.genres == raw.item_meta.genres
        assert np.array_equal(data.item_meta.years, raw.item_meta.years)
        assert data.user_meta is not None and raw.user_meta is not None
        for name in ("gender", "age", "occupation"):
            assert getattr(data.user_meta, name) == getattr(raw.user_meta, name)
        assert data.filters == raw.filters == {"min_rating": -1, "core": 0}
    assert_same_columns(atomic.item_meta.columns, raw.item_meta.columns)
    assert_same_columns(from_csv.item_meta.columns, raw.item_meta.columns)
    assert_same_columns(atomic.user_meta.columns, raw.user_meta.columns)
    # A CSV declares no types, so its all-number ages read as numbers; RecBole's file declares them tokens.
    csv_users = from_csv.user_meta.columns
    assert csv_users["age"].kind == "numeric" and raw.user_meta.columns["age"].kind == "categorical"
    assert csv_users["age"].numbers.tolist() == [float(age) for age in raw.user_meta.age]
    assert_same_columns({k: v for k, v in csv_users.items() if k != "age"}, raw.user_meta.columns, skip=("age",))


def assert_same_columns(got: dict, expected: dict, skip: tuple[str, ...] = ()) -> None:
    assert set(got) == set(expected) - set(skip)
    for name, column in got.items():
        other = expected[name]
        assert column.kind == other.kind, name
        assert column.tokens == other.tokens and column.texts == other.texts, name
        if column.numbers is not None:
            assert np.array_equal(column.numbers, other.numbers, equal_nan=True), name


def test_ml100k_model_that_knows_part_of_the_catalog(ml100k_files):
    # A model trained before items 1601.. were added, which also knows two items no one has rated yet.
    item_ids = [str(i) for i in range(1, 1601)] + ["new-a", "new-b"]
    data, report = load_as(ml100k_files, "csv_", item_ids)
    assert data.item_tokens == item_ids and data.n_items == 1602
    late = read_atomic(ml100k_files["atomic_inter"]).columns["item_id"]
    dropped = sum(int(item) > 1600 for item in late)
    assert report.skipped_unknown_item == dropped > 0 and report.rows_kept == 100_000 - dropped
    assert all(int(item) > 1600 for item in report.unknown_items) and len(report.unknown_items) == 5
    assert (report.item_rows_matched, report.item_rows_skipped) == (1600, 82)
    assert report.items_without_interactions == 2
    assert data.item_meta.titles[-2:] == ["new-a", "new-b"] and data.item_meta.years[-1] == -1
    assert data.item_meta.columns["class"].tokens[-1] == []
    assert data.item_meta.titles[0] == "Toy Story"


# --- the log: ids, order, counts --------------------------------------------------------------------------------

LOG = [
    "user_id,item_id,timestamp,rating",
    "u2,b,30,5",
    "u1,a,20,4",
    "u1,x,15,3",  # x: an item added after training
    "u2,a,10,",
    "u1,c,20,1",  # ties u1's 'a' at 20: file order breaks the tie
    "u3,a,5,2",
    "u1,c,20,1",  # a duplicate row is kept
    "u9,y,1,1",  # unknown user and item: counted once, as an unknown item
]


def test_log_in_the_models_id_space(tmp_path):
    data, report = load_imported_dataset(write(tmp_path / "log.csv", LOG), ["c", "b", "a", "d"])
    assert data.item_tokens == ["c", "b", "a", "d"]  # the model's order, with 'd' never rated
    assert data.user_tokens == ["u2", "u1", "u3"]  # first appearance among the kept rows
    histories = {
        data.user_tokens[u]: [data.item_tokens[i] for i in data.items[data.users == u]] for u in range(data.n_users)
    }
    assert histories == {"u2": ["a", "b"], "u1": ["a", "c", "c"], "u3": ["a"]}  # oldest first
    assert data.users.tolist() == sorted(data.users.tolist())
    assert data.timestamps.tolist() == [10, 30, 20, 20, 20, 5]
    assert report == ImportReport(
        rows_read=8,
        rows_kept=6,
        skipped_unknown_item=2,
        skipped_unknown_user=0,
        unknown_items=("x", "y"),
        unknown_users=(),
        items_without_interactions=1,
        item_rows_matched=0,
        item_rows_skipped=0,
        user_rows_matched=0,
        user_rows_skipped=0,
    )
    assert json.loads(json.dumps(report.as_dict()))["unknown_items"] == ["x", "y"]
    assert data.user_meta is None and data.item_meta.titles == ["c", "b", "a", "d"] and data.name == "imported"


def test_user_ids_restrict_users_to_the_models(tmp_path):
    log = write(tmp_path / "log.csv", LOG)
    data, report = load_imported_dataset(log, ["a", "b", "c"], user_ids=["u3", "u1", "u7"], name="shop")
    assert data.name == "shop" and data.user_tokens == ["u1", "u3"]  # the log's order, not the map's
    assert (report.skipped_unknown_item, report.skipped_unknown_user) == (2, 2)
    assert report.unknown_users == ("u2",) and report.rows_kept == 4


def test_atomic_log_without_timestamps_keeps_file_order(tmp_path):
    log = write(tmp_path / "shop.inter", ["user_id:token\titem_id:token", "u\tb", "v\ta", "u\ta", "u\tb"])
    data, _ = load_imported_dataset(log, ["a", "b"])
    assert data.user_tokens == ["u", "v"]
    assert data.items.tolist() == [1, 0, 1, 0] and data.timestamps.tolist() == [0, 2, 3, 1]


def test_iso_timestamps(tmp_path):
    rows = ["user_id,item_id,timestamp", "u,a,2024-03-01T10:00:00", "u,b,2024-01-01", "u,c,2024-02-01 00:00:00+01:00"]
    data, _ = load_imported_dataset(write(tmp_path / "log.csv", rows), ["a", "b", "c"])
    assert data.items.tolist() == [1, 2, 0]
    assert data.timestamps[0] == 1704067200.0  # 2024-01-01 00:00 UTC: a date without a zone is read as UTC


@pytest.mark.parametrize(
    ("value", "fragment"), [("nan", "timestamp is NaN"), ("yesterday", "neither a number nor an ISO 8601 date")]
)
def test_bad_timestamp_names_the_line(tmp_path, value, fragment):
    path = write(tmp_path / "log.csv", ["user_id,item_id,timestamp", "u,a,1", f"u,a,{value}"])
    message = refusal(path, ["a"])
    assert str(path) in message and "line 3" in message and fragment in message


# --- refusals ---------------------------------------------------------------------------------------------------


def test_log_naming_no_model_item_is_refused(tmp_path):
    path = write(tmp_path / "log.csv", ["user_id,item_id", "u,x", "v,y"])
    message = refusal(path, ["a", "b"])
    assert str(path) in message and "no row names an item the model knows" in message
    assert "'x'" in message and "2 rows" in message


def test_log_naming_no_model_user_is_refused(tmp_path):
    path = write(tmp_path / "log.csv", ["user_id,item_id", "u,a", "v,a"])
    message = refusal(path, ["a"], user_ids=["w"])
    assert str(path) in message and "a user and an item the model knows" in message and "'u'" in message


def test_malformed_log_row_names_file_and_line(tmp_path):
    path = write(tmp_path / "log.csv", ["user_id,item_id", "u,a", "u,a,5"])
    message = refusal(path, ["a"])
    assert str(path) in message and "line 3" in message and "expected 2" in message


def test_log_without_item_column(tmp_path):
    path = write(tmp_path / "log.inter", ["user_id:token\tmovie:token", "u\ta"])
    message = refusal(path, ["a"])
    assert str(path) in message and "item_id" in message


@pytest.mark.parametrize("role", ["items", "users"])
def test_table_matching_nothing_is_refused(tmp_path, role):
    log = write(tmp_path / "log.csv", ["user_id,item_id", "u,a"])
    table = write(tmp_path / f"{role}.csv", [f"{role[:-1]}_id,colour", "zz,red", "zy,blue"])
    message = refusal(log, ["a"], **{role: table})
    assert str(table) in message and "no row names" in message and "'zz'" in message


def test_duplicate_id_in_item_table_is_refused(tmp_path):
    log = write(tmp_path / "log.csv", ["user_id,item_id", "u,a"])
    items = write(tmp_path / "items.csv", ["item_id,title", "a,One", "b,Two", "a,Three"])
    message = refusal(log, ["a", "b"], items=items)
    assert str(items) in message and "line 4" in message and "duplicate item_id 'a'" in message and "line 2" in message


def test_item_table_of_unknown_format_is_refused(tmp_path):
    log = write(tmp_path / "log.csv", ["user_id,item_id", "u,a"])
    items = write(tmp_path / "items.tsv", ["item_id\ttitle", "a\tOne"])
    assert "unknown table format" in refusal(log, ["a"], items=items)


# --- item and user tables ---------------------------------------------------------------------------------------


def test_csv_item_table_columns_and_legacy_fields(tmp_path):
    log = write(tmp_path / "log.csv", ["user_id,item_id", "u,i1", "u,i2"])
    items = write(
        tmp_path / "items.csv",
        [
            "item_id,title,genres,year,price,brand",
            "i2,The Prestige,Drama|Mystery,2006,12.5,Warner",
            "i1,Toy Story,Animation|Comedy,unknown,,Pixar",
            "gone,Removed Film,Drama,2001,3,Warner",
            "i4,Heat,,1995,7,Warner",
        ],
    )
    data, report = load_imported_dataset(log, ["i1", "i2", "i3", "i4"], items=items)
    meta = data.item_meta
    assert (report.item_rows_matched, report.item_rows_skipped) == (3, 1)
    assert meta.titles == ["Toy Story", "The Prestige", "i3", "Heat"]  # the raw id where the table lacks the item
    assert meta.years.tolist() == [-1, 2006, -1, 1995]
    assert meta.genres == [["Animation", "Comedy"], ["Drama", "Mystery"], [], []]
    assert {name: column.kind for name, column in meta.columns.items()} == {
        "title": "text",
        "genres": "categorical",
        "year": "numeric",  # named as a year: a value that is not a number is unknown
        "price": "numeric",
        "brand": "categorical",
    }
    assert meta.columns["title"].texts == ["Toy Story", "The Prestige", "", "Heat"]
    assert np.isnan(meta.columns["year"].numbers).tolist() == [True, False, True, False]
    assert meta.columns["price"].numbers[1] == 12.5 and np.isnan(meta.columns["price"].numbers[0])
    assert meta.columns["brand"].tokens == [["Pixar"], ["Warner"], [], ["Warner"]]
    assert meta.column("genres") is meta.columns["genres"] and meta.source == items
    with pytest.raises(DataError) as info:
        meta.column("studio")
    assert str(items) in str(info.value) and "'studio'" in str(info.value) and "brand" in str(info.value)


def test_item_table_with_names_of_its_own(tmp_path):
    # No MovieLens names: the title, year and genre are found by kind and by what the columns are called.
    log = write(tmp_path / "log.csv", ["user_id,item_id", "u,1"])
    items = write(
        tmp_path / "items.csv",
        [
            "item_id,Product Name,Category,Year",
            "1,Blue Wool Scarf,Clothing,2019",
            "2,Red Cotton Shirt,Clothing,2021",
            "3,Oak Side Table,Furniture,2020",
        ],
    )
    meta = load_imported_dataset(log, ["1", "2", "3"], items=items)[0].item_meta
    assert meta.titles == ["Blue Wool Scarf", "Red Cotton Shirt", "Oak Side Table"]
    assert meta.genres == [["Clothing"], ["Clothing"], ["Furniture"]]
    assert meta.years.tolist() == [2019, 2021, 2020]
    assert {name: column.kind for name, column in meta.columns.items()} == {
        "Product Name": "text",
        "Category": "categorical",
        "Year": "numeric",
    }


def test_atomic_item_table(tmp_path):
    log = write(tmp_path / "shop.inter", ["user_id:token\titem_id:token\ttimestamp:float", "u\t1\t1"])
    items = write(
        tmp_path / "shop.item",
        ["item_id:token\ttitle:token_seq\ttags:token_seq\tprice:float", "1\tA Film\tx y\t2.5", "2\tB Film\ty\t"],
    )
    meta = load_imported_dataset(log, ["1", "2"], items=items)[0].item_meta
    assert meta.titles == ["A Film", "B Film"]
    assert meta.genres == [[], []]  # 'tags' is not named like a genre
    assert meta.columns["tags"].tokens == [["x", "y"], ["y"]]
    assert meta.columns["price"].numbers[0] == 2.5 and np.isnan(meta.columns["price"].numbers[1])


def test_declared_float_that_is_not_a_number_is_refused(tmp_path):
    log = write(tmp_path / "shop.inter", ["user_id:token\titem_id:token", "u\t1"])
    items = write(tmp_path / "shop.item", ["item_id:token\tprice:float", "1\t2.5", "2\tcheap"])
    message = refusal(log, ["1", "2"], items=items)
    assert str(items) in message and "line 3" in message and "'cheap'" in message


def test_user_table(tmp_path):
    log = write(tmp_path / "log.csv", ["user_id,item_id", "u1,a", "u2,a", "u3,a"])
    users = write(
        tmp_path / "users.csv",
        ["user_id,gender,age_band,income", "u2,F,25-34,52000", "u1,M,18-24,", "ghost,F,35-44,1", "u4,M,45-54,3"],
    )
    data, report = load_imported_dataset(log, ["a"], user_ids=["u1", "u2", "u3", "u4"], users=users)
    meta = data.user_meta
    assert meta is not None and meta.source == users
    assert (report.user_rows_matched, report.user_rows_skipped) == (2, 2)  # ghost: not the model's; u4: no log rows
    assert meta.gender == ["M", "F", ""] and meta.age == ["", "", ""] and meta.occupation == ["", "", ""]
    assert {name: column.kind for name, column in meta.columns.items()} == {
        "gender": "categorical",
        "age_band": "categorical",
        "income": "numeric",
    }
    assert meta.column("age_band").tokens == [["18-24"], ["25-34"], []]
    with pytest.raises(DataError) as info:
        meta.column("country")
    assert str(users) in str(info.value) and "'country'" in str(info.value)


# --- the MovieLens path fills the same generic view -------------------------------------------------------------


def test_movielens_columns(ml100k, ml1m):
    for data, genre in ((ml100k, "class"), (ml1m, "genre")):
        columns = data.item_meta.columns
        assert {name: column.kind for name, column in columns.items()} == {
            "movie_title": "text",
            "release_year": "numeric",
            genre: "categorical",
        }
        assert columns[genre].tokens == data.item_meta.genres  # ML-1M declares its genres one token: split anyway
        assert columns["movie_title"].texts == data.item_meta.titles
        years = columns["release_year"].numbers
        assert np.array_equal(np.nan_to_num(years, nan=-1).astype(int), data.item_meta.years)
        assert data.user_meta is not None and data.user_meta.columns["gender"].tokens[0] in (["M"], ["F"])
    assert ml1m.user_meta.columns["age"].kind == "numeric"  # age:float in ML-1M's file, age:token in ML-100K's
    assert ml100k.user_meta.columns["age"].tokens[0] == [ml100k.user_meta.age[0]]
