"""A local Ray cluster for the tests of offline steps on Ray (issue 19): two worker CPUs, started by `ray start` for
the first test that asks for it and stopped after the last, joined by address as a user would join theirs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from service.bench_cluster import local_cluster

CLUSTER_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
"""The cluster and every driver that joins it, each a process of its own, share one auth mode. Nothing here joins a
cluster from the pytest process itself: Ray keeps its auth mode per process once set, and the service tests after
this module start local Rays in token mode (ray.init sets RAY_AUTH_MODE=token in this process's environment)."""


class SharedCluster:
    """One cluster for every test that asks for it (the distributed modules run one after another), started on the
    first request and stopped right after the last test that uses it, so the tests after run on a quiet machine.
    Started and stopped as `recsae bench scale` does (only this cluster is stopped, and the machine's current-cluster
    record is put back), not by `ray stop`, which would stop every Ray on the machine."""

    def __init__(self) -> None:
        self.stack: ExitStack | None = None
        self.address = ""
        self.last_user = ""
        """Node id of the last collected test that uses the cluster."""

    def start(self) -> str:
        if self.stack is None:
            import ray

            ray.shutdown()  # an in-process Ray an earlier test left behind is not this cluster
            self.stack = ExitStack()
            saved = os.environ.get("RAY_AUTH_MODE")
            # local_cluster sets this process's auth mode for a driver it never starts here: put back at the stop
            self.stack.callback(lambda: os.environ.pop("RAY_AUTH_MODE", None) if saved is None
                                else os.environ.__setitem__("RAY_AUTH_MODE", saved))  # fmt: skip
            try:
                self.address = self.stack.enter_context(local_cluster(cpus=2))
            except BaseException:
                self.stop()
                raise
        return self.address

    def stop(self) -> None:
        stack, self.stack = self.stack, None
        if stack is not None:
            stack.close()


SHARED = SharedCluster()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users = [item.nodeid for item in items if "cluster" in getattr(item, "fixturenames", ())]
    SHARED.last_user = users[-1] if users else ""


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if item.nodeid == SHARED.last_user:
        SHARED.stop()


@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    """The address of a local Ray cluster with 2 CPUs (so 2 probe actors), shared by the tests that use it."""
    try:
        yield SHARED.start()
    finally:
        SHARED.stop()


def copy_recommender(run: Path, to: Path) -> Path:
    shutil.copytree(run / "recommender", to / "recommender")
    return to


def in_a_fresh_process(args: list[str]) -> subprocess.CompletedProcess:
    """Run as a user would: a process of its own that joins the cluster by address."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
                          env=CLUSTER_ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done
