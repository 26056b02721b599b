"""`recsae bench serve`: latency and throughput of the real HTTP service in every mode (service.bench_modes), beside
its floor (service.floor: the same engine and request path inline behind a plain uvicorn, without Ray), and of the
engine and the replica's request path alone (service.bench_replica). Every HTTP figure is also given as a ratio to
bare (what the middleware costs) and to floor (what the serving stack costs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.bench_load import LoadRun, load, summarize
from service.bench_modes import MODES, SteerPlan, bodies, check_steered, plan_steering
from service.bench_replica import engine_bench, replica_bench
from service.engine import limit_threads
from service.floor import FloorServer
from service.local import LocalService, free_port, start_local
from service.schemas import ServiceConfig
from service.served import Served

FLOOR = "floor"
"""The floor's mode name: monitor-mode requests (SAE on, no steering) answered by service.floor."""
HTTP_MODES = (FLOOR, *MODES)


@dataclass
class ModeLoad:
    """Load runs in each mode against a started local service (and the floor, when given its URL): the deployment's
    SAE is switched only when a mode needs it, and every steer-mode run must have been steered."""

    service: LocalService
    """The running service."""
    served: Served
    """Its bundle, loaded here (the request bodies and the steering check come from it)."""
    plan: SteerPlan
    """What steer mode sends."""
    duration: float
    """Measured seconds per run."""
    warmup: float
    """Unmeasured seconds before each run."""
    floor_url: str | None = None
    """The floor's URL (service.floor), for mode FLOOR."""
    state: dict[str, bool] = field(default_factory=lambda: {"sae": True, "batching": True})
    """The deployment's settings as last applied."""

    def configure(self, **changes: bool) -> None:
        """Apply deployment settings that differ from the current ones."""
        if any(self.state[key] != value for key, value in changes.items()):
            self.state.update(changes)
            self.service.update(**changes)

    def run(self, mode: str, concurrency: int, where: str = "") -> LoadRun:
        """One closed-loop run of `mode` at `concurrency`."""
        if mode != FLOOR:
            self.configure(sae=mode != "bare")
        url = self.floor_url if mode == FLOOR else self.service.url
        assert url is not None, "the floor was not started"
        out = asyncio.run(load(url, bodies(self.served, mode, self.plan), concurrency, self.duration, self.warmup))
        if mode == "steer":
            # Stop at once: the remaining minutes of load would measure an unsteered service as "steer".
            check_steered(out.checked, out.steered, out.unsteered_note, where, self.plan)
        return out

    def rounds(self, modes: tuple[str, ...], concurrency: int, rounds: int) -> dict[str, list[LoadRun]]:
        """`rounds` interleaved rounds of every mode (the order rotates each round, so that drift in the machine's
        load affects all modes alike instead of whichever ran last)."""
        runs: dict[str, list[LoadRun]] = {mode: [] for mode in modes}
        for r in range(rounds):
            shift = r % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                runs[mode].append(self.run(mode, concurrency, f"steer mode, concurrency {concurrency}, round {r + 1}"))
        return runs


def bench_serve(
    bundle: Path,
    duration: float,
    concurrencies: list[int],
    warmup: float = 1.0,
    rounds: int = 3,
    policy: str | None = None,
    edits: list[Any] | None = None,
    user_config: dict[str, Any] | None = None,
    relay: bool = True,
) -> dict[str, Any]:
    """Every mode, floor included, at every concurrency, in `rounds` interleaved rounds (the mode order rotates each
    round), so that drift in the machine's load affects all modes alike instead of whichever ran last. Steer mode
    sends `policy` and/or `edits` (plan_steering; refused with ConfigError before Ray starts); it stops with
    SteeringNotApplied at the first steer run in which an answer was not steered. `user_config` adds deployment
    settings (the floor gets them too, with the SAE on); `relay` False serves without the relaying ingress
    (service.app:app_builder); Ray's settings come from the environment (`ray_env`).
    The floor and the Ray service both run throughout, each idle while the other is measured."""
    limit_threads(1)  # as in a one-CPU replica
    config = ServiceConfig.model_validate({"bundle": str(bundle), **(user_config or {})})
    served = load_quietly(bundle, config)
    plan = plan_steering(served, config, policy, edits)
    result: dict[str, Any] = {
        "bundle": str(bundle),
        "versions": served.versions,
        "duration_s": duration,
        "warmup_s": warmup,
        "rounds": rounds,
        "load_generator": "aiohttp closed loop, same machine",
        "relay": relay,
        "floor": "service.floor: monitor requests, engine inline, one uvicorn process without Ray, no batching",
        "load_average": {"start": [round(v, 2) for v in os.getloadavg()]},
        "steer": plan.record(served),
        "engine_ms": engine_bench(served, plan.edits),
        "http": {},
        "floor_ratios": {},
    }
    floor = FloorServer.start(bundle, {**(user_config or {}), "sae": True})
    try:
        service = start_local(bundle, port=free_port(), metrics_port=free_port(), user_config=user_config,
                              app_args={"relay": relay})  # fmt: skip
    except BaseException:
        floor.stop()
        raise
    # As Ray's processes got them (start_local adds its local defaults, service.local.haproxy_local_env).
    result["ray_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
    modes = ModeLoad(service, served, plan, duration, warmup, floor.url)
    configure, run = modes.configure, modes.run
    try:
        for concurrency in concurrencies:
            runs = modes.rounds(HTTP_MODES, concurrency, rounds)
            row: dict[str, Any] = {mode: summarize(runs[mode]) for mode in HTTP_MODES}
            row["ratios"] = ratios(row)
            # The same ratios within each round: their spread shows how much of a pooled ratio is machine noise.
            row["round_ratios"] = [ratios({m: summarize([runs[m][r]]) for m in MODES}) for r in range(rounds)]
            result["http"][str(concurrency)] = row
            result["floor_ratios"][str(concurrency)] = floor_ratios(row)
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
        result["replica_ms"] = replica_bench(served, config, plan)
        steer_runs = [row["steer"] for row in result["http"].values()]
        result["steer"]["checked"] = sum(r["checked"] for r in steer_runs)
        result["steer"]["steering_applied"] = sum(r["steering_applied"] for r in steer_runs)
    finally:
        try:
            service.stop()
        finally:
            floor.stop()
    result["load_average"]["end"] = [round(v, 2) for v in os.getloadavg()]
    return result


def load_quietly(bundle: Path, config: ServiceConfig) -> Served:
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


def floor_ratios(row: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Every Ray-served mode's p50, p99 and rps against the floor's: what the serving stack costs."""
    floor = row[FLOOR]
    return {
        mode: {
            "p50": _ratio(row[mode]["p50_ms"], floor["p50_ms"]),
            "p99": _ratio(row[mode]["p99_ms"], floor["p99_ms"]),
            "rps": _ratio(row[mode]["rps"], floor["rps"]),
        }
        for mode in MODES
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b and np.isfinite(a) and np.isfinite(b) else None


def write_report(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
