"""Probe throughput in one process and on Ray Data with several worker counts (issue 19), on a run's recommender.

Each measurement probes a fresh copy of the run's recommender into a run folder of its own: first in this process
(`collect`), then on the Ray cluster at `address`, once per worker count (`collect_on_ray`). Rows/s counts probed
samples over the probe's wall time, the actors' start and each actor's loading of the run included (that is what a
user waits for). Every Ray probe's shards must equal the one-process probe's byte for byte; the result says so.
"""

from __future__ import annotations

import filecmp
import shutil
import time
from pathlib import Path
from typing import Any

from recsae_core.common.layout import RunLayout
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.probe.collect import collect
from recsae_core.probe.on_ray import collect_on_ray
from recsae_core.recommenders.run import load_run


def fresh_run(src: Path, work: Path, name: str) -> Path:
    """A new run folder under `work` holding a copy of `src`'s recommender only."""
    run = work / name
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(src / "recommender", run / "recommender")
    return run


def same_probe(a: Path, b: Path) -> bool:
    """Whether two probe folders hold the same files, byte for byte."""
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def _figures(samples: int, started: float, loaded: float) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    return {"samples": samples, "seconds": round(seconds, 2), "load_run_s": round(loaded - started, 2),
            "rows_per_s": round(samples / seconds, 1)}  # fmt: skip


def probe_throughput(
    run: Path, work: Path, address: str, workers: list[int], batch_size: int = 2048, progress: bool = False
) -> dict[str, Any]:
    """{"one_process": {...}, "ray": {"1": {...}, "2": {...}}, "ratio": rows/s with 2 workers over 1 (when both
    were measured)}; runs are copied under `work`. Every wall time includes the loading of the run in this process
    (`load_run_s`, as a user's `recsae pipeline` loads it); the Ray probes also include their actors' start and each
    actor's own loading of the run."""
    base = fresh_run(run, work, "probe-one-process")
    t0 = time.perf_counter()
    ctx = load_run(base)
    t1 = time.perf_counter()
    probe = collect(ctx, batch_size=batch_size, progress=progress)
    result: dict[str, Any] = {"batch_size": batch_size, "one_process": _figures(probe.n_samples, t0, t1), "ray": {}}
    for n in workers:
        copy = fresh_run(run, work, f"probe-ray-{n}")
        t0 = time.perf_counter()
        ctx = load_run(copy)
        t1 = time.perf_counter()
        got = collect_on_ray(ctx, RayConfig(address=address, workers=n), batch_size=batch_size, progress=progress)
        figures = _figures(got.n_samples, t0, t1)
        figures["identical_to_one_process"] = same_probe(RunLayout(base).probe, RunLayout(copy).probe)
        result["ray"][str(n)] = figures
        shutil.rmtree(copy)
    shutil.rmtree(base)
    rates = {n: r["rows_per_s"] for n, r in result["ray"].items()}
    if "1" in rates and "2" in rates:
        result["ratio"] = round(rates["2"] / rates["1"], 3)
    return result
