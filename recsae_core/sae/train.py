"""Training the TopK SAE on probed activations, and measuring its reconstruction."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recsae_core.common.errors import ConfigError
from recsae_core.sae.activations import Activations, first_rows, iter_batches
from recsae_core.sae.model import SAEConfig, TopKSAE


@dataclass
class SAETrainConfig:
    """How to train the SAE (RecSAE grid: lr in {1e-5, 5e-5, 1e-4})."""

    lr: float = 1e-4
    batch_size: int = 4096
    epochs: int = 50
    patience: int = 5
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    select_tolerance: float = 0.0
    """Relative slack on the selection score: a later epoch scoring within this fraction of the best score so far
    replaces the kept one when it reconstructs better (by min_fvu_gain). 0 keeps the strictly best-scoring epoch."""
    min_fvu_gain: float = 0.005
    """Relative FVU drop that makes a within-tolerance epoch worth keeping (and resets the patience)."""
    max_seconds: float | None = None
    """Stop after the epoch during which this much wall time has passed (the kept checkpoint is still returned)."""
    lr_drops: int = 0
    """When patience runs out, multiply the learning rate by lr_drop_factor and go on, this many times, before
    stopping (reduce-on-plateau): the last part of the FVU comes from smaller steps, not more of them."""
    lr_drop_factor: float = 0.3
    select_every: int = 1
    """Score (and count patience) every this many epochs: tiny epochs (one sample per user) would otherwise spend
    more time selecting than training."""

    def __post_init__(self) -> None:
        if not (0 <= self.select_tolerance < 1 and 0 <= self.min_fvu_gain < 1):
            raise ConfigError(
                f"SAETrainConfig.select_tolerance and min_fvu_gain must be in [0, 1), got "
                f"{self.select_tolerance}, {self.min_fvu_gain}"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"SAETrainConfig.max_seconds must be > 0, got {self.max_seconds}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"SAETrainConfig.lr must be > 0, got {self.lr}")
        if self.batch_size < 2:
            raise ConfigError(
                f"SAETrainConfig.batch_size must be >= 2 (FVU needs a batch variance), got {self.batch_size}"
            )
        if self.lr_drops < 0 or not 0 < self.lr_drop_factor < 1:
            raise ConfigError(
                f"SAETrainConfig.lr_drops must be >= 0 and lr_drop_factor in (0, 1), got {self.lr_drops}, "
                f"{self.lr_drop_factor}"
            )
        if self.select_every < 1:
            raise ConfigError(f"SAETrainConfig.select_every must be >= 1, got {self.select_every}")
        if self.epochs < 1 or self.patience < 1:
            raise ConfigError(f"SAETrainConfig.epochs and patience must be >= 1, got {self.epochs}, {self.patience}")


@dataclass
class SAETrainResult:
    """What SAE training produced."""

    sae: TopKSAE
    """The kept (best-scoring) SAE, in eval mode."""
    best_epoch: int
    """1-based epoch whose weights were kept."""
    best_score: float
    """Selection score of that epoch (select(sae, row), else -valid FVU, else -train FVU)."""
    epochs_trained: int
    """Epochs actually run (early stopping may end before `epochs`)."""
    seconds: float
    """Wall-clock training time, selection included."""
    samples_per_second: float
    """Training throughput over all epochs."""
    stopped_by: str = "epochs"
    """Why training ended: 'epochs' (the cap), 'patience' (no kept checkpoint for `patience` epochs) or 'time'."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per epoch: epoch, fvu (train), aux_loss, dead_fraction (in no top-k this epoch), valid_fvu and
    valid_dead_fraction (on `valid`, when given), score."""


def random_sae(config: SAEConfig, data: Activations, seed: int) -> TopKSAE:
    """The random-init baseline: exactly the SAE training starts from (same seed, b_dec from the data)."""
    sae = TopKSAE(config, seed=seed)
    sae.init_from_data(first_rows(data, 32768))
    return sae


def train_sae(
    activations: Activations,
    sae_config: SAEConfig,
    train_config: SAETrainConfig,
    select: Callable[[TopKSAE, dict[str, float]], float] | None = None,
    valid: Tensor | None = None,
    init: TopKSAE | None = None,
) -> SAETrainResult:
    """Adam on FVU + aux_coef * AuxK, with early stopping on `select(sae, row)` (higher is better: RecSAE uses the
    dev NDCG@10 with the reconstruction substituted; `row` is the epoch's history entry, with the reconstruction
    metrics on `valid` already in it), else on -FVU of `valid`, else on -FVU of the training epoch.

    Training starts from `random_sae(sae_config, activations, seed)`, or from a copy of `init` when given
    (whose config then replaces `sae_config`)."""
    tc = train_config
    gen = torch.Generator().manual_seed(tc.seed)
    sae = copy.deepcopy(init) if init is not None else random_sae(sae_config, activations, tc.seed)
    sae = sae.to(tc.device).train()
    cfg = sae.cfg
    optimizer = torch.optim.Adam(sae.parameters(), lr=tc.lr)

    # Samples seen since each latent last fired; a latent is dead once that reaches dead_after. With dead_after
    # unset it is one epoch, which for shards is known only after the first pass; no latent can reach an epoch's
    # count before then, so "infinite" during epoch 1 is the same rule.
    since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=tc.device)
    dead_after = cfg.dead_after if cfg.dead_after is not None else math.inf
    if cfg.dead_after is None and isinstance(activations, Tensor):
        dead_after = len(activations)

    best_score, best_epoch, best_state = -math.inf, 0, copy.deepcopy(sae.state_dict())
    top_score, kept_score, kept_fvu = -math.inf, -math.inf, math.inf
    stopped_by, drops_left = "epochs", tc.lr_drops
    history: list[dict[str, float]] = []
    seen, start, stale = 0, time.perf_counter(), 0
    bar = tqdm(range(1, tc.epochs + 1), desc="sae", unit="epoch", disable=not tc.progress)
    for epoch in bar:
        fired = torch.zeros(cfg.n_latents, dtype=torch.bool, device=tc.device)
        sums = {"fvu": 0.0, "aux_loss": 0.0}
        n_batches, epoch_samples = 0, 0
        for x in iter_batches(activations, tc.batch_size, gen, tc.device):
            if len(x) < 2:
                continue  # a one-row batch has no variance to explain
            dead_mask = since_fired >= dead_after if cfg.aux_coef > 0 else None
            out = sae(x, dead_mask)
            loss = out.fvu + cfg.aux_coef * out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_gradient()
            optimizer.step()
            sae.normalize_decoder()

            active = (out.z > 0).any(0)
            fired |= active
            since_fired += len(x)
            since_fired[active] = 0
            sums["fvu"] += out.fvu.item()
            sums["aux_loss"] += out.aux_loss.item()
            n_batches += 1
            epoch_samples += len(x)
        if n_batches == 0:
            raise ConfigError("no training batch with at least 2 rows")
        seen += epoch_samples
        if cfg.dead_after is None:
            dead_after = epoch_samples

        row: dict[str, float] = {
            "epoch": epoch,
            "fvu": sums["fvu"] / n_batches,
            "aux_loss": sums["aux_loss"] / n_batches,
            "dead_fraction": 1.0 - float(fired.float().mean()),
        }
        if epoch % tc.select_every and epoch != tc.epochs:
            history.append(row)
            continue
        sae.eval()
        with torch.no_grad():
            if valid is not None:
                recon = evaluate_reconstruction(sae, valid, tc.batch_size)
                row["valid_fvu"], row["valid_dead_fraction"] = recon["fvu"], recon["dead_fraction"]
            score = float(select(sae, row)) if select is not None else -row.get("valid_fvu", row["fvu"])
        sae.train()
        row["score"] = score
        history.append(row)
        bar.set_postfix(fvu=f"{row['fvu']:.4f}", dead=f"{row['dead_fraction']:.3f}", score=f"{score:.4f}")

        fvu_now = row.get("valid_fvu", row["fvu"])
        if _keep(score, fvu_now, top_score, kept_score, kept_fvu, tc):
            best_score, best_epoch, stale = score, epoch, 0
            kept_score, kept_fvu = score, fvu_now
            best_state = copy.deepcopy(sae.state_dict())
        else:
            stale += 1
        top_score = max(top_score, score)
        if stale >= tc.patience and drops_left > 0:
            drops_left, stale = drops_left - 1, 0
            for group in optimizer.param_groups:
                group["lr"] *= tc.lr_drop_factor
            row["lr"] = optimizer.param_groups[0]["lr"]
        elif stale >= tc.patience:
            stopped_by = "patience"
            break
        if tc.max_seconds is not None and time.perf_counter() - start >= tc.max_seconds:
            stopped_by = "time"
            break
    bar.close()

    seconds = time.perf_counter() - start
    sae.load_state_dict(best_state)
    return SAETrainResult(
        sae=sae.eval(),
        best_epoch=best_epoch,
        best_score=best_score,
        epochs_trained=len(history),
        seconds=seconds,
        samples_per_second=seen / max(seconds, 1e-9),
        history=history,
        stopped_by=stopped_by,
    )


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


@torch.no_grad()
def evaluate_reconstruction(sae: TopKSAE, activations: Activations, batch_size: int = 4096) -> dict[str, float]:
    """FVU over the whole set (one global mean, not per batch), share of latents that never fire, mean L0."""
    sq_err = sq_sum = 0.0
    total = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    n = l0 = 0
    for x in iter_batches(activations, batch_size, device=str(sae.device)):
        z = sae.encode(x)
        sq_err += float((sae.decode(z) - x).double().pow(2).sum())
        sq_sum += float(x.double().pow(2).sum())
        total += x.double().sum(0).cpu()
        fired |= (z > 0).any(0).cpu()
        l0 += int((z > 0).sum())
        n += len(x)
    if n == 0:
        raise ConfigError("no activations to evaluate")
    variance = sq_sum - float(total.pow(2).sum()) / n  # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2
    return {
        "fvu": sq_err / max(variance, 1e-30),
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "mean_l0": l0 / n,
    }
