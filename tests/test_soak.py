"""`recsae bench soak`: the seeded traffic (every call checked against the replica's own request path), how answers are
judged, the summary's definitions, the command line's refusals, and one short real soak on loopback. The issue's
figures need 30 minutes (docs/benchmarks.md); the suite checks the machinery and the answers, never wall time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from _cli import cli_refusal

from service.cli import main
from service.local import MODEL_DEPLOYMENT
from service.schemas import ServiceConfig
from service.served import Served
from service.soak import Recorder, Window, summarize_soak
from service.soak_config import SoakOptions
from service.soak_traffic import (
    BAD_KINDS,
    VALID_KINDS,
    Call,
    Schedule,
    answer_problem,
    build_schedule,
    in_process_status,
)


@pytest.fixture(scope="module")
def served(service_bundle: Path) -> Served:
    return Served.load(service_bundle, threads=1)


def test_schedule_is_seeded_mixes_every_kind_and_each_call_is_what_its_kind_says(served: Served) -> None:
    config = ServiceConfig(bundle=str(served.bundle.folder))
    schedule = build_schedule(served, config, bad_share=0.05, seed=3)
    assert schedule.skipped == {}  # the test bundle takes every valid kind (one usable policy, histories)
    assert set(schedule.mix()) == set(VALID_KINDS) | set(BAD_KINDS)
    bad = sum(not call.valid for call in schedule.calls)
    assert 0.03 < bad / len(schedule.calls) < 0.07
    assert schedule == build_schedule(served, config, bad_share=0.05, seed=3)
    assert schedule.calls != build_schedule(served, config, bad_share=0.05, seed=4).calls
    for call in schedule.calls[:300]:  # build_schedule checks all; this checks that check
        status = in_process_status(call, served, config)
        assert status == 200 if call.valid else 400 <= status < 500, call
    oversize = next(c for c in schedule.calls if c.kind == "oversize_body")
    assert in_process_status(oversize, served, config) == 413
    policies = {json.loads(c.body)["steering"]["policy"] for c in schedule.calls if c.kind == "policy"}
    usable = {name for name, policy in served.catalog.policies.items() if policy.error is None}
    assert policies == usable and "tail-boost" in usable and "broken" not in usable  # every usable one, only those
    assert all(c.method == "GET" for c in schedule.calls if c.kind in ("plain_get", "bad_query"))


def test_a_bundle_without_usable_policies_skips_the_policy_kind(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(served.catalog, "policies", {k: v for k, v in served.catalog.policies.items() if v.error})
    schedule = build_schedule(served, ServiceConfig(bundle="b"), bad_share=0.0, seed=0)
    assert schedule.skipped == {"policy": "the bundle has no usable policy"}
    assert "policy" not in schedule.mix() and all(call.valid for call in schedule.calls)


def test_answers_are_judged_by_kind() -> None:
    steered = Call("policy", True, "POST", "/v1/recommend", b"{}", "steered")
    bad = BAD_K
    ok = json.dumps({"items": [], "steering_applied": True}).encode()
    assert answer_problem(steered, 200, ok) is None
    unsteered = json.dumps({"items": [], "steering_applied": False, "steering_suppressed": "kill switch"}).encode()
    assert answer_problem(steered, 200, unsteered) == "steering not applied (kill switch)"
    assert answer_problem(steered, 500, b'{"detail": "boom"}').startswith("answered 500")
    assert answer_problem(steered, None, b"").startswith("no answer")
    assert answer_problem(bad, 422, b"") is None and answer_problem(bad, 413, b"") is None
    assert answer_problem(bad, 200, ok) == "bad input answered 200"
    assert answer_problem(bad, 500, b"") == "bad input answered 500"
    explain = Call("explain", True, "POST", "/v1/recommend", b"{}", "explained")
    assert answer_problem(explain, 200, ok) == "explain answered without an explanation"


PLAIN = Call("plain_post", True, "POST", "/v1/recommend", b"{}", None)
BAD_K = Call("bad_k", False, "POST", "/v1/recommend", b"{}", None)


def _window(
    index: int, rss: float, p99: float, series: int, options: SoakOptions, pids: list[int] | None = None
) -> Window:
    replicas = {"recsae": {"a": rss / 2, "b": rss / 2}, "ingress": {"c": 100.0}}
    pids_by = {"recsae": pids or [1, 2], "ingress": [3]}
    return Window(index, (index + 1) * options.window, index >= options.first_steady, 100, 95, 10.0, p99 / 2, p99,
                  0, 0, replicas, pids_by, 50.0, 300 + series, series, 1000)  # fmt: skip


def test_summary_compares_the_last_window_with_the_first_steady_one() -> None:
    options = SoakOptions(Path("b"), minutes=2, window=20, warmup=30, replicas=2)
    assert (options.n_windows, options.first_steady) == (6, 2)
    # Warm-up windows (0, 1) grow fast and are not the baseline; steady ones go 200 -> 208 MiB and 10 -> 13 ms.
    shape = [(150, 40, 10), (190, 30, 20), (200, 10, 30), (204, 11, 30), (206, 12, 30), (208, 13, 30)]
    windows = [_window(i, *values, options) for i, values in enumerate(shape)]
    recorder = Recorder(Schedule([PLAIN, BAD_K], {}))
    recorder.record(PLAIN, 200, b'{"items": []}', 5.0)
    recorder.record(BAD_K, 422, b"", 1.0)
    summary = summarize_soak(windows, recorder, options)
    assert summary["first_steady_window"] == 2
    assert summary["rss_growth_pct"] == 4.0 and summary["p99_drift_pct"] == 30.0
    assert summary["rss_growth_pct_by_deployment"] == {"ingress": 0.0, "recsae": 4.0}
    assert summary["recsae_series_first_steady"] == summary["recsae_series_last"] == 30
    assert summary["goals"] == {
        "rss_growth_under_5pct": True, "p99_drift_under_20pct": False, "no_errors_on_valid": True,
        "every_bad_answered_4xx": True, "series_bounded": True,
    }  # fmt: skip
    assert summary["all_goals_met"] is False and summary["replica_restarts"] == {"ingress": 0, "recsae": 0}
    grown = [*windows[:-1], _window(5, 208, 13, 31, options)]
    assert summarize_soak(grown, recorder, options)["goals"]["series_bounded"] is False
    restarted = [*windows[:-1], _window(5, 208, 13, 30, options, pids=[1, 7])]
    assert summarize_soak(restarted, recorder, options)["replica_restarts"] == {"ingress": 0, "recsae": 1}
    # Every deployment of the app is held to the RSS goal, not only the one serving the bundle.
    leaky = [
        *windows[:-1],
        windows[-1]._replace(replica_rss_mb={**windows[-1].replica_rss_mb, "ingress": {"c": 106.0}}),
    ]
    assert summarize_soak(leaky, recorder, options)["goals"]["rss_growth_under_5pct"] is False


# ------------------------------------------------------------------ the command line


def _soak(bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "soak", "--bundle", str(bundle), "--out", str(out), *extra]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--minutes", "0.5"], "--minutes 0.5 gives 1 window(s) of --window 30 s, and the --warmup of 60 s takes"),
        (["--minutes", "1", "--window", "30", "--warmup", "30"], "(--minutes >= 1.5)"),
        (["--bad-share", "0.6"], "recsae: error: --bad-share 0.6 is over 0.5"),
        (["--concurrency", "5000"], "--concurrency 5000: at most 1024 clients"),
    ],
)
def test_bad_options_fail_in_one_line_before_ray_starts(
    capsys: pytest.CaptureFixture[str], service_bundle: Path, tmp_path: Path, extra: list[str], expected: str
) -> None:
    line = cli_refusal(capsys, _soak(service_bundle, tmp_path / "o.json", *extra), entry=main)
    assert expected in line
    assert not ray.is_initialized() and not (tmp_path / "o.json").exists()


def test_a_missing_bundle_fails_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = cli_refusal(capsys, _soak(tmp_path / "nope", tmp_path / "o.json", "--minutes", "3"), entry=main)
    assert line == f"recsae: error: {tmp_path / 'nope'}: no bundle folder here"
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--window", "0"], "argument --window: expected a positive finite number, got 0"),
        (["--bad-share", "nan"], "argument --bad-share: expected a number in [0, 1], got nan"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    ],
)
def test_malformed_options_are_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(_soak(tmp_path, tmp_path / "o.json", *extra))
    assert info.value.code == 2 and expected in capsys.readouterr().err
    assert not ray.is_initialized()


# ------------------------------------------------------------------ a short real soak


@pytest.mark.slow
def test_short_soak_answers_every_valid_request_and_refuses_every_bad_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, service_bundle: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")  # read by Ray at start: series within the run
    out = tmp_path / "soak.json"
    # 6 windows of 4 s, the first one warm-up; a bad share of 20% so every bad kind comes up within seconds.
    args = ["--minutes", "0.4", "--window", "4", "--warmup", "4", "--concurrency", "4", "--bad-share", "0.2"]
    assert main(_soak(service_bundle, out, *args)) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads(out.read_text())
    assert printed == {"out": str(out), **report["summary"]}
    assert {"options", "versions", "schedule", "kinds", "windows", "summary", "definitions"} <= set(report)
    windows, summary = report["windows"], report["summary"]
    assert len(windows) == 6 and [w["steady"] for w in windows] == [False] + [True] * 5
    for window in windows:
        assert window["requests"] > 0 and window["valid_errors"] == 0 and window["bad_not_4xx"] == 0
        model = window["replica_rss_mb"][MODEL_DEPLOYMENT]
        assert len(model) == 1 and sum(model.values()) > 50  # one replica, holding ONNX Runtime and the bundle
        assert window["series"] > 0 and window["export_bytes"] > 0
    assert windows[-1]["recsae_series"] > 0
    kinds = report["kinds"]
    assert sum(k["sent"] for k in kinds.values()) == summary["valid_requests"] + summary["bad_requests"]
    for name, kind in kinds.items():
        assert kind["answered_as_required"] == kind["sent"], (name, kind)
        codes = {int(code) for code in kind["statuses"]}
        assert codes == {200} if kind["valid"] else all(400 <= code < 500 for code in codes), (name, kind)
    assert summary["valid_requests"] > 0 and summary["valid_errors"] == 0
    assert summary["bad_requests"] > 0 and summary["bad_answered_4xx"] == summary["bad_requests"]
    assert summary["goals"]["no_errors_on_valid"] and summary["goals"]["every_bad_answered_4xx"]
    assert set(summary["goals"]) == {
        "rss_growth_under_5pct", "p99_drift_under_20pct", "no_errors_on_valid", "every_bad_answered_4xx",
        "series_bounded",
    }  # fmt: skip
    assert set(summary["replica_restarts"].values()) == {0} and not ray.is_initialized()
