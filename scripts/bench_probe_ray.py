"""Probe throughput in one process and on Ray Data with 1 and 2 workers (issue 19), on a run's recommender.

    python scripts/bench_probe_ray.py RUN_DIR OUT.json [--workers 1,2] [--batch-size 2048]

Each measurement probes a fresh copy of RUN_DIR/recommender into a temporary run: first in this process
(`collect`), then on a local Ray cluster started here with as many CPUs as the machine has (`ray start --head`,
stopped at the end), once per worker count. Rows/s counts probed samples over the probe's wall time, the actors'
start and the run's loading in each actor included (that is what a user waits for). Every Ray probe's shards must
equal the one-process probe's byte for byte; the JSON says so. Prints the JSON and writes it to OUT.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recsae_core.common.layout import RunLayout
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.probe.collect import collect
from recsae_core.probe.on_ray import collect_on_ray
from recsae_core.recommenders.run import load_run
from service.local import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def fresh_run(src: Path, work: Path, name: str) -> Path:
    run = work / name
    shutil.copytree(src / "recommender", run / "recommender")
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    if not RunLayout(args.run).recommender_complete() or min(workers) < 1 or args.batch_size < 1:
        parser.error("RUN_DIR needs a complete recommender; --workers and --batch-size must be >= 1")
    result: dict = {"run": str(args.run), "batch_size": args.batch_size, "cpus": os.cpu_count(),
                    "load_average_start": os.getloadavg()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="recsae-probe-bench-") as tmp:
        work = Path(tmp)
        base = fresh_run(args.run, work, "one-process")
        t0 = time.perf_counter()
        probe = collect(load_run(base), batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - t0
        result["one_process"] = {"samples": probe.n_samples, "seconds": round(seconds, 2),
                                 "rows_per_s": round(probe.n_samples / seconds, 1)}  # fmt: skip
        port = free_port()
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        subprocess.run([RAY, "start", "--head", f"--port={port}", f"--num-cpus={os.cpu_count()}",
                        "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        try:
            result["ray"] = {}
            for n in workers:
                run = fresh_run(args.run, work, f"ray-{n}")
                t0 = time.perf_counter()
                got = collect_on_ray(load_run(run), RayConfig(address=f"127.0.0.1:{port}", workers=n),
                                     batch_size=args.batch_size, progress=False)  # fmt: skip
                seconds = time.perf_counter() - t0
                names = sorted(p.name for p in RunLayout(base).probe.iterdir())
                _, mismatch, errors = filecmp.cmpfiles(RunLayout(base).probe, RunLayout(run).probe, names,
                                                       shallow=False)  # fmt: skip
                result["ray"][str(n)] = {"samples": got.n_samples, "seconds": round(seconds, 2),
                                         "rows_per_s": round(got.n_samples / seconds, 1),
                                         "identical_to_one_process": not mismatch and not errors}  # fmt: skip
        finally:
            import ray

            ray.shutdown()
            subprocess.run([RAY, "stop", "--force"], capture_output=True)
    ray_rates = {n: r["rows_per_s"] for n, r in result["ray"].items()}
    if "1" in ray_rates and "2" in ray_rates:
        result["ratio"] = round(ray_rates["2"] / ray_rates["1"], 3)
    result["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
