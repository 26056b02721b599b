"""Activations as the SAE stage streams them: one (N, d) tensor or a re-iterable of shard tensors, in batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from recsae_core.common.errors import ConfigError

Activations = Tensor | Iterable[Tensor]
"""One (N, d) tensor, or a re-iterable of shard tensors (a list, or an object whose __iter__ reads shards afresh)."""


def _shards(data: Activations) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        return [data]
    if iter(data) is data:
        raise ConfigError("activations must be a tensor or a re-iterable of shards, not a one-shot iterator")
    return data


def iter_batches(
    data: Activations, batch_size: int, generator: torch.Generator | None = None, device: str = "cpu"
) -> Iterator[Tensor]:
    """Batches of rows; with a generator, rows are shuffled within each shard and rows left over at the end of
    a shard are carried into the next one, so only the very last batch can be short."""
    carry: Tensor | None = None
    for shard in _shards(data):
        if shard.ndim != 2:
            raise ConfigError(f"activation shards must be 2-D (N, d), got shape {tuple(shard.shape)}")
        rows = shard.to(torch.float32)
        if generator is not None:
            rows = rows[torch.randperm(len(rows), generator=generator)]
        if carry is not None:
            rows = torch.cat([carry, rows])
        end = len(rows) - len(rows) % batch_size
        for start in range(0, end, batch_size):
            yield rows[start : start + batch_size].to(device)
        carry = rows[end:]
    if carry is not None and len(carry):
        yield carry.to(device)


def first_rows(data: Activations, n: int) -> Tensor:
    parts, have = [], 0
    for shard in _shards(data):
        parts.append(shard[: n - have].to(torch.float32))
        have += len(parts[-1])
        if have >= n:
            break
    if not have:
        raise ConfigError("no activations to train on")
    return torch.cat(parts)


def count_rows(data: Activations) -> int:
    """Rows in all shards (shards read lazily are read once more to count them, unless they say how many they hold
    as `n_rows`)."""
    if isinstance(data, Tensor):
        return len(data)
    n_rows = getattr(data, "n_rows", None)
    return int(n_rows) if n_rows is not None else sum(len(shard) for shard in _shards(data))


def take_rows(data: Activations, index: Tensor) -> Tensor:
    """data[index] (float32), in `index`'s order; from shards read one at a time, only the rows taken are kept."""
    if isinstance(data, Tensor):
        return data[index].to(torch.float32)
    order = torch.argsort(index)
    wanted = index[order]
    taken: Tensor | None = None
    start = 0
    for shard in _shards(data):
        lo, hi = (int(torch.searchsorted(wanted, bound)) for bound in (start, start + len(shard)))
        if taken is None:
            taken = torch.empty((len(index), shard.shape[1]), dtype=torch.float32)
        taken[order[lo:hi]] = shard[wanted[lo:hi] - start].to(torch.float32)
        start += len(shard)
    if taken is None or (len(index) and int(wanted[-1]) >= start):
        raise ConfigError(f"row {int(wanted[-1]) if len(index) else 0} is outside the {start} activations")
    return taken
