"""Reading tables as users have them: RecBole atomic files and CSV, the real ML-100K files, column kinds, and
one-line refusals naming the file and the line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsae_core.common.errors import DataError
from recsae_core.data.datasets import locate_dataset
from recsae_core.data.tables import Table, looks_like_text, read_atomic, read_csv, read_table


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def refusal(path: Path, required: tuple[str, ...] = ()) -> str:
    with pytest.raises(DataError) as info:
        read_table(path, required)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


# --- both formats -----------------------------------------------------------------------------------------------


def test_atomic_table_by_suffix(tmp_path):
    path = write(tmp_path / "shop.item", "item_id:token\tgenre:token_seq\tprice:float\n1\tA B \t9.5\n\n2\t\t3\n")
    table = read_table(path, required=("item_id",))
    assert table.format == "atomic" and table.path == path
    assert table.types == {"item_id": "token", "genre": "token_seq", "price": "float"}
    assert table.columns == {"item_id": ["1", "2"], "genre": ["A B", ""], "price": ["9.5", "3"]}
    assert table.line_numbers == [2, 4]  # the blank line is skipped but still counted
    assert table.tokens("genre") == [["A", "B"], []]
    assert table.floats("price").tolist() == [9.5, 3.0]


@pytest.mark.parametrize("suffix", [".inter", ".item", ".user", ".CSV", ".csv"])
def test_format_follows_the_suffix(tmp_path, suffix):
    atomic = suffix.lower() != ".csv"
    text = "user_id:token\titem_id:token\nu\ti\n" if atomic else "user_id,item_id\nu,i\n"
    table = read_table(write(tmp_path / f"log{suffix}", text))
    assert table.format == ("atomic" if atomic else "csv")
    assert table.columns == {"user_id": ["u"], "item_id": ["i"]}


@pytest.mark.parametrize("name", ["log.tsv", "log.txt", "log", "log.csv.gz"])
def test_unknown_suffix_is_refused(tmp_path, name):
    message = refusal(write(tmp_path / name, "user_id,item_id\nu,i\n"))
    assert "unknown table format" in message and ".csv" in message and ".inter" in message


def test_csv_table(tmp_path):
    text = (
        "\ufeffitem_id, title ,genres,year\r\n"  # a byte-order mark and padded names, as spreadsheets write them
        '1,"Toy Story, the first",Animation|Children\'s| Comedy,1995\r\n'
        "\r\n"
        '2,"A title over\ntwo lines",,\r\n'
        "3,Heat,Action,1995\r\n"
    )
    table = read_table(write(tmp_path / "items.csv", text), required=("item_id", "title"))
    assert table.format == "csv" and table.types == {}
    assert list(table.columns) == ["item_id", "title", "genres", "year"]
    assert table.columns["title"] == ["Toy Story, the first", "A title over\ntwo lines", "Heat"]
    assert table.line_numbers == [2, 4, 6]  # the quoted line break makes row 2 two lines long
    assert table.tokens("genres") == [["Animation", "Children's", "Comedy"], [], ["Action"]]
    assert table.tokens("genres", split=False) == [["Animation|Children's| Comedy"], [], ["Action"]]
    assert np.isnan(table.numbers("year")).tolist() == [False, True, False]


# --- refusals, each naming the file and the line ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("log.inter", "user_id:token\titem_id:token\nu\ti\n\nu\n", ("line 4", "expected 2", "found 1")),
        ("log.csv", "user_id,item_id\nu,i\n\nu,i,x\n", ("line 4", "expected 2", "found 3")),
        ("log.inter", "user_id:token\titem_id:token\titem_id:token\nu\ti\tj\n", ("line 1", "'item_id' twice")),
        ("log.csv", "user_id,item_id,item_id\nu,i,j\n", ("line 1", "'item_id' twice")),
        ("log.csv", "user_id,,item_id\nu,x,i\n", ("line 1", "column 2 has no name")),
        ("log.inter", "user_id:token\titem_id:int\nu\ti\n", ("line 1", "'item_id:int'")),
        ("log.inter", b"user_id:token\titem_id:token\nu\ti\nu\t\xff\n", ("line 3", "not UTF-8")),
        ("log.csv", b"user_id,item_id\nu,i\nu,\xe9\n", ("line 3", "not UTF-8")),
        ("log.inter", "", ("empty file",)),
        ("log.csv", "\n\n", ("empty file",)),
        ("log.inter", "user_id:token\titem_id:token\n", ("header only",)),
        ("log.csv", "user_id,item_id\n\n", ("header only",)),
        ("log.csv", f'user_id,item_id\nu,i\nu,"{"x" * 200_000}"\n', ("line 3", "not valid CSV", "field limit")),
    ],
)
def test_bad_file_is_refused_in_one_line(tmp_path, name, content, fragments):
    message = refusal(write(tmp_path / name, content))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    ("name", "content"),
    [("log.inter", "user_id:token\trating:float\nu\t5\n"), ("log.csv", "user_id,rating\nu,5\n")],
)
def test_missing_required_column(tmp_path, name, content):
    message = refusal(write(tmp_path / name, content), required=("user_id", "item_id"))
    assert "line 1" in message and "['item_id']" in message and "'rating'" in message


def test_missing_column_is_named_before_a_bad_row(tmp_path):
    # The header is checked first: a file lacking a column is refused for that, not for a later row.
    message = refusal(write(tmp_path / "log.csv", "user_id\nu\nu,x\n"), required=("item_id",))
    assert "item_id" in message and "line 1" in message


def test_callers_refuse_an_attribute_column_that_does_not_exist(tmp_path):
    table = read_table(write(tmp_path / "users.csv", "user_id,gender\nu,F\n"))
    table.require("gender")
    with pytest.raises(DataError) as info:
        table.require("gender", "age_band")
    assert str(tmp_path / "users.csv") in str(info.value) and "'age_band'" in str(info.value)


def test_missing_file(tmp_path):
    assert "file not found" in refusal(tmp_path / "absent.csv")


def test_numbers_strict_and_lenient(tmp_path):
    table = read_csv(write(tmp_path / "items.csv", "item_id,year\n1,1995\n2,\n3,unknown\n"))
    assert np.isnan(table.numbers("year", strict=False)).tolist() == [False, True, True]
    with pytest.raises(DataError) as info:
        table.numbers("year")
    assert "line 4" in str(info.value) and "'unknown'" in str(info.value)


# --- column kinds -----------------------------------------------------------------------------------------------

DESCRIPTIONS = [
    "A cowboy doll is threatened by a new spaceman figure in a boy's room.",
    "Two rival magicians fight over a secret in Victorian London.",
    "A thief who steals secrets through dreams is given one last job.",
    "A retired hitman goes back to work to avenge his dog.",
]


def kinds_of(table: Table) -> dict[str, str]:
    return {name: table.infer_kind(name) for name in table.columns}


def test_csv_column_kinds(tmp_path):
    rows = [
        ["1", "Toy Story", "Animation|Comedy", "Pixar", "1995", "9.99", DESCRIPTIONS[0]],
        ["2", "The Prestige", "Drama", "Warner", "2006", "", DESCRIPTIONS[1]],
        ["3", "Inception", "Action|Sci-Fi", "Warner", "2010", "12", DESCRIPTIONS[2]],
        ["4", "John Wick", "Action", "Lionsgate", "2014", "7.5", DESCRIPTIONS[3]],
    ]
    lines = ["item_id,title,genres,studio,year,price,description"] + [",".join(f'"{c}"' for c in r) for r in rows]
    table = read_csv(write(tmp_path / "items.csv", "\n".join(lines) + "\n"))
    assert kinds_of(table) == {
        "item_id": "numeric",
        "title": "text",  # distinct, mostly several words
        "genres": "categorical",  # '|' marks several values
        "studio": "categorical",  # repeated single words
        "year": "numeric",
        "price": "numeric",  # empty cells are unknown, not text
        "description": "text",  # long and distinct
    }


def test_atomic_column_kinds_follow_declared_types(tmp_path):
    fields = ["item_id:token", "tags:token_seq", "brand:token", "year:token", "score:float", "embedding:float_seq"]
    header = "\t".join([*fields, "description:token_seq"])
    rows = [f"{i}\ttag{i % 2} shared\tAcme\t{1990 + i}\t{i}.5\t0.{i} 0.{i + 1}\t{DESCRIPTIONS[i]}" for i in range(4)]
    table = read_atomic(write(tmp_path / "shop.item", "\n".join([header, *rows]) + "\n"))
    assert kinds_of(table) == {
        "item_id": "categorical",
        "tags": "categorical",  # token_seq, split on spaces
        "brand": "categorical",
        "year": "categorical",  # declared a token: the file's type is kept
        "score": "numeric",
        "embedding": "categorical",
        "description": "text",  # RecBole has no text type: distinct sentences in a token_seq are free text
    }
    assert table.tokens("tags")[0] == ["tag0", "shared"]
    assert table.tokens("brand")[0] == ["Acme"]


@pytest.mark.parametrize(
    ("values", "text"),
    [
        (["Toy Story", "Heat", "The Prestige", "John Wick"], True),  # distinct, mostly several words
        (["Science Fiction", "Science Fiction", "Film Noir", "Film Noir"], False),  # repeated: a category
        (["Averyveryverylongsingleword" * 2, "Anotherlongsingleword" * 2], True),  # distinct and long
        (["M", "F", "M", "F"], False),
        (["Drama", "Comedy", "Action", "Horror"], False),  # distinct single short words: a category
        ([], False),
    ],
)
def test_looks_like_text(values, text):
    assert looks_like_text(values) is text


def test_atomic_words_are_tokens_not_text():
    # In a token_seq a space separates values: short distinct word lists are tags, long ones free text.
    assert not looks_like_text(["x y", "y z", "z w"], words=False)
    assert looks_like_text(["x y", "y z", "z w"], words=True)
    assert looks_like_text(DESCRIPTIONS, words=False)


# --- the real ML-100K files -------------------------------------------------------------------------------------


def test_real_ml100k_files_read_through_read_table():
    folder = locate_dataset("ml-100k")
    inter = read_table(folder / "ml-100k.inter", required=("user_id", "item_id", "timestamp"))
    assert len(inter) == 100_000 and inter.format == "atomic"
    assert inter.types == {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float"}
    assert inter.floats("rating").sum() == 352_986  # ML-100K's 100k ratings average 3.52986
    items = read_table(folder / "ml-100k.item", required=("item_id",))
    assert len(items) == 1682
    assert kinds_of(items) == {
        "item_id": "categorical",
        # As declared: short token_seq values and a token year. The item metadata reads them as title and year.
        "movie_title": "categorical",
        "release_year": "categorical",
        "class": "categorical",
    }
    assert items.tokens("class")[0] == ["Animation", "Children's", "Comedy"]
    users = read_table(folder / "ml-100k.user", required=("user_id", "gender"))
    assert len(users) == 943 and set(users.columns["gender"]) == {"M", "F"}
