"""Training the TopK SAE on probed activations, and measuring its reconstruction."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recsae_core.common.errors import ConfigError
from recsae_core.sae.activations import Activations, count_rows, first_rows, iter_batches
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.model import SAEConfig, TopKSAE
from recsae_core.sae.selection import CheckpointKeeper, FireClock, Select, score_epoch, scored


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
    config: SAETrainConfig
    """The run's settings, resolved against the training data (batch size, selection cadence, dead window)."""
    stopped_by: str = "epochs"
    """Why training ended: 'epochs' (the cap), 'samples' (the sample budget), 'patience' (no kept checkpoint for
    `patience` evaluations after the last learning-rate drop) or 'wall_clock_safety' (the safety stop fired: the
    result then depends on the machine's speed)."""
    samples_seen: int = 0
    """Training samples over all epochs run (what `max_samples` counts)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per epoch: epoch, fvu (train), aux_loss, dead_fraction (in no top-k this epoch), valid_fvu and
    valid_dead_fraction (on `valid`, when given), score."""
    workers: int = 1
    """Data-parallel workers it trained on (more than 1: DDP on Ray Train)."""


def random_sae(config: SAEConfig, data: Activations, seed: int) -> TopKSAE:
    """The random-init baseline: exactly the SAE training starts from (same seed, b_dec from the data)."""
    sae = TopKSAE(config, seed=seed)
    sae.init_from_data(first_rows(data, 32768))
    return sae


def train_sae(
    activations: Activations,
    config: SAETrainConfig,
    select: Select | None = None,
    valid: Tensor | None = None,
    init: TopKSAE | None = None,
) -> SAETrainResult:
    """Adam on FVU + aux_coef * AuxK, with early stopping on `select(sae, row)` (higher is better: RecSAE uses the
    dev NDCG@10 with the reconstruction substituted; `row` is the epoch's history entry, with the reconstruction
    metrics on `valid` already in it), else on -FVU of `valid`, else on -FVU of the training epoch. A checkpoint
    with more dead latents than `config.max_dead` (on `valid` when given, else in the epoch) loses to any with fewer.

    Training starts from `random_sae(config.resolve(n).sae_config(d), activations, seed)`, or from a copy of `init`
    when given, whose architecture (AuxK settings included) is then kept; its width and k must be the config's."""
    tc = config.resolve(count_rows(activations))
    if init is not None and (init.cfg.n_latents, init.cfg.k) != (tc.n_latents, tc.k):
        raise ConfigError(
            f"init SAE has n_latents={init.cfg.n_latents}, k={init.cfg.k}; the config asks for {tc.n_latents}, {tc.k}"
        )
    gen = torch.Generator().manual_seed(tc.seed)
    if init is not None:
        sae = copy.deepcopy(init)
    else:
        sae = random_sae(tc.sae_config(first_rows(activations, 1).shape[1]), activations, tc.seed)
    sae = sae.to(tc.device).train()
    cfg = sae.cfg
    optimizer = torch.optim.Adam(sae.parameters(), lr=tc.lr)
    max_seconds = tc.max_seconds
    clock = FireClock(cfg.n_latents, cfg.dead_after, tc.device)
    if cfg.dead_after is None and isinstance(activations, Tensor):
        clock.epoch_length(len(activations))
    keeper = CheckpointKeeper(tc)
    best_state = copy.deepcopy(sae.state_dict())
    stopped_by = "epochs"
    history: list[dict[str, float]] = []
    seen, start = 0, time.perf_counter()
    bar = tqdm(range(1, tc.epochs + 1), desc="sae", unit="epoch", disable=not tc.progress)
    for epoch in bar:
        fired = torch.zeros(cfg.n_latents, dtype=torch.bool, device=tc.device)
        sums = {"fvu": 0.0, "aux_loss": 0.0}
        n_batches, epoch_samples = 0, 0
        for x in iter_batches(activations, tc.batch_size, gen, tc.device):
            if len(x) < 2:
                continue  # a one-row batch has no variance to explain
            out = sae(x, clock.dead_mask() if cfg.aux_coef > 0 else None)
            loss = out.fvu + cfg.aux_coef * out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_gradient()
            optimizer.step()
            sae.normalize_decoder()

            active = (out.z > 0).any(0)
            fired |= active
            clock.tick(active, len(x))
            sums["fvu"] += out.fvu.item()
            sums["aux_loss"] += out.aux_loss.item()
            n_batches += 1
            epoch_samples += len(x)
        if n_batches == 0:
            raise ConfigError("no training batch with at least 2 rows")
        seen += epoch_samples
        clock.epoch_length(epoch_samples)

        row: dict[str, float] = {
            "epoch": epoch,
            "fvu": sums["fvu"] / n_batches,
            "aux_loss": sums["aux_loss"] / n_batches,
            "dead_fraction": 1.0 - float(fired.float().mean()),
        }
        history.append(row)
        # Checked every epoch, scored or not; the epoch that ends training on a budget is scored, like the last one.
        spent = bool(tc.max_samples) and seen >= tc.max_samples
        out_of_time = max_seconds is not None and time.perf_counter() - start >= max_seconds
        if not scored(epoch, tc, spent or out_of_time):
            continue
        score_epoch(sae, row, tc, select, valid, evaluate_reconstruction)
        bar.set_postfix(fvu=f"{row['fvu']:.4f}", dead=f"{row['dead_fraction']:.3f}", score=f"{row['score']:.4f}")
        verdict = keeper.judge(epoch, row)
        if verdict.keep:
            best_state = copy.deepcopy(sae.state_dict())
        if verdict.lr_drop:
            for group in optimizer.param_groups:
                group["lr"] *= tc.lr_drop_factor
            row["lr"] = optimizer.param_groups[0]["lr"]
        elif verdict.stop:
            stopped_by = "patience"
            break
        if spent:
            stopped_by = "samples"
            break
        if out_of_time:
            stopped_by = "wall_clock_safety"
            warn_safety_stop(tc, epoch, seen)
            break
    bar.close()

    seconds = time.perf_counter() - start
    sae.load_state_dict(best_state)
    return SAETrainResult(
        sae=sae.eval(),
        config=tc,
        best_epoch=keeper.best_epoch,
        best_score=keeper.best_score,
        epochs_trained=len(history),
        seconds=seconds,
        samples_per_second=seen / max(seconds, 1e-9),
        history=history,
        stopped_by=stopped_by,
        samples_seen=seen,
    )


def warn_safety_stop(tc: SAETrainConfig, epoch: int, seen: int) -> None:
    print(f"recsae: warning: SAE training hit the {tc.max_minutes:g}-minute wall-clock safety stop after "
          f"{epoch} epochs ({seen} samples); the best checkpoint so far is kept, and this SAE depends on the "
          "machine's speed (metrics.json: stopped_by wall_clock_safety)", file=sys.stderr)  # fmt: skip


def training_summary(result: SAETrainResult) -> dict[str, Any]:
    """What a step records about how its SAE was trained: the resolved settings and how training ended."""
    tc = result.config
    return {
        "n_latents": tc.n_latents, "k": tc.k, "lr": tc.lr, "batch_size": tc.batch_size,
        "dead_after": result.sae.cfg.dead_after, "max_dead": tc.max_dead, "select_every": tc.select_every,
        "seed": tc.seed, "max_samples": tc.max_samples, "samples_seen": result.samples_seen,
        "max_minutes": tc.max_minutes, "seconds": round(result.seconds, 2),
        "samples_per_second": round(result.samples_per_second, 1), "best_epoch": result.best_epoch,
        "epochs_trained": result.epochs_trained, "stopped_by": result.stopped_by, "workers": result.workers,
    }  # fmt: skip


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
