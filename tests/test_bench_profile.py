"""`recsae bench profile`: joining Ray Serve's spans with the client's clock and the handler's Server-Timing into
segments that add up to each request's latency, CPU time per process role, py-spy's samples by owner; and one short
real profile of the test bundle (Ray Serve on loopback, its tracing on) whose requests must all be joined."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from service.bench_cpu import OTHERS, cpu_seconds, cpu_use, py_spy_summary
from service.bench_load import Traced
from service.bench_profile import Span, profile_serve, read_spans, segment_table, segments, server_timing
from service.local import HIGH_THROUGHPUT_ENV

MS = 1_000_000
TIMING = "parse;dur=0.100, queue;dur=2.000, batch;dur=5.000, respond;dur=0.200, represent;dur=2.000, total;dur=3.000"
TIMING += ", metrics;dur=0.500"


def test_server_timing_is_read_by_stage() -> None:
    assert server_timing("a;dur=1.5, b;dur=0.250") == {"a": 1.5, "b": 0.25}
    assert server_timing("") == {}


def test_one_hop_splits_into_segments_that_add_up_to_the_latency() -> None:
    trace = Traced("t", 0, 20 * MS, TIMING)
    spans = [
        # As Ray records them: routing ends once the replica accepted (after its span began), the proxy's span
        # after the client has the answer; neither end is a boundary.
        Span("proxy_http_request", 1 * MS, 21 * MS),
        Span("route_to_replica", 2 * MS, 5 * MS),
        Span("replica_handle_request recsae __call__", 4 * MS, 17 * MS),
    ]
    out = segments(trace, spans)
    assert out is not None and min(out.values()) >= 0
    assert out is not None and sum(out.values()) == pytest.approx(20.0)
    assert out["client -> proxy handler"] == 1.0 and out["proxy: before routing"] == 1.0
    assert out["proxy -> recsae: routing + call"] == 2.0
    assert out["recsae: batch queue"] == 2.0 and out["recsae: engine"] == 3.0 and out["recsae: metrics"] == 0.5
    assert out["recsae: worker-thread hop"] == pytest.approx(1.5)  # batch - engine - metrics
    assert out["recsae: rest"] == pytest.approx(13.0 - 7.3)  # the replica's span less the handler's stages
    assert out["answer: recsae -> proxy -> client"] == 3.0


def test_a_relaying_ingress_is_a_second_hop() -> None:
    trace = Traced("t", 0, 30 * MS, TIMING)
    spans = [
        Span("replica_handle_request model __call__", 8 * MS, 20 * MS),
        Span("proxy_http_request", 1 * MS, 28 * MS),
        Span("route_to_replica", 6 * MS, 7 * MS),
        Span("route_to_replica", 2 * MS, 3 * MS),
        Span("replica_handle_request ingress __call__", 4 * MS, 25 * MS),
    ]
    out = segments(trace, spans)
    assert out is not None and sum(out.values()) == pytest.approx(30.0)
    assert out["proxy -> ingress: routing + call"] == 2.0 and out["ingress: before routing"] == 2.0
    assert out["ingress -> model: routing + call"] == 2.0 and out["model: engine"] == 3.0
    assert out["answer: model -> ingress -> proxy -> client"] == 10.0
    assert "ingress: engine" not in out


def test_behind_haproxy_the_first_replica_is_the_entry_and_fastapi_spans_split_the_rest() -> None:
    trace = Traced("t", 0, 20 * MS, TIMING)
    spans = [  # no proxy span: HAProxy hands the request to the ingress replica's own HTTP server
        Span("replica_handle_request ingress __call__", 1 * MS, 18 * MS),
        Span("route_to_replica recsae forward", 2 * MS, 5 * MS),
        Span("replica_handle_request recsae forward", 4 * MS, 16 * MS),
        Span("POST /v1/recommend", 5 * MS, 15 * MS),
        Span("fastapi.endpoint", 6 * MS, 14 * MS),
    ]
    out = segments(trace, spans)
    assert out is not None and sum(out.values()) == pytest.approx(20.0)
    assert out["client -> ingress (HAProxy)"] == 1.0 and out["ingress -> recsae: routing + call"] == 2.0
    assert out["recsae: Ray replica wrapper"] == 2.0  # 12 ms span, 10 ms app
    assert out["recsae: ASGI app (FastAPI routing, middleware)"] == 2.0  # 10 ms app, 8 ms endpoint
    assert out["recsae: endpoint rest (body, validation, JSON encoding)"] == pytest.approx(8.0 - 7.3)
    assert "recsae: rest" not in out
    assert out["answer: recsae -> ingress -> client"] == 4.0


def test_requests_without_their_spans_are_not_joined() -> None:
    trace = Traced("t", 0, 20 * MS, TIMING)
    assert segments(trace, [Span("proxy_http_request", 1 * MS, 19 * MS)]) is None
    table = segment_table([trace], {})
    assert table == {"joined": 0, "requests": 1}


def test_segment_means_add_up_to_the_mean_latency(tmp_path: Path) -> None:
    lines = []
    traces = []
    for i, shift in enumerate((0, 5)):
        tid = f"{i:032x}"
        traces.append(Traced(tid, 0, (20 + shift) * MS, TIMING))
        for name, start, end in (
            ("proxy_http_request", 1, 19 + shift),
            ("route_to_replica", 2, 3),
            ("replica_handle_request recsae __call__", 4, 17 + shift),
        ):
            lines.append(json.dumps([tid, name, start * MS, end * MS]))
    (tmp_path / "spans-1.jsonl").write_text("\n".join(lines) + '\n["cut sh')
    table = segment_table(traces, read_spans(tmp_path))
    assert table["joined"] == 2 and table["latency_mean_ms"] == 22.5
    assert sum(s["mean_ms"] for s in table["segments"].values()) == pytest.approx(22.5, abs=1e-2)


def test_cpu_is_charged_to_each_role_above_its_idle_use_and_the_rest_to_the_machine() -> None:
    before = ({1: ("proxy", 1.0), 2: ("replica recsae", 2.0), 9: (OTHERS, 0.0)}, 10.0)
    after = ({1: ("proxy", 1.5), 2: ("replica recsae", 3.0), 3: ("raylet", 0.1), 9: (OTHERS, 0.2)}, 12.0)
    spent = cpu_seconds(before, after)
    # The machine's 2 s less the 1.6 s of the roles named: other tenants, and processes that ended meanwhile.
    assert spent == pytest.approx({"replica recsae": 1.0, "proxy": 0.5, "raylet": 0.1, OTHERS: 0.4})
    out = cpu_use(spent, seconds=2.0, requests=100, idle={"replica recsae": 0.1, "raylet": 0.05})
    assert out["cores"] == pytest.approx({"replica recsae": 0.5, "proxy": 0.25, "raylet": 0.05, OTHERS: 0.2})
    # (1.0 s - 0.1 cores * 2 s) / 100 requests: what requests cost beyond the replica's background work.
    assert out["ms_per_request"] == pytest.approx({"replica recsae": 8.0, "proxy": 5.0, "raylet": 0.0})


def test_py_spy_samples_go_to_the_innermost_recsae_frame(tmp_path: Path) -> None:
    raw = tmp_path / "replica.txt"
    raw.write_text(
        "run (asyncio/events.py:80);recommend (/x/service/engine.py:160);dot (/x/numpy/core.py:1) 6\n"
        "run (asyncio/events.py:80);_run_once (/x/asyncio/base_events.py:1900) 3\n"
        "handle (/x/ray/serve/_private/replica.py:10);send (/x/uvicorn/protocols/h.py:5) 1\n"
    )
    out = py_spy_summary(raw)
    assert out["samples"] == 10
    assert out["percent"] == {"recsae: recommend": 60.0, "asyncio": 30.0, "uvicorn": 10.0}
    raw.write_text("_bootstrap (threading.py:1002);wait (threading.py:320) 4\nf (lib/x.py:1) 1\n")
    assert py_spy_summary(raw) == {"samples": 1, "waiting": 4, "percent": {"other: lib": 100.0}}


@pytest.mark.slow
@pytest.mark.parametrize("ingress", ["python proxy", "haproxy"])
def test_profile_of_the_service_joins_every_request(
    service_bundle: Path, monkeypatch: pytest.MonkeyPatch, ingress: str
) -> None:
    if ingress == "haproxy":  # Ray Serve's high-throughput mode: no proxy span, the ingress replica is the entry
        for key, value in HIGH_THROUGHPUT_ENV.items():
            monkeypatch.setenv(key, value)
    result = profile_serve(service_bundle, [2], duration=1.0, warmup=0.5)
    out = result["concurrency"]["2"]
    entry = "client -> ingress (HAProxy)" if ingress == "haproxy" else "client -> proxy handler"
    assert next(iter(out["timeline"]["segments"])) == entry
    timeline = out["timeline"]
    assert out["plain"]["requests"] > 0 and out["traced"]["requests"] > 0
    # Ray Serve traced every request the client sent with a sampled traceparent, and they all pair up.
    assert timeline["joined"] == timeline["requests"] == out["traced"]["requests"]
    segments_ms = timeline["segments"]
    assert sum(s["mean_ms"] for s in segments_ms.values()) == pytest.approx(timeline["latency_mean_ms"], abs=0.05)
    assert any(name.endswith(": engine") and s["mean_ms"] > 0 for name, s in segments_ms.items())
    cpu = out["cpu"]["cores"]
    assert cpu["proxy"] > 0 and cpu["replica recsae"] > 0 and all(math.isfinite(v) for v in cpu.values())
    assert result["idle_cores"]["replica recsae"] >= 0
