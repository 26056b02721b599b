"""Splits: RecBole's per-user 8:1:1 random split and leave-one-out by time."""

from __future__ import annotations

import numpy as np
import pytest

from recsae_core.common.errors import ConfigError
from recsae_core.data.datasets import load_dataset
from recsae_core.data.splits import Ragged, make_split, recbole_ratio_counts

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
RATIOS = (0.8, 0.1, 0.1)


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (10, [8, 1, 1]),  # 8 = 10 - 1 - 1
        (20, [16, 2, 2]),
        (19, [17, 1, 1]),  # int(1.9) = 1 each, the rest trains
        (5, [3, 1, 1]),  # int(0.5) = 0, but 0 < 0.5 < 1 moves one item to test, then one to valid
        (3, [1, 1, 1]),
        (2, [1, 0, 1]),  # test gets one; train is then down to 1 and keeps it
        (1, [1, 0, 0]),
    ],
)
def test_recbole_ratio_counts_by_hand(total, expected):
    assert recbole_ratio_counts(total, RATIOS) == expected


def test_recbole_ratio_counts_always_sum_to_total():
    for total in range(1, 200):
        counts = recbole_ratio_counts(total, RATIOS)
        assert sum(counts) == total and min(counts) >= 0 and counts[0] >= 1
        if total >= 3:
            assert counts[1] >= 1 and counts[2] >= 1


def test_random_split_sizes_follow_recbole_per_user(ml100k, ml100k_split):
    split = ml100k_split
    assert (split.protocol, split.sequential, split.seed) == ("recbole", False, 2020)
    totals = np.bincount(ml100k.users, minlength=ml100k.n_users)
    expected = np.array([recbole_ratio_counts(int(t), RATIOS) for t in totals])
    assert (split.train.lengths == expected[:, 0]).all()
    assert (split.valid.lengths == expected[:, 1]).all()
    assert (split.test.lengths == expected[:, 2]).all()
    assert split.n_train + split.valid.indptr[-1] + split.test.indptr[-1] == ml100k.n_interactions
    # Roughly 8:1:1 overall.
    assert 0.78 < split.n_train / ml100k.n_interactions < 0.82


def test_random_split_partitions_each_users_items(ml100k, ml100k_split):
    split = ml100k_split
    order = np.argsort(ml100k.users, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(ml100k.users, minlength=ml100k.n_users))])
    time_of = {(int(u), int(i)): t for u, i, t in zip(ml100k.users, ml100k.items, ml100k.timestamps, strict=True)}
    for u in range(ml100k.n_users):
        mine = np.sort(ml100k.items[order[indptr[u] : indptr[u + 1]]])
        train, valid, test = split.train.row(u), split.valid.row(u), split.test.row(u)
        parts = np.concatenate([train, valid, test])
        assert (np.sort(parts) == mine).all(), u
        assert len(set(train.tolist()) | set(valid.tolist()) | set(test.tolist())) == len(parts), u
        times = [time_of[(u, int(i))] for i in train]
        assert times == sorted(times), u  # training items are kept in chronological order


def test_random_split_is_seeded(ml100k, ml100k_split):
    again = make_split(ml100k, "recbole", sequential=False, seed=2020)
    for part in ("train", "valid", "test"):
        assert (getattr(again, part).values == getattr(ml100k_split, part).values).all()
        assert (getattr(again, part).indptr == getattr(ml100k_split, part).indptr).all()
    other = make_split(ml100k, "recbole", sequential=False, seed=7)
    assert (other.valid.indptr == ml100k_split.valid.indptr).all()  # same sizes ...
    assert (other.valid.values != ml100k_split.valid.values).mean() > 0.5  # ... different items
    assert (other.test.values != ml100k_split.test.values).mean() > 0.5


def test_seen_and_targets(ml100k_split):
    split = ml100k_split
    assert split.seen("valid") is split.train
    assert split.targets("valid") is split.valid and split.targets("test") is split.test
    seen_test = split.seen("test")
    for u in (0, 1, 500, split.n_users - 1):
        assert seen_test.row(u).tolist() == split.train.row(u).tolist() + split.valid.row(u).tolist()
    assert (seen_test.lengths == split.train.lengths + split.valid.lengths).all()


def test_item_popularity_counts_training_only(ml100k, ml100k_split):
    popularity = ml100k_split.item_popularity()
    assert popularity.shape == (ml100k.n_items,)
    assert (popularity == np.bincount(ml100k_split.train.values, minlength=ml100k.n_items)).all()
    assert popularity.sum() == ml100k_split.n_train
    assert (popularity <= np.bincount(ml100k.items, minlength=ml100k.n_items)).all()
    assert popularity.sum() < ml100k.n_interactions


@pytest.fixture
def timed_dataset(write_atomic):
    """Rows deliberately out of time order; user c has a timestamp tie, user d only two items."""
    rows = [
        INTER_HEADER,
        "a\ti3\t5\t300",
        "a\ti1\t5\t100",
        "b\ti1\t4\t50",
        "a\ti4\t5\t400",
        "a\ti2\t5\t200",
        "c\ti2\t5\t10",
        "c\ti5\t5\t20",  # tie with the next row at t=20: file order decides (i5 before i6)
        "c\ti6\t5\t20",
        "b\ti5\t4\t60",
        "b\ti2\t4\t55",
        "d\ti1\t5\t1",
        "d\ti2\t5\t2",
    ]
    return load_dataset(str(write_atomic("timed", rows)), min_rating=None, core=0)


def tokens(data, row: np.ndarray) -> list[str]:
    return [data.item_tokens[i] for i in row]


def test_leave_one_out_takes_the_last_two_by_time(timed_dataset):
    data = timed_dataset
    split = make_split(data, "loo", sequential=False)
    assert split.sequential
    expected = {
        "a": (["i1", "i2"], ["i3"], ["i4"]),
        "b": (["i1"], ["i2"], ["i5"]),
        "c": (["i2"], ["i5"], ["i6"]),
        "d": (["i1", "i2"], [], []),  # fewer than 3 interactions: everything trains
    }
    for token, (train, valid, test) in expected.items():
        u = data.user_tokens.index(token)
        assert tokens(data, split.train.row(u)) == train, token
        assert tokens(data, split.valid.row(u)) == valid, token
        assert tokens(data, split.test.row(u)) == test, token
        assert tokens(data, split.seen("test").row(u)) == train + valid, token
    # Popularity counts only training rows: i1 trains for a, b, d; i2 for a, c, d (b's i2 is validation).
    popularity = dict(zip(data.item_tokens, split.item_popularity().tolist(), strict=True))
    assert popularity == {"i1": 3, "i2": 3, "i3": 0, "i4": 0, "i5": 0, "i6": 0}


def test_sequential_models_always_get_leave_one_out(timed_dataset):
    a = make_split(timed_dataset, "recbole", sequential=True, seed=1)
    b = make_split(timed_dataset, "loo", sequential=False, seed=2)
    assert a.sequential and b.sequential
    for part in ("train", "valid", "test"):
        assert (getattr(a, part).values == getattr(b, part).values).all()


def test_leave_one_out_on_ml100k(ml100k, ml100k_seq_split):
    split = ml100k_seq_split
    assert (split.valid.lengths == 1).all() and (split.test.lengths == 1).all()  # 10-core: everyone has >= 3
    latest = {}
    for u, i, t in zip(ml100k.users, ml100k.items, ml100k.timestamps, strict=True):
        latest.setdefault(int(u), []).append((t, int(i)))
    for u in (0, 17, 400, ml100k.n_users - 1):
        history = [i for _, i in sorted(latest[u], key=lambda pair: pair[0])]
        assert split.test.row(u)[0] in history[-2:]
        assert max(t for t, i in latest[u] if i in split.train.row(u)) <= min(
            t for t, i in latest[u] if i in (split.valid.row(u)[0], split.test.row(u)[0])
        )


def test_unknown_protocol(ml100k):
    with pytest.raises(ConfigError, match="unknown protocol 'temporal'"):
        make_split(ml100k, "temporal", sequential=False)


def test_ragged_helpers():
    r = Ragged.from_lists([np.array([3, 1]), np.array([], dtype=np.int64), np.array([2])])
    assert r.indptr.tolist() == [0, 2, 2, 3] and r.values.tolist() == [3, 1, 2]
    assert r.lengths.tolist() == [2, 0, 1] and r.row(1).tolist() == []
    both = Ragged.concat(r, Ragged.from_lists([np.array([9]), np.array([8]), np.array([], dtype=np.int64)]))
    assert [both.row(u).tolist() for u in range(3)] == [[3, 1, 9], [8], [2]]
    empty = Ragged.from_lists([np.array([], dtype=np.int64)] * 2)
    assert empty.values.shape == (0,) and empty.indptr.tolist() == [0, 0, 0]
