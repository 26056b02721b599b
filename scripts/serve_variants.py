"""Compare serving variants against the floor in one run: each variant is the local service (service.local) started in
its own process with its own Ray, Ray settings (environment) and service settings (user_config); the floor is
service.floor. Monitor-mode requests at each concurrency, in interleaved rounds (the order rotates each round), so a
drift in the machine's load touches every variant alike. Prints and saves p50/p99/rps and their ratios to the floor.

    python scripts/serve_variants.py BUNDLE OUT.json VARIANTS.json [--rounds 6] [--duration 3] [--concurrency 1,16]

VARIANTS.json: {"name": {"env": {...}, "config": {...}, "replicas": 1, "relay": true}, ...}. `env` is applied before
Ray starts (e.g. {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"} for Ray's Python proxy);
"relay": false serves the model deployment as the HTTP ingress itself, without service.ingress's relay (to measure
that hop; not a supported deployment). How docs/benchmarks.md compared the candidates of issue 18.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NO_RELAY = "scripts.serve_variants:model_only"


def model_only(args: dict[str, Any]) -> Any:
    """The application without the relaying ingress: the model deployment takes HTTP itself."""
    from service.app import RecsaeService
    from service.schemas import ServiceConfig

    args = dict(args)
    replicas, cpus = int(args.pop("num_replicas", 1)), float(args.pop("num_cpus", 1))
    args.setdefault("threads", max(1, int(cpus)))
    config = ServiceConfig.model_validate(args)
    ongoing = max(2 * config.max_batch_size, 16)
    return RecsaeService.options(
        num_replicas=replicas, max_ongoing_requests=ongoing, user_config=config.model_dump(),
        ray_actor_options={"num_cpus": cpus},
    ).bind(ongoing)  # fmt: skip


def child(bundle: Path, port: int, variant: dict[str, Any]) -> None:
    """Serve one variant until stdin closes."""
    os.environ.update(variant.get("env", {}))
    import service.local
    from service.local import free_port, start_local

    if not variant.get("relay", True):
        service.local.BUILDER = NO_RELAY
    config, replicas = variant.get("config") or None, int(variant.get("replicas", 1))
    service = start_local(bundle, port=port, metrics_port=free_port(), replicas=replicas, user_config=config)
    print("READY", flush=True)
    try:
        sys.stdin.read()
    finally:
        service.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("variants", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--child", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = json.loads(args.variants.read_text())
    if args.child is not None:
        child(args.bundle, args.child, variants)
        return 0

    from service.bench_load import load, summarize
    from service.bench_modes import SteerPlan, bodies
    from service.floor import FloorServer
    from service.local import free_port
    from service.served import Served

    requests = bodies(Served.load(args.bundle, threads=1), "monitor", SteerPlan({}, "", []))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    floor = FloorServer.start(args.bundle, {"sae": True})
    targets, children = {"floor": floor.url}, []
    result: dict[str, Any] = {"bundle": str(args.bundle), "variants": variants, "load_average": [os.getloadavg()]}
    try:
        for name, variant in variants.items():
            port = free_port()
            spec = args.out.with_suffix(f".{name}.json")
            spec.write_text(json.dumps(variant))
            command = [sys.executable, __file__, str(args.bundle), str(args.out), str(spec), "--child", str(port)]
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            children.append(proc)
            while (line := proc.stdout.readline()) and not line.startswith("READY"):
                pass  # Ray's own lines
            if not line:
                print(f"variant {name} did not start", file=sys.stderr)
                return 1
            spec.unlink()
            targets[name] = f"http://127.0.0.1:{port}"
        names = list(targets)
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            runs: dict[str, list] = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    runs[name].append(
                        asyncio.run(load(targets[name], requests, concurrency, args.duration, args.warmup))
                    )
            row = {n: summarize(runs[n]) for n in names}
            for name in names:
                row[name]["p50_x_floor"] = round(row[name]["p50_ms"] / row["floor"]["p50_ms"], 3)
                row[name]["rps_x_floor"] = round(row[name]["rps"] / row["floor"]["rps"], 3)
                shown = {k: row[name][k] for k in ("p50_ms", "p99_ms", "rps", "errors", "p50_x_floor", "rps_x_floor")}
                print(f"concurrency {concurrency} {name}: {json.dumps(shown)}", flush=True)
            result[str(concurrency)] = row
        result["load_average"].append(os.getloadavg())
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for proc in children:
            proc.stdin.close()
        for proc in children:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        floor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
