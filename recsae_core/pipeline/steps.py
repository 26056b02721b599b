"""The offline steps after training, and the pipeline that runs every step in order, skipping finished ones."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsae_core.bundle.export import contents_from_run
from recsae_core.bundle.format import verify_bundle, write_bundle
from recsae_core.common.artifacts import atomic_folder, read_json, write_json
from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import CONFIG, METRICS, STATS_FILE, RunLayout
from recsae_core.concepts.catalog import concepts_step
from recsae_core.probe.collect import collect, load_activations
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.run import load_run, train_step
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.fit import fit_sae
from recsae_core.sae.stats import save_stats


def probe_step(run_dir: Path, progress: bool = True) -> dict[str, Any]:
    ctx = load_run(run_dir)
    result = collect(ctx, progress=progress)
    return {"n_samples": result.n_samples, "d": result.d, "shards": len(result.shards)}


def sae_step(run_dir: Path, config: SAETrainConfig) -> dict[str, Any]:
    """Train, select and evaluate the run's SAE, and write RUN_DIR/sae atomically."""
    ctx = load_run(run_dir, device="cpu")
    layout = RunLayout(run_dir)
    if not layout.probe_complete():
        raise ArtifactError(f"{layout.probe}: no complete probe (run 'recsae pipeline' or the probe step first)")
    activations, _, _ = load_activations(layout.probe)
    fitted = fit_sae(ctx, activations, config)
    with atomic_folder(layout.sae) as folder:
        fitted.sae.save(folder, hook_name=f"{ctx.model.name}.h")
        save_stats(fitted.stats, folder / STATS_FILE)
        write_json(folder / METRICS, fitted.metrics)
    return fitted.metrics


def bundle_step(run_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """Export the run (ONNX, items, users, SAE, and catalog/policies when present) into a verified bundle."""
    layout = RunLayout(run_dir)
    if not layout.sae_complete():
        raise ArtifactError(f"{layout.sae}: no trained SAE (run 'recsae train-sae --run {run_dir}' first)")
    ctx = load_run(run_dir)
    out = out or layout.bundle
    with tempfile.TemporaryDirectory() as work:
        contents, parity = contents_from_run(ctx, layout.sae, Path(work))
        contents.catalog_path = layout.catalog if layout.catalog.is_file() else None
        contents.policy_paths = layout.policy_files()
        manifest = write_bundle(contents, out, parity=parity)
    verify_bundle(out)
    return {"bundle": str(out), "versions": manifest["versions"], "parity": parity}


Step = tuple[str, Callable[[], bool], Callable[[], dict]]
"""A pipeline step: its name, whether its outputs are complete and valid, and how to run it."""


def steps_after_recommender(run_dir: Path, sae_config: SAETrainConfig) -> list[Step]:
    """probe -> sae -> concepts -> bundle: the same for a recommender trained here and one imported."""
    layout = RunLayout(run_dir)
    return [
        ("probe", layout.probe_complete, lambda: probe_step(run_dir, sae_config.progress)),
        ("sae", layout.sae_complete, lambda: sae_step(run_dir, sae_config)),
        ("concepts", layout.catalog_complete, lambda: concepts_step(run_dir, sae_config.progress)),
        ("bundle", layout.bundle_complete, lambda: bundle_step(run_dir)),
    ]


def run_steps(steps: list[Step], force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `steps` in order; a step whose outputs are complete and valid is skipped (unless `force`), and every step
    after one that ran runs too (it depends on that output)."""
    summary: dict[str, Any] = {}
    redo = force
    for index, (name, complete, run) in enumerate(steps, start=1):
        if not redo and complete():
            log(f"[{index}/{len(steps)}] {name}: up to date, skipped")
            summary[name] = "skipped"
            continue
        log(f"[{index}/{len(steps)}] {name}: running")
        started = time.perf_counter()
        summary[name] = run()
        redo = True
        log(f"[{index}/{len(steps)}] {name}: done in {time.perf_counter() - started:.1f}s")
    return summary


def run_pipeline(
    run_dir: Path,
    dataset: str,
    model: str,
    protocol: str,
    train_config: TrainConfig,
    sae_config: SAETrainConfig,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `model` on `dataset` into a new or matching run, then every later step (`run_steps`)."""
    layout = RunLayout(run_dir)
    if layout.recommender_complete():
        existing = read_json(layout.recommender / CONFIG)
        if (existing.get("dataset"), existing.get("recommender", {}).get("model")) != (dataset, model):
            raise ArtifactError(
                f"{run_dir}: holds a {existing.get('recommender', {}).get('model')} run on "
                f"{existing.get('dataset')}, not {model} on {dataset}; use another --out"
            )
    train: Step = ("recommender", layout.recommender_complete,
                   lambda: train_step(run_dir, dataset, model, protocol, train_config))  # fmt: skip
    return run_steps([train, *steps_after_recommender(run_dir, sae_config)], force, log)


def pipeline_on_run(
    run_dir: Path, sae_config: SAETrainConfig, force: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every step after the recommender on an existing run, trained here or imported (`force` redoes them all,
    never the recommender itself)."""
    if not RunLayout(run_dir).recommender_complete():
        raise ArtifactError(f"{RunLayout(run_dir).recommender}: no complete recommender here; 'recsae import' one, "
                            "or train one with 'recsae pipeline --dataset D --model M --out RUN_DIR'")  # fmt: skip
    return run_steps(steps_after_recommender(run_dir, sae_config), force, log)
