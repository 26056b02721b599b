"""Fitting the run's SAE: train on probed activations, select on dev NDCG@10 with the reconstruction substituted,
evaluate on test."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from recsae_core.common.ray_cluster import RayConfig
from recsae_core.data.splits import Stage
from recsae_core.probe.shards import ProbeShards, ShardRows
from recsae_core.recommenders.evaluate import evaluate, make_batch, mask_seen
from recsae_core.recommenders.run import RunContext, load_run
from recsae_core.sae.activations import Activations, count_rows, take_rows
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.stats import LatentStats, latent_statistics
from recsae_core.sae.train import evaluate_reconstruction, random_sae, train_sae, training_summary


def substitute(sae: TopKSAE) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> the SAE reconstruction (what RecSAE evaluates and selects checkpoints on)."""
    return lambda h: sae(h).x_hat


def error_preserving(sae: TopKSAE) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> x_hat + (h - x_hat): the numerical path of an intervention with no edits."""

    def apply(h: torch.Tensor) -> torch.Tensor:
        x_hat = sae(h).x_hat
        return x_hat + (h - x_hat)

    return apply


@torch.no_grad()
def compare_rankings(ctx: RunContext, stage: Stage, transform: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Share of users whose top-10 is unchanged by `transform`, and the largest score difference."""
    seen, targets = ctx.split.seen(stage), ctx.split.targets(stage)
    users = np.flatnonzero(targets.lengths > 0)
    identical, max_diff = 0, 0.0
    for start in range(0, len(users), 1024):
        chunk = users[start : start + 1024]
        h = ctx.model.represent(make_batch(ctx.model, chunk, seen, "cpu"))
        original = mask_seen(ctx.model.score(h), chunk, seen)
        changed = mask_seen(ctx.model.score(transform(h)), chunk, seen)
        finite = torch.isfinite(original)
        max_diff = max(max_diff, float((original[finite] - changed[finite]).abs().max()))
        same = (original.topk(10, dim=1).indices == changed.topk(10, dim=1).indices).all(dim=1)
        identical += int(same.sum())
    return {"identical_top10_fraction": identical / len(users), "max_abs_score_diff": max_diff}


class FittedSAE(NamedTuple):
    """An SAE trained and evaluated on a run."""

    sae: TopKSAE
    """The selected SAE, on the CPU in eval mode."""
    stats: LatentStats
    """Its per-latent statistics over all probed activations."""
    metrics: dict[str, Any]
    """What sae/metrics.json holds."""


class DevNDCG:
    """RecSAE's selection score: dev NDCG@10 of the run's recommender with the reconstruction substituted. It
    pickles as the run folder alone, so Ray Train's rank 0 loads the run where it scores."""

    def __init__(self, run_dir: Path, ctx: RunContext | None = None) -> None:
        self.run_dir, self.ctx = Path(run_dir), ctx

    def __getstate__(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "ctx": None}

    def __call__(self, sae: TopKSAE, row: dict[str, float]) -> float:
        """(train_sae then prefers checkpoints within max_dead on the fixed sample, which it has just
        reconstructed.)"""
        if self.ctx is None:
            self.ctx = load_run(self.run_dir, device="cpu")
        sae = copy.deepcopy(sae).cpu().eval()  # a copy: training may be on another device
        return evaluate(self.ctx.model, self.ctx.split, "valid", transform=substitute(sae))["ndcg@10"]


def activations_of(probe: ProbeShards, ray_config: RayConfig | None) -> Activations:
    """What this process holds of the probe `fit_sae` fits on: every row in memory when it trains here; on Ray,
    where it only samples and evaluates them, the shards read one at a time (`ShardRows`)."""
    if ray_config is not None and ray_config.on_ray:
        return ShardRows(probe)
    return probe.read_all()[0]


def fit_sae(
    ctx: RunContext, activations: Activations, config: SAETrainConfig, ray_config: RayConfig | None = None,
    probe: Path | ProbeShards | None = None,
) -> FittedSAE:  # fmt: skip
    """Train an SAE on probed activations, select it by dev NDCG@10 with substitution, and evaluate it on test.
    With a `ray_config` that names a cluster, training runs there on Ray Train and the latent statistics on Ray
    Data, both streaming `probe` (the probe `activations` were read from: its folder, or its shards); `activations`
    may then be the shards read one at a time (`shards.ShardRows`), as this process only samples and evaluates them.
    """
    n = count_rows(activations)
    dead_sample = take_rows(activations, torch.randperm(n, generator=torch.Generator().manual_seed(0))[:100_000])
    select = DevNDCG(ctx.root, ctx)
    # The same fixed sample, in eval mode, decides whether a tied checkpoint reconstructs better: the running
    # training FVU moves by about 1% between epochs from batch noise alone, more than the gains it should judge.
    if ray_config is not None and ray_config.on_ray:
        if probe is None:
            raise ValueError("training on Ray streams the probe's shards: give probe")
        from recsae_core.sae.on_ray import train_sae_on_ray

        result = train_sae_on_ray(probe, config, ray_config, select=select, valid=dead_sample)
    else:
        result = train_sae(activations, config, select=select, valid=dead_sample)
    sae = result.sae.cpu().eval()
    baseline = random_sae(sae.cfg, activations, config.seed).eval()
    if ray_config is not None and ray_config.on_ray and probe is not None:
        from recsae_core.sae.stats_on_ray import latent_statistics_on_ray

        stats = latent_statistics_on_ray(sae, probe, ray_config)
    else:
        stats = latent_statistics(sae, activations)
    recon = evaluate_reconstruction(sae, activations)
    with torch.no_grad():
        ndcg = {
            "original": evaluate(ctx.model, ctx.split, "test")["ndcg@10"],
            "substituted": evaluate(ctx.model, ctx.split, "test", transform=substitute(sae))["ndcg@10"],
            "error_preserving": evaluate(ctx.model, ctx.split, "test", transform=error_preserving(sae))["ndcg@10"],
            "random_sae_substituted": evaluate(ctx.model, ctx.split, "test", transform=substitute(baseline))["ndcg@10"],
        }
        passthrough = compare_rankings(ctx, "test", error_preserving(sae))
    metrics = {
        "fvu": recon["fvu"],
        "dead_fraction": stats.dead_fraction,
        "mean_l0": recon["mean_l0"],
        "random_sae_fvu": evaluate_reconstruction(baseline, activations)["fvu"],
        "n_samples": n,
        **training_summary(result),
        "ndcg@10": ndcg,
        "substituted_ratio": round(ndcg["substituted"] / ndcg["original"], 4),
        "passthrough_identical_top10_fraction": passthrough["identical_top10_fraction"],
        "passthrough_max_abs_score_diff": passthrough["max_abs_score_diff"],
        "history": result.history,
    }
    return FittedSAE(sae, stats, metrics)
