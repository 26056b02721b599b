"""The service's command line and deployment entry points (no Ray started: errors must come before it)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from recsae_core.common.errors import ConfigError
from service.app import app, app_builder
from service.cli import main


def test_serve_refuses_a_missing_bundle_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--bundle", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"recsae: error: {tmp_path / 'nope'}: no bundle folder here"]


def test_bench_refuses_a_missing_bundle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "serve", "--bundle", str(tmp_path / "x"), "--out", str(tmp_path / "o.json")]) == 2
    assert capsys.readouterr().err.startswith("recsae: error: ")


def test_bench_reliability_refuses_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "o.json")]
    assert main(["bench", "reliability", "--bundle", str(tmp_path / "x"), "--scenario", "kill", *out]) == 2
    assert capsys.readouterr().err.strip() == f"recsae: error: {tmp_path / 'x'}: no bundle folder here"
    args = ["bench", "reliability", "--bundle", str(tmp_path), "--scenario", "kill", "--replicas", "1", *out]
    assert main(args) == 2 and "--replicas: the kill scenario needs at least 2 replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "reliability", "--bundle", str(tmp_path), "--scenario", "flood", *out])
    assert "invalid choice: 'flood'" in capsys.readouterr().err


def test_concurrency_list_is_validated(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "serve", "--bundle", str(tmp_path), "--out", "o.json", "--concurrency", "4,0"])
    assert info.value.code == 2 and "positive integers" in capsys.readouterr().err


def test_port_in_use_is_reported_before_ray_starts() -> None:
    from service.local import start_local

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}: 127.0.0.1:{port} is already in use"):
            start_local(Path("/unused"), port=port, metrics_port=port)


def test_free_ports_are_distinct_and_outside_the_ranges_other_processes_draw_from() -> None:
    """A port handed out must still be free when the service binds it: never one the kernel gives to a socket bound
    to port 0 (Ray's gRPC servers start in between), nor a Ray worker's or Ray's defaults, nor one handed out before."""
    from service.local import RAY_DEFAULT_PORTS, RAY_WORKER_PORTS, ephemeral_ports, free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    taken = set(ephemeral_ports()) | set(RAY_WORKER_PORTS) | RAY_DEFAULT_PORTS
    assert not taken.intersection(ports)


def test_app_builder_validates_arguments() -> None:
    with pytest.raises(ConfigError, match="max_k: Input should be less than or equal to 10000"):
        app_builder({"bundle": "/b", "max_k": 10**6})
    with pytest.raises(ConfigError, match="unknown field"):
        app_builder({"bundle": "/b", "colour": "red"})
    with pytest.raises(ConfigError, match="needs a bundle"):
        app_builder({})
    with pytest.raises(ConfigError, match=r"max_queued_requests -1 \(unbounded\) or >= 1 \(got 0\)"):
        app_builder({"bundle": "/b", "max_queued_requests": 0})
    with pytest.raises(ConfigError, match="retry_after_s between 0 and 3600 seconds"):
        app_builder({"bundle": "/b", "retry_after_s": -1})
    with pytest.raises(ConfigError, match="bundle_version: String should match pattern"):
        app_builder({"bundle": "/b", "bundle_version": "v1"})
    # HTTP enters through the ingress, which admits what the model replicas take at once and sheds beyond its queue.
    ingress = app_builder({"bundle": "/b", "replicas": 2, "max_queued_requests": 8, "retry_after_s": 3})
    limits = ingress._bound_deployment.max_ongoing_requests, ingress._bound_deployment.max_queued_requests
    model = ingress._bound_deployment.init_args[0]._bound_deployment
    assert (ingress._bound_deployment.name, model.name) == ("ingress", "recsae")
    assert limits == (2 * model.max_ongoing_requests, 8)
    assert ingress._bound_deployment.backpressure_config.retry_after_s == 3
    # relay=false: the model deployment takes HTTP itself and sheds beyond its own queue.
    direct = app_builder({"bundle": "/b", "relay": "false", "max_queued_requests": 8, "retry_after_s": 3})
    direct = direct._bound_deployment
    assert (direct.name, direct.max_queued_requests, direct.backpressure_config.retry_after_s) == ("recsae", 8, 3)
    with pytest.raises(ConfigError, match="relay true or false"):
        app_builder({"bundle": "/b", "relay": "sometimes"})
    assert app is app_builder


def test_documented_serve_config_is_valid() -> None:
    text = (Path(__file__).parents[1] / "docs" / "service.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    config = ServeDeploySchema.model_validate(yaml.safe_load(block))
    (application,) = config.applications
    assert application.import_path == "service.app:app"
    user_config = application.deployments[0].user_config
    app_builder({**application.args, **user_config})  # the same fields validate
