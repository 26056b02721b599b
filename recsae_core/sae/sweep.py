"""The k / width trade-off: FVU, dead latents and substituted NDCG@10 for several k, in JSON and an HTML page."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from recsae_core.common.artifacts import write_json, write_text_atomic
from recsae_core.common.errors import ArtifactError, ConfigError, IncompleteError
from recsae_core.common.html import figure_html, page, table_html
from recsae_core.common.layout import RunLayout
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.probe.shards import probe_shards
from recsae_core.recommenders.run import load_run
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.fit import activations_of, fit_sae


def sweep_sae(
    run_dir: Path, ks: list[int], widths: list[int], config: SAETrainConfig, out: Path,
    ray_config: RayConfig | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train one SAE per (width, k) with k <= width on the run's probe, the rest of each run as `config` says
    (its own n_latents and k are replaced), each on Ray Train when `ray_config` names a cluster; write OUT (JSON)
    and OUT with .html beside it."""
    pairs = [(width, k) for width in widths for k in ks if k <= width]
    if not pairs:
        raise ConfigError(f"every k in {ks} exceeds every width in {widths}: nothing to sweep")
    layout = RunLayout(run_dir)
    try:  # a changed file is refused by name; an unfinished probe asks for the pipeline
        meta = layout.verify_probe()
    except IncompleteError as err:
        raise ArtifactError(f"{layout.probe}: no complete probe ({err}); run 'recsae pipeline' first") from None
    layout.verify_recommender()
    ctx = load_run(run_dir)
    probe = probe_shards(layout.probe, meta)  # verified just above, wherever its shards are
    activations = activations_of(probe, ray_config)  # in memory once for every point, unless on Ray
    points = []
    for width, k in pairs:
        point_config = dataclasses.replace(config, n_latents=width, k=k)
        m = fit_sae(ctx, activations, point_config, ray_config, probe).metrics
        points.append({
            "n_latents": width, "k": k, "fvu": m["fvu"], "dead_fraction": m["dead_fraction"],
            "ndcg@10_original": m["ndcg@10"]["original"], "ndcg@10_substituted": m["ndcg@10"]["substituted"],
            "substituted_ratio": m["substituted_ratio"], "seconds": m["seconds"],
            "samples_per_second": m["samples_per_second"], "epochs_trained": m["epochs_trained"],
            "stopped_by": m["stopped_by"], "workers": m["workers"],
        })  # fmt: skip
    result = {"run": str(run_dir), "model": ctx.model.name, "dataset": ctx.config["dataset"], "points": points}
    write_json(out, result)
    write_text_atomic(out.with_suffix(".html"), render(result))
    return result


def render(result: dict[str, Any]) -> str:
    points = result["points"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for width in sorted({p["n_latents"] for p in points}):
        series = sorted((p for p in points if p["n_latents"] == width), key=lambda p: p["k"])
        ks = [p["k"] for p in series]
        axes[0].plot(ks, [p["fvu"] for p in series], marker="o", label=f"{width} latents")
        axes[1].plot(ks, [p["dead_fraction"] for p in series], marker="o", label=f"{width} latents")
        axes[2].plot(ks, [p["substituted_ratio"] for p in series], marker="o", label=f"{width} latents")
    for ax, title in zip(axes, ("FVU", "dead latent fraction", "substituted / original NDCG@10"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[2].axhline(0.95, color="grey", linestyle="--", linewidth=1)
    axes[0].legend()
    headers = ["latents", "k", "FVU", "dead", "NDCG@10 orig", "NDCG@10 subst", "ratio", "seconds"]
    rows = [
        [p["n_latents"], p["k"], p["fvu"], p["dead_fraction"], p["ndcg@10_original"], p["ndcg@10_substituted"],
         p["substituted_ratio"], p["seconds"]]
        for p in points
    ]  # fmt: skip
    title = f"SAE k / width trade-off: {result['model']} on {result['dataset']}"
    return page(title, [figure_html(fig, "k / width trade-off"), table_html(headers, rows, "sweep")])
