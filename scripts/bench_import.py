"""Benchmark of wrapping a recommender recsae did not train (issue 15's figures): a foreign-convention SASRec-like
model (tests/foreign_models.py `ForeignSeq`: 1-based item indices, pad 0, right padding, a length input, its own
input names) is trained outside recsae's trainers, exported to ONNX with its item matrix and recipe, and taken
through `recsae import` -> `recsae pipeline --run`. Prints and saves JSON: the SAE and catalog figures beside the
issue's targets, and the import -> bundle wall time (the foreign model's own training is timed apart).

    python scripts/bench_import.py --dataset ml-1m --out runs/bench-import
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the foreign model is the tests' own, scaled up

from foreign_models import build_sequence_model  # noqa: E402

from recsae_core.common.artifacts import read_json, write_json  # noqa: E402
from recsae_core.common.layout import METRICS, RunLayout  # noqa: E402
from recsae_core.data.datasets import load_dataset  # noqa: E402
from recsae_core.pipeline.cli import main as recsae  # noqa: E402

TARGETS = {"fvu": ("<=", 0.10), "dead_fraction": ("<=", 0.05), "substituted_ratio": (">=", 0.95),
           "mean_confidence": (">=", 0.75), "mean_auc": (">=", 0.80)}  # fmt: skip


def met(value: float, rule: tuple[str, float]) -> bool:
    op, bound = rule
    return value <= bound if op == "<=" else value >= bound


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    if (out / "run").exists():
        raise SystemExit(f"bench_import: {out / 'run'} exists; choose another --out")
    started = time.perf_counter()
    data = load_dataset(args.dataset)
    files = build_sequence_model(data, out / "foreign", epochs=args.epochs, seed=args.seed, max_len=args.max_len,
                                 dim=args.dim, lr=args.lr, batch_size=args.batch_size)  # fmt: skip
    train_seconds = time.perf_counter() - started
    run_dir = out / "run"
    sae_flags = ["--sae-max-minutes", str(args.sae_max_minutes)] if args.sae_max_minutes is not None else []
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    commands = {
        "import": ["import", "--onnx", files.onnx, "--item-embeddings", files.item_embeddings, "--recipe",
                   files.recipe, "--interactions", files.interactions, "--items", files.items, "--users",
                   files.users, "--out", run_dir],
        "pipeline": ["pipeline", "--run", run_dir, *sae_flags],
    }  # fmt: skip
    for name, argv in commands.items():
        t = time.perf_counter()
        if recsae([str(a) for a in argv]) != 0:
            raise SystemExit(f"bench_import: recsae {name} failed")
        steps[name] = round(time.perf_counter() - t, 1)
    total = time.perf_counter() - t0
    layout = RunLayout(run_dir)
    imported = read_json(layout.recommender / METRICS)
    sae = read_json(layout.sae / METRICS)
    summary = read_json(layout.catalog)["summary"]
    figures = {
        "fvu": sae["fvu"],
        "dead_fraction": sae["dead_fraction"],
        "substituted_ratio": sae["substituted_ratio"],
        "mean_confidence": summary["mean_confidence"],
        "mean_auc": summary["mean_auc"],
    }
    foreign = {"max_len": args.max_len, "dim": args.dim, "epochs": args.epochs, "lr": args.lr,
               "batch_size": args.batch_size,
               "train_seconds": round(train_seconds, 1), "test": imported.get("test"),
               "popularity_baseline_test": imported.get("popularity_baseline_test")}  # fmt: skip
    return {
        "command": " ".join(sys.argv),
        "dataset": args.dataset,
        "foreign_model": foreign,
        "import_report": imported.get("import"),
        "sae": {k: sae.get(k) for k in ("n_samples", "n_latents", "k", "stopped_by", "epochs_trained", "ndcg@10")},
        "figures": figures,
        "targets": {k: f"{op} {bound}" for k, (op, bound) in TARGETS.items()},
        "met": {k: met(figures[k], rule) for k, rule in TARGETS.items()},
        "import_to_bundle_seconds": round(total, 1),
        "step_seconds": steps,
        "bundle_complete": layout.bundle_complete(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the foreign model's own training")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128, help="training windows per step of the foreign model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sae-max-minutes", type=float, default=None, help="passed to pipeline (default: its own)")
    args = parser.parse_args()
    result = run(args)
    write_json(args.out / "bench_import.json", result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
