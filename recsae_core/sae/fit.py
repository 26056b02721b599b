"""Fitting the run's SAE: train on probed activations, select on dev NDCG@10 with the reconstruction substituted,
evaluate on test."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from recsae_core.data.splits import Stage
from recsae_core.recommenders.evaluate import evaluate, make_batch, mask_seen
from recsae_core.recommenders.run import RunContext
from recsae_core.sae.model import SAEConfig, TopKSAE
from recsae_core.sae.stats import LatentStats, latent_statistics
from recsae_core.sae.train import SAETrainConfig, evaluate_reconstruction, random_sae, train_sae

SELECT_SAMPLES = 50_000
"""Training samples between two checkpoint evaluations (every epoch once an epoch is at least this large)."""


@dataclass
class SAEOptions:
    """SAE step options (RecSAE defaults: 16x latents, k=8)."""

    n_latents: int = 1024
    k: int = 8
    lr: float = 3e-3
    """Above RecSAE's grid: with under 1M samples lower rates stop with many latents dead (docs/benchmarks.md)."""
    epochs: int = 1000
    patience: int = 10
    select_tolerance: float = 0.005
    """Checkpoints within 0.5% of the best dev NDCG count as tied; among tied ones the better reconstruction wins."""
    max_minutes: float | None = 5.0
    """Wall-time budget of SAE training (None: no limit); the best checkpoint so far is kept."""
    lr_drops: int = 2
    """Plateaus answered by lowering the learning rate (x0.3) before stopping."""
    dead_after: int = 80_000
    """AuxK treats a latent as dead after this many training samples without firing (at most one epoch). RecSAE's
    one-epoch window is ~800k samples on ML-1M SASRec, so revived latents starve for an epoch before AuxK helps them
    again: 15% dead after 5 epochs there, against 3.8% with 80k (docs/benchmarks.md)."""
    max_dead: float = 0.05
    """Checkpoints with more dead latents than this lose to any that have fewer, whatever their NDCG."""
    batch_size: int = 0
    """0 picks a size giving at least ~32 steps per epoch (general models have one sample per user only)."""
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


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


def fit_sae(ctx: RunContext, activations: torch.Tensor, options: SAEOptions) -> FittedSAE:
    """Train an SAE on probed activations, select it by dev NDCG@10 with substitution, and evaluate it on test."""
    n, d = activations.shape
    batch = options.batch_size or int(np.clip(n // 32, 64, 4096))
    sae_config = SAEConfig(d_in=d, n_latents=options.n_latents, k=options.k, dead_after=min(n, options.dead_after))
    train_config = SAETrainConfig(
        lr=options.lr, batch_size=batch, epochs=options.epochs, patience=options.patience, seed=options.seed,
        device=options.device, progress=options.progress, select_tolerance=options.select_tolerance,
        max_seconds=None if options.max_minutes is None else options.max_minutes * 60,
        select_every=max(1, -(-SELECT_SAMPLES // n)), lr_drops=options.lr_drops,
    )  # fmt: skip
    dead_sample = activations[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:100_000]]

    def select(sae: TopKSAE, row: dict[str, float]) -> float:
        """RecSAE's selection (dev NDCG@10 with the reconstruction substituted), among SAEs with few dead latents
        (dead on the fixed sample, which train_sae has just reconstructed: row['valid_dead_fraction'])."""
        sae = copy.deepcopy(sae).cpu().eval()  # a copy: training may be on another device
        ndcg = evaluate(ctx.model, ctx.split, "valid", transform=substitute(sae))["ndcg@10"]
        return ndcg if row["valid_dead_fraction"] <= options.max_dead else ndcg - 1.0

    # The same fixed sample, in eval mode, decides whether a tied checkpoint reconstructs better: the running
    # training FVU moves by about 1% between epochs from batch noise alone, more than the gains it should judge.
    result = train_sae(activations, sae_config, train_config, select=select, valid=dead_sample)
    sae = result.sae.cpu().eval()
    baseline = random_sae(sae.cfg, activations, options.seed).eval()
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
        "seconds": round(result.seconds, 2),
        "samples_per_second": round(result.samples_per_second, 1),
        "n_samples": n,
        "n_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "lr": options.lr,
        "batch_size": batch,
        "dead_after": sae.cfg.dead_after,
        "best_epoch": result.best_epoch,
        "epochs_trained": result.epochs_trained,
        "stopped_by": result.stopped_by,
        "ndcg@10": ndcg,
        "substituted_ratio": round(ndcg["substituted"] / ndcg["original"], 4),
        "passthrough_identical_top10_fraction": passthrough["identical_top10_fraction"],
        "passthrough_max_abs_score_diff": passthrough["max_abs_score_diff"],
        "history": result.history,
    }
    return FittedSAE(sae, stats, metrics)
