"""The load benchmark: pooling of interleaved rounds, the steering steer mode uses (chosen, validated, recorded and
checked on every answer), and the in-process timing of the replica's request path. Two short real runs of `recsae
bench serve` (one round of fractions of a second per mode) check the steering end to end; the figures themselves need
minutes of wall time (docs/benchmarks.md), which the suite does not spend."""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from _cli import cli_refusal

import service.bench
import service.bench_replica
from recsae_core.common.errors import ConfigError, RecsaeError
from service.bench import FLOOR, floor_ratios
from service.bench_load import LoadRun, summarize
from service.bench_modes import MODES, SteeringNotApplied, plan_steering, steering_reported
from service.bench_replica import replica_bench
from service.cli import main
from service.floor import FloorServer
from service.local import free_port, start_local
from service.schemas import ServiceConfig
from service.served import Served
from service.steering import Policy

TINY_RUN = ["--duration", "0.2", "--warmup", "0.1", "--rounds", "1", "--concurrency", "1"]
"""The smallest `bench serve` run: one round per mode at concurrency 1."""


def test_summarize_pools_rounds_before_taking_percentiles():
    runs = [LoadRun([1.0, 2.0, 3.0], 0, 2.0), LoadRun([10.0, 20.0, 30.0, 40.0], 1, 2.0)]
    out = summarize(runs)
    # Pooled p50 of [1, 2, 3, 10, 20, 30, 40] is 10, not the mean of the per-round medians (2 and 25).
    assert out["p50_ms"] == 10.0
    assert out["requests"] == 7 and out["errors"] == 1 and out["rounds"] == 2
    assert out["rps"] == round(7 / 4.0, 1)


def test_summarize_without_successes_reports_nan_latency():
    out = summarize([LoadRun([], 3, 1.0)])
    assert math.isnan(out["p50_ms"]) and out["rps"] == 0.0 and out["errors"] == 3


def test_summarize_counts_the_answers_that_reported_steering():
    out = summarize([LoadRun([1.0], 0, 1.0, checked=5, steered=5), LoadRun([2.0], 0, 1.0, checked=3, steered=2)])
    assert out["checked"] == 8 and out["steering_applied"] == 7


def test_steering_reported_reads_the_answer_and_says_why_not() -> None:
    assert steering_reported(b'{"items": [], "steering_applied": true}') == (True, None)
    suppressed = {"steering_applied": False, "steering_suppressed": "steering is switched off (kill switch)"}
    assert steering_reported(json.dumps(suppressed).encode()) == (False, "steering is switched off (kill switch)")
    assert steering_reported({"steering_applied": "yes"}) == (False, 'steering_applied is "yes"')
    assert steering_reported(b'{"items": []}')[0] is False
    assert steering_reported(b"<html>")[0] is False


# ------------------------------------------------------------------ the steering of steer mode (no Ray)


@pytest.fixture
def served(service_bundle: Path) -> Served:
    """The test bundle as the bench loads it: policies 'tail-boost' (usable) and 'broken' (unusable)."""
    return Served.load(service_bundle, threads=1, bounds=ServiceConfig(bundle=str(service_bundle)).edit_bounds())


def _add_policy(served: Served, name: str) -> None:
    """A usable policy under another name (the edits of 'tail-boost', already validated for this bundle)."""
    served.catalog.policies[name] = Policy(name, "", list(served.catalog.policies["tail-boost"].edits))


def test_default_is_the_popularity_policy_even_when_another_sorts_first(served: Served) -> None:
    # The case: a gender policy written beside the popularity one must not take over steer mode.
    _add_policy(served, "gender")
    _add_policy(served, "popularity")
    plan = plan_steering(served, ServiceConfig(bundle="b"))
    assert plan.steering == {"policy": "popularity"}
    assert plan.chosen_by == "default: the policy named 'popularity'"


def test_default_without_a_popularity_policy_is_the_first_usable_by_name(served: Served) -> None:
    _add_policy(served, "zz-last")
    plan = plan_steering(served, ServiceConfig(bundle="b"))
    # 'broken' sorts first but is unusable.
    assert plan.steering == {"policy": "tail-boost"} and plan.chosen_by.startswith("default: no usable 'popularity'")
    record = plan.record(served)
    assert record["policy"] == "tail-boost" and record["edits"] == []
    assert record["resolved_edits"] == [
        served.responses.edit_summary(e) for e in served.catalog.policy("tail-boost").edits
    ]


def test_default_without_usable_policies_is_two_edits(served: Served) -> None:
    del served.catalog.policies["tail-boost"]
    plan = plan_steering(served, ServiceConfig(bundle="b"))
    assert "policy" not in plan.steering and [e["op"] for e in plan.steering["edits"]] == ["ablate", "nudge"]
    assert len(plan.edits) == 2 and plan.chosen_by.startswith("default: no usable policy")


def test_policy_and_edits_given_are_sent_and_recorded_as_given(served: Served) -> None:
    policy_latent = served.catalog.policy("tail-boost").edits[0].latent
    concept = next(c["name"] for c in served.catalog.concepts if c["latent"] != policy_latent)
    edits = [{"concept": concept, "op": "nudge", "value": 1, "unit": "std"}]
    plan = plan_steering(served, ServiceConfig(bundle="b"), "tail-boost", edits)
    assert plan.steering == {"policy": "tail-boost", "edits": edits} and plan.chosen_by == "options"
    record = plan.record(served)
    assert record["policy"] == "tail-boost" and record["edits"] == edits
    assert [e["latent"] for e in record["resolved_edits"]] == [policy_latent, served.catalog.latent_of(concept)]


def test_steering_the_service_refuses_is_refused_the_same_way(served: Served) -> None:
    config = ServiceConfig(bundle="b")
    with pytest.raises(
        ConfigError, match=r"steering \{\"policy\": \"tail-boosts\"\}: unknown policy 'tail-boosts'; did"
    ):
        plan_steering(served, config, "tail-boosts")
    with pytest.raises(ConfigError, match="policy 'broken' cannot be used with this bundle: edit 0: unknown concept"):
        plan_steering(served, config, "broken")
    with pytest.raises(ConfigError, match=r"steering.edits\[0\]: \|value\| 50.0 std exceeds the bound of 10.0 std"):
        plan_steering(served, config, None, [{"latent": 0, "op": "nudge", "value": 50, "unit": "std"}])
    with pytest.raises(ConfigError, match="no edits to apply"):
        plan_steering(served, config, None, [])


# ------------------------------------------------------------------ the command line


def _bench(bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "serve", "--bundle", str(bundle), "--out", str(out), *TINY_RUN, *extra]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--policy", "nope"], 'recsae: error: steering {"policy": "nope"}: unknown policy \'nope\''),
        (["--policy", "broken"], "policy 'broken' cannot be used with this bundle"),
        (["--edits", '[{"latent": 3, "op": "nudge"'], "recsae: error: --edits is not valid JSON: "),
        (["--edits", "null"], "recsae: error: --edits takes a JSON list of edits"),
        (["--edits", '[{"latent": 3, "op": "zap"}]'], "steering.edits[0].op: Input should be 'ablate', 'pin'"),
        (["--edits", '[{"latent": 9999, "op": "ablate"}]'], "latent 9999 out of range [0, "),
    ],
)
def test_bad_steering_options_fail_in_one_line_before_ray_starts(
    capsys: pytest.CaptureFixture[str], service_bundle: Path, tmp_path: Path, extra: list[str], expected: str
) -> None:
    line = cli_refusal(capsys, _bench(service_bundle, tmp_path / "o.json", *extra), entry=main)
    assert expected in line
    assert not ray.is_initialized() and not (tmp_path / "o.json").exists()


@pytest.fixture
def small_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the in-process parts of a bench run (the HTTP part is shrunk by TINY_RUN)."""
    monkeypatch.setattr(service.bench_replica, "ENGINE_BATCHES", (1,))
    monkeypatch.setattr(service.bench_replica, "REPLICA_REQUESTS", 20)


@pytest.mark.slow
@pytest.mark.usefixtures("small_bench")
def test_bench_serve_records_the_steering_and_that_every_answer_was_steered(
    capsys: pytest.CaptureFixture[str], service_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    assert main(_bench(service_bundle, out)) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    steer = report["steer"]
    assert steer["policy"] == "tail-boost" and steer["edits"] == []
    assert steer["chosen_by"].startswith("default: no usable 'popularity' policy")
    assert steer["resolved_edits"][0]["op"] == "nudge"
    http = report["http"]["1"]
    assert http["steer"]["checked"] > 0 and http["steer"]["steering_applied"] == http["steer"]["checked"]
    assert steer["checked"] == steer["steering_applied"] == http["steer"]["checked"]
    assert http["monitor"]["checked"] > 0 and http["monitor"]["steering_applied"] == 0
    assert set(report["replica_ms"]) == set(MODES)
    # The floor ran beside the modes, and every mode is given against it.
    assert http[FLOOR]["requests"] > 0 and http[FLOOR]["errors"] == 0 and http[FLOOR]["steering_applied"] == 0
    ratios = report["floor_ratios"]["1"]
    assert set(report["floor_ratios"]) == {"1"} and set(ratios) == set(MODES)
    for mode in MODES:
        assert set(ratios[mode]) == {"p50", "p99", "rps"}
        assert ratios[mode]["p50"] == pytest.approx(http[mode]["p50_ms"] / http[FLOOR]["p50_ms"], abs=1e-3)
        assert ratios[mode]["rps"] == pytest.approx(http[mode]["rps"] / http[FLOOR]["rps"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.usefixtures("small_bench")
def test_bench_serve_fails_when_the_service_does_not_steer(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, service_bundle: Path, tmp_path: Path
) -> None:
    # The deployment runs with the steering kill switch on: answers come back 200, unsteered, and say so.
    switched_off = functools.partial(service.bench.bench_serve, user_config={"steering": False})
    monkeypatch.setattr(service.bench, "bench_serve", switched_off)
    out = tmp_path / "bench.json"
    assert main(_bench(service_bundle, out, "--policy", "tail-boost")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recsae: error: ")]
    assert len(errors) == 1, errors
    assert errors[0].startswith("recsae: error: steer mode, concurrency 1, round 1: ")
    assert (
        "did not report steering_applied: true (steering is switched off on this deployment (kill switch))" in errors[0]
    )
    assert not out.exists() and not ray.is_initialized()


# ------------------------------------------------------------------ the replica's request path, in process


@pytest.fixture
def served_on_ray(service_bundle: Path) -> Iterator[tuple[Served, Path]]:
    """A small real bundle, loaded as a replica serves it, with a local Ray for the metrics (no Serve app:
    replica_bench drives the replica's request path in process). Per test, not per module: the bench runs above
    start and stop their own Ray in this process, and must not find one running."""
    bundle = service_bundle
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield Served.load(bundle, threads=1), bundle
    finally:
        ray.shutdown()


def test_replica_bench_times_every_stage_of_every_mode(served_on_ray: tuple[Served, Path]) -> None:
    served, bundle = served_on_ray
    config = ServiceConfig(bundle=str(bundle))
    out = replica_bench(served, config, plan_steering(served, config), n=60)
    stages = ("parse", "engine", "metrics", "response", "flush", "total")
    for mode in MODES:
        assert all(math.isfinite(out[mode][s]) and out[mode][s] >= 0 for s in stages), out[mode]
        assert out[mode]["total"] == pytest.approx(sum(out[mode][s] for s in stages[:-1]), abs=1e-3)
    for mode in ("monitor", "steer"):
        assert out[mode]["added_ms"] == pytest.approx(out[mode]["total"] - out["bare"]["total"], abs=1e-3)
    assert "added_ms" not in out["bare"]


def test_replica_bench_fails_when_steering_is_switched_off(served_on_ray: tuple[Served, Path]) -> None:
    served, bundle = served_on_ray
    config = ServiceConfig(bundle=str(bundle), steering=False)
    with pytest.raises(
        SteeringNotApplied, match=r"replica_bench, steer mode: 30 of 30 answers to steering .*\(kill switch\)"
    ):
        replica_bench(served, config, plan_steering(served, config), n=30)


# ------------------------------------------------------------------ the floor


def test_floor_ratios_divide_each_mode_by_the_floor() -> None:
    def row(p50: float, p99: float, rps: float) -> dict[str, float]:
        return {"p50_ms": p50, "p99_ms": p99, "rps": rps}

    out = floor_ratios(
        {FLOOR: row(2, 4, 400), "bare": row(10, 20, 100), "monitor": row(11, 30, 80), "steer": row(12, 40, 0)}
    )
    assert out == {
        "bare": {"p50": 5.0, "p99": 5.0, "rps": 0.25},
        "monitor": {"p50": 5.5, "p99": 7.5, "rps": 0.2},
        "steer": {"p50": 6.0, "p99": 10.0, "rps": 0.0},
    }
    # A floor without answers gives no ratio rather than infinity.
    assert floor_ratios({FLOOR: row(float("nan"), float("nan"), 0), **{m: row(1, 1, 1) for m in MODES}})["bare"] == {
        "p50": None,
        "p99": None,
        "rps": None,
    }


FLOOR_SETTINGS = {"max_body_bytes": 4096, "max_history": 60}


@pytest.mark.slow
def test_floor_answers_exactly_as_the_deployment(service_bundle: Path) -> None:
    """The floor is the deployment's request path without Ray: the same bytes for the same request, good or bad."""
    served = Served.load(service_bundle, threads=1)
    users = [str(u) for u in served.bundle.user_ids[:3]]
    items = served.responses.item_ids
    concept = served.catalog.concepts[0]["name"]
    requests = [
        {"user_id": users[0]},
        {"user_id": users[1], "k": 3, "explain": True},
        {"user_id": users[2], "k": 20, "exclude_seen": False},
        {"history": [items[3], items[17], items[42]], "k": 5, "explain": True},
        {"user_id": users[0], "steering": {"policy": "tail-boost"}, "explain": True},
        {"user_id": users[1], "steering": {"edits": [{"concept": concept, "op": "nudge", "value": 1, "unit": "std"}]}},
        {"user_id": "no-such-user"},
        {"user_id": users[0], "steering": {"policy": "broken"}},
        {"user_id": users[0], "k": "many"},
        {"history": [items[0]] * 61},
        {"user_id": users[0], "pad": "x" * 5000},
    ]
    payloads = [json.dumps(body).encode() for body in requests] + [b"{not json"]
    floor = FloorServer.start(service_bundle, FLOOR_SETTINGS)
    try:
        service = start_local(service_bundle, port=free_port(), metrics_port=free_port(), user_config=FLOOR_SETTINGS)
        try:
            statuses = set()
            for payload in payloads:
                ours = httpx.post(f"{floor.url}/v1/recommend", content=payload, timeout=30)
                theirs = httpx.post(f"{service.url}/v1/recommend", content=payload, timeout=30)
                assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content), payload[:80]
                statuses.add(ours.status_code)
            assert {200, 404, 413, 422} <= statuses
        finally:
            service.stop()
    finally:
        floor.stop()
    assert floor.process.returncode is not None


def test_floor_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(RecsaeError, match=r"the floor server exited with code 2: floor: error: .*manifest"):
        FloorServer.start(tmp_path)
