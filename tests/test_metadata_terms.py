"""The metadata labeler's term space from a table's own columns: made-up categorical, numeric and text columns and
user attributes give the expected terms and wording, and MovieLens keeps exactly the vocabulary (keys and matrices)
the catalog has always had, whether its tables fill the generic columns or only the older fixed fields."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest

from recsae_core.concepts.labelers import MOVIELENS_KINDS, Term, TermSpace, describe_terms, display, make_tfidf_label
from recsae_core.concepts.metadata_terms import (
    MAX_VALUES,
    column_numbers,
    column_values,
    format_number,
    legacy_item_columns,
)
from recsae_core.data.datasets import Column, Dataset, ItemMeta, UserMeta
from recsae_core.data.splits import Ragged, Split

NAN = float("nan")

# What the catalog's term space was for ML-100K before the term space read the tables' columns (commit d0d95ef).
ML100K_ITEM_TERMS = [
    *(f"genre:{g}" for g in ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                             "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                             "Thriller", "War", "Western")),
    *(f"decade:{d}s" for d in range(1920, 2000, 10)),
    "pop:mid-popular", "pop:niche", "pop:popular",
]  # fmt: skip
ML100K_USER_TERMS = [
    "gender:female", "gender:male",
    *(f"age:{a}" for a in ("18-24", "25-34", "35-44", "45-49", "50-55", "56+", "under 18")),
    *(f"occupation:{o}" for o in ("administrator", "artist", "doctor", "educator", "engineer", "entertainment",
                                  "executive", "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none",
                                  "other", "programmer", "retired", "salesman", "scientist", "student", "technician",
                                  "writer")),
]  # fmt: skip


def toy_dataset() -> tuple[Dataset, Split]:
    """6 items and 6 users with columns no mapping knows (and one named like a built-in term kind)."""
    items = {
        "item_id": Column("categorical", tokens=[[f"i{i}"] for i in range(6)]),  # the key: never terms
        "name": Column("text", texts=["Atlas", "Bard", "Cello", "Drum", "Epic", ""]),
        "category": Column(
            "categorical", tokens=[["Books", "Kids"], ["Books"], ["Music"], ["Music", "Kids"], ["Rare"], []]
        ),
        "pub_year": Column("numeric", numbers=np.array([1994, 1999, 2003, NAN, 2011, 1987.0])),
        "price": Column("numeric", numbers=np.array([3.0, 10.0, 25.0, 7.5, 99.0, 50.0])),
        "rating": Column("numeric", numbers=np.array([4, 5, 4, 3, NAN, 5.0])),
        "pop": Column("categorical", tokens=[["x"], ["x"], ["y"], ["y"], ["y"], ["x"]]),
    }
    users = {
        "plan": Column("categorical", tokens=[["gold"], ["free"], ["gold"], [], ["free"], []]),
        "income": Column("numeric", numbers=np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])),
        "signup year": Column("numeric", numbers=np.array([2012, 2015, 2021, 2019, NAN, NAN])),
        "category": Column("categorical", tokens=[["a"], ["b"], ["a"], ["b"], ["a"], ["b"]]),
        "bio": Column("text", texts=["likes books", "", "music", "drums", "reads", ""]),
    }
    n_items, n_users = 6, 6
    item_meta = ItemMeta(titles=["Atlas", "Bard", "Cello", "Drum", "Epic", "i5"], years=np.full(n_items, -1),
                         genres=[[] for _ in range(n_items)], columns=items)  # fmt: skip
    user_meta = UserMeta(gender=[""] * n_users, age=[""] * n_users, occupation=[""] * n_users, columns=users)
    histories = [np.array(h) for h in ([0, 1, 2], [2, 3], [0, 2, 4], [5, 2], [1, 2], [3])]
    flat_users = np.concatenate([np.full(len(h), u) for u, h in enumerate(histories)])
    data = Dataset(
        name="toy",
        user_tokens=[f"u{u}" for u in range(n_users)],
        item_tokens=[f"i{i}" for i in range(n_items)],
        users=flat_users,
        items=np.concatenate(histories),
        timestamps=np.arange(len(flat_users), dtype=float),
        item_meta=item_meta,
        user_meta=user_meta,
    )
    empty = Ragged.from_lists([np.zeros(0, dtype=np.int64)] * n_users)
    split = Split("loo", True, 0, n_users, n_items, Ragged.from_lists(histories), empty, empty)
    return data, split


def test_made_up_columns_give_the_expected_terms():
    data, split = toy_dataset()
    space = TermSpace.build(data, split)
    assert space.item_terms == [
        "category:Books", "category:Kids", "category:Music",  # 'Rare' is held by one item only
        "pub_year:1980s", "pub_year:1990s", "pub_year:2000s", "pub_year:2010s",  # a year column: decades
        "price:low", "price:mid", "price:high",  # tertile bands of a many-valued number
        "rating:3", "rating:4", "rating:5",  # a few values: one term each
        "item_pop:x", "item_pop:y",  # a column named like the popularity terms keeps out of their way
        "pop:mid-popular", "pop:niche", "pop:popular",
    ]  # fmt: skip
    assert space.user_terms == [
        "plan:free", "plan:gold", "income:low", "income:mid", "income:high", "signup_year:2010s", "signup_year:2020s",
        "user_category:a", "user_category:b",  # the item table has 'category' already
    ]  # fmt: skip
    assert not any(t.startswith(("name:", "bio:", "item_id:")) for t in space.terms)  # text and keys: no terms
    rows = {t: space.items[:, i].toarray().ravel().tolist() for i, t in enumerate(space.item_terms)}
    assert rows["category:Books"] == [1, 1, 0, 0, 0, 0] and rows["category:Kids"] == [1, 0, 0, 1, 0, 0]
    assert rows["pub_year:1990s"] == [1, 1, 0, 0, 0, 0] and rows["pub_year:2010s"] == [0, 0, 0, 0, 1, 0]
    assert rows["price:low"] == [1, 0, 0, 1, 0, 0] and rows["price:high"] == [0, 0, 0, 0, 1, 1]
    assert rows["rating:5"] == [0, 1, 0, 0, 0, 1] and sum(rows["pop:popular"]) >= 1
    user_rows = {t: space.users[:, i].toarray().ravel().tolist() for i, t in enumerate(space.user_terms)}
    assert user_rows["plan:gold"] == [1, 0, 1, 0, 0, 0] and user_rows["plan:free"] == [0, 1, 0, 0, 1, 0]
    assert user_rows["income:low"] == [1, 1, 0, 0, 0, 0] and user_rows["income:high"] == [0, 0, 0, 0, 1, 1]
    assert user_rows["signup_year:2020s"] == [0, 0, 1, 0, 0, 0]
    assert space.kinds == {"category": "category", "pub_year": "era", "price": "measure", "rating": "measure",
                           "item_pop": "category", "pop": "pop", "plan": "user", "income": "user",
                           "signup_year": "user", "user_category": "user"}  # fmt: skip
    assert space.user_kinds == ["plan", "income", "signup_year", "user_category"]
    # The sample matrix carries every term: recent, last and next items, history length, user, item identities.
    x = space.sample_matrix(split, np.array([0, 2]), np.array([2, 1]), np.array([3, 5]), recent=10)
    assert x.shape == (2, len(space.terms))
    last_price_low = space.terms.index("last price:low")
    assert x[0, last_price_low] == 0 and x[1, last_price_low] == 0  # user 0's and 2's items at positions 2, 1
    assert x[0, space.terms.index("next price:low")] == 1  # item 3 costs 7.5


def test_made_up_terms_read_in_names_and_descriptions():
    data, split = toy_dataset()
    kinds = TermSpace.build(data, split).kinds
    assert [display(t) for t in ("price:high", "rating:4", "next category:Books", "last pub_year:1990s")] == [
        "high price", "rating 4", "Books", "1990s",
    ]  # fmt: skip
    terms = [Term("next category:Books", 0.9, 0.1, 5, 2), Term("next price:high", 0.8, 0.2, 3, 1),
             Term("last pub_year:1990s", 0.6, 0.2, 2, 0.5), Term("plan:gold", 0.7, 0.3, 2, 0.4),
             Term("income:high", 0.5, 0.3, 1.5, 0.2)]  # fmt: skip
    label = make_tfidf_label(terms, kinds)
    assert label.name == "books-high-price"
    assert label.longer == ("books-high-price-1990s", "books-high-price-1990s-gold")
    assert label.description == ("After titles from the 1990s, the model recommends Books titles with high price "
                                 "next; users skew plan gold and high income.")  # fmt: skip
    # Without the space's kinds, the MovieLens wording is unchanged (see test_concepts) and other kinds are not
    # mistaken for it.
    assert describe_terms(["next genre:Horror", "gender:female"]) == (
        "The model recommends Horror titles next; users skew female."
    )


def test_column_values_of_every_kind():
    assert column_values(Column("numeric", numbers=np.array([25.0, NAN, 2.5]))) == [["25"], [], ["2.5"]]
    assert column_values(Column("text", texts=["a title", ""])) == [["a title"], []]
    assert column_values(Column("categorical", tokens=[["x", ""], []])) == [["x"], []]
    numbers = column_numbers(Column("categorical", tokens=[["1995"], ["unknown"], []]))
    assert numbers[0] == 1995 and np.isnan(numbers[1:]).all()
    assert format_number(1995.0) == "1995" and format_number(0.25) == "0.25"


def test_a_many_valued_column_keeps_its_most_frequent_values():
    n = 2 * (MAX_VALUES + 10)
    tokens = [[f"tag{i // 2}"] for i in range(n)]  # MAX_VALUES + 10 tags, two items each ...
    tokens[0] = tokens[1] = tokens[2] = ["tag0"]  # ... but tag0 has three (and tag1 one, so it is dropped)
    data, _ = toy_dataset()
    meta = copy.copy(data.item_meta)
    meta.columns = {"tags": Column("categorical", tokens=tokens)}
    big = copy.copy(data)
    big.item_meta, big.item_tokens = meta, [str(i) for i in range(n)]
    space = TermSpace.build(big, SimpleNamespace(item_popularity=lambda: np.ones(n, dtype=np.int64)))
    tags = [t for t in space.item_terms if t.startswith("tags:")]
    assert len(tags) == MAX_VALUES and "tags:tag0" in tags and "tags:tag1" not in tags


def _legacy_only(data: Dataset) -> Dataset:
    """The dataset as a reader that fills only the fixed fields would give it."""
    legacy = copy.copy(data)
    legacy.item_meta = copy.copy(data.item_meta)
    legacy.item_meta.columns = {}
    legacy.user_meta = copy.copy(data.user_meta)
    legacy.user_meta.columns = {}
    return legacy


def _same_space(a: TermSpace, b: TermSpace) -> None:
    assert a.terms == b.terms
    assert (a.items != b.items).nnz == 0 and (a.users != b.users).nnz == 0
    np.testing.assert_array_equal(a.popularity_percentile, b.popularity_percentile)


def test_movielens_100k_vocabulary_is_unchanged(ml100k, ml100k_seq_split):
    space = TermSpace.build(ml100k, ml100k_seq_split)
    assert space.item_terms == ML100K_ITEM_TERMS and space.user_terms == ML100K_USER_TERMS
    assert space.kinds == MOVIELENS_KINDS
    assert len(space.item_names) == ml100k.n_items and space.item_names[0].startswith("item:")
    _same_space(space, TermSpace.build(_legacy_only(ml100k), ml100k_seq_split))
    # The MovieLens names map, whatever kind the reader gave them: 'class' is the genre column, 'release_year' the
    # decades, and titles and zip codes give no terms.
    assert legacy_item_columns(ml100k.item_meta).keys() == {"genre", "release_year"}
    assert not any(t.startswith(("movie_title:", "zip_code:", "class:", "release_year:")) for t in space.terms)


@pytest.mark.slow
def test_movielens_1m_vocabulary_is_unchanged(ml1m):
    split = SimpleNamespace(item_popularity=lambda: np.bincount(ml1m.items, minlength=ml1m.n_items))
    space = TermSpace.build(ml1m, split)
    _same_space(space, TermSpace.build(_legacy_only(ml1m), split))
    assert {"occupation:programmer", "occupation:K-12 student", "age:25-34", "age:under 18", "gender:female"} <= set(
        space.user_terms
    )
    assert len([t for t in space.item_terms if t.startswith("genre:")]) == 18  # ML-1M's genre column is one token
