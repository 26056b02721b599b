"""Dataset loading: shipped MovieLens counts and metadata, k-core filtering, and one-line refusals of bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsae_core.common.errors import DataError
from recsae_core.data.datasets import k_core, load_dataset, locate_dataset, read_atomic
from recsae_core.pipeline.cli import main

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def assert_one_line_error(err: DataError, *fragments: str) -> None:
    message = str(err)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# --- shipped datasets -------------------------------------------------------------------------------------------


def test_ml1m_recbole_filter_counts(ml1m):
    assert (ml1m.n_users, ml1m.n_items, ml1m.n_interactions) == (6033, 3123, 834449)
    assert ml1m.filters == {"min_rating": 3.0, "core": 10}


def test_ml1m_metadata(ml1m):
    item = ml1m.item_tokens.index("Toy Story (1995)")
    assert ml1m.item_meta.titles[item] == "Toy Story"
    assert ml1m.item_meta.years[item] == 1995
    assert ml1m.item_meta.genres[item] == ["Animation", "Children's", "Comedy"]
    assert ml1m.user_meta is not None
    user = ml1m.user_tokens.index("1m_1")
    assert ml1m.user_meta.gender[user] == "F"
    assert set(ml1m.user_meta.gender) == {"M", "F"}
    assert (ml1m.item_meta.years > 1900).all()


def test_ml100k_counts_are_stable(ml100k):
    assert (ml100k.n_users, ml100k.n_items, ml100k.n_interactions) == (939, 1016, 80393)
    assert len(ml100k.items) == len(ml100k.timestamps) == ml100k.n_interactions


def test_ml100k_counts_without_filters():
    raw = load_dataset("ml-100k", min_rating=None, core=0)
    assert (raw.n_users, raw.n_items, raw.n_interactions) == (943, 1682, 100000)
    rated = load_dataset("ml-100k", min_rating=3.0, core=0)
    assert rated.n_interactions == 82520  # 27145 + 34174 + 21201 ratings of 3, 4 and 5


def test_ml100k_is_a_10_core_with_dense_ids(ml100k):
    assert np.bincount(ml100k.users).min() >= 10
    assert np.bincount(ml100k.items).min() >= 10
    assert len(np.unique(ml100k.users)) == ml100k.n_users and ml100k.users.max() == ml100k.n_users - 1
    assert len(np.unique(ml100k.items)) == ml100k.n_items and ml100k.items.max() == ml100k.n_items - 1
    # Dense ids follow first appearance: each new id is exactly one more than the largest seen so far.
    for ids in (ml100k.users, ml100k.items):
        assert ids[0] == 0
        assert (np.diff(np.maximum.accumulate(ids)) <= 1).all()


def test_ml100k_metadata(ml100k):
    item = ml100k.item_tokens.index("1")
    assert ml100k.item_meta.titles[item] == "Toy Story"
    assert ml100k.item_meta.years[item] == 1995
    assert ml100k.item_meta.genres[item] == ["Animation", "Children's", "Comedy"]
    assert ml100k.user_meta is not None
    user = ml100k.user_tokens.index("1")
    assert (ml100k.user_meta.gender[user], ml100k.user_meta.age[user]) == ("M", "24")
    assert ml100k.user_meta.occupation[user] == "technician"
    assert all(g in ("M", "F") for g in ml100k.user_meta.gender)
    assert len(ml100k.item_meta.titles) == len(ml100k.item_meta.genres) == ml100k.n_items


def test_ml100k_unknown_year_becomes_minus_one():
    raw = load_dataset("ml-100k", min_rating=None, core=0)
    item = raw.item_tokens.index("267")  # the one movie whose year is spelled "unkonwn"
    assert raw.item_meta.years[item] == -1
    # The only other non-numeric year is item 1412, whose year column holds "V" (a title split in the source data).
    unknown = {raw.item_tokens[i] for i in np.flatnonzero(raw.item_meta.years == -1)}
    assert unknown == {"267", "1412"}
    assert raw.item_meta.years[raw.item_tokens.index("1")] == 1995


def test_cli_data_info_json(capsys, ml100k):
    assert main(["data", "info", "--dataset", "ml-100k"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dataset"] == "ml-100k"
    assert (info["n_users"], info["n_items"], info["n_interactions"]) == (939, 1016, 80393)
    assert sum(info["train_valid_test"]) == 80393
    assert info["has_item_metadata"] and info["has_user_metadata"]
    assert info["density"] == round(80393 / (939 * 1016), 6)


# --- k-core -----------------------------------------------------------------------------------------------------


def test_k_core_cascades_until_stable():
    # A chain 0-0, 0-1, 1-1, 1-2, 2-2, 2-3 unravels entirely under core=2 (three rounds of removals);
    # the complete 2x2 block of users 3, 4 and items 4, 5 survives.
    pairs = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 4), (3, 5), (4, 4), (4, 5)]
    users, items = (np.array(col) for col in zip(*pairs, strict=True))
    keep = k_core(users, items, core=2)
    assert keep.tolist() == [False] * 6 + [True] * 4
    # One round alone would only drop the two chain ends: the test really needs the iteration.
    first_round = (np.bincount(users)[users] >= 2) & (np.bincount(items)[items] >= 2)
    assert first_round.sum() == 8


def test_k_core_user_removal_cascades_to_items():
    # Item 0 has 3 users, but two of them have only one interaction; with them gone item 0 drops below 3.
    pairs = [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (3, 1), (3, 2), (4, 1), (4, 2), (2, 3)]
    users, items = (np.array(col) for col in zip(*pairs, strict=True))
    keep = k_core(users, items, core=3)
    kept = {pair for pair, k in zip(pairs, keep, strict=True) if k}
    assert kept == set()  # removing user 0/1 drops item 0, user 2 then has 3 left ... until nothing remains
    assert k_core(users, items, core=1).all() and k_core(users, items, core=0).all()


def test_k_core_keeps_exact_core():
    # Users 0..2 x items 0..2 complete (every count 3), plus user 3 with items 0, 1 (count 2) -> removed at core 3.
    pairs = [(u, i) for u in range(3) for i in range(3)] + [(3, 0), (3, 1)]
    users, items = (np.array(col) for col in zip(*pairs, strict=True))
    assert k_core(users, items, core=3).tolist() == [True] * 9 + [False] * 2


def test_load_applies_rating_filter_before_k_core(write_atomic):
    # Without the rating filter every user and item has 2 interactions; the low rating breaks the 2-core.
    rows = [INTER_HEADER, "a\tx\t5\t1", "a\ty\t5\t2", "b\tx\t5\t3", "b\ty\t1\t4"]
    folder = write_atomic("tiny", rows)
    assert load_dataset(str(folder), min_rating=None, core=2).n_interactions == 4
    # Dropping b-y leaves b and y with one interaction each, which unravels the whole 2-core.
    with pytest.raises(DataError, match="no interactions left after filtering"):
        load_dataset(str(folder), min_rating=3.0, core=2)
    # With core 1 the rating filter alone applies: the three ratings of 5 survive.
    assert load_dataset(str(folder), min_rating=3.0, core=1).n_interactions == 3


def test_tiny_dataset_tokens_and_missing_metadata(write_atomic):
    rows = [INTER_HEADER, "u9\ti5\t4\t10", "u2\ti5\t4\t11", "u9\ti1\t4\t12"]
    data = load_dataset(str(write_atomic("tiny", rows)), core=0)
    assert data.name == "tiny"
    assert data.user_tokens == ["u9", "u2"] and data.item_tokens == ["i5", "i1"]  # first appearance
    assert data.users.tolist() == [0, 1, 0] and data.items.tolist() == [0, 0, 1]
    assert data.timestamps.tolist() == [10.0, 11.0, 12.0]
    assert data.item_meta.titles == ["i5", "i1"]  # no .item file: the token stands in
    assert data.item_meta.years.tolist() == [-1, -1] and data.item_meta.genres == [[], []]
    assert data.user_meta is None


# --- refusals ---------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_dataset(str(missing))
    assert_one_line_error(info.value, str(missing), "no such dataset")


def test_unknown_dataset_name():
    with pytest.raises(DataError) as info:
        load_dataset("ml-20m")
    assert_one_line_error(info.value, "ml-20m", "ml-100k", "ml-1m")


def test_folder_without_inter_file(write_atomic):
    folder = write_atomic("bad", None, item="item_id:token\n1\n")
    with pytest.raises(DataError) as info:
        locate_dataset(str(folder))
    assert_one_line_error(info.value, str(folder), "missing bad.inter")


def test_inter_named_after_another_folder(write_atomic, tmp_path):
    folder = write_atomic("bad", None)
    (folder / "other.inter").write_text(INTER_HEADER + "\n1\t1\t5\t1\n")
    with pytest.raises(DataError, match=r"missing bad\.inter"):
        load_dataset(str(folder))


def test_path_that_is_a_file(tmp_path):
    path = tmp_path / "file.inter"
    path.write_text(INTER_HEADER + "\n")
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert_one_line_error(info.value, str(path), "not a folder")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ("user_id\titem_id:token", "'user_id'"),
        ("user_id:token\titem_id:int", "'item_id:int'"),
        (":token\titem_id:token", "':token'"),
    ],
)
def test_bad_header_field(write_atomic, header, fragment):
    folder = write_atomic("bad", [header, "1\t2"])
    with pytest.raises(DataError) as info:
        load_dataset(str(folder))
    assert_one_line_error(info.value, str(folder / "bad.inter"), "header field", fragment)


def test_header_without_required_field(write_atomic):
    folder = write_atomic("bad", ["user_id:token\trating:float", "1\t5"])
    with pytest.raises(DataError) as info:
        load_dataset(str(folder))
    assert_one_line_error(info.value, str(folder / "bad.inter"), "item_id")


def test_row_with_wrong_field_count_names_the_line(write_atomic):
    rows = [INTER_HEADER, "1\t1\t5\t10", "", "2\t1\t5\t11", "3\t1\t5"]  # the short row is on line 5
    folder = write_atomic("bad", rows)
    with pytest.raises(DataError) as info:
        read_atomic(folder / "bad.inter")
    assert_one_line_error(info.value, str(folder / "bad.inter"), "line 5", "expected 4", "found 3")


def test_non_numeric_rating(write_atomic):
    folder = write_atomic("bad", [INTER_HEADER, "1\t1\t5\t10", "2\t1\tfive\t11"])
    with pytest.raises(DataError) as info:
        load_dataset(str(folder))
    assert_one_line_error(info.value, str(folder / "bad.inter"), "line 3", "'rating'", "'five'")


def test_non_numeric_rating_after_blank_line_names_the_file_line(write_atomic):
    folder = write_atomic("bad", [INTER_HEADER, "1\t1\t5\t10", "", "2\t1\tfive\t11"])  # 'five' is on line 4
    with pytest.raises(DataError, match=r"line 4\b"):
        load_dataset(str(folder))


def test_nan_timestamp(write_atomic):
    folder = write_atomic("bad", [INTER_HEADER, "1\t1\t5\t10", "2\t1\t5\tnan"])
    with pytest.raises(DataError) as info:
        load_dataset(str(folder), core=0)
    assert_one_line_error(info.value, str(folder / "bad.inter"), "line 3", "NaN")


@pytest.mark.parametrize(("content", "fragment"), [("", "empty file"), ("\n\n", "empty file")])
def test_empty_file(write_atomic, content, fragment):
    folder = write_atomic("bad", content)
    with pytest.raises(DataError) as info:
        load_dataset(str(folder))
    assert_one_line_error(info.value, str(folder / "bad.inter"), fragment)


def test_header_only(write_atomic):
    folder = write_atomic("bad", [INTER_HEADER])
    with pytest.raises(DataError) as info:
        load_dataset(str(folder))
    assert_one_line_error(info.value, str(folder / "bad.inter"), "header only")


def test_not_utf8(write_atomic):
    folder = write_atomic("bad", INTER_HEADER.encode() + b"\n1\t\xff\xfe\t5\t1\n")
    with pytest.raises(DataError) as info:
        load_dataset(str(folder))
    assert_one_line_error(info.value, str(folder / "bad.inter"), "not UTF-8")


def test_malformed_item_file_is_named(write_atomic):
    rows = [INTER_HEADER, "1\t1\t5\t10"]
    folder = write_atomic("bad", rows, item=["item_id:token\tmovie_title:token_seq", "1\tA\tB"])
    with pytest.raises(DataError) as info:
        load_dataset(str(folder), core=0)
    assert_one_line_error(info.value, str(folder / "bad.item"), "line 2")


def test_everything_filtered_out_with_core_0(write_atomic):
    folder = write_atomic("low", [INTER_HEADER, "1\t1\t1\t10", "1\t2\t2\t11"])
    with pytest.raises(DataError) as info:
        load_dataset(str(folder), core=0)
    assert_one_line_error(info.value, str(folder / "low.inter"), "no interactions left")


def test_everything_filtered_out_by_rating_with_default_core(write_atomic):
    folder = write_atomic("low", [INTER_HEADER, "1\t1\t1\t10", "1\t2\t2\t11", "2\t1\t1\t12"])
    with pytest.raises(DataError, match="no interactions left"):
        load_dataset(str(folder))  # min_rating=3 removes every row, then k-core runs on nothing


def test_duplicate_header_field_is_refused(write_atomic):
    folder = write_atomic("dup", ["user_id:token\titem_id:token\titem_id:token", "1\t1\t5", "2\t2\t6"])
    with pytest.raises(DataError, match="item_id"):
        read_atomic(folder / "dup.inter")


def test_cli_reports_bad_folder_in_one_line(write_atomic, capsys):
    folder = write_atomic("bad", [INTER_HEADER, "1\t1\t5\t10", "2\t1\t5"])
    assert main(["data", "info", "--dataset", str(folder)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("recsae: error: ")
    assert str(folder / "bad.inter") in lines[0] and "line 3" in lines[0]
    assert "Traceback" not in captured.err


def test_cli_reports_unknown_dataset_in_one_line(capsys, tmp_path):
    assert main(["data", "info", "--dataset", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("recsae: error: no such dataset")


def test_read_atomic_parses_types_and_strips_cells(tmp_path):
    path = tmp_path / "t.item"
    path.write_text("item_id:token\tgenre:token_seq\tyear:float\r\n1\tA B \t1999\r\n2\t\t2001\r\n")
    table = read_atomic(path, required=("item_id",))
    assert len(table) == 2
    assert table.types == {"item_id": "token", "genre": "token_seq", "year": "float"}
    assert table.columns["genre"] == ["A B", ""]
    assert table.floats("year").tolist() == [1999.0, 2001.0]
    assert table.path == Path(path)
