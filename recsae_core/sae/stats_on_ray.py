"""The SAE's latent statistics on Ray Data: the same `LatentStats` as `stats.latent_statistics`, computed by an actor
pool over the probe's shards and aggregated by Ray Data.

The dataset holds one row per encoding batch, its [start, end) over the probe's samples, cut as the one-process
path cuts them (`iter_batches` over the shards in order), so every code comes out of the same batch of the same
SAE. Each actor (the SAE shipped once, in its constructor) reads its rows from the shards and emits one
(latent, value) row per positive activation; Ray Data then groups them by latent (firing count, sums, largest value
and the exact deciles of each latent, from its sorted values) and sorts all of them (the pooled deciles, read at
their ranks of the sorted dataset).

Equality with one process: n_samples, frequency, max_activation, deciles and global_deciles are bit-identical (the
same values at the same ranks, interpolated by the same code); mean_activation and std_activation sum the same
float64 values in another order, so they agree to about 1e-6 relative (tested at rtol 1e-5, atol 1e-7).
The driver verifies the probe once; the actors get its shards (`probe.shards.ProbeShards`: the probe folder's, or
those at the local path or pyarrow filesystem URI the probe wrote them to) and read only their rows, through the
probe's one shard reader. Shards in the run folder must then be on storage every node mounts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from recsae_core.common.errors import ConfigError
from recsae_core.common.ray_cluster import RayConfig, cluster_workers
from recsae_core.probe.collect import batch_bounds
from recsae_core.probe.shards import ProbeShards, as_probe
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.stats import LatentStats, decile_ranks, finish_stats, group_deciles, interpolate_deciles

if TYPE_CHECKING:  # Ray is imported only when a cluster is asked for
    from collections.abc import Iterator

    from ray.data import Dataset


class EncodeActor:
    """One Ray actor: the SAE and the probe's shards (shipped once); a batch of rows -> its positive codes."""

    def __init__(self, sae: TopKSAE, probe: ProbeShards) -> None:
        self.sae, self.probe = sae.cpu().eval(), probe

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        latents, values = [], []
        for start, end in zip(batch["start"], batch["end"], strict=True):
            z = self.sae.encode(torch.from_numpy(self.probe.read_rows(int(start), int(end))))
            rows, cols = z.nonzero(as_tuple=True)  # as latent_statistics takes them
            latents.append(cols.numpy())
            values.append(z[rows, cols].numpy())
        return {"latent": np.concatenate(latents).astype(np.int64), "value": np.concatenate(values)}


def per_latent(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One latent's firing count, float64 sum and sum of squares, largest value and deciles."""
    values = np.sort(group["value"])
    wide = values.astype(np.float64)
    return {"latent": group["latent"][:1], "count": np.array([len(values)]), "total": np.array([wide.sum()]),
            "total_sq": np.array([(wide * wide).sum()]), "peak": values[-1:],
            "deciles": group_deciles(torch.from_numpy(values)).numpy()[None]}  # fmt: skip


def latent_statistics_on_ray(
    sae: TopKSAE, probe: Path | ProbeShards, ray_config: RayConfig, batch_size: int = 4096
) -> LatentStats:
    """`latent_statistics(sae, the probe's activations, batch_size)` computed on the Ray cluster of `ray_config`
    from a probe (its folder, or its shards already verified); see the module docstring for what is bit-identical
    and what agrees to ~1e-6 relative."""
    import ray.data

    if ray_config.address is None:
        raise ConfigError("latent_statistics_on_ray needs a Ray address (RayConfig.address)")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    probe = as_probe(probe)
    n = probe.n_rows
    workers = cluster_workers(ray_config)
    ray.data.DataContext.get_current().enable_progress_bars = False
    bounds = batch_bounds(n, batch_size)
    rows = [{"start": a, "end": b} for a, b in bounds]
    # A few blocks per actor, so that every actor of the pool gets work (one block would feed one actor).
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * workers))
    pairs = dataset.map_batches(EncodeActor, fn_constructor_args=(sae.cpu().eval(), probe), batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1).materialize()  # fmt: skip
    n_lat = sae.cfg.n_latents
    count = torch.zeros(n_lat, dtype=torch.long)
    total, total_sq = torch.zeros(n_lat, dtype=torch.float64), torch.zeros(n_lat, dtype=torch.float64)
    peak, deciles = torch.zeros(n_lat), torch.zeros(n_lat, 9)
    for block in _blocks(pairs.groupby("latent").map_groups(per_latent, batch_format="numpy")):
        # torch.tensor copies: Ray hands out read-only arrays
        j = torch.tensor(block["latent"], dtype=torch.long)
        count[j] = torch.tensor(block["count"], dtype=torch.long)
        total[j], total_sq[j] = torch.tensor(block["total"]), torch.tensor(block["total_sq"])
        peak[j], deciles[j] = torch.tensor(block["peak"]), torch.tensor(block["deciles"])
    return finish_stats(n, count, total, total_sq, peak, deciles, pooled_deciles(pairs.select_columns(["value"])))


def pooled_deciles(values: Dataset) -> torch.Tensor:
    """The deciles of every value of a Ray dataset with one 'value' column: a distributed sort, then the values at
    the deciles' ranks (`stats.decile_ranks`), interpolated as in one process."""
    n = values.count()
    counts = torch.tensor([n])
    pos, lo, hi = decile_ranks(counts)
    if n == 0:
        return interpolate_deciles(pos, lo, torch.zeros_like(pos), torch.zeros_like(pos), counts)[0]
    ranks = sorted({int(r) for r in torch.cat([lo[0], hi[0]])})
    pieces = values.sort("value").materialize().split_at_indices(ranks)[1:]
    at = {rank: float(piece.take(1)[0]["value"]) for rank, piece in zip(ranks, pieces, strict=True)}

    def gather(index: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[at[int(r)] for r in index[0]]], dtype=torch.float32)

    return interpolate_deciles(pos, lo, gather(lo), gather(hi), counts)[0]


def _blocks(dataset: Dataset) -> Iterator[dict[str, np.ndarray]]:
    return dataset.iter_batches(batch_size=None, batch_format="numpy")
