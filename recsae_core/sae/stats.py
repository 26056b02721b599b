"""Per-latent activation statistics of a trained SAE: firing frequency, activation scale and deciles.

Later steps rely on them: the steering units (std, max), RecSAE's activation levels (runtime.activation_levels
of global_deciles), the service's drift gauge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from recsae_core.common.artifacts import save_tensors_atomic
from recsae_core.common.errors import ArtifactError, ConfigError
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.train import Activations, iter_batches

DECILES = torch.arange(1, 10, dtype=torch.float64) / 10


@dataclass
class LatentStats:
    """Per-latent activation statistics over a set of samples (zeros where a latent never fired)."""

    frequency: Tensor
    """(n_latents,) share of samples where z > 0."""
    mean_activation: Tensor
    """(n_latents,) mean of z over the samples where it fired."""
    max_activation: Tensor
    """(n_latents,) largest z seen."""
    std_activation: Tensor
    """(n_latents,) std of z over all samples, zeros included: the 'std' unit for steering."""
    deciles: Tensor
    """(n_latents, 9) cut points of each latent's positive activations."""
    global_deciles: Tensor
    """(9,) cut points of all positive activations pooled: RecSAE's activation levels 1..10."""
    n_samples: int
    """Samples the statistics were computed on."""

    @property
    def n_latents(self) -> int:
        return len(self.frequency)

    @property
    def dead_fraction(self) -> float:
        """Share of latents that never fired."""
        return float((self.frequency == 0).float().mean())


def decile_ranks(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(pos, lo, hi): each decile's fractional rank in groups of `counts` ascending values, and the two ranks it
    interpolates between (as torch.quantile does)."""
    pos = (counts.clamp_min(1) - 1).double()[:, None] * DECILES[None, :]
    return pos, pos.floor().long(), pos.ceil().long()


def interpolate_deciles(pos: Tensor, lo: Tensor, v_lo: Tensor, v_hi: Tensor, counts: Tensor) -> Tensor:
    """The deciles from the values at ranks lo and hi of `decile_ranks`; zeros for empty groups."""
    out = v_lo.double() + (pos - lo.double()) * (v_hi.double() - v_lo.double())
    return torch.where(counts[:, None] > 0, out, torch.zeros_like(out)).float()


def _interpolated_quantiles(values: Tensor, offsets: Tensor, counts: Tensor) -> Tensor:
    """Linear-interpolated deciles of groups stored sorted and contiguous in `values`."""
    pos, lo, hi = decile_ranks(counts)
    base = offsets[:, None]
    last = max(len(values) - 1, 0)
    v_lo = values[(base + lo).clamp(0, last)] if len(values) else torch.zeros_like(pos)
    v_hi = values[(base + hi).clamp(0, last)] if len(values) else torch.zeros_like(pos)
    return interpolate_deciles(pos, lo, v_lo, v_hi, counts)


def group_deciles(sorted_values: Tensor) -> Tensor:
    """(9,) deciles of one group of ascending values (zeros when empty)."""
    return _interpolated_quantiles(sorted_values, torch.zeros(1, dtype=torch.long),
                                   torch.tensor([len(sorted_values)]))[0]  # fmt: skip


def finish_stats(
    n: int, count: Tensor, total: Tensor, total_sq: Tensor, peak: Tensor, deciles: Tensor, global_deciles: Tensor
) -> LatentStats:
    """LatentStats from per-latent sums over `n` samples: firing counts, float64 sums and sums of squares of the
    activations, largest activations, and the deciles."""
    mean_all = total / n
    return LatentStats(
        frequency=(count.double() / n).float(),
        mean_activation=torch.where(count > 0, total / count.clamp_min(1), 0.0).float(),
        max_activation=peak,
        std_activation=(total_sq / n - mean_all.pow(2)).clamp_min(0).sqrt().float(),
        deciles=deciles,
        global_deciles=global_deciles,
        n_samples=n,
    )


@torch.no_grad()
def latent_statistics(sae: TopKSAE, activations: Activations, batch_size: int = 4096) -> LatentStats:
    """Exact statistics over every sample. Memory: every positive activation is kept for the deciles,
    about 12 bytes x k x n_samples."""
    n_lat = sae.cfg.n_latents
    count = torch.zeros(n_lat, dtype=torch.long)
    total = torch.zeros(n_lat, dtype=torch.float64)
    total_sq = torch.zeros(n_lat, dtype=torch.float64)
    peak = torch.zeros(n_lat)
    latent_ids: list[Tensor] = []
    values: list[Tensor] = []
    n = 0
    for x in iter_batches(activations, batch_size, device=str(sae.device)):
        z = sae.encode(x).cpu()
        rows, cols = z.nonzero(as_tuple=True)
        vals = z[rows, cols]
        latent_ids.append(cols)
        values.append(vals)
        count += torch.bincount(cols, minlength=n_lat)
        total.index_add_(0, cols, vals.double())
        total_sq.index_add_(0, cols, vals.double().pow(2))
        peak = torch.maximum(peak, z.amax(0))
        n += len(x)
    if n == 0:
        raise ConfigError("no activations to compute latent statistics on")
    ids = torch.cat(latent_ids)
    vals = torch.cat(values)
    # Sort by value, then stably by latent: each latent's values end up contiguous and ascending.
    order = vals.argsort(stable=True)
    ids, vals = ids[order], vals[order]
    order = ids.argsort(stable=True)
    grouped = vals[order]
    offsets = torch.cumsum(count, 0) - count
    deciles = _interpolated_quantiles(grouped, offsets, count)
    return finish_stats(n, count, total, total_sq, peak, deciles, group_deciles(vals))  # vals: already ascending


_STATS_SHAPES = {"frequency": 1, "mean_activation": 1, "max_activation": 1, "std_activation": 1, "deciles": 2}


def save_stats(stats: LatentStats, path: Path) -> None:
    """Write statistics to one safetensors file (conventionally STATS_FILE beside the SAE), atomically."""
    tensors = {name: getattr(stats, name).detach().cpu().float().contiguous() for name in _STATS_SHAPES}
    tensors["global_deciles"] = stats.global_deciles.detach().cpu().float().contiguous()
    save_tensors_atomic(tensors, Path(path), metadata={"n_samples": str(stats.n_samples)})


def load_stats(path: Path, n_latents: int | None = None) -> LatentStats:
    """Read statistics back, refusing missing, corrupt or inconsistent files (and a latent count that differs
    from `n_latents` when given)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata: dict[str, Any] = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{path}: cannot read latent statistics ({err})") from None
    missing = sorted({*_STATS_SHAPES, "global_deciles"} - set(tensors))
    if missing:
        raise ArtifactError(f"{path}: missing tensors {missing}")
    try:
        n_samples = int(metadata["n_samples"])
    except (KeyError, ValueError):
        raise ArtifactError(f"{path}: metadata lacks a valid n_samples") from None
    n = len(tensors["frequency"])
    expected = {name: (n,) if dims == 1 else (n, 9) for name, dims in _STATS_SHAPES.items()}
    expected["global_deciles"] = (9,)
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        if not torch.isfinite(tensors[name]).all():
            raise ArtifactError(f"{path}: {name} contains NaN or infinite values")
    if n_samples < 1 or not ((tensors["frequency"] >= 0) & (tensors["frequency"] <= 1)).all():
        raise ArtifactError(f"{path}: n_samples must be >= 1 and frequencies within [0, 1]")
    if n_latents is not None and n != n_latents:
        raise ArtifactError(f"{path}: statistics cover {n} latents, but the SAE has {n_latents}")
    return LatentStats(**{k: tensors[k] for k in expected}, n_samples=n_samples)
