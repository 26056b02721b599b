#!/usr/bin/env bash
# One command from a fresh machine: install everything, then run the whole offline pipeline on ML-100K
# (SASRec -> probe -> SAE -> bundle) and, where the service is present, serve it and query it once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${RECSAE_VENV:-.venv}
RUN=${RECSAE_RUN:-runs/ml-100k-sasrec}
"$VENV/bin/recsae" pipeline --dataset ml-100k --model sasrec --out "$RUN"
if [ -f scripts/demo_service.sh ]; then
  bash scripts/demo_service.sh "$RUN/bundle"
fi
