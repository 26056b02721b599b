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
from recsae_core.common.errors import ArtifactError, IncompleteError
from recsae_core.common.layout import CONFIG, MADE_FROM, METRICS, STATS_FILE, RunLayout
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.common.storage import ShardStore
from recsae_core.concepts.catalog import concepts_step
from recsae_core.probe.collect import collect
from recsae_core.probe.shards import probe_shards
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.run import add_contract, load_run, train_step
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.fit import activations_of, fit_sae
from recsae_core.sae.stats import save_stats


def probe_step(
    run_dir: Path, progress: bool = True, ray_config: RayConfig | None = None, activations: ShardStore | None = None
) -> dict[str, Any]:
    """Probe the run's recommender into RUN_DIR/probe: in this process, or on the Ray cluster of `ray_config` (the
    same files either way); the shards to `activations` (a local path or pyarrow filesystem URI) when given."""
    ctx = load_run(run_dir)  # first: it gives a run trained before contracts its contract
    RunLayout(run_dir).verify_recommender()
    if ray_config is not None and ray_config.on_ray:
        from recsae_core.probe.on_ray import collect_on_ray

        result = collect_on_ray(ctx, ray_config, progress=progress, activations=activations)
    else:
        result = collect(ctx, progress=progress, activations=activations)
    summary = {"n_samples": result.n_samples, "d": result.d, "shards": len(result.shards)}
    return summary if result.activations is None else {**summary, "activations": result.activations}


def sae_step(run_dir: Path, config: SAETrainConfig, ray_config: RayConfig | None = None) -> dict[str, Any]:
    """Train, select and evaluate the run's SAE, and write RUN_DIR/sae atomically (trained on Ray Train and its
    latent statistics computed on Ray Data when `ray_config` names a cluster)."""
    layout = RunLayout(run_dir)
    try:
        meta = layout.verify_probe()  # and the recommender it was made from
    except IncompleteError as err:
        raise ArtifactError(f"{layout.probe}: no complete probe ({err}); run 'recsae pipeline' or the probe step "
                            "first") from None  # fmt: skip
    ctx = load_run(run_dir, device="cpu")
    made_from = layout.made_from(layout.probe)
    probe = probe_shards(layout.probe, meta)  # verified just above, wherever its shards are
    fitted = fit_sae(ctx, activations_of(probe, ray_config), config, ray_config, probe)
    fitted.metrics[MADE_FROM] = made_from
    with atomic_folder(layout.sae) as folder:
        fitted.sae.save(folder, hook_name=f"{ctx.model.name}.h")
        save_stats(fitted.stats, folder / STATS_FILE)
        write_json(folder / METRICS, fitted.metrics)
    return fitted.metrics


def bundle_step(run_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """Export the run (ONNX, items, users, SAE, and catalog/policies when present) into a verified bundle."""
    layout = RunLayout(run_dir)
    try:
        layout.verify_sae()  # and the probe and recommender it was made from
    except IncompleteError as err:
        raise ArtifactError(f"{layout.sae}: no trained SAE ({err}); run 'recsae train-sae --run {run_dir}' "
                            "first") from None  # fmt: skip
    if layout.catalog.is_file():  # bundled only when intact and built from this SAE
        try:
            layout.verify_catalog()
        except IncompleteError as err:
            hint = f"rebuild it with 'recsae pipeline --run {run_dir}', or remove {layout.concepts} to leave it out"
            raise ArtifactError(f"{err}; {hint}") from None
    ctx = load_run(run_dir)
    out = out or layout.bundle
    with tempfile.TemporaryDirectory() as work:
        contents, parity = contents_from_run(ctx, layout.sae, Path(work))
        contents.catalog_path = layout.catalog if layout.catalog.is_file() else None
        contents.policy_paths = layout.policy_files()
        contents.meta[MADE_FROM] = layout.made_from(layout.recommender, layout.sae)
        manifest = write_bundle(contents, out, parity=parity)
    verify_bundle(out)
    return {"bundle": str(out), "versions": manifest["versions"], "parity": parity}


Step = tuple[str, Callable[[], object], Callable[[], dict]]
"""A pipeline step: its name, the check of its outputs (raises IncompleteError when the step has not finished,
ArtifactError naming a file whose bytes changed since), and how to run it."""


def steps_after_recommender(
    run_dir: Path, sae_config: SAETrainConfig, ray_config: RayConfig | None = None,
    activations: ShardStore | None = None,
) -> list[Step]:  # fmt: skip
    """probe -> sae -> concepts -> bundle: the same for a recommender trained here and one imported (the probe, the
    SAE with its statistics, and the catalog's top samples and labels on Ray when `ray_config` names a cluster). With
    `activations`, a probe whose shards are elsewhere is redone there; without, a complete probe is kept wherever
    its shards are, and a probe redone writes them into RUN_DIR/probe."""
    layout = RunLayout(run_dir)
    where = None if activations is None else activations.uri
    probe: Step = ("probe", lambda: layout.verify_probe(where),
                   lambda: probe_step(run_dir, sae_config.progress, ray_config, activations))  # fmt: skip
    return [
        probe,
        ("sae", layout.verify_sae, lambda: sae_step(run_dir, sae_config, ray_config)),
        ("concepts", layout.verify_catalog, lambda: concepts_step(run_dir, sae_config.progress, ray_config)),
        ("bundle", layout.verify_bundle, lambda: bundle_step(run_dir)),
    ]


def run_steps(steps: list[Step], force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `steps` in order; a step whose outputs are complete and intact is skipped (unless `force`), one whose
    files changed since it finished is redone with a line naming the file, and every step after one that ran runs
    too (it depends on that output)."""
    summary: dict[str, Any] = {}
    redo = force
    for index, (name, verify, run) in enumerate(steps, start=1):
        if not redo:
            try:
                verify()
            except IncompleteError:
                pass
            except ArtifactError as err:
                log(f"[{index}/{len(steps)}] {name}: {err}; redoing the step")
            else:
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
    ray_config: RayConfig | None = None,
    activations: ShardStore | None = None,
) -> dict[str, Any]:
    """Train `model` on `dataset` into a new or matching run, then every later step (`run_steps`; the probe's
    shards to `activations` when given: `steps_after_recommender`)."""
    layout = RunLayout(run_dir)
    layout.remove_stale_temps()
    if layout.needs_contract():  # trained before runs carried a contract: add it, never retrain for it
        add_contract(run_dir)
    try:
        layout.verify_recommender()
    except IncompleteError:
        pass  # not trained yet, or cut short: train it
    except ArtifactError as err:
        if not force:  # never retrained silently: minutes to hours, and a new model under the same run
            raise ArtifactError(f"{err}; restore it, or retrain the run with --force") from None
    else:
        existing = read_json(layout.recommender / CONFIG)
        if (existing.get("dataset"), existing.get("recommender", {}).get("model")) != (dataset, model):
            raise ArtifactError(
                f"{run_dir}: holds a {existing.get('recommender', {}).get('model')} run on "
                f"{existing.get('dataset')}, not {model} on {dataset}; use another --out"
            )
    train: Step = ("recommender", layout.verify_recommender,
                   lambda: train_step(run_dir, dataset, model, protocol, train_config, ray_config))  # fmt: skip
    return run_steps([train, *steps_after_recommender(run_dir, sae_config, ray_config, activations)], force, log)


def pipeline_on_run(
    run_dir: Path, sae_config: SAETrainConfig, force: bool = False, log: Callable[[str], None] = print,
    ray_config: RayConfig | None = None, activations: ShardStore | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every step after the recommender on an existing run, trained here or imported (`force` redoes them all,
    never the recommender itself; the probe's shards to `activations` when given)."""
    RunLayout(run_dir).remove_stale_temps()
    if RunLayout(run_dir).needs_contract():
        add_contract(run_dir)
    try:
        RunLayout(run_dir).verify_recommender()  # corrupt: refused, naming the file (it is not recomputed here)
    except IncompleteError:
        hint = "'recsae import' one, or train one with 'recsae pipeline --dataset D --model M --out RUN_DIR'"
        raise ArtifactError(f"{RunLayout(run_dir).recommender}: no complete recommender here; {hint}") from None
    return run_steps(steps_after_recommender(run_dir, sae_config, ray_config, activations), force, log)
