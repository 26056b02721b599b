"""Deterministic train / valid / test splits under RecBole's leaderboard protocol or leave-one-out."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from recsae_core.common.errors import ConfigError
from recsae_core.data.datasets import Dataset

PROTOCOLS: tuple[str, ...] = ("recbole", "loo")
Stage = Literal["valid", "test"]


@dataclass(frozen=True)
class Ragged:
    """Per-user item lists in compressed-row form (user u's items are values[indptr[u]:indptr[u+1]])."""

    indptr: np.ndarray
    """int64, length n_users + 1."""
    values: np.ndarray
    """int64 item indices, each user's in chronological order."""

    def row(self, user: int) -> np.ndarray:
        return self.values[self.indptr[user] : self.indptr[user + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @classmethod
    def from_lists(cls, rows: list[np.ndarray]) -> Ragged:
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.concatenate(rows).astype(np.int64) if rows and indptr[-1] else np.zeros(0, np.int64)
        return cls(indptr=indptr, values=values)

    @staticmethod
    def concat(a: Ragged, b: Ragged) -> Ragged:
        n = len(a.indptr) - 1
        return Ragged.from_lists([np.concatenate([a.row(u), b.row(u)]) for u in range(n)])


@dataclass(frozen=True)
class Split:
    """Train / valid / test item lists per user; seen items for a stage are the earlier parts."""

    protocol: str
    """'recbole' or 'loo'."""
    sequential: bool
    """True when valid/test are the user's last items by time (leave-one-out)."""
    seed: int
    """Seed of the random split (unused by leave-one-out)."""
    n_users: int
    """Number of users."""
    n_items: int
    """Number of items."""
    train: Ragged
    """Training items per user, chronological."""
    valid: Ragged
    """Validation targets per user."""
    test: Ragged
    """Test targets per user."""

    def seen(self, stage: Stage) -> Ragged:
        """Items a user had interacted with before `stage`: masked in ranking, and the input of sequential models."""
        return self.train if stage == "valid" else self.seen_before_test

    @cached_property
    def seen_before_test(self) -> Ragged:
        """Train and valid items per user, built once: every batch of a test ranking masks them."""
        return Ragged.concat(self.train, self.valid)

    def targets(self, stage: Stage) -> Ragged:
        return self.valid if stage == "valid" else self.test

    def item_popularity(self) -> np.ndarray:
        """Training-interaction count per item (never counts valid/test interactions)."""
        return np.bincount(self.train.values, minlength=self.n_items).astype(np.int64)

    @property
    def n_train(self) -> int:
        return int(self.train.indptr[-1])


def recbole_ratio_counts(total: int, ratios: tuple[float, float, float]) -> list[int]:
    """How RecBole sizes a per-user ratio split (so tiny groups still get valid/test items where possible)."""
    counts = [int(r * total) for r in ratios]
    counts[0] = total - sum(counts[1:])
    for i in range(1, len(ratios)):
        if counts[0] <= 1:
            break
        if 0 < ratios[-i] * total < 1:
            counts[-i] += 1
            counts[0] -= 1
    return counts


def make_split(dataset: Dataset, protocol: str, sequential: bool, seed: int = 2020) -> Split:
    """Split a dataset: sequential models (or protocol 'loo') leave the last two items out by time."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}': expected one of {', '.join(PROTOCOLS)}")
    by_time = sequential or protocol == "loo"
    # Chronological per-user order; ties broken by original row order for determinism.
    order = np.lexsort((np.arange(dataset.n_interactions), dataset.timestamps, dataset.users))
    users, items = dataset.users[order], dataset.items[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=dataset.n_users))])
    rng = np.random.default_rng(seed)
    train_rows, valid_rows, test_rows = [], [], []
    for u in range(dataset.n_users):
        row = items[indptr[u] : indptr[u + 1]]
        if by_time:
            if len(row) < 3:
                train_rows.append(row)
                valid_rows.append(row[:0])
                test_rows.append(row[:0])
                continue
            train_rows.append(row[:-2])
            valid_rows.append(row[-2:-1])
            test_rows.append(row[-1:])
        else:
            n_train, n_valid, _ = recbole_ratio_counts(len(row), (0.8, 0.1, 0.1))
            positions = rng.permutation(len(row))
            train_pos = np.sort(positions[:n_train])  # keep training items chronological
            train_rows.append(row[train_pos])
            valid_rows.append(row[positions[n_train : n_train + n_valid]])
            test_rows.append(row[positions[n_train + n_valid :]])
    return Split(
        protocol=protocol,
        sequential=by_time,
        seed=seed,
        n_users=dataset.n_users,
        n_items=dataset.n_items,
        train=Ragged.from_lists(train_rows),
        valid=Ragged.from_lists(valid_rows),
        test=Ragged.from_lists(test_rows),
    )
