"""The load generator of `recsae bench serve`: closed-loop keep-alive clients, and the pooled summary of their runs."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, NamedTuple

import aiohttp
import numpy as np

from service.bench_modes import steering_reported


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class LoadRun(NamedTuple):
    """One closed-loop load run against the service."""

    latencies_ms: list[float]
    """Latency of every successful request that started after the warm-up and ended in the window."""
    errors: int
    """Requests in the window that failed (non-200 or transport error)."""
    duration_s: float
    """Length of the measured window."""
    checked: int = 0
    """Successful answers whose `steering_applied` was read: every one, warm-up included."""
    steered: int = 0
    """Of those, the answers that reported `steering_applied: true`."""
    unsteered_note: str | None = None
    """Why the first answer without `steering_applied: true` was not steered, as far as it says."""


class Traced(NamedTuple):
    """One request of a traced load run, as the client saw it."""

    trace_id: str
    """The W3C trace id it was sent with (its `traceparent`): Ray Serve's spans for it carry the same id."""
    start_ns: int
    """Wall clock (time.time_ns, the clock of Ray's spans) when the client sent it."""
    end_ns: int
    """Wall clock when the client had read the whole answer."""
    server_timing: str
    """The answer's Server-Timing header."""


async def load(
    url: str,
    bodies: list[dict],
    concurrency: int,
    duration: float,
    warmup: float,
    traces: list[Traced] | None = None,
) -> LoadRun:
    """`concurrency` keep-alive clients posting in a closed loop; only requests that start after the warm-up and
    finish before the end count. aiohttp rather than httpx: on 2 cores the client shares the CPU with the server,
    and aiohttp spends about a third of httpx's CPU per request. With `traces`, every request carries a sampled
    W3C `traceparent`, and each counted one is appended there (service.bench_profile)."""
    latencies: list[float] = []
    errors = checked = steered = 0
    unsteered_note: str | None = None
    payloads = [json.dumps(body).encode() for body in bodies]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30.0)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, headers=headers) as session:

        async def worker(seed: int) -> None:
            nonlocal errors, checked, steered, unsteered_note
            i = seed
            while (now := time.perf_counter()) < stop_at:
                payload = payloads[i % len(payloads)]
                i += concurrency
                answer, timing, extra = b"", "", None
                if traces is not None:
                    trace_id = secrets.token_hex(16)
                    extra = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
                    sent_ns = time.time_ns()
                try:
                    async with session.post("/v1/recommend", data=payload, headers=extra) as response:
                        answer = await response.read()
                        ok = response.status == 200
                        timing = response.headers.get("server-timing", "")
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                end, end_ns = time.perf_counter(), time.time_ns()
                if ok:
                    # Read after the clock stopped, and in every mode, so the check costs each mode the same.
                    checked += 1
                    applied, note = steering_reported(answer)
                    steered += applied
                    if not applied and unsteered_note is None:
                        unsteered_note = note
                if now >= measure_from and end <= stop_at:
                    if ok:
                        latencies.append((end - now) * 1000)
                        if traces is not None:
                            traces.append(Traced(trace_id, sent_ns, end_ns, timing))
                    else:
                        errors += 1

        await asyncio.gather(*(worker(s) for s in range(concurrency)))
    return LoadRun(latencies, errors, duration, checked, steered, unsteered_note)


def summarize(runs: list[LoadRun]) -> dict[str, Any]:
    """p50/p99 over the pooled latencies of all rounds; rps over their summed windows."""
    latencies = [v for run in runs for v in run.latencies_ms]
    seconds = sum(run.duration_s for run in runs)
    return {
        "p50_ms": round(_percentile(latencies, 50), 3),
        "p99_ms": round(_percentile(latencies, 99), 3),
        "rps": round(len(latencies) / seconds, 1),
        "requests": len(latencies),
        "errors": sum(run.errors for run in runs),
        "rounds": len(runs),
        "checked": sum(run.checked for run in runs),
        "steering_applied": sum(run.steered for run in runs),
    }
