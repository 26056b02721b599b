"""Shared fixtures: real MovieLens data loaded once per session, and a writer for tiny atomic-file datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from recsae_core.data.datasets import Dataset, load_dataset
from recsae_core.data.splits import Split, make_split

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


@pytest.fixture(scope="session")
def ml100k() -> Dataset:
    """ML-100K under the default (RecBole leaderboard) filters."""
    return load_dataset("ml-100k")


@pytest.fixture(scope="session")
def ml100k_split(ml100k: Dataset) -> Split:
    """The general-model split: per-user random 8:1:1 with the default seed."""
    return make_split(ml100k, "recbole", sequential=False)


@pytest.fixture(scope="session")
def ml100k_seq_split(ml100k: Dataset) -> Split:
    """The sequential-model split: leave-one-out by time."""
    return make_split(ml100k, "recbole", sequential=True)


@pytest.fixture
def split_for(ml100k_split: Split, ml100k_seq_split: Split) -> Callable[[str], Split]:
    """split_for(model name) -> the split that model trains on (leave-one-out for SASRec, random 8:1:1 otherwise)."""
    return lambda name: ml100k_seq_split if name == "sasrec" else ml100k_split


@pytest.fixture(scope="session")
def ml1m() -> Dataset:
    """ML-1M under the default filters (about 6 s to load, so once per session)."""
    return load_dataset("ml-1m")


AtomicWriter = Callable[..., Path]


@pytest.fixture
def write_atomic(tmp_path: Path) -> AtomicWriter:
    """write_atomic(name, inter=..., item=..., user=...) -> tmp_path/name holding name.inter etc.

    Each argument is the file's full text, or a list of lines joined with newlines (a trailing newline is added).
    A suffix left as None is not written, so a folder without name.inter can be made too.
    """

    def write(name: str, inter: str | list[str] | None = None, **others: str | list[str] | bytes) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        for suffix, content in {"inter": inter, **others}.items():
            if content is None:
                continue
            path = folder / f"{name}.{suffix}"
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content if isinstance(content, str) else "\n".join(content) + "\n")
        return folder

    return write
