#!/usr/bin/env bash
# Serve a bundle on local Ray, print one plain and one steered ranking, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${RECSAE_VENV:-.venv}/bin/python" scripts/demo_service.py "$1"
