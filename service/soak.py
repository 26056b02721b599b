"""`recsae bench soak`: long-running mixed traffic against the real local service, sampled in windows.

The traffic (service/soak_traffic.py) mixes plain POST and GET recommendations, bundled policies, concept edits,
explanations, histories and a share of bad requests of several kinds, from a seeded schedule; every valid request
must be answered 200 (and steered or explained when it asks), every bad one 4xx. Every `window` seconds the run
records the window's p50/p99 over valid requests, each Serve replica's resident memory (RSS; the replicas are found
in Ray's actor table and measured with psutil), and the size of the Prometheus export (series and bytes).

Warm-up and drift, as the summary reports them: windows that start before `warmup` seconds are warm-up (caches,
allocator arenas, Ray's first metric exports); the *first steady window* is the first one that starts at or after
`warmup`. RSS growth is the summed RSS of the bundle-serving deployment's replicas at the end of the last window
against the end of the first steady window, in percent (reported for every deployment of the app, and the goal holds
when every one of them stays under it); p99 drift is the last window's p99 against the first steady window's, in
percent. The issue's goals (RSS growth < 5%, p99 drift < 20%, no error on a valid request, every bad request a 4xx, a
bounded series count) are reported as booleans; they are set for 30 minutes on the 2-core machine, and a shorter run
only indicates them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import asdict
from typing import Any, NamedTuple

import aiohttp
import numpy as np
from tqdm import tqdm

from service.engine import limit_threads
from service.local import APP_NAME, MODEL_DEPLOYMENT, free_port, start_local
from service.schemas import ServiceConfig
from service.served import Served
from service.soak_config import SOAK_OPTIONS, SoakOptions
from service.soak_traffic import Call, Schedule, answer_problem, build_schedule

GOALS = {"rss_growth_pct": 5.0, "p99_drift_pct": 20.0}
"""The issue's bounds (exclusive), for 30 minutes on the 2-core machine."""
REPLICA_CLASS = f"ServeReplica:{APP_NAME}:"
"""Class name prefix of the app's replica actors in Ray's actor table (the deployment's name follows)."""
PROXY_CLASS = "ProxyActor"


class Window(NamedTuple):
    """One sampling window."""

    index: int
    """0-based position in the run."""
    end_s: float
    """Seconds from the start of the load to the end of the window."""
    steady: bool
    """False for warm-up windows."""
    requests: int
    """Answers (any status) that arrived in the window."""
    valid: int
    """Of those, answers to valid requests."""
    rps: float
    """Answers per second."""
    p50_ms: float
    """Median latency of the valid requests answered in the window."""
    p99_ms: float
    """Their 99th percentile."""
    valid_errors: int
    """Valid requests answered wrongly (non-200, unsteered, no explanation, transport error)."""
    bad_not_4xx: int
    """Bad requests answered anything but 4xx."""
    replica_rss_mb: dict[str, dict[str, float]]
    """RSS at the end of the window, MiB, per deployment of the app and replica actor (id prefix)."""
    replica_pids: dict[str, list[int]]
    """The replicas' process ids per deployment (a new one means a replica restarted)."""
    proxy_rss_mb: float | None
    """RSS of Ray Serve's HTTP proxy on this node, MiB."""
    series: int | None
    """Samples (series) in the Prometheus export (None: the scrape failed)."""
    recsae_series: int | None
    """Of those, recsae's own (`ray_recsae_*`)."""
    export_bytes: int | None
    """Size of the scraped export."""

    def rss_mb(self, deployment: str = MODEL_DEPLOYMENT) -> float:
        """The summed RSS of a deployment's replicas (the bundle-serving one by default)."""
        return sum(self.replica_rss_mb.get(deployment, {}).values())


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def serve_processes() -> tuple[dict[str, dict[str, tuple[int, float]]], float | None]:
    """({deployment: {replica actor id prefix: (pid, RSS MiB)}}, proxy RSS MiB) for the app's live Serve actors
    on this node."""
    import psutil  # Ray's own copy (ray/thirdparty_files), on sys.path once ray is imported
    import ray

    # Ray's GCS actor table: ray.util.state.list_actors would need the dashboard, which the local service does not
    # start (it costs a core's worth of CPU on this machine).
    from ray._private import state

    node = ray.get_runtime_context().get_node_id()
    replicas: dict[str, dict[str, tuple[int, float]]] = {}
    proxy: float | None = None
    for actor_id, info in state.actors(actor_state_name="ALIVE").items():
        name, pid = info.get("ActorClassName", ""), int(info.get("Pid") or 0)
        if not pid or info.get("Address", {}).get("NodeID") != node:
            continue
        try:
            rss = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            continue  # exited between the table and the measurement
        if name.startswith(REPLICA_CLASS):
            replicas.setdefault(name.removeprefix(REPLICA_CLASS), {})[actor_id[:12]] = (pid, round(rss, 2))
        elif name == PROXY_CLASS:
            proxy = round(rss, 2)
    return replicas, proxy


def count_series(text: str) -> tuple[int, int]:
    """(samples, recsae samples) in a Prometheus text export: every non-comment line is one series."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return len(lines), sum(line.startswith("ray_recsae_") for line in lines)


class KindTally:
    """Per request kind: what was sent and how it was answered."""

    def __init__(self, valid: bool) -> None:
        self.valid = valid
        self.sent = self.wrong = 0
        self.statuses: dict[str, int] = {}
        self.latencies: list[float] = []
        self.first_problem: str | None = None

    def record(self, status: int | None, ms: float, problem: str | None) -> None:
        self.sent += 1
        key = str(status) if status is not None else "transport"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        self.latencies.append(ms)
        if problem is not None:
            self.wrong += 1
            self.first_problem = self.first_problem or problem

    def report(self) -> dict[str, Any]:
        return {
            "valid": self.valid, "sent": self.sent, "answered_as_required": self.sent - self.wrong,
            "statuses": dict(sorted(self.statuses.items())), "p50_ms": round(_percentile(self.latencies, 50), 3),
            "p99_ms": round(_percentile(self.latencies, 99), 3), "first_problem": self.first_problem,
        }  # fmt: skip


class Recorder:
    """Answers as they arrive: per-kind tallies for the whole run, and the current window's figures."""

    def __init__(self, schedule: Schedule) -> None:
        self.kinds = {c.kind: KindTally(c.valid) for c in schedule.calls}
        self._reset()

    def _reset(self) -> None:
        self.latencies: list[float] = []
        self.requests = self.valid_errors = self.bad_not_4xx = 0

    def record(self, call: Call, status: int | None, answer: bytes, ms: float) -> None:
        problem = answer_problem(call, status, answer)
        self.kinds[call.kind].record(status, ms, problem)
        self.requests += 1
        if call.valid:
            self.latencies.append(ms)
            self.valid_errors += problem is not None
        else:
            self.bad_not_4xx += problem is not None

    def cut(self) -> tuple[list[float], int, int, int]:
        """The window's (valid latencies, answers, valid errors, bad not 4xx); starts the next window."""
        out = (self.latencies, self.requests, self.valid_errors, self.bad_not_4xx)
        self._reset()
        return out


async def _send(session: aiohttp.ClientSession, call: Call) -> tuple[int | None, bytes]:
    try:
        if call.method == "GET":
            async with session.get(call.path) as response:
                return response.status, await response.read()
        async with session.post(call.path, data=call.body) as response:
            return response.status, await response.read()
    except (TimeoutError, aiohttp.ClientError):
        return None, b""


async def _scrape(session: aiohttp.ClientSession, url: str) -> tuple[int | None, int | None, int | None]:
    try:
        async with session.get(url) as response:
            text = await response.text()
    except (TimeoutError, aiohttp.ClientError):
        return None, None, None
    return *count_series(text), len(text.encode())


async def drive(url: str, metrics_url: str, schedule: Schedule, options: SoakOptions) -> tuple[list[Window], Recorder]:
    """`options.concurrency` keep-alive clients send the schedule in a closed loop (client c sends calls c, c + C,
    c + 2C, ... cycling), while a sampler closes a window every `options.window` seconds."""
    recorder, windows = Recorder(schedule), []
    calls, concurrency = schedule.calls, options.concurrency
    duration = options.n_windows * options.window
    headers = {"content-type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=30.0)
    start = time.perf_counter()
    stop_at = start + duration
    bar = tqdm(total=round(duration), unit="s", desc="soak", disable=None)
    async with (
        aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout,
                              headers=headers) as session,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as scraper,
    ):  # fmt: skip

        async def client(i: int) -> None:
            while (now := time.perf_counter()) < stop_at:
                call = calls[i % len(calls)]
                i += concurrency
                status, answer = await _send(session, call)
                recorder.record(call, status, answer, (time.perf_counter() - now) * 1000)

        async def sampler() -> None:
            for index in range(options.n_windows):
                end = start + (index + 1) * options.window
                while (left := end - time.perf_counter()) > 0:
                    await asyncio.sleep(min(1.0, left))
                    bar.update(max(0, round(time.perf_counter() - start) - bar.n))
                latencies, requests, valid_errors, bad = recorder.cut()
                replicas, proxy = await asyncio.to_thread(serve_processes)
                series, ours, size = await _scrape(scraper, metrics_url)
                window = Window(
                    index, round(end - start, 2), index >= options.first_steady, requests, len(latencies),
                    round(requests / options.window, 1), round(_percentile(latencies, 50), 3),
                    round(_percentile(latencies, 99), 3), valid_errors, bad,
                    {d: {k: rss for k, (_, rss) in actors.items()} for d, actors in sorted(replicas.items())},
                    {d: sorted(pid for pid, _ in actors.values()) for d, actors in sorted(replicas.items())}, proxy,
                    series, ours, size,
                )  # fmt: skip
                windows.append(window)
                bar.set_postfix(p99_ms=window.p99_ms, rss_mb=round(window.rss_mb()), errors=valid_errors + bad)

        await asyncio.gather(sampler(), *(client(c) for c in range(concurrency)))
    bar.close()
    return windows, recorder


def _pct(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or not (before > 0 and math.isfinite(before) and math.isfinite(after)):
        return None
    return round(100 * (after - before) / before, 2)


def summarize_soak(windows: list[Window], recorder: Recorder, options: SoakOptions) -> dict[str, Any]:
    """Growth, drift, errors and series counts (definitions in the module docstring), and the goals as booleans."""
    first, last = windows[options.first_steady], windows[-1]
    steady = [w for w in windows if w.steady]
    kinds = recorder.kinds.values()
    valid = sum(t.sent for t in kinds if t.valid)
    bad = sum(t.sent for t in kinds if not t.valid)
    valid_errors = sum(t.wrong for t in kinds if t.valid)
    bad_4xx = bad - sum(t.wrong for t in kinds if not t.valid)
    ours = [w.recsae_series for w in steady if w.recsae_series is not None]
    deployments = sorted({d for w in windows for d in w.replica_rss_mb})
    growth = {d: _pct(first.rss_mb(d), last.rss_mb(d)) for d in deployments}
    rss_growth = growth.get(MODEL_DEPLOYMENT)
    p99_drift = _pct(first.p99_ms, last.p99_ms)
    # A restarted replica shows as a process id beyond the most a deployment ever had at once.
    restarts = {
        d: len({p for w in windows for p in w.replica_pids.get(d, [])})
        - max(len(w.replica_pids.get(d, [])) for w in windows)
        for d in deployments
    }
    bounded = bool(ours) and first.recsae_series is not None and max(ours) <= first.recsae_series
    goals = {
        "rss_growth_under_5pct": rss_growth is not None
        and all(g is not None and g < GOALS["rss_growth_pct"] for g in growth.values()),
        "p99_drift_under_20pct": p99_drift is not None and p99_drift < GOALS["p99_drift_pct"],
        "no_errors_on_valid": valid > 0 and valid_errors == 0,
        "every_bad_answered_4xx": bad_4xx == bad,
        "series_bounded": bounded,
    }
    return {
        "first_steady_window": first.index, "last_window": last.index,
        "rss_first_steady_mb": round(first.rss_mb(), 2), "rss_last_mb": round(last.rss_mb(), 2),
        "rss_growth_pct": rss_growth, "rss_growth_pct_by_deployment": growth,
        "p99_first_steady_ms": first.p99_ms, "p99_last_ms": last.p99_ms, "p99_drift_pct": p99_drift,
        "p50_first_steady_ms": first.p50_ms, "p50_last_ms": last.p50_ms,
        "p50_drift_pct": _pct(first.p50_ms, last.p50_ms),
        "p99_steady_range_ms": [min(w.p99_ms for w in steady), max(w.p99_ms for w in steady)],
        "valid_requests": valid, "valid_errors": valid_errors, "bad_requests": bad, "bad_answered_4xx": bad_4xx,
        "series_first_steady": first.series, "series_last": last.series,
        "recsae_series_first_steady": first.recsae_series, "recsae_series_last": last.recsae_series,
        "recsae_series_max": max(ours) if ours else None,
        "export_bytes_first_steady": first.export_bytes, "export_bytes_last": last.export_bytes,
        "replica_restarts": restarts,
        "goals": goals, "all_goals_met": all(goals.values()),
    }  # fmt: skip


def soak(options: SoakOptions) -> dict[str, Any]:
    """Build and check the schedule (before Ray starts), start the local service, drive it, report."""
    limit_threads(1)  # the load generator shares the machine with the replicas
    config = ServiceConfig(bundle=str(options.bundle))
    served = Served.load(options.bundle, threads=1, bounds=config.edit_bounds())
    schedule = build_schedule(served, config, options.bad_share, options.seed)
    versions = served.versions
    del served
    service = start_local(options.bundle, port=free_port(), metrics_port=free_port(), replicas=options.replicas)
    try:
        windows, recorder = asyncio.run(drive(service.url, service.metrics_url, schedule, options))
    finally:
        service.stop()
    return {
        "options": {**asdict(options), "bundle": str(options.bundle)},
        "versions": versions,
        "load_generator": "aiohttp closed loop, same machine",
        "definitions": {
            "first_steady_window": "the first window starting at or after --warmup seconds",
            "rss_growth_pct": f"summed RSS of the {MODEL_DEPLOYMENT!r} deployment's replicas, end of the last window "
            "vs end of the first steady window (by_deployment: the same for each deployment of the app; the goal "
            "holds when every deployment's is under 5%)",
            "p99_drift_pct": "p99 of valid requests, last window vs first steady window",
            "series_bounded": "no steady window exports more ray_recsae_* series than the first steady window",
        },
        "schedule": {"length": len(schedule.calls), "mix": schedule.mix(), "skipped_kinds": schedule.skipped},
        "kinds": {kind: tally.report() for kind, tally in sorted(recorder.kinds.items())},
        "windows": [w._asdict() for w in windows],
        "summary": summarize_soak(windows, recorder, options),
    }


def run_command(args: argparse.Namespace) -> int:
    """`recsae bench soak`: options checked in one line before the bundle is read and Ray starts."""
    from recsae_core.bundle.format import load_bundle
    from recsae_core.common.artifacts import write_json

    options = SOAK_OPTIONS.build(args, bundle=args.bundle.resolve())
    load_bundle(args.bundle)  # a bad bundle fails here in one line
    result = soak(options)
    write_json(args.out, result)
    print(json.dumps({"out": str(args.out), **result["summary"]}))
    return 0
