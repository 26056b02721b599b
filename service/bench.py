"""`recsae bench serve`: latency and throughput of the real HTTP service, and of the engine alone.

Modes, all through the same HTTP path, batching and engine:
  bare     the deployment runs with sae=false: ONNX model + ranking only (the original recommender served alone)
  monitor  SAE on every request (encode + reconstruction error for monitoring), no edits: same items as bare
  steer    SAE on, and every request carries steering (a bundled policy if one is usable, else two edits)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import numpy as np

from service.engine import Row, limit_threads
from service.local import free_port, start_local
from service.prometheus import ServiceMetrics
from service.schemas import RecommendRequest, ServiceConfig
from service.served import Served

MODES = ("bare", "monitor", "steer")
ENGINE_BATCHES = (1, 16, 64, 256)


def steering_for(served: Served) -> dict[str, Any]:
    """A bundled usable policy, else: ablate the most frequent latent and nudge the second by +1 std."""
    usable = [p.name for p in served.catalog.policies.values() if p.error is None]
    if usable:
        return {"policy": usable[0]}
    order = np.argsort(-served.engine.sae.stats.frequency.numpy())
    return {"edits": [{"latent": int(order[0]), "op": "ablate"},
                      {"latent": int(order[1]), "op": "nudge", "value": 1.0, "unit": "std"}]}  # fmt: skip


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


async def load(url: str, bodies: list[dict], concurrency: int, duration: float, warmup: float) -> LoadRun:
    """`concurrency` keep-alive clients posting in a closed loop; only requests that start after the warm-up and
    finish before the end count. aiohttp rather than httpx: on 2 cores the client shares the CPU with the server,
    and aiohttp spends about a third of httpx's CPU per request."""
    latencies: list[float] = []
    errors = 0
    payloads = [json.dumps(body).encode() for body in bodies]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30.0)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, headers=headers) as session:

        async def worker(seed: int) -> None:
            nonlocal errors
            i = seed
            while (now := time.perf_counter()) < stop_at:
                payload = payloads[i % len(payloads)]
                i += concurrency
                try:
                    async with session.post("/v1/recommend", data=payload) as response:
                        await response.read()
                        ok = response.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                end = time.perf_counter()
                if now >= measure_from and end <= stop_at:
                    if ok:
                        latencies.append((end - now) * 1000)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(s) for s in range(concurrency)))
    return LoadRun(latencies, errors, duration)


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
    }


def engine_bench(served: Served, repeats: int = 20, seed: int = 0) -> dict[str, Any]:
    """Median milliseconds per batch for each stage, without and with steering on every row."""
    rng = np.random.default_rng(seed)
    n_users = len(served.bundle.user_ids)
    body = steering_for(served)
    if "policy" in body:
        edits = served.catalog.policy(body["policy"]).edits
    else:
        targets = [served.catalog.edit(e["latent"], None, e["op"], e.get("value", 0.0), e.get("unit", "raw"))
                   for e in body["edits"]]  # fmt: skip
        edits = served.catalog.resolve_steering(None, targets)
    engine = served.engine
    out: dict[str, Any] = {}
    for batch in ENGINE_BATCHES:
        for mode in ("bare", "monitor", "steer"):
            rows = [Row(user=int(u), edits=edits if mode == "steer" else []) for u in rng.integers(0, n_users, batch)]
            runs = [engine.recommend(rows, sae=mode != "bare")[1] for _ in range(repeats + 2)][2:]
            stages = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
            stages["per_request_us"] = round(stages["total"] * 1000 / batch, 1)
            out.setdefault(f"batch_{batch}", {})[mode] = stages
    return out


def replica_bench(served: Served, bundle: Path, n: int = 1000) -> dict[str, Any]:
    """The replica's own work per request at concurrency 1, in process (median ms): parse (validation, id and policy
    resolution), engine (one-row batch), metrics (buffering; `flush` is the 1 s refresher's cost spread over the
    requests), response (building and encoding the JSON). Everything else a request costs (HTTP, Ray's proxy and
    actor call) is the same in every mode, so `added_ms` is what the middleware adds to the bare model's latency,
    free of the load generator's noise. Needs Ray initialised (the metrics are Ray's)."""
    config = ServiceConfig(bundle=str(bundle))
    metrics = ServiceMetrics()
    metrics.use_bundle(served, config.concept_metric_cap, config.drift_window)
    out: dict[str, Any] = {}
    for mode in MODES:
        payloads = [json.dumps(b).encode() for b in _bodies(served, mode, n)]
        stages: list[list[float]] = []
        metrics.flush()
        for payload in payloads:
            t0 = time.perf_counter()
            parsed = RecommendRequest.model_validate_json(payload, context={"config": config})
            row = served.requests.parse(parsed, sae=mode != "bare")
            t1 = time.perf_counter()
            results, timings = served.engine.recommend([row], sae=mode != "bare")
            t2 = time.perf_counter()
            metrics.batch(served, [row], results, timings)
            t3 = time.perf_counter()
            json.dumps(served.responses.recommend(row, results[0], config.explain_top)).encode()
            stages.append([t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3])
        t0 = time.perf_counter()
        metrics.flush()
        flush = (time.perf_counter() - t0) / n
        med = np.median(np.asarray(stages), axis=0) * 1000
        row_out = {k: round(float(v), 4) for k, v in zip(("parse", "engine", "metrics", "response"), med, strict=True)}
        row_out["flush"] = round(flush * 1000, 4)
        row_out["total"] = round(sum(row_out.values()), 4)
        out[mode] = row_out
    for mode in ("monitor", "steer"):
        out[mode]["added_ms"] = round(out[mode]["total"] - out["bare"]["total"], 4)
    return out


def _bodies(served: Served, mode: str, n: int = 512, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    users = rng.choice(served.bundle.user_ids, size=n)
    steering = steering_for(served) if mode == "steer" else None
    return [{"user_id": str(u), "k": 10, **({"steering": steering} if steering else {})} for u in users]


def bench_serve(
    bundle: Path, duration: float, concurrencies: list[int], warmup: float = 1.0, rounds: int = 3
) -> dict[str, Any]:
    """Every mode at every concurrency, in `rounds` interleaved rounds (the mode order rotates each round), so that
    drift in the machine's load affects all modes alike instead of whichever ran last."""
    limit_threads(1)  # as in a one-CPU replica
    served = Served.load(bundle, threads=1)
    result: dict[str, Any] = {
        "bundle": str(bundle),
        "versions": served.versions,
        "duration_s": duration,
        "warmup_s": warmup,
        "rounds": rounds,
        "load_generator": "aiohttp closed loop, same machine",
        "engine_ms": engine_bench(served),
        "http": {},
    }
    service = start_local(bundle, port=free_port(), metrics_port=free_port())
    state = {"sae": True, "batching": True}

    def configure(**changes: bool) -> None:
        if any(state[key] != value for key, value in changes.items()):
            state.update(changes)
            service.update(**changes)

    def run(mode: str, concurrency: int) -> LoadRun:
        configure(sae=mode != "bare")
        return asyncio.run(load(service.url, _bodies(served, mode), concurrency, duration, warmup))

    try:
        result["replica_ms"] = replica_bench(served, bundle)
        for concurrency in concurrencies:
            runs: dict[str, list[LoadRun]] = {mode: [] for mode in MODES}
            for r in range(rounds):
                for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                    runs[mode].append(run(mode, concurrency))
            row: dict[str, Any] = {mode: summarize(runs[mode]) for mode in MODES}
            row["ratios"] = ratios(row)
            # The same ratios within each round: their spread shows how much of a pooled ratio is machine noise.
            row["round_ratios"] = [ratios({m: summarize([runs[m][r]]) for m in MODES}) for r in range(rounds)]
            result["http"][str(concurrency)] = row
        batching: dict[str, Any] = {"concurrency": 32, "mode": "monitor"}
        by_setting: dict[bool, list[LoadRun]] = {True: [], False: []}
        for r in range(rounds):
            for enabled in (True, False) if r % 2 == 0 else (False, True):
                configure(batching=enabled)
                by_setting[enabled].append(run("monitor", 32))
        batching["batched"] = summarize(by_setting[True])
        batching["unbatched"] = summarize(by_setting[False])
        batching["rps_ratio"] = _ratio(batching["batched"]["rps"], batching["unbatched"]["rps"])
        result["batching"] = batching
    finally:
        service.stop()
    return result


def ratios(row: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """monitor and steer p50 and rps against bare."""
    bare = row["bare"]
    return {
        "monitor_p50": _ratio(row["monitor"]["p50_ms"], bare["p50_ms"]),
        "steer_p50": _ratio(row["steer"]["p50_ms"], bare["p50_ms"]),
        "monitor_rps": _ratio(row["monitor"]["rps"], bare["rps"]),
        "steer_rps": _ratio(row["steer"]["rps"], bare["rps"]),
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b and np.isfinite(a) and np.isfinite(b) else None


def write_report(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
