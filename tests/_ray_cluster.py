"""A local Ray cluster for the tests of offline steps on Ray (issue 19): two worker CPUs, started by `ray start` for
one test module and stopped at its end, joined by address as a user would join theirs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.local import free_port

RAY = str(Path(sys.executable).with_name("ray"))
CLUSTER_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
"""The cluster and every driver that joins it, each a process of its own, share one auth mode. Nothing here joins a
cluster from the pytest process itself: Ray keeps its auth mode per process once set, and the service tests after
this module start local Rays in token mode (ray.init sets RAY_AUTH_MODE=token in this process's environment)."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The address of a local Ray cluster with 2 CPUs (so 2 probe actors), for this module only."""
    import ray

    ray.shutdown()  # an in-process Ray an earlier test left behind is not this cluster
    port = free_port()
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats"], env=CLUSTER_ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def copy_recommender(run: Path, to: Path) -> Path:
    shutil.copytree(run / "recommender", to / "recommender")
    return to


def in_a_fresh_process(args: list[str]) -> subprocess.CompletedProcess:
    """Run as a user would: a process of its own that joins the cluster by address."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
                          env=CLUSTER_ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done
