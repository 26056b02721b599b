#!/usr/bin/env bash
# The test suite: installs what it needs (idempotent), then runs pytest and ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${RECSAE_VENV:-.venv}
"$VENV/bin/ruff" check recsae_core service tests
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider --durations=30 "$@"
