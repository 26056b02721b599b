"""Probe throughput in one process and on Ray Data with 1 and 2 workers (issue 19), on a run's recommender.

    python scripts/bench_probe_ray.py RUN_DIR OUT.json [--workers 1,2] [--batch-size 2048]

service.bench_probe measures (a fresh copy of RUN_DIR/recommender per measurement; every Ray probe's shards compared
with the one-process probe's, byte for byte) on a local Ray cluster started here with as many CPUs as the machine
has and stopped at the end (service.bench_cluster: only that cluster). `recsae bench scale` runs the same
measurement on a synthetic model. Prints the JSON and writes it to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from recsae_core.common.layout import RunLayout
from service.bench_cluster import local_cluster, warm_up
from service.bench_probe import probe_throughput


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
    result: dict = {"run": str(args.run), "cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="recsae-probe-bench-") as tmp, local_cluster(cpus) as address:
        warm_up(address)
        result.update(probe_throughput(args.run, Path(tmp), address, workers, args.batch_size))
    result["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
