"""`recsae bench reliability`: the service as a fleet. Each scenario starts the local service with 2 model replicas
(service/local.py: local Ray, the app deployed from a Serve config as in production), drives loopback HTTP load,
performs one event, and reports what the clients saw.

  rollout   a new bundle rolled out under load, the Ray-native way (a new user_config, as `serve deploy`), then
            back through POST /admin/reload, then a corrupt bundle through the same route (refused): the time from
            each command until every answer carries the new version, failed requests, answers whose versions do
            not match one bundle's (a half-loaded bundle), and answers of the refused bundle.
  kill      SIGKILL of one model replica's process under load: failed requests, the longest gap between answers,
            and the time until the fleet has all its replicas running again.
  overload  the unloaded p99 (concurrency 1), the saturation throughput (closed loop), then an open loop at
            `factor` x that throughput: shed answers (503 + Retry-After) and their latency, the admitted answers'
            p99 against the unloaded and the saturated one, then the load dropped back to concurrency 1.
  relay     what the ingress relay (service/ingress.py, the retry of the kill scenario) costs: the same requests
            through the application and straight to a second copy of its model deployment taking HTTP itself, in
            interleaved rounds at concurrency 1, 8 and 32.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from recsae_core.bundle.format import bundle_versions, load_bundle, write_manifest
from recsae_core.common.artifacts import read_json, sha256_file
from recsae_core.common.errors import ConfigError
from service.app import ADMIN_TOKEN_ENV
from service.bench_load import load, summarize
from service.local import APP_NAME, MODEL_DEPLOYMENT, LocalService, app_config, free_port, start_local
from service.reliability_config import ReliabilityOptions
from service.timeline import PATH, Outcome, closed_loop, open_loop, percentile

DIRECT = "direct"
"""The relay scenario's second application: the model deployment alone, at route prefix /direct."""
RELAY_CONCURRENCY = (1, 8, 32)


def direct_app(args: dict[str, Any]) -> Any:
    """The model deployment of `service.app:app_builder(args)` alone, taking HTTP itself (no relay, no retry): the
    relay scenario's baseline, not a way to deploy recsae."""
    from service.app import app_builder

    return app_builder({**args, "relay": False})


def variant_bundle(src: Path, dst: Path) -> Path:
    """A copy of bundle `src` with the same model, SAE and concepts but another version: its catalog re-serialised
    (other bytes, same content), its manifest re-sealed. Lets a rollout be measured with one trained bundle."""
    shutil.copytree(src, dst)
    catalog = dst / "concepts" / "catalog.json"
    if not catalog.is_file():
        raise ConfigError(f"{src}: a bundle without a concept catalog; pass the new bundle with --to")
    catalog.write_text(json.dumps(json.loads(catalog.read_text()), indent=1) + "\n")
    manifest = read_json(dst / "manifest.json")
    files = {**manifest["files"], "concepts/catalog.json": sha256_file(catalog)}
    write_manifest(dst, {**manifest, "files": files, "versions": bundle_versions(files)})
    return dst


def corrupt_bundle(src: Path, dst: Path) -> Path:
    """A copy of bundle `src` with one flipped byte in its model file: every replica must refuse it."""
    shutil.copytree(src, dst)
    model = dst / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return dst


def replica_pids(app: str = APP_NAME, deployment: str = MODEL_DEPLOYMENT) -> dict[str, int]:
    """Process id of every RUNNING replica of the deployment, by replica id (from the Serve controller)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][app]["deployments"][deployment]["replicas"]
    return {r["replica_id"]: int(r["pid"]) for r in replicas if r["state"] == "RUNNING" and r.get("pid")}


def wait_for_replicas(count: int, exclude: set[int], timeout_s: float) -> float | None:
    """Seconds until `count` replicas run, none of them a process in `exclude`; None if not within `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        pids = set(replica_pids().values())
        if len(pids) >= count and not pids & exclude:
            return time.monotonic() - start
        time.sleep(0.1)
    return None


RETRIES = "ray_recsae_ingress_retries_total"
"""The ingress's counter of requests sent again after their replica was lost."""
EXPORT_INTERVAL = "RAY_metrics_report_interval_ms"
"""Read by Ray at start: how often replicas export metrics (default 10 s; the scenarios use 1 s)."""


def exported_total(metrics_url: str, name: str) -> float:
    """The sum of a metric's samples on Ray's metrics export port (0 if it has none yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def wait_for_total(metrics_url: str, name: str, at_least: float, timeout_s: float) -> float:
    """The metric's total once it reaches `at_least`, or whatever it is after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (value := exported_total(metrics_url, name)) < at_least and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


class Background:
    """A load function run on its own event loop in a thread, so the scenario can act while it runs."""

    def __init__(self, run: Callable[[], Any]) -> None:
        self.result: Any = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", asyncio.run(run())), daemon=True)
        self.thread.start()

    def join(self) -> Any:
        self.thread.join()
        return self.result


def _failures(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        if o.status != 200:
            counts[str(o.status or "transport")] = counts.get(str(o.status or "transport"), 0) + 1
    return counts


def rollout_phase(outcomes: list[Outcome], t_cmd: float, old: str, new: str) -> dict[str, Any]:
    """What clients saw of one rollout from `old` to `new` started at `t_cmd` (seconds of the load's clock)."""
    after = [o for o in outcomes if o.end >= t_cmd]
    last_old = max((o.start for o in after if o.bundle == old), default=None)
    first_new = min((o.end for o in after if o.bundle == new), default=None)
    return {
        "requests": len(after),
        "failed": _failures(after),
        "first_new_s": None if first_new is None else round(first_new - t_cmd, 3),
        "converged_s": None if first_new is None else round(max(last_old or t_cmd, t_cmd) - t_cmd, 3),
        "other_versions": sum(o.bundle not in (old, new) for o in after if o.status == 200),
        "inconsistent": sum(not o.consistent for o in after if o.status == 200),
    }


def scenario_rollout(
    service: LocalService, bundle: Path, to: Path, work: Path, token: str, args: ReliabilityOptions
) -> dict[str, Any]:
    base, new = load_bundle(bundle).manifest["versions"], load_bundle(to).manifest["versions"]
    bad = corrupt_bundle(bundle, work / "corrupt")
    known = [base, new]
    bodies = _bodies(bundle)
    t0, marks, answers = time.perf_counter(), {}, {}
    stop = threading.Event()
    loader = Background(lambda: closed_loop(service.url, bodies, args.concurrency, stop, t0, known))
    auth = {"Authorization": f"Bearer {token}"}

    def admin(name: str, folder: Path) -> None:
        marks[name] = time.perf_counter() - t0
        answer = httpx.post(f"{service.url}/admin/reload", json={"bundle": str(folder)}, headers=auth, timeout=120)
        answers[name] = {"status": answer.status_code, "body": answer.json(), "s": time.perf_counter() - t0}

    time.sleep(args.settle)
    marks["deploy"] = time.perf_counter() - t0
    service.update(bundle=str(to), timeout_s=120)  # what `serve deploy` of an edited config does
    answers["deploy"] = {"s": time.perf_counter() - t0}
    time.sleep(args.settle)
    admin("admin", bundle)
    time.sleep(args.settle)
    admin("refused", bad)
    time.sleep(args.settle)
    stop.set()
    outcomes = loader.join()
    refused = [o for o in outcomes if o.end >= marks["refused"]]
    deploy = rollout_phase(_between(outcomes, marks["deploy"], marks["admin"]), marks["deploy"], base["bundle"],
                           new["bundle"])  # fmt: skip
    back = rollout_phase(_between(outcomes, marks["admin"], marks["refused"]), marks["admin"], new["bundle"],
                         base["bundle"])  # fmt: skip
    status = answers["admin"]["status"]
    return {
        "versions": {"from": base["bundle"], "to": new["bundle"]},
        "deploy": {**deploy, "command_s": round(answers["deploy"]["s"] - marks["deploy"], 3)},
        "admin": {**back, "command_s": round(answers["admin"]["s"] - marks["admin"], 3), "http_status": status},
        "refused": {
            "http_status": answers["refused"]["status"],
            "detail": answers["refused"]["body"].get("detail"),
            "requests": len(refused),
            "failed": _failures(refused),
            "served_other_than_old": sum(o.bundle != base["bundle"] for o in refused if o.status == 200),
        },
        "total_requests": len(outcomes),
        "total_failed": sum(o.status != 200 for o in outcomes),
    }


def _between(outcomes: list[Outcome], start: float, end: float) -> list[Outcome]:
    return [o for o in outcomes if start <= o.end < end]


def scenario_kill(service: LocalService, bundle: Path, args: ReliabilityOptions) -> dict[str, Any]:
    bodies = _bodies(bundle)
    before = replica_pids()
    t0, stop = time.perf_counter(), threading.Event()
    loader = Background(lambda: closed_loop(service.url, bodies, args.concurrency, stop, t0))
    time.sleep(args.settle)
    victim = sorted(before.values())[0]
    t_kill = time.perf_counter() - t0
    os.kill(victim, signal.SIGKILL)
    recovery = wait_for_replicas(len(before), {victim}, timeout_s=120)
    time.sleep(args.settle)
    stop.set()
    outcomes = loader.join()
    ok = sorted(o.end for o in outcomes if o.status == 200)
    after = [o for o in outcomes if o.end >= t_kill]
    gaps = np.diff([t_kill, *[t for t in ok if t >= t_kill]])
    in_flight = sum(o.start < t_kill < o.end for o in outcomes)
    time.sleep(3.0)  # three of the scenario's 1 s metric exports
    retried = exported_total(service.metrics_url, RETRIES)
    return {
        "replicas": len(before),
        "killed_pid": victim,
        "requests": len(outcomes),
        "failed": _failures(outcomes),
        "failed_total": sum(o.status != 200 for o in outcomes),
        "in_flight_at_kill": in_flight,
        "retried": retried,
        "recovery_s": None if recovery is None else round(recovery, 3),
        "longest_gap_after_kill_s": round(float(gaps.max()), 3) if len(gaps) else None,
        "p99_ms_before_kill": percentile([o.ms for o in outcomes if o.status == 200 and o.end < t_kill], 99),
        "p99_ms_after_kill": percentile([o.ms for o in after if o.status == 200], 99),
    }


def _rss_mb(pids: list[int]) -> dict[str, float]:
    out = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[str(pid)] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            out[str(pid)] = float("nan")
    return out


def scenario_overload(service: LocalService, bundle: Path, args: ReliabilityOptions) -> dict[str, Any]:
    bodies = _bodies(bundle)
    pids = sorted(replica_pids().values())
    rss_before = _rss_mb(pids)
    unloaded = summarize([asyncio.run(load(service.url, bodies, 1, args.duration, 1.0))])
    saturated = summarize([asyncio.run(load(service.url, bodies, args.saturation_concurrency, args.duration, 1.0))])
    rate = args.factor * saturated["rps"]
    t0 = time.perf_counter()
    outcomes = asyncio.run(open_loop(service.url, bodies, rate, args.duration, t0))
    t_start = min(o.start for o in outcomes)
    seconds = [
        [o.ms for o in outcomes if o.status == 503 and int(o.start - t_start) == i] for i in range(int(args.duration))
    ]
    by_second = [percentile(ms, 50) for ms in seconds]
    t_end = time.perf_counter() - t0
    recovery = asyncio.run(closed_loop(service.url, bodies, 1, None, t0, duration=args.duration))
    shed = [o for o in outcomes if o.status == 503]
    admitted = [o for o in outcomes if o.status == 200]
    first_ok = min((o.end for o in recovery if o.status == 200), default=None)
    return {
        "unloaded": unloaded,
        "saturated": {**saturated, "concurrency": args.saturation_concurrency},
        "overload": {
            "factor": args.factor,
            "rate_rps": round(rate, 1),
            "sent": len(outcomes),
            "admitted": len(admitted),
            "shed": len(shed),
            "shed_with_retry_after": sum(o.retry_after is not None for o in shed),
            "other": _failures([o for o in outcomes if o.status != 503]),
            "shed_p50_ms": percentile([o.ms for o in shed], 50),
            "shed_p99_ms": percentile([o.ms for o in shed], 99),
            "admitted_p50_ms": percentile([o.ms for o in admitted], 50),
            "admitted_p99_ms": percentile([o.ms for o in admitted], 99),
            "admitted_rps": round(len(admitted) / args.duration, 1),
            # Growing with the second the request was sent: the backlog of a proxy that cannot even refuse that fast.
            "shed_p50_ms_by_second": by_second,
        },
        "ratios": {
            "admitted_p99_vs_unloaded": _ratio(percentile([o.ms for o in admitted], 99), unloaded["p99_ms"]),
            "admitted_p99_vs_saturated": _ratio(percentile([o.ms for o in admitted], 99), saturated["p99_ms"]),
        },
        "after": {
            "first_ok_s": None if first_ok is None else round(first_ok - t_end, 3),
            "requests": len(recovery),
            "failed": _failures(recovery),
            "p99_ms": percentile([o.ms for o in recovery if o.status == 200], 99),
        },
        "replica_rss_mb": {"before": rss_before, "after": _rss_mb(pids)},
    }


def scenario_relay(service: LocalService, bundle: Path, args: ReliabilityOptions) -> dict[str, Any]:
    bodies = _bodies(bundle)
    paths = {"relay": PATH, DIRECT: f"/{DIRECT}{PATH}"}
    out: dict[str, Any] = {}
    for concurrency in RELAY_CONCURRENCY:
        runs: dict[str, list[Outcome]] = {name: [] for name in paths}
        for r in range(args.rounds):
            for name in list(paths)[:: 1 if r % 2 == 0 else -1]:
                path, t0 = paths[name], time.perf_counter()
                asyncio.run(closed_loop(service.url, bodies, concurrency, None, t0, duration=1.0, path=path))
                runs[name] += asyncio.run(
                    closed_loop(service.url, bodies, concurrency, None, t0, duration=args.duration, path=path)
                )
        row: dict[str, Any] = {}
        for name, outcomes in runs.items():
            ms = [o.ms for o in outcomes if o.status == 200]
            rps = round(len(ms) / (args.duration * args.rounds), 1)
            row[name] = {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "rps": rps,
                         "failed": _failures(outcomes)}  # fmt: skip
        row["relay_vs_direct"] = {k: _ratio(row["relay"][k], row[DIRECT][k]) for k in ("p50_ms", "p99_ms", "rps")}
        out[str(concurrency)] = row
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b and np.isfinite(a) and np.isfinite(b) else None


def _bodies(bundle: Path, n: int = 512, seed: int = 0) -> list[dict]:
    users = np.random.default_rng(seed).choice(load_bundle(bundle).user_ids, size=n)
    return [{"user_id": str(u), "k": 10} for u in users]


def bench_reliability(options: ReliabilityOptions) -> dict[str, Any]:
    """Run one scenario on a fresh local service with `options.replicas` model replicas; the JSON report."""
    token = secrets.token_hex(16)
    saved = {key: os.environ.get(key) for key in (ADMIN_TOKEN_ENV, EXPORT_INTERVAL)}
    os.environ.update({ADMIN_TOKEN_ENV: token, EXPORT_INTERVAL: "1000"})  # inherited by Ray's workers at ray.init
    app_args = {key: getattr(options, key) for key in ("max_ongoing_requests", "max_queued_requests", "retry_after_s")}
    bundle = options.bundle
    with tempfile.TemporaryDirectory(prefix="recsae-reliability-") as tmp:
        work = Path(tmp)
        target = options.to if options.to is not None else variant_bundle(bundle, work / "variant")
        # The relay scenario's second copy of the model deployment shares the CPUs: each app gets half.
        apps = 2 if options.scenario == "relay" else 1
        cpus = min(1.0, (os.cpu_count() or 1) / (apps * options.replicas))
        args = {"bundle": str(bundle), "num_replicas": options.replicas, "num_cpus": cpus, **app_args}
        extra = [app_config(args, {"bundle": str(bundle)}, name=DIRECT, route_prefix=f"/{DIRECT}",
                            import_path="service.reliability:direct_app")] if apps == 2 else []  # fmt: skip
        try:
            service = start_local(bundle, free_port(), free_port(), replicas=options.replicas, num_cpus=cpus,
                                  app_args=app_args, extra_apps=extra)  # fmt: skip
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        try:
            if options.scenario == "rollout":
                result = scenario_rollout(service, bundle, target, work, token, options)
            elif options.scenario == "kill":
                result = scenario_kill(service, bundle, options)
            elif options.scenario == "relay":
                result = scenario_relay(service, bundle, options)
            else:
                result = scenario_overload(service, bundle, options)
        finally:
            service.stop()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()}
    return {"settings": settings, options.scenario: result}
