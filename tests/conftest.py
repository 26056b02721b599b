"""Shared fixtures, each defined once: real MovieLens data, short-trained runs, the service bundle, and a writer for
tiny atomic-file datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bundle_fixture import build_test_bundle

from recsae_core.data.datasets import Dataset, load_dataset
from recsae_core.data.splits import Split, make_split
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.run import train_step

pytest_plugins = ("_ray_cluster",)  # the `cluster` fixture of the tests of offline steps on Ray

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


# Quality does not matter for the shared runs, only real weights: the fewest epochs that train a real model.
SHARED_RUN_EPOCHS = {"sasrec": 1, "bprmf": 2}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """trained_run(model) -> a run folder holding only `recommender/`: `model` trained briefly on ML-100K (recbole
    protocol), once per session on first request. Tests write probes, SAEs and bundles elsewhere, or on a copy."""
    runs: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in runs:
            run_dir = tmp_path_factory.mktemp(f"shared-run-{model}")
            config = TrainConfig(epochs=SHARED_RUN_EPOCHS[model], progress=False)
            train_step(run_dir, "ml-100k", model, "recbole", config)
            runs[model] = run_dir
        return runs[model]

    return get


@pytest.fixture(scope="session")
def service_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real bundle every service test serves (SASRec on ML-100K + TopK SAE + catalog + policies; see
    bundle_fixture.py), built once per session, or $RECSAE_TEST_BUNDLE."""
    return build_test_bundle(tmp_path_factory.getbasetemp() / "service-bundle")


@pytest.fixture(scope="session")
def fitted_bundle(service_bundle: Path, ml100k: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service bundle written again with fitted policies (erase, calibrated, spectral, popsteer, and one made for
    another SAE), fit on its own data; see fitted_policies.py."""
    from fitted_policies import bundle_with_fitted_policies

    return bundle_with_fitted_policies(service_bundle, ml100k, tmp_path_factory.getbasetemp() / "fitted-bundle")
