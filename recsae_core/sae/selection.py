"""What SAE training decides between steps, the same in one process and on Ray Train: which latents count as dead
for AuxK (`FireClock`), when an epoch is scored, and which checkpoint is kept and when the learning rate drops or
training stops (`CheckpointKeeper`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.model import TopKSAE

Select = Callable[[TopKSAE, dict[str, float]], float]
"""A checkpoint's selection score, higher is better (RecSAE: dev NDCG@10 with the reconstruction substituted)."""


class FireClock:
    """Samples seen since each latent last fired; a latent is dead once that reaches `dead_after`. On Ray Train every
    worker ticks with the latents that fired anywhere in the global batch, so the dead set is global."""

    def __init__(self, n_latents: int, dead_after: int | None, device: str | torch.device) -> None:
        self.since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
        # With dead_after unset (an `init` SAE from elsewhere) it is one epoch, known only after the first pass; no
        # latent can reach an epoch's count before then, so "infinite" during epoch 1 is the same rule.
        self.dead_after: float = math.inf if dead_after is None else dead_after

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.dead_after

    def tick(self, active: Tensor, n_samples: int) -> None:
        """A step of `n_samples` rows in which the latents of the boolean mask `active` fired."""
        self.since_fired += n_samples
        self.since_fired[active] = 0

    def epoch_length(self, n_samples: int) -> None:
        """The first epoch's length: the window when none was set."""
        if math.isinf(self.dead_after):
            self.dead_after = n_samples


def scored(epoch: int, tc: SAETrainConfig, ending: bool) -> bool:
    """Whether `epoch` is scored: every `select_every`-th, the last, and one that ends training on a budget."""
    return epoch % tc.select_every == 0 or epoch == tc.epochs or ending


@torch.no_grad()
def score_epoch(
    sae: TopKSAE, row: dict[str, float], tc: SAETrainConfig, select: Select | None, valid: Tensor | None,
    reconstruct: Callable[[TopKSAE, Tensor, int], dict[str, float]],
) -> float:  # fmt: skip
    """Fill the epoch's row with the reconstruction on `valid` (when given) and return its selection score:
    `select(sae, row)`, else -FVU of `valid`, else -FVU of the epoch."""
    was_training = sae.training
    sae.eval()
    if valid is not None:
        recon = reconstruct(sae, valid, tc.batch_size)
        row["valid_fvu"], row["valid_dead_fraction"] = recon["fvu"], recon["dead_fraction"]
    score = float(select(sae, row)) if select is not None else -row.get("valid_fvu", row["fvu"])
    sae.train(was_training)
    row["score"] = score
    return score


class Verdict(NamedTuple):
    """What a scored epoch decides."""

    keep: bool
    """Its weights replace the kept checkpoint."""
    lr_drop: bool
    """The learning rate drops by `lr_drop_factor` (a plateau with drops left)."""
    stop: bool
    """Training stops for patience (a plateau with no drop left)."""


class CheckpointKeeper:
    """Early stopping and checkpoint selection. A checkpoint with more dead latents than `max_dead` loses to any with
    fewer; among checkpoints of one kind, a better score wins, and within `select_tolerance` of the best the clearly
    better reconstruction wins (`_keep`)."""

    def __init__(self, tc: SAETrainConfig) -> None:
        self.tc = tc
        self.best_score, self.best_epoch = -math.inf, 0
        self.top_score, self.kept_score, self.kept_fvu, self.kept_few_dead = -math.inf, -math.inf, math.inf, False
        self.stale, self.drops_left = 0, tc.lr_drops

    def judge(self, epoch: int, row: dict[str, float]) -> Verdict:
        """Decide on a scored epoch's row (score, and fvu / dead_fraction, on `valid` when it has them)."""
        tc, score = self.tc, row["score"]
        fvu_now = row.get("valid_fvu", row["fvu"])
        few_dead = row.get("valid_dead_fraction", row["dead_fraction"]) <= tc.max_dead
        if few_dead and not self.kept_few_dead:  # the first checkpoint within max_dead beats every one before it
            keep, self.top_score = True, -math.inf
        elif self.kept_few_dead and not few_dead:
            keep = False
        else:
            keep = _keep(score, fvu_now, self.top_score, self.kept_score, self.kept_fvu, tc)
        if keep:
            self.best_score, self.best_epoch, self.stale = score, epoch, 0
            self.kept_score, self.kept_fvu, self.kept_few_dead = score, fvu_now, few_dead
        else:
            self.stale += 1
        if few_dead == self.kept_few_dead:  # the tolerance band is measured among checkpoints of the kept one's kind
            self.top_score = max(self.top_score, score)
        lr_drop = stop = False
        if self.stale >= tc.patience and self.drops_left > 0:
            self.drops_left, self.stale, lr_drop = self.drops_left - 1, 0, True
        elif self.stale >= tc.patience:
            stop = True
        return Verdict(keep, lr_drop, stop)


def _keep(score: float, fvu: float, top_score: float, kept_score: float, kept_fvu: float, tc: SAETrainConfig) -> bool:
    """Whether this epoch replaces the kept checkpoint: it beats every earlier score, or (with a tolerance) it
    scores within the tolerance of the best and reconstructs clearly better than the kept one, which itself must
    then still be within the tolerance of the new best. Selection scores on a few thousand users are noisy at the
    third decimal, so without the tolerance an early lucky epoch wins over a later, more faithful SAE."""
    if score > top_score and tc.select_tolerance == 0:
        return True
    floor = max(top_score, score) - tc.select_tolerance * abs(max(top_score, score))
    if score < floor:
        return False
    if kept_score < floor:  # the kept checkpoint fell out of the tolerance band: this one is in it
        return True
    return fvu < kept_fvu * (1 - tc.min_fvu_gain) or (score > top_score and fvu <= kept_fvu)
