"""Wrapping a recommender we did not train without its interactions: ONNX `inputs -> h` + its item matrix + one input
row per user -> probe -> SAE -> a bare bundle (`recsae bundle --import-onnx`).

Kept for models that come with no interaction log: users are row numbers, nothing is seen, there is no catalog or
policy, and the SAE is selected on held-out FVU. A model with a log goes through `recsae import`
(recommenders.imported) and then the same steps as a run trained here (`recsae pipeline --run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recsae_core.bundle.export import contents_from_onnx
from recsae_core.bundle.format import verify_bundle, write_bundle
from recsae_core.common.artifacts import atomic_folder, write_json
from recsae_core.common.layout import METRICS, STATS_FILE, RunLayout
from recsae_core.common.ray_cluster import RayConfig, cluster_workers
from recsae_core.common.storage import ShardStore
from recsae_core.probe.collect import collect_onnx
from recsae_core.probe.shards import open_probe
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.stats import latent_statistics, save_stats
from recsae_core.sae.train import evaluate_reconstruction, train_sae, training_summary


def import_onnx(
    onnx_path: Path,
    embeddings_path: Path,
    items_csv: Path,
    user_inputs_path: Path,
    out: Path,
    config: SAETrainConfig,
    name: str = "imported",
    work: Path | None = None,
    activations: ShardStore | None = None,
    ray_config: RayConfig | None = None,
) -> dict[str, Any]:
    """Build a bundle around an outside model, its SAE trained as `config` says. Without ground-truth interactions
    the SAE is selected on held-out reconstruction (FVU) instead of dev NDCG; every other setting applies as in a
    run (the tolerance then ties checkpoints on FVU itself, so the better reconstruction wins either way). The
    probe's shards go to `activations` when given, else into the work folder's probe/. With `ray_config` naming a
    cluster, the probe runs on Ray Data (the same shards), the SAE on Ray Train (the same held-out rows left out of
    training; within the tolerances of training on Ray) and its statistics on Ray Data."""
    on_ray = ray_config is not None and ray_config.on_ray
    if on_ray:
        cluster_workers(ray_config)  # a bad address or worker count is refused before the work
    layout = RunLayout(work or out.with_name(out.name + ".work"))  # the import's probe and SAE, as in a run
    # Validate every input file before spending minutes on the probe and the SAE.
    contents = contents_from_onnx(onnx_path, embeddings_path, items_csv, user_inputs_path, layout.sae, name)
    if on_ray:
        from recsae_core.probe.on_ray import collect_onnx_on_ray

        collect_onnx_on_ray(onnx_path, user_inputs_path, layout.probe, ray_config, progress=config.progress,
                            activations=activations)  # fmt: skip
    else:
        collect_onnx(onnx_path, user_inputs_path, layout.probe, progress=config.progress, activations=activations)
    probe = open_probe(layout.probe)
    samples, _, _ = probe.read_all()
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(samples), generator=generator)
    n_valid = max(len(samples) // 10, 1)
    valid, train = samples[order[:n_valid]], samples[order[n_valid:]]
    if on_ray:
        from recsae_core.sae.on_ray import train_sae_on_ray

        result = train_sae_on_ray(probe, config, ray_config, valid=valid, leave_out=order[:n_valid].numpy())
    else:
        result = train_sae(train, config, valid=valid)
    sae = result.sae.cpu().eval()
    if on_ray:
        from recsae_core.sae.stats_on_ray import latent_statistics_on_ray

        stats = latent_statistics_on_ray(sae, probe, ray_config)
    else:
        stats = latent_statistics(sae, samples)
    metrics = {
        **evaluate_reconstruction(sae, valid),
        "dead_fraction": stats.dead_fraction,
        "n_samples": len(samples),
        "selected_on": "held-out FVU",
        **training_summary(result),
        "history": result.history,
    }
    with atomic_folder(layout.sae) as folder:
        sae.save(folder, hook_name="imported.h")
        save_stats(stats, folder / STATS_FILE)
        write_json(folder / METRICS, metrics)
    manifest = write_bundle(contents, out)
    verify_bundle(out)
    summary = {key: value for key, value in metrics.items() if key != "history"}  # the history stays on disk
    return {"bundle": str(out), "versions": manifest["versions"], "sae": summary}
