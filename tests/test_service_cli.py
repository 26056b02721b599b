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


def test_app_builder_validates_arguments() -> None:
    with pytest.raises(ConfigError, match="max_k: Input should be less than or equal to 10000"):
        app_builder({"bundle": "/b", "max_k": 10**6})
    with pytest.raises(ConfigError, match="unknown field"):
        app_builder({"bundle": "/b", "colour": "red"})
    with pytest.raises(ConfigError, match="needs a bundle"):
        app_builder({})
    assert app is app_builder


def test_documented_serve_config_is_valid() -> None:
    text = (Path(__file__).parents[1] / "docs" / "service.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    config = ServeDeploySchema.model_validate(yaml.safe_load(block))
    (application,) = config.applications
    assert application.import_path == "service.app:app"
    user_config = application.deployments[0].user_config
    app_builder({**application.args, **user_config})  # the same fields validate
