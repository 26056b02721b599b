"""The load benchmark: pooling of interleaved rounds, and the in-process timing of the replica's request path (the
HTTP runs themselves are exercised by `recsae bench serve` in docs/benchmarks.md; they need minutes of wall time,
which the suite does not spend)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from service.bench import MODES, LoadRun, replica_bench, summarize
from service.served import Served


def test_summarize_pools_rounds_before_taking_percentiles():
    runs = [LoadRun([1.0, 2.0, 3.0], 0, 2.0), LoadRun([10.0, 20.0, 30.0, 40.0], 1, 2.0)]
    out = summarize(runs)
    # Pooled p50 of [1, 2, 3, 10, 20, 30, 40] is 10, not the mean of the per-round medians (2 and 25).
    assert out["p50_ms"] == 10.0
    assert out["requests"] == 7 and out["errors"] == 1 and out["rounds"] == 2
    assert out["rps"] == round(7 / 4.0, 1)


def test_summarize_without_successes_reports_nan_latency():
    out = summarize([LoadRun([], 3, 1.0)])
    assert math.isnan(out["p50_ms"]) and out["rps"] == 0.0 and out["errors"] == 3


@pytest.fixture(scope="module")
def served_on_ray(service_bundle: Path) -> Iterator[tuple[Served, Path]]:
    """A small real bundle, loaded as a replica serves it, with a local Ray for the metrics (no Serve app:
    replica_bench drives the replica's request path in process)."""
    bundle = service_bundle
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield Served.load(bundle, threads=1), bundle
    finally:
        ray.shutdown()


def test_replica_bench_times_every_stage_of_every_mode(served_on_ray: tuple[Served, Path]) -> None:
    served, bundle = served_on_ray
    out = replica_bench(served, bundle, n=60)
    stages = ("parse", "engine", "metrics", "response", "flush", "total")
    for mode in MODES:
        assert all(math.isfinite(out[mode][s]) and out[mode][s] >= 0 for s in stages), out[mode]
        assert out[mode]["total"] == pytest.approx(sum(out[mode][s] for s in stages[:-1]), abs=1e-3)
    for mode in ("monitor", "steer"):
        assert out[mode]["added_ms"] == pytest.approx(out[mode]["total"] - out["bare"]["total"], abs=1e-3)
    assert "added_ms" not in out["bare"]
