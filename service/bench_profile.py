"""`recsae bench profile`: where a request's time goes in the running service, measured, at each concurrency.

Three load runs per concurrency against one local deployment (monitor mode, the deployment's defaults), each
`duration` seconds after a warm-up:
  plain    no instrumentation beyond what the service always does: client latency, and the CPU time every process on
           the machine spent in the window (/proc), grouped by role (proxy, replica, Ray's system processes, the load
           generator, and everything else on the machine), per request;
  traced   every request carries a sampled W3C `traceparent`: Ray Serve's own OpenTelemetry spans (the Python
           proxy's request if it is the ingress, each routing, each replica's handling, FastAPI's; service.tracing
           writes them) are joined per request with the client's clock and the answer's Server-Timing (the
           handler's stages), and split into consecutive segments that add up to the client's latency;
  py-spy   (with `py_spy`) the proxy and one replica of each deployment sampled by py-spy (service.bench_cpu).
Tracing costs time itself: both runs' latencies are reported, so its share is visible.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from service.bench_cpu import OTHERS, cpu_seconds, cpu_snapshot, cpu_use, py_spy_summary, run_py_spy, spied_pids
from service.bench_load import Traced, load, summarize
from service.bench_modes import SteerPlan, bodies
from service.local import free_port, start_local
from service.served import Served
from service.tracing import EXPORTER, SPANS_ENV

TRACING_ENV = {"RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": EXPORTER, "RAY_SERVE_TRACING_SAMPLING_RATIO": "0"}
"""Ray Serve traces only requests whose traceparent says sampled: the profile's own, not the readiness polls."""
HANDLER = ("parse", "batch queue", "worker-thread hop", "engine", "metrics", "respond")
"""The innermost replica's handler stages, from its Server-Timing; the rest of its span is its `rest`."""


class Span(NamedTuple):
    """One span Ray Serve recorded."""

    name: str
    start_ns: int
    end_ns: int


def read_spans(folder: Path) -> dict[str, list[Span]]:
    """Every span in `folder`'s files (service.tracing's lines), by trace id."""
    import json

    out: dict[str, list[Span]] = defaultdict(list)
    for path in folder.glob("spans-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                trace_id, name, start, end = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed process
            out[trace_id].append(Span(name, int(start), int(end)))
    return out


def server_timing(header: str) -> dict[str, float]:
    """'a;dur=1.0, b;dur=2.5' -> {'a': 1.0, 'b': 2.5}."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def _deployment(span: Span) -> str:
    """'replica_handle_request recsae __call__' -> 'recsae'."""
    parts = span.name.split()
    return parts[1] if len(parts) > 1 else "replica"


def segments(trace: Traced, spans: list[Span]) -> dict[str, float] | None:
    """The request's consecutive segments (ms), which add up to its latency; None when its spans do not pair up.

    Ray Serve records, per request: the Python proxy's span (none when HAProxy sends the request straight to the
    ingress replica's own HTTP server), one replica span per deployment the request passes (a relaying ingress
    deployment makes two), one routing span per call from the proxy or a replica to the next replica, and, inside a
    replica, FastAPI's spans (the ASGI app, the endpoint). Only boundaries that follow one another are used: a
    routing span ends once the next replica has accepted the request, after that replica's span began, and the
    proxy's and the outer replica's spans end after the client has the answer, so routing is counted with the call,
    and the way back from the innermost replica to the client is one segment. The innermost replica's time is split
    by its handler's Server-Timing and FastAPI's spans; without the latter, what the handler does not time is that
    replica's `rest`."""
    proxy = next((s for s in spans if s.name.startswith("proxy_http_request")), None)
    routes = sorted((s for s in spans if s.name.startswith("route_to_replica")), key=lambda s: s.start_ns)
    replicas = sorted((s for s in spans if s.name.startswith("replica_handle_request")), key=lambda s: s.start_ns)
    stations = [proxy, *replicas] if proxy is not None else replicas
    if not replicas or len(routes) != len(stations) - 1:
        return None
    names = [*(["proxy"] if proxy is not None else []), *(_deployment(r) for r in replicas)]
    entry = "client -> proxy handler" if proxy is not None else f"client -> {names[0]} (HAProxy)"
    ms: dict[str, float] = {entry: (stations[0].start_ns - trace.start_ns) / 1e6}
    for level, route in enumerate(routes):
        ms[f"{names[level]}: before routing"] = (route.start_ns - stations[level].start_ns) / 1e6
        ms[f"{names[level]} -> {names[level + 1]}: routing + call"] = (
            stations[level + 1].start_ns - route.start_ns
        ) / 1e6
    inner, name = replicas[-1], names[-1]
    st = server_timing(trace.server_timing)
    engine, metrics = st.get("total", 0.0), st.get("metrics", 0.0)
    stages = [st.get("parse", 0.0), st.get("queue", 0.0), st.get("batch", 0.0) - engine - metrics, engine, metrics]
    stages.append(st.get("respond", 0.0))
    for stage, value in zip(HANDLER, stages, strict=True):
        ms[f"{name}: {stage}"] = value
    inside = [s for s in spans if inner.start_ns <= s.start_ns and s.end_ns <= inner.end_ns]
    app = next((s for s in inside if s.name.split(" ")[0] in ("POST", "GET")), None)
    endpoint = next((s for s in inside if s.name == "fastapi.endpoint"), None)
    whole = (inner.end_ns - inner.start_ns) / 1e6
    if app is not None and endpoint is not None:
        app_ms, endpoint_ms = (app.end_ns - app.start_ns) / 1e6, (endpoint.end_ns - endpoint.start_ns) / 1e6
        ms[f"{name}: endpoint rest (body, validation, JSON encoding)"] = endpoint_ms - sum(stages)
        ms[f"{name}: ASGI app (FastAPI routing, middleware)"] = app_ms - endpoint_ms
        ms[f"{name}: Ray replica wrapper"] = whole - app_ms
    else:
        ms[f"{name}: rest"] = whole - sum(stages)
    ms[f"answer: {' -> '.join(reversed(names))} -> client"] = (trace.end_ns - inner.end_ns) / 1e6
    return ms


def segment_table(traces: list[Traced], spans: dict[str, list[Span]]) -> dict[str, Any]:
    """Mean and median of every segment over the joined requests; the means add up to the mean latency."""
    joined = [(t, s) for t in traces if (s := segments(t, spans.get(t.trace_id, []))) is not None]
    if not joined:
        return {"joined": 0, "requests": len(traces)}
    names = Counter(tuple(s) for _, s in joined).most_common(1)[0][0]
    rows = [s for _, s in joined if tuple(s) == names]  # one path through the service (the usual one)
    table = {
        name: {
            "mean_ms": round(float(np.mean([r[name] for r in rows])), 3),
            "p50_ms": round(float(np.median([r[name] for r in rows])), 3),
        }
        for name in names
    }
    total = [(t.end_ns - t.start_ns) / 1e6 for t, s in joined if tuple(s) == names]
    return {
        "joined": len(rows),
        "requests": len(traces),
        "latency_mean_ms": round(float(np.mean(total)), 3),
        "segments": table,
    }


# ------------------------------------------------------------------ the command


def profile_serve(
    bundle: Path,
    concurrencies: list[int],
    duration: float = 5.0,
    warmup: float = 1.0,
    py_spy: bool = False,
    user_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The profile of monitor-mode requests at every concurrency (see the module's docstring)."""
    served = Served.load(bundle, threads=1)
    plan = SteerPlan({}, "unused", [])
    requests = bodies(served, "monitor", plan)
    folder = Path(tempfile.mkdtemp(prefix="recsae-profile-"))
    saved = {k: os.environ.get(k) for k in (*TRACING_ENV, SPANS_ENV)}
    os.environ.update({**TRACING_ENV, SPANS_ENV: str(folder / "spans")})  # inherited by Ray's processes at ray.init
    result: dict[str, Any] = {
        "bundle": str(bundle),
        "mode": "monitor",
        "duration_s": duration,
        "tools": "client clock + Ray Serve's OpenTelemetry spans (service.tracing) + Server-Timing; /proc CPU times"
        + ("; py-spy" if py_spy else ""),
        "load_average": {"start": [round(v, 2) for v in os.getloadavg()]},
        "concurrency": {},
    }
    try:
        service = start_local(bundle, port=free_port(), metrics_port=free_port(), user_config=user_config)
        result["ray_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
        try:
            # What the deployment and Ray cost with no request at all: their background work (health checks,
            # metrics pushes, polling), which every request on this machine competes with.
            before, t0 = cpu_snapshot(), time.monotonic()
            time.sleep(duration)
            idle_s = time.monotonic() - t0
            idle = {role: cpu / idle_s for role, cpu in cpu_seconds(before, cpu_snapshot()).items()}
            result["idle_cores"] = {
                role: round(cores, 3) for role, cores in sorted(idle.items(), key=lambda kv: -kv[1])
            }
            for concurrency in concurrencies:
                out: dict[str, Any] = {}
                before, t0 = cpu_snapshot(), time.monotonic()
                plain = asyncio.run(load(service.url, requests, concurrency, duration, warmup))
                spent, seconds = cpu_seconds(before, cpu_snapshot()), time.monotonic() - t0
                out["plain"] = summarize([plain])
                out["cpu"] = cpu_use(spent, seconds, plain.checked, idle)  # checked: every answer, warm-up included
                traces: list[Traced] = []
                traced = asyncio.run(load(service.url, requests, concurrency, duration, warmup, traces))
                out["traced"] = summarize([traced])
                time.sleep(1.0)  # the last spans reach their files
                out["timeline"] = segment_table(traces, read_spans(folder / "spans"))
                if py_spy:
                    spies = run_py_spy(spied_pids(), duration, folder)
                    asyncio.run(load(service.url, requests, concurrency, duration, 0.0))
                    for spy in spies:
                        spy.wait(timeout=60)
                    out["py_spy"] = {p.stem: py_spy_summary(p) for p in folder.glob("*.txt")}
                    for p in folder.glob("*.txt"):
                        p.unlink()
                result["concurrency"][str(concurrency)] = out
        finally:
            service.stop()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(folder, ignore_errors=True)
    result["load_average"]["end"] = [round(v, 2) for v in os.getloadavg()]
    return result


def render(result: dict[str, Any]) -> str:
    """The profile as text tables."""
    idle = ", ".join(f"{role} {cores}" for role, cores in result.get("idle_cores", {}).items() if cores >= 0.005)
    lines = [f"cores busy with no request: {idle}"]
    for concurrency, out in result["concurrency"].items():
        plain, traced, timeline = out["plain"], out["traced"], out["timeline"]
        joined = f"{timeline['joined']}/{timeline['requests']} requests joined"
        lines.append(f"concurrency {concurrency}: p50 {plain['p50_ms']} ms, {plain['rps']} rps untraced; "
                     f"p50 {traced['p50_ms']} ms traced; {joined}")  # fmt: skip
        for name, seg in timeline.get("segments", {}).items():
            lines.append(f"  {name:<58} mean {seg['mean_ms']:8.3f}  p50 {seg['p50_ms']:8.3f}")
        cores = out["cpu"]["cores"]
        lines.append(f"  CPU per request above idle, ms (cores busy under load; {sum(cores.values()):.2f} in all):")
        for role, ms in out["cpu"]["ms_per_request"].items():
            lines.append(f"    {role:<56} {ms:8.3f}   ({cores[role]:.2f} cores)")
        lines.append(f"    {OTHERS:<56} {'':8}   ({cores[OTHERS]:.2f} cores)")
        for process, spy in out.get("py_spy", {}).items():
            shown = ", ".join(f"{k} {v}%" for k, v in list(spy["percent"].items())[:8])
            lines.append(f"  py-spy {process} ({spy['samples']} samples at work, {spy['waiting']} waiting): {shown}")
    return "\n".join(lines)
