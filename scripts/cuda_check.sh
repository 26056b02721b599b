#!/usr/bin/env bash
# The CUDA path on a GPU machine: the CUDA tests, then ML-1M training of the three recommenders and the SASRec SAE
# with --device cuda. Each stage writes its log and metrics under OUT_DIR; a stage that fails or runs out of time
# does not stop the next one. Usage: scripts/cuda_check.sh OUT_DIR [SECONDS_PER_STAGE]
set -uo pipefail
out=${1:?usage: scripts/cuda_check.sh OUT_DIR [SECONDS_PER_STAGE]}
limit=${2:-180}
runs=$(mktemp -d)
mkdir -p "$out"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -3

# The three trainings share the GPU at once (each leaves it mostly idle); OMP threads split the CPU cores.
threads=$(( $(nproc) / 3 ))
for spec in "sasrec --epochs 22" "lightgcn --epochs 100" "bprmf"; do
  set -- $spec
  OMP_NUM_THREADS=$threads timeout "$limit" python3 -m recsae_core.pipeline.cli train-recommender --dataset ml-1m \
    --model $spec --device cuda --quiet --out "$runs/$1" >"$out/train-$1.log" 2>&1 &
done
wait
for model in sasrec lightgcn bprmf; do
  cp "$runs/$model/recommender/metrics.json" "$out/train-$model.json" 2>/dev/null || echo "train $model: no metrics"
done

timeout "$limit" python3 -m recsae_core.pipeline.cli train-sae --run "$runs/sasrec" --device cuda --quiet \
  --sae-max-minutes "$(python3 -c "print(round(($limit - 60) / 60, 2))")" >"$out/sae-sasrec.log" 2>&1
cp "$runs/sasrec/sae/metrics.json" "$out/sae-sasrec.json" 2>/dev/null || echo "sae sasrec: no metrics"
python3 - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*.json")):
    m = json.loads(f.read_text())
    keys = ("train_seconds", "seconds_per_epoch", "epochs_trained", "seconds", "fvu", "dead_fraction", "stopped_by")
    print(f.stem, {k: m[k] for k in keys if k in m}, "test ndcg@10", m.get("test", {}).get("ndcg@10"))
EOF
