"""A local Ray cluster for the tests of offline steps on Ray (issue 19): two worker CPUs, started by `ray start` for
one test module and stopped at its end, joined by address as a user would join theirs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.bench_cluster import local_cluster

CLUSTER_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
"""The cluster and every driver that joins it, each a process of its own, share one auth mode. Nothing here joins a
cluster from the pytest process itself: Ray keeps its auth mode per process once set, and the service tests after
this module start local Rays in token mode (ray.init sets RAY_AUTH_MODE=token in this process's environment)."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The address of a local Ray cluster with 2 CPUs (so 2 probe actors), for this module only. Started and stopped
    as `recsae bench scale` does (only this cluster is stopped, and the machine's current-cluster record is put back),
    not by `ray stop`, which would stop every Ray on the machine."""
    import ray

    ray.shutdown()  # an in-process Ray an earlier test left behind is not this cluster
    saved = os.environ.get("RAY_AUTH_MODE")
    try:
        with local_cluster(cpus=2) as address:
            yield address
    finally:  # local_cluster sets this process's auth mode for a driver it never starts here
        os.environ.pop("RAY_AUTH_MODE", None) if saved is None else os.environ.__setitem__("RAY_AUTH_MODE", saved)


def copy_recommender(run: Path, to: Path) -> Path:
    shutil.copytree(run / "recommender", to / "recommender")
    return to


def in_a_fresh_process(args: list[str]) -> subprocess.CompletedProcess:
    """Run as a user would: a process of its own that joins the cluster by address."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
                          env=CLUSTER_ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done
