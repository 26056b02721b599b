"""`recsae bench serve`: latency and throughput of the real HTTP service, and of the engine alone.

Modes, all through the same HTTP path, batching and engine:
  bare     the deployment runs with sae=false: ONNX model + ranking only (the original recommender served alone)
  monitor  SAE on every request (encode + reconstruction error for monitoring), no edits: same items as bare
  steer    SAE on, and every request carries the same steering: `--policy` and/or `--edits`, else default_steering.
           Every answer in steer mode must report `steering_applied: true`, or the bench fails: a deployment with the
           kill switch on answers 200 without steering, and would otherwise be timed as "steered".

The steering is validated by the service's own request path (schema, catalog, edit rules) before Ray starts, and
recorded in the report as `steer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import numpy as np
from pydantic import ValidationError

from recsae_core.common.errors import ConfigError, RecsaeError
from recsae_core.sae.edits import Edit
from service.engine import Row, limit_threads
from service.errors import RequestError
from service.local import free_port, start_local
from service.prometheus import ServiceMetrics
from service.schemas import RecommendRequest, ServiceConfig, validation_message
from service.served import Served

MODES = ("bare", "monitor", "steer")
ENGINE_BATCHES = (1, 16, 64, 256)
REPLICA_REQUESTS = 1000
"""Requests per mode that replica_bench times."""
DEFAULT_POLICY = "popularity"
"""The policy steer mode uses when given neither --policy nor --edits (the one docs/benchmarks.md measured)."""


class SteeringNotApplied(RecsaeError):
    """A steer-mode answer did not report `steering_applied: true`: the figures would not measure steering."""


class SteerPlan(NamedTuple):
    """What every steer-mode request sends, and what it resolves to."""

    steering: dict[str, Any]
    """The request's `steering` object, as sent over HTTP: `policy` and/or `edits`."""
    chosen_by: str
    """'options' (--policy/--edits), or 'default: ...' naming the rule that picked it."""
    edits: list[Edit]
    """The latent edits the service resolves it to (policy edits first)."""

    def record(self, served: Served) -> dict[str, Any]:
        """The report's `steer` entry."""
        return {
            "policy": self.steering.get("policy"),
            "edits": self.steering.get("edits", []),
            "chosen_by": self.chosen_by,
            "resolved_edits": [served.responses.edit_summary(e) for e in self.edits],
        }


def default_steering(served: Served) -> tuple[dict[str, Any], str]:
    """Without options: the bundle's `popularity` policy if usable, else its first usable policy in name order,
    else two edits (ablate the most frequent latent, nudge the second by +1 std). Name order, not the bundle's file
    order, so that adding a policy (a gender one, say) never changes what an existing bundle is benchmarked with."""
    usable = sorted(name for name, policy in served.catalog.policies.items() if policy.error is None)
    if DEFAULT_POLICY in usable:
        return {"policy": DEFAULT_POLICY}, f"default: the policy named '{DEFAULT_POLICY}'"
    if usable:
        return {"policy": usable[0]}, f"default: no usable '{DEFAULT_POLICY}' policy; the first usable one by name"
    order = np.argsort(-served.engine.sae.stats.frequency.numpy(), kind="stable")
    edits = [{"latent": int(order[0]), "op": "ablate"},
             {"latent": int(order[1]), "op": "nudge", "value": 1.0, "unit": "std"}]  # fmt: skip
    return {"edits": edits}, "default: no usable policy; two edits on the most frequent latents"


def plan_steering(
    served: Served, config: ServiceConfig, policy: str | None = None, edits: list[Any] | None = None
) -> SteerPlan:
    """The steering of steer mode: `policy` and/or `edits` (as the HTTP API takes them), else `default_steering`.
    It is validated by the path every request takes (schema, then the catalog and recsae_core's edit rules), so
    what is accepted here is exactly what the service accepts; a refusal is a ConfigError naming the problem."""
    if policy is None and edits is None:
        steering, chosen_by = default_steering(served)
    else:
        steering = {"policy": policy} if policy is not None else {}
        if edits is not None:
            steering["edits"] = edits
        chosen_by = "options"
    shown = json.dumps(steering, separators=(", ", ": "))
    body = {"user_id": str(served.bundle.user_ids[0]), "steering": steering}
    try:
        request = RecommendRequest.model_validate(body, context={"config": config})
        row = served.requests.parse(request)
    except ValidationError as err:
        raise ConfigError(f"steering {shown}: {validation_message(err)}") from None
    except RequestError as err:
        raise ConfigError(f"steering {shown}: {err.message}") from None
    if not row.edits:
        raise ConfigError(f"steering {shown}: no edits to apply; steer mode needs a policy or at least one edit")
    return SteerPlan(steering, chosen_by, row.edits)


def parse_edits(text: str) -> list[Any]:
    """--edits: a JSON list. Only its syntax is checked here; the edits themselves by plan_steering, as a request's."""
    try:
        edits = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--edits is not valid JSON: {err.msg} at column {err.colno} of {text!r}") from None
    if not isinstance(edits, list):
        # Checked here because None would read as "no --edits" and quietly fall back to the default steering.
        raise ConfigError(f"--edits takes a JSON list of edits ('[{{...}}, ...]'), got {text!r}")
    return edits


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


async def load(url: str, bodies: list[dict], concurrency: int, duration: float, warmup: float) -> LoadRun:
    """`concurrency` keep-alive clients posting in a closed loop; only requests that start after the warm-up and
    finish before the end count. aiohttp rather than httpx: on 2 cores the client shares the CPU with the server,
    and aiohttp spends about a third of httpx's CPU per request."""
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
                answer = b""
                try:
                    async with session.post("/v1/recommend", data=payload) as response:
                        answer = await response.read()
                        ok = response.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                end = time.perf_counter()
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
                    else:
                        errors += 1

        await asyncio.gather(*(worker(s) for s in range(concurrency)))
    return LoadRun(latencies, errors, duration, checked, steered, unsteered_note)


def steering_reported(answer: bytes | dict[str, Any]) -> tuple[bool, str | None]:
    """Whether an answer reports `steering_applied: true`, and if not, what it says instead."""
    try:
        body = json.loads(answer) if isinstance(answer, bytes) else answer
    except ValueError:
        return False, "the answer is not JSON"
    if not isinstance(body, dict) or "steering_applied" not in body:
        return False, "the answer has no steering_applied field"
    if body["steering_applied"] is True:
        return True, None
    return False, str(body.get("steering_suppressed") or f"steering_applied is {json.dumps(body['steering_applied'])}")


def check_steered(checked: int, steered: int, note: str | None, where: str, plan: SteerPlan) -> None:
    """Raise SteeringNotApplied unless every one of `checked` (> 0) steer-mode answers was steered."""
    if checked and steered == checked:
        return
    shown = json.dumps(plan.steering, separators=(", ", ": "))
    if not checked:
        raise SteeringNotApplied(f"{where}: no successful answer to check steering {shown} on")
    raise SteeringNotApplied(
        f"{where}: {checked - steered} of {checked} answers to steering {shown} did not report "
        f"steering_applied: true ({note}); the figures would not measure steering"
    )


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


def replica_bench(served: Served, config: ServiceConfig, plan: SteerPlan, n: int = 1000) -> dict[str, Any]:
    """The replica's own work per request at concurrency 1, in process (median ms): parse (validation, id and policy
    resolution), engine (one-row batch), metrics (buffering; `flush` is the 1 s refresher's cost spread over the
    requests), response (building and encoding the JSON). Everything else a request costs (HTTP, Ray's proxy and
    actor call) is the same in every mode, so `added_ms` is what the middleware adds to the bare model's latency,
    free of the load generator's noise. `config` is the deployment's (its kill switch included); every steer-mode
    answer must report steering_applied, or SteeringNotApplied is raised. Needs Ray initialised (Ray's metrics)."""
    metrics = ServiceMetrics()
    metrics.use_bundle(served, config.concept_metric_cap, config.drift_window)
    out: dict[str, Any] = {}
    for mode in MODES:
        payloads = [json.dumps(b).encode() for b in _bodies(served, mode, plan, n)]
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


def _bodies(served: Served, mode: str, plan: SteerPlan, n: int = 512, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    users = rng.choice(served.bundle.user_ids, size=n)
    steering = plan.steering if mode == "steer" else None
    return [{"user_id": str(u), "k": 10, **({"steering": steering} if steering else {})} for u in users]


def bench_serve(
    bundle: Path,
    duration: float,
    concurrencies: list[int],
    warmup: float = 1.0,
    rounds: int = 3,
    policy: str | None = None,
    edits: list[Any] | None = None,
    user_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every mode at every concurrency, in `rounds` interleaved rounds (the mode order rotates each round), so that
    drift in the machine's load affects all modes alike instead of whichever ran last. Steer mode sends `policy`
    and/or `edits` (plan_steering; refused with ConfigError before Ray starts); it stops with SteeringNotApplied
    at the first steer run in which an answer was not steered. `user_config` adds deployment settings."""
    limit_threads(1)  # as in a one-CPU replica
    config = ServiceConfig.model_validate({"bundle": str(bundle), **(user_config or {})})
    served = _load_quietly(bundle, config)
    plan = plan_steering(served, config, policy, edits)
    result: dict[str, Any] = {
        "bundle": str(bundle),
        "versions": served.versions,
        "duration_s": duration,
        "warmup_s": warmup,
        "rounds": rounds,
        "load_generator": "aiohttp closed loop, same machine",
        "steer": plan.record(served),
        "engine_ms": engine_bench(served, plan.edits),
        "http": {},
    }
    service = start_local(bundle, port=free_port(), metrics_port=free_port(), user_config=user_config)
    state = {"sae": True, "batching": True}

    def configure(**changes: bool) -> None:
        if any(state[key] != value for key, value in changes.items()):
            state.update(changes)
            service.update(**changes)

    def run(mode: str, concurrency: int, where: str = "") -> LoadRun:
        configure(sae=mode != "bare")
        out = asyncio.run(load(service.url, _bodies(served, mode, plan), concurrency, duration, warmup))
        if mode == "steer":
            # Stop at once: the remaining minutes of load would measure an unsteered service as "steer".
            check_steered(out.checked, out.steered, out.unsteered_note, where, plan)
        return out

    try:
        for concurrency in concurrencies:
            runs: dict[str, list[LoadRun]] = {mode: [] for mode in MODES}
            for r in range(rounds):
                for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                    where = f"steer mode, concurrency {concurrency}, round {r + 1}"
                    runs[mode].append(run(mode, concurrency, where))
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
        # After the HTTP runs (it is in process and quick), so a deployment that does not steer fails on the
        # answers it sends rather than here.
        result["replica_ms"] = replica_bench(served, config, plan, REPLICA_REQUESTS)
        steer_runs = [row["steer"] for row in result["http"].values()]
        result["steer"]["checked"] = sum(r["checked"] for r in steer_runs)
        result["steer"]["steering_applied"] = sum(r["steering_applied"] for r in steer_runs)
    finally:
        service.stop()
    return result


def _load_quietly(bundle: Path, config: ServiceConfig) -> Served:
    """The bundle as the deployment loads it: with its edit bounds, so that a policy is usable here exactly when the
    replica finds it usable. The catalog's warnings about other, unusable policies are held back: the bench uses one
    policy, and an unusable one is refused with its reason, on one line."""
    log = logging.getLogger("recsae.service")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return Served.load(bundle, threads=1, bounds=config.edit_bounds())
    finally:
        log.setLevel(level)


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
