"""The in-process parts of `recsae bench serve`: the engine's stages per batch size, and the replica's own work per
request (what the middleware adds to the bare model, free of HTTP and of the load generator)."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import numpy as np

from recsae_core.sae.edits import Edit
from service.bench_modes import MODES, SteerPlan, bodies, check_steered, steering_reported
from service.engine import Row
from service.prometheus import ServiceMetrics
from service.schemas import RecommendRequest, ServiceConfig
from service.served import Served

ENGINE_BATCHES = (1, 16, 64, 256)
REPLICA_REQUESTS = 1000
"""Requests per mode that replica_bench times."""


def engine_bench(served: Served, edits: list[Edit], repeats: int = 20, seed: int = 0) -> dict[str, Any]:
    """Median milliseconds per batch for each stage, without and with `edits` (steer mode's) on every row."""
    rng = np.random.default_rng(seed)
    n_users = len(served.bundle.user_ids)
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


def replica_bench(served: Served, config: ServiceConfig, plan: SteerPlan, n: int | None = None) -> dict[str, Any]:
    """The replica's own work per request at concurrency 1, in process (median ms): parse (validation, id and policy
    resolution), engine (one-row batch), metrics (buffering; `flush` is the 1 s refresher's cost spread over the
    requests), response (building and encoding the JSON). Everything else a request costs (HTTP, Ray's proxy and
    actor call) is the same in every mode, so `added_ms` is what the middleware adds to the bare model's latency,
    free of the load generator's noise. `config` is the deployment's (its kill switch included); every steer-mode
    answer must report steering_applied, or SteeringNotApplied is raised. Needs Ray initialised (Ray's metrics)."""
    n = REPLICA_REQUESTS if n is None else n
    metrics = ServiceMetrics()
    metrics.use_bundle(served, config.concept_metric_cap, config.drift_window)
    out: dict[str, Any] = {}
    for mode in MODES:
        payloads = [json.dumps(b).encode() for b in bodies(served, mode, plan, n)]
        stages: list[list[float]] = []
        steered, note = 0, None
        metrics.flush()
        for payload in payloads:
            t0 = time.perf_counter()
            parsed = RecommendRequest.model_validate_json(payload, context={"config": config})
            row = served.requests.parse(parsed, sae=mode != "bare", steering_enabled=config.steering)
            t1 = time.perf_counter()
            results, timings = served.engine.recommend([row], sae=mode != "bare")
            t2 = time.perf_counter()
            metrics.batch(served, [row], results, timings)
            t3 = time.perf_counter()
            answer = served.responses.recommend(row, results[0], config.explain_top)
            json.dumps(answer).encode()
            stages.append([t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3])
            if mode == "steer":
                applied, why = steering_reported(answer)
                steered += applied
                note = note or why
        if mode == "steer":
            check_steered(len(payloads), steered, note, "replica_bench, steer mode", plan)
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
