"""The `recsae` console entry point: every recsae_core command, plus `serve` and the `bench` commands."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import positive_float, positive_int
from recsae_core.pipeline.cli import command
from recsae_core.pipeline.cli import main as core_main
from recsae_core.pipeline.options import build_parser as core_parser
from service.bench_scale_config import add_scale_options
from service.reliability_config import RELIABILITY_OPTIONS, SCENARIOS
from service.soak_config import SOAK_OPTIONS


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value}")
    return value


def concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    return core_parser(extend=add_service_commands)


NO_RELAY = (
    "the model deployment takes HTTP itself: no relay hop, and no retry of a request whose replica dies "
    "(docs/deploy.md, 'Latency and the relay')"
)


def add_service_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a bundle over HTTP with Ray Serve (Ctrl-C stops it)")
    serve.add_argument("--bundle", required=True, type=Path, help="bundle folder (recsae bundle / pipeline)")
    serve.add_argument("--port", type=port, default=8000, help="HTTP port")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    serve.add_argument("--replicas", type=positive_int, default=1)
    serve.add_argument("--metrics-port", type=port, default=8081, help="Prometheus export port of Ray")
    serve.add_argument("--no-relay", action="store_true", help=NO_RELAY)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    bserve = bench_sub.add_parser(
        "serve", help="latency/throughput of the HTTP service: bare vs monitor vs steer, and against its floor"
    )
    bserve.add_argument("--bundle", required=True, type=Path)
    bserve.add_argument("--out", required=True, type=Path, help="JSON report")
    bserve.add_argument("--duration", type=positive_float, default=3.0, help="measured seconds per round and mode")
    bserve.add_argument("--warmup", type=positive_float, default=1.0, help="unmeasured seconds before each run")
    bserve.add_argument("--concurrency", type=concurrency_list, default=[1, 8, 32], help="e.g. 1,8,32")
    bserve.add_argument(
        "--rounds", type=positive_int, default=16,
        help="interleaved rounds of every mode: on a shared 2-core machine one round's ratio scatters by +-0.2, "
        "and 16 rounds bring a pooled ratio to about +-0.03 (about 12 minutes with the defaults)",
    )  # fmt: skip
    bserve.add_argument(
        "--policy", metavar="NAME",
        help="bundled policy every steer-mode request applies (default without --edits: 'popularity' if usable, "
        "else the first usable policy by name, else two edits); recorded in the report as steer",
    )  # fmt: skip
    bserve.add_argument(
        "--edits", metavar="JSON",
        help='edits every steer-mode request sends, as the HTTP API takes them, e.g. \'[{"concept": "drama-3", '
        '"op": "nudge", "value": -2, "unit": "std"}]\'; with --policy, both apply',
    )  # fmt: skip
    bserve.add_argument("--no-relay", action="store_true", help=NO_RELAY)
    soak = bench_sub.add_parser("soak", help="mixed traffic for a set time: latency drift, replica RSS, errors")
    soak.add_argument("--bundle", required=True, type=Path, help="bundle folder to serve")
    soak.add_argument("--out", required=True, type=Path, help="JSON report")
    SOAK_OPTIONS.add_to(soak)
    brel = bench_sub.add_parser(
        "reliability", help="the service as a fleet: a bundle rollout, a killed replica, overload"
    )
    brel.add_argument("--bundle", required=True, type=Path, help="bundle folder to serve")
    brel.add_argument("--scenario", required=True, choices=SCENARIOS, help="the event to measure")
    brel.add_argument("--to", type=Path, help="rollout: the new bundle (default: a copy of --bundle, another version)")
    brel.add_argument("--out", required=True, type=Path, help="JSON report")
    RELIABILITY_OPTIONS.add_to(brel)
    bprofile = bench_sub.add_parser(
        "profile", help="where a request's time goes in the service: Ray Serve's spans, Server-Timing, CPU per process"
    )
    bprofile.add_argument("--bundle", required=True, type=Path)
    bprofile.add_argument("--out", required=True, type=Path, help="JSON report")
    bprofile.add_argument("--duration", type=positive_float, default=5.0, help="measured seconds per run")
    bprofile.add_argument("--warmup", type=positive_float, default=1.0, help="unmeasured seconds before each run")
    bprofile.add_argument("--concurrency", type=concurrency_list, default=[1, 16], help="e.g. 1,16")
    bprofile.add_argument("--py-spy", action="store_true", help="also sample the proxy and the replica with py-spy")
    bscale = bench_sub.add_parser(
        "scale", help="a synthetic two-tower model at scale: probe, SAE and catalog on 1 vs 2 Ray workers, and the "
        "service against catalogue size",
    )  # fmt: skip
    add_scale_options(bscale)


def _check_bundle(folder: Path) -> None:
    from recsae_core.bundle.format import load_bundle

    load_bundle(folder)  # a bad bundle fails here in one line, before Ray starts


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from service.local import start_local

    _check_bundle(args.bundle)
    service = start_local(args.bundle.resolve(), args.port, args.metrics_port, args.host, args.replicas,
                          app_args={"relay": not args.no_relay})  # fmt: skip

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"recsae: serving {args.bundle} at {service.url}/v1/recommend", flush=True)
    print(f"recsae: metrics at {service.metrics_url}; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("recsae: shutting down", file=sys.stderr, flush=True)
    finally:
        service.stop()
    return 0


@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "soak":
        from service.soak import run_command

        return run_command(args)
    if args.bench_command == "reliability":
        return _bench_reliability(args)
    if args.bench_command == "profile":
        return _bench_profile(args)
    if args.bench_command == "scale":
        from service.bench_scale import run_command as run_scale

        return run_scale(args)
    if args.bench_command != "serve":
        raise ConfigError(f"unknown bench {args.bench_command!r}")
    from service.bench import bench_serve, write_report
    from service.bench_modes import parse_edits

    edits = parse_edits(args.edits) if args.edits is not None else None
    _check_bundle(args.bundle)
    # The steering is validated inside bench_serve before Ray starts; a refusal is one line and exit 2, and so is a
    # steer-mode answer without steering_applied (SteeringNotApplied), which ends the run without a report.
    result = bench_serve(
        args.bundle.resolve(), args.duration, args.concurrency, args.warmup, args.rounds, args.policy, edits,
        relay=not args.no_relay,
    )
    write_report(result, args.out)
    summary = {key: result[key] for key in ("steer", "http", "floor_ratios", "batching")}
    summary = {"out": str(args.out), **summary}
    print(json.dumps(summary))
    return 0


def _bench_profile(args: argparse.Namespace) -> int:
    from service.bench import write_report
    from service.bench_profile import profile_serve, render

    _check_bundle(args.bundle)
    result = profile_serve(args.bundle.resolve(), args.concurrency, args.duration, args.warmup, args.py_spy)
    write_report(result, args.out)
    print(render(result))
    return 0


def _bench_reliability(args: argparse.Namespace) -> int:
    from recsae_core.common.artifacts import write_json
    from service.reliability import bench_reliability

    to = args.to.resolve() if args.to is not None else None
    options = RELIABILITY_OPTIONS.build(args, bundle=args.bundle.resolve(), scenario=args.scenario, to=to)
    for folder in (args.bundle, *([to] if to else [])):
        _check_bundle(folder)
    result = bench_reliability(options)
    write_json(args.out, result)
    print(json.dumps({"out": str(args.out), args.scenario: result[args.scenario]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return core_main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
