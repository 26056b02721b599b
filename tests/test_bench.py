"""The load benchmark's pooling of interleaved rounds (the HTTP runs themselves are exercised by `recsae bench
serve` in docs/benchmarks.md; they need minutes of wall time, which the suite does not spend)."""

from __future__ import annotations

import math

from service.bench import LoadRun, summarize


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
