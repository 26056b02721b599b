#!/usr/bin/env bash
# Every deployment check, with the real tools (docs/deploy.md). Needs scripts/install_tools.sh to have run.
#   helm lint --strict / helm template (several value sets), kubernetes-validate --strict (core objects and the
#   Ray pod templates), the RayService and the optional RayJob against the KubeRay CRDs vendored in
#   deploy/kuberay/crds (strict), the Serve configs (deploy/serve.yaml and every rendered serveConfigV2) through
#   Ray's ServeDeploySchema + import path + deployment names + ServiceConfig, bad values refused, promtool check
#   config / check rules / test rules, the Grafana dashboard against grafana-foundation-sdk's models and its PromQL
#   parsed by promtool.
# Uses only this repository and what install_tools.sh installs (validators: scripts/deploy_checks/).
# Env: HELM, PROMTOOL, RECSAE_VENV.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${RECSAE_VENV:-.venv}
PY="$VENV/bin/python"
HELM=${HELM:-$( [ -x .tools/bin/helm ] && echo .tools/bin/helm || command -v helm || true)}
PROMTOOL=${PROMTOOL:-$(command -v promtool || true)}
KV="$VENV/bin/kubernetes-validate"
CHART=helm/recsae
fail() { echo "check_deploy: FAIL: $*" >&2; exit 1; }
step() { echo "== $*"; }

[ -n "$HELM" ] && [ -x "$HELM" ] || fail "helm not found: run scripts/install_tools.sh"
[ -n "$PROMTOOL" ] || fail "promtool not found: run scripts/install_tools.sh"
[ -x "$KV" ] || fail "kubernetes-validate not in $VENV: run scripts/install_tools.sh"
"$PY" -c "import jsonschema, grafana_foundation_sdk" 2>/dev/null \
  || fail "jsonschema or grafana-foundation-sdk not in $VENV: run scripts/install_tools.sh"
VALIDATE=("$PY" -m scripts.deploy_checks)  # from $ROOT: scripts/ is a namespace package there
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# Value sets rendered and checked: name|helm --set arguments
VARIANTS=(
  "default|"
  "init-podmonitor-token|--set bundle.source=initContainer --set metrics.podMonitor.enabled=true --set adminToken.value=0123456789abcdef0123"
  "fixed-replicas-secret|--set serve.autoscaling.enabled=false --set serve.numReplicas=3 --set serve.numCpus=2 --set adminToken.existingSecret=recsae-admin --set image.digest=sha256:0000000000000000000000000000000000000000000000000000000000000000"
  "rayjob|--set rayJob.enabled=true --set rayJob.run=ml-1m-v2 --set rayJob.workers.replicas=3"
)

step "helm lint --strict + helm template ($($HELM version --short))"
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}; read -r -a args <<<"${v#*|}"
  "$HELM" lint --strict "$CHART" "${args[@]}" >"$TMP/lint.log" 2>&1 || { cat "$TMP/lint.log"; fail "helm lint ($name)"; }
  "$HELM" template recsae "$CHART" --namespace serving "${args[@]}" >"$TMP/$name.yaml" || fail "helm template ($name)"
  echo "ok $name: $(grep -c '^kind:' "$TMP/$name.yaml") objects"
done

step "kubernetes-validate --strict (core objects and the Ray pod templates)"
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}
  "$KV" --strict --quiet "$TMP/$name.yaml" || fail "kubernetes-validate ($name)"
  # RayService and RayJob are not core kinds: their head, worker and submitter pod templates are checked as core
  # PodTemplates too.
  "$PY" - "$TMP/$name.yaml" >"$TMP/$name.pods.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = []
for d in docs:
    if d["kind"] not in ("RayService", "RayJob"):
        continue
    spec = d["spec"]["rayClusterConfig" if d["kind"] == "RayService" else "rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in d["spec"]:
        groups.append(("submitter", {"template": d["spec"]["submitterPodTemplate"]}))
    for group, g in groups:
        out.append({"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": f"{d['metadata']['name']}-{group}"}, "template": g["template"]})
assert out, "no RayService rendered"
print(yaml.safe_dump_all(out))
PY
  "$KV" --strict --quiet "$TMP/$name.pods.yaml" || fail "kubernetes-validate pod templates ($name)"
  echo "ok $name"
done

step "RayService and RayJob against the vendored KubeRay CRDs (strict)"
rendered=()
for v in "${VARIANTS[@]}"; do rendered+=("$TMP/${v%%|*}.yaml"); done
"${VALIDATE[@]}" crd --expect RayService "${rendered[@]}" || fail "KubeRay CRD"
"${VALIDATE[@]}" crd --expect RayJob "$TMP/rayjob.yaml" || fail "KubeRay CRD (RayJob)"

step "Ray Serve configs: ServeDeploySchema, import path, deployment names, ServiceConfig"
files=(deploy/serve.yaml)
for v in "${VARIANTS[@]}"; do files+=("$TMP/${v%%|*}.yaml"); done
"$PY" - "${files[@]}" <<'PY' || fail "Serve config"
import importlib, logging, sys, yaml
logging.disable(logging.WARNING)
from ray.serve.deployment import Application
from ray.serve.schema import ServeDeploySchema
from service.schemas import ServiceConfig

def serve_configs(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    if len(docs) == 1 and "applications" in docs[0]:
        yield path, docs[0]
    for d in docs:
        if d.get("kind") == "RayService":
            yield f"{path} RayService/{d['metadata']['name']}", yaml.safe_load(d["spec"]["serveConfigV2"])

count = 0
for path in sys.argv[1:]:
    for where, raw in serve_configs(path):
        schema = ServeDeploySchema.model_validate(raw)
        for app in schema.applications:
            module, _, attr = app.import_path.rpartition(":") if ":" in app.import_path else app.import_path.rpartition(".")
            target = getattr(importlib.import_module(module), attr)
            built = target if isinstance(target, Application) else target(dict(app.args or {}))
            assert isinstance(built, Application), f"{where}: {app.import_path} does not build a Serve application"
            names, todo = set(), [built]  # every deployment of the app's graph (the ingress binds the model)
            while todo:
                node = todo.pop()
                if isinstance(node, Application):
                    names.add(node._bound_deployment.name)
                    todo += [*node._bound_deployment.init_args, *node._bound_deployment.init_kwargs.values()]
            for dep in app.deployments:
                assert dep.name in names, f"{where}: deployment {dep.name!r} not in the app's deployments {sorted(names)}"
                user_config = dep.model_dump(exclude_unset=True).get("user_config")
                if user_config is not None:
                    cfg = ServiceConfig.model_validate(user_config)
                    assert cfg.bundle.startswith("/"), f"{where}: user_config.bundle must be an absolute path"
                    if app.args and "bundle" in app.args:
                        assert app.args["bundle"] == cfg.bundle, f"{where}: args.bundle and user_config.bundle differ"
            count += 1
            print(f"ok {where}: app {app.name!r} -> {app.import_path}, deployments {sorted(d.name for d in app.deployments)}")
assert count >= len(sys.argv[1:]), "a file held no Serve config"
PY

step "bad values are refused"
BAD=(
  "--set image.tag=latest"
  "--set image.tag="
  "--set image.digest=sha256:abc"
  "--set rayVersion=2.60"
  "--set bogus=1"
  "--set serve.numReplicas=0"
  "--set serve.numCpus=0"
  "--set serve.maxQueuedRequests=0"
  "--set serve.retryAfterS=-1"
  "--set serve.userConfig.max_k=0"
  "--set serve.userConfig.max_batch_size=5000"
  "--set serve.userConfig.bundle=/elsewhere"
  "--set serve.userConfig.max_kk=10"
  "--set serve.autoscaling.minReplicas=5"
  "--set bundle.source=s3"
  "--set bundle.subPath=../etc"
  "--set bundle.mountPath=relative/path"
  "--set adminToken.value=short"
  "--set adminToken.existingSecret=Not_A_Name"
  "--set workers.replicas=9"
  "--set workers.resources.requests.memory=4GB"
  "--set service.port=70000"
  "--set service.type=Ingress"
  "--set metrics.podMonitor.interval=often"
  "--set rayJob.enabled=true --set bundle.source=initContainer"
  "--set rayJob.enabled=true --set rayJob.shutdownAfterJobFinishes=false"
  "--set rayJob.enabled=true --set rayJob.run=a-run-name-that-makes-the-rayjob-name-too-long"
  "--set rayJob.ttlSecondsAfterFinished=-1"
  "--set rayJob.entrypoint="
  "--set rayJob.submitter.command=sh"
)
for b in "${BAD[@]}"; do
  read -r -a args <<<"$b"
  if "$HELM" template recsae "$CHART" "${args[@]}" >/dev/null 2>"$TMP/bad.log"; then
    fail "helm accepted bad values: $b"
  fi
  grep -qE "schema|must|need" "$TMP/bad.log" || { cat "$TMP/bad.log"; fail "unexpected error for $b"; }
done
echo "ok ${#BAD[@]} bad value sets refused"

step "promtool ($($PROMTOOL --version 2>&1 | head -1 | cut -d' ' -f1-3))"
"$PROMTOOL" check config deploy/prometheus.yml || fail "promtool check config"
"$PROMTOOL" check rules deploy/alerts.yml || fail "promtool check rules"
"$PROMTOOL" test rules deploy/alerts_test.yml || fail "promtool test rules"
"$PY" - deploy/alerts.yml deploy/alerts_test.yml <<'PY' || fail "alert test coverage"
import sys, yaml
alerts = {r["alert"] for g in yaml.safe_load(open(sys.argv[1]))["groups"] for r in g["rules"] if "alert" in r}
tests = yaml.safe_load(open(sys.argv[2]))["tests"]
fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
silent = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if not t.get("exp_alerts")}
missing = sorted((alerts - fired) | (alerts - silent))
assert not missing, f"alerts without a firing and a silent unit test: {missing}"
print(f"ok every alert ({len(alerts)}) has a firing and a silent test")
PY

step "Grafana dashboard"
"${VALIDATE[@]}" dashboard deploy/grafana/*.json || fail "dashboard schema"
"$PY" - deploy/grafana/recsae.json <<'PY' || fail "dashboard conventions"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["schemaVersion"] >= 36, "schemaVersion < 36"
panels = [p for p in d["panels"] if p["type"] != "row"]
legacy = [p["title"] for p in panels if p["type"] in ("graph", "singlestat", "table-old")]
assert not legacy, f"legacy panels: {legacy}"
ds = [v for v in d["templating"]["list"] if v["type"] == "datasource" and v["query"] == "prometheus"]
assert ds, "no templated Prometheus datasource"
for p in panels:
    for t in [p, *p["targets"]]:
        assert t["datasource"]["uid"] == "${%s}" % ds[0]["name"], f"{p['title']}: datasource not templated"
print(f"ok {len(panels)} panels ({sorted({p['type'] for p in panels})}), datasource ${ds[0]['name']}")
PY
"${VALIDATE[@]}" promql --promtool "$PROMTOOL" deploy/grafana/*.json || fail "dashboard PromQL"

echo "check_deploy: all checks passed"
