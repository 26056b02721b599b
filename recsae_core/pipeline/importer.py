"""Wrapping a recommender we did not train: ONNX `inputs -> h` + its item matrix -> probe -> SAE -> bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recsae_core.bundle.export import contents_from_onnx
from recsae_core.bundle.format import verify_bundle, write_bundle
from recsae_core.common.artifacts import atomic_folder, write_json
from recsae_core.pipeline.steps import SAEOptions
from recsae_core.probe.collect import collect_onnx, load_activations
from recsae_core.sae.model import SAEConfig
from recsae_core.sae.stats import latent_statistics, save_stats
from recsae_core.sae.train import SAETrainConfig, evaluate_reconstruction, train_sae


def import_onnx(
    onnx_path: Path,
    embeddings_path: Path,
    items_csv: Path,
    user_inputs_path: Path,
    out: Path,
    options: SAEOptions,
    name: str = "imported",
    work: Path | None = None,
) -> dict[str, Any]:
    """Build a bundle around an outside model. Without ground-truth interactions the SAE is selected on held-out
    reconstruction (FVU) instead of dev NDCG."""
    work = work or out.with_name(out.name + ".work")
    # Validate every input file before spending minutes on the probe and the SAE.
    contents = contents_from_onnx(onnx_path, embeddings_path, items_csv, user_inputs_path, work / "sae", name)
    collect_onnx(onnx_path, user_inputs_path, work / "probe", progress=options.progress)
    activations, _, _ = load_activations(work / "probe")
    generator = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(len(activations), generator=generator)
    n_valid = max(len(activations) // 10, 1)
    valid, train = activations[order[:n_valid]], activations[order[n_valid:]]
    batch = options.batch_size or max(64, min(4096, len(train) // 32))
    result = train_sae(
        train,
        SAEConfig(d_in=activations.shape[1], n_latents=options.n_latents, k=options.k),
        SAETrainConfig(lr=options.lr, batch_size=batch, epochs=options.epochs, patience=options.patience,
                       seed=options.seed, device=options.device, progress=options.progress),
        valid=valid,
    )  # fmt: skip
    sae = result.sae.cpu().eval()
    stats = latent_statistics(sae, activations)
    metrics = {
        **evaluate_reconstruction(sae, valid),
        "dead_fraction": stats.dead_fraction,
        "seconds": round(result.seconds, 2),
        "n_samples": len(activations),
        "selected_on": "held-out FVU",
    }
    with atomic_folder(work / "sae") as folder:
        sae.save(folder, hook_name="imported.h")
        save_stats(stats, folder / "latent_stats.safetensors")
        write_json(folder / "metrics.json", metrics)
    manifest = write_bundle(contents, out)
    verify_bundle(out)
    return {"bundle": str(out), "versions": manifest["versions"], "sae": metrics}
