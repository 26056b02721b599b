"""The concept catalog's distributed parts: each latent's top-activating samples on Ray Data, and per-latent work
(labelling and scoring) over chunks of latents on an actor pool (`recsae_core.common.ray_map.map_chunks`).

The top samples are a distributed top-k equal to `samples.column_top_units` over `samples.encode_sparse`'s codes,
for every latent at once. The dataset holds one row per encoding batch, cut as `encode_sparse` cuts them, so every
code comes out of the same batch of the same SAE. Each actor (the SAE shipped once, in its constructor) reads its
rows from the probe's shards and keeps, per latent, its own top-n samples at most one per user
(`samples.ranked_top_units`); Ray Data groups these candidates by latent and each group ranks them once more. A
sample of a latent's global top-n is the best of its user and has fewer than n better users, in its batch too: it is
among its batch's candidates, so the answer is exactly the one-process one (ties: the lower sample id first, on both
paths). The actors get the verified probe's shards (`probe.shards.ProbeShards`: in the run folder, on storage every
node mounts, or at the local path or pyarrow filesystem URI the probe wrote them to) and read only their rows.

Labelling and scoring a latent reads its own samples alone, so chunks of latents labelled by Ray actors give the
one-process labels, merged back in latent order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from recsae_core.common.errors import ConfigError
from recsae_core.common.ray_cluster import RayConfig, cluster_workers
from recsae_core.concepts.samples import ranked_top_units
from recsae_core.probe.collect import batch_bounds
from recsae_core.probe.shards import ProbeShards, as_probe
from recsae_core.sae.runtime import SAERuntime


class TopActor:
    """One Ray actor: the SAE and the samples' users (shipped once) and the probe's shards; a batch of rows -> each
    latent's top-n candidates among them."""

    def __init__(self, sae: SAERuntime, probe: ProbeShards, users: np.ndarray, n: int) -> None:
        self.sae, self.probe, self.users, self.n = sae, probe, users, n

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for start, end in zip(batch["start"], batch["end"], strict=True):
            codes = self.sae.encode(self.probe.read_rows(int(start), int(end)))
            keep = codes.values > 0  # as encode_sparse keeps them
            triples = (codes.indices[keep].astype(np.int64), np.nonzero(keep)[0] + int(start), codes.values[keep])
            pick = ranked_top_units(*triples, self.users, self.n)
            parts.append([column[pick] for column in triples])
        latent, sample, value = (np.concatenate(column) for column in zip(*parts, strict=True))
        return {"latent": latent, "sample": sample.astype(np.int64), "value": value.astype(np.float32)}


def top_of_group(users: np.ndarray, n: int) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The group function: one latent's candidates -> its top-n samples, in rank order."""

    def top(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pick = ranked_top_units(group["latent"], group["sample"], group["value"], users, n)
        return {"latent": group["latent"][pick], "sample": group["sample"][pick], "rank": np.arange(len(pick))}

    return top


def top_units_on_ray(
    sae: SAERuntime, probe: Path | ProbeShards, users: np.ndarray, n: int, ray_config: RayConfig,
    batch_size: int = 4096,
) -> dict[int, np.ndarray]:  # fmt: skip
    """Every firing latent -> `column_top_units(encode_sparse(sae, h, batch_size), users, latent, n)`, computed on
    the Ray cluster of `ray_config` from a probe's shards (its folder, or its shards already verified; `users`: each
    probe sample's user)."""
    import ray.data

    if ray_config.address is None:
        raise ConfigError("top_units_on_ray needs a Ray address (RayConfig.address)")
    if n < 1 or batch_size < 1:
        raise ConfigError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    probe = as_probe(probe)
    if probe.n_rows != len(users):
        raise ConfigError(f"{len(users)} users given for a probe of {probe.n_rows} samples")
    workers = cluster_workers(ray_config)
    ray.data.DataContext.get_current().enable_progress_bars = False
    bounds = [{"start": a, "end": b} for a, b in batch_bounds(probe.n_rows, batch_size)]
    users = np.asarray(users, dtype=np.int64)
    dataset = ray.data.from_items(bounds, override_num_blocks=min(len(bounds), 4 * workers))
    candidates = dataset.map_batches(TopActor, fn_constructor_args=(sae, probe, users, n), batch_size=1,
                                     compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)  # fmt: skip
    ranked = candidates.groupby("latent").map_groups(top_of_group(users, n), batch_format="numpy")
    found: dict[int, list[tuple[int, int]]] = {}
    for block in ranked.iter_batches(batch_size=None, batch_format="numpy"):
        for latent, sample, rank in zip(block["latent"], block["sample"], block["rank"], strict=True):
            found.setdefault(int(latent), []).append((int(rank), int(sample)))
    return {j: np.asarray([s for _, s in sorted(found[j])], dtype=np.int64) for j in sorted(found)}
