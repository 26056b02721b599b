"""Collect the representation h right before the prediction layer, streamed into safetensors shards.

For general and graph models one sample is one user; for sequential models one sample is one valid position of
one training window (as RecSAE trains its SAE on every position). Each sample records its user and position so
that later steps can show it to people as "this user, after these items".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from recsae_core.common.artifacts import atomic_folder, write_json
from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import MADE_FROM, PROBE_META, RunLayout, verify_probe_folder
from recsae_core.common.onnx import h_output, load_inputs, open_onnx
from recsae_core.recommenders.base import Batch
from recsae_core.recommenders.batching import make_batch, pad_histories
from recsae_core.recommenders.run import RunContext


@dataclass(frozen=True)
class ProbeResult:
    """What a probe wrote."""

    folder: Path
    """The probe folder."""
    n_samples: int
    """Activations collected."""
    d: int
    """Width of h."""
    shards: list[str]
    """Shard file names, in order."""


class ShardWriter:
    """Buffers rows and writes fixed-size shards so memory stays bounded by one shard."""

    def __init__(self, folder: Path, rows_per_shard: int) -> None:
        self.folder, self.rows_per_shard = folder, rows_per_shard
        self.buffer: dict[str, list[np.ndarray]] = {}
        self.buffered, self.total, self.shards = 0, 0, []

    def add(self, **columns: np.ndarray) -> None:
        for name, values in columns.items():
            self.buffer.setdefault(name, []).append(values)
        self.buffered += len(next(iter(columns.values())))
        while self.buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        joined = {name: np.concatenate(parts) for name, parts in self.buffer.items()}
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({k: np.ascontiguousarray(v[:rows]) for k, v in joined.items()}, str(self.folder / name))
        self.shards.append(name)
        self.buffer = {k: [v[rows:]] for k, v in joined.items()}
        self.buffered -= rows
        self.total += rows

    def close(self) -> list[str]:
        if self.buffered:
            self._flush(self.buffered)
        return self.shards


def sample_index(ctx: RunContext) -> tuple[np.ndarray, np.ndarray]:
    """(user, position) of every sample, in probe order: for a sequential model every position of every training
    sequence, otherwise one sample per user (its position: the last training item)."""
    train = ctx.split.train
    if not ctx.model.sequential:
        return np.arange(ctx.split.n_users, dtype=np.int64), (train.lengths - 1).astype(np.int64)
    users = np.repeat(np.arange(ctx.split.n_users, dtype=np.int64), train.lengths)
    positions = np.concatenate([np.arange(n) for n in train.lengths]) if len(users) else np.zeros(0)
    return users, positions.astype(np.int64)


@torch.no_grad()
def probe_batch(ctx: RunContext, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """h (float32) of a batch of samples. A sequential sample is its prefix as the service computes it (its last
    max_len items, as the model's `represent` takes a history): an output read from inside a longer training window
    would sit at another absolute position and differ from what is served. Through `represent`, any recommender is
    probed alike, in-house or imported."""
    train = ctx.split.train
    if not ctx.model.sequential:
        return ctx.model.represent(make_batch(ctx.model, users, train, "cpu")).numpy().astype(np.float32)
    max_len, pad = ctx.model.config.max_len, ctx.model.config.n_items
    prefixes = [train.row(u)[max(0, t + 1 - max_len) : t + 1] for u, t in zip(users, positions, strict=True)]
    batch = Batch(torch.from_numpy(users), torch.from_numpy(pad_histories(prefixes, max_len, pad)))
    return ctx.model.represent(batch).numpy().astype(np.float32)


def batch_bounds(n_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each probe batch: the same cut whether one process or Ray workers compute them, so that each
    h comes out of the same batch either way."""
    return [(start, min(start + batch_size, n_samples)) for start in range(0, n_samples, batch_size)]


def write_probe(
    ctx: RunContext, batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], rows_per_shard: int,
    progress: bool, total: int,
) -> ProbeResult:  # fmt: skip
    """Stream (h, user, position) batches, in probe order, into RUN_DIR/probe (atomically)."""
    layout = RunLayout(ctx.root)
    target, made_from = layout.probe, layout.made_from(layout.recommender)
    with atomic_folder(target) as folder:
        writer = ShardWriter(folder, rows_per_shard)
        for h, users, positions in tqdm(batches, desc="probe", total=total, disable=not progress, unit="batch"):
            writer.add(h=h, user=users.astype(np.int64), position=positions.astype(np.int64))
        shards = writer.close()
        d = int(ctx.model.config.dim)
        meta = {"n_samples": writer.total, "d": d, "shards": shards, "source": ctx.model.name,
                "sample": "position" if ctx.model.sequential else "user", MADE_FROM: made_from}
        write_json(folder / PROBE_META, meta)  # fmt: skip
    return ProbeResult(folder=target, n_samples=writer.total, d=d, shards=shards)


def collect(
    ctx: RunContext, rows_per_shard: int = 131072, batch_size: int = 2048, progress: bool = True
) -> ProbeResult:
    """Probe a trained run into RUN_DIR/probe (atomically), in this process (recsae_core.probe.on_ray: on Ray)."""
    ctx.model.cpu().eval()
    users, positions = sample_index(ctx)
    bounds = batch_bounds(len(users), batch_size)
    batches = ((probe_batch(ctx, users[a:b], positions[a:b]), users[a:b], positions[a:b]) for a, b in bounds)
    return write_probe(ctx, batches, rows_per_shard, progress, len(bounds))


def collect_onnx(
    model_path: Path,
    inputs_path: Path,
    out: Path,
    output_name: str | None = None,
    batch_size: int = 1024,
    rows_per_shard: int = 131072,
    progress: bool = True,
) -> ProbeResult:
    """Probe a recommender we did not train: an ONNX model mapping its own inputs to h, fed from a safetensors file
    whose tensors are named like the model's inputs and share their first (batch) axis."""
    session = open_onnx(model_path)
    inputs = load_inputs(inputs_path, session)
    n = len(next(iter(inputs.values())))
    name = h_output(session, model_path, output_name)
    with atomic_folder(out) as folder:
        writer = ShardWriter(folder, rows_per_shard)
        d = 0
        for start in tqdm(range(0, n, batch_size), desc="probe onnx", disable=not progress, unit="batch"):
            feed = {k: v[start : start + batch_size] for k, v in inputs.items()}
            h = session.run([name], feed)[0]
            if h.ndim != 2 or len(h) != len(next(iter(feed.values()))):
                raise ArtifactError(f"{model_path}: output '{name}' has shape {h.shape}; expected (batch, d)")
            if not np.isfinite(h).all():
                raise ArtifactError(f"{model_path}: output '{name}' has NaN/inf for input rows from {start}")
            d = h.shape[1]
            rows = np.arange(start, start + len(h), dtype=np.int64)
            writer.add(h=h.astype(np.float32), user=rows, position=np.zeros(len(h), dtype=np.int64))
        shards = writer.close()
        write_json(
            folder / PROBE_META,
            {"n_samples": writer.total, "d": d, "shards": shards, "source": str(model_path), "sample": "input-row"},
        )
    return ProbeResult(folder=out, n_samples=writer.total, d=d, shards=shards)


def load_activations(folder: Path) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """All probed h (N, d) as one float32 tensor, with each sample's user and position; the folder is checked
    against its completion record first (ArtifactError naming a changed or missing shard)."""
    meta = verify_probe_folder(folder)
    hs, users, positions = [], [], []
    for shard in meta.get("shards", []):
        try:
            tensors = load_file(str(folder / shard))
        except (SafetensorError, FileNotFoundError, OSError) as err:
            raise ArtifactError(f"{folder / shard}: cannot read shard ({err})") from None
        hs.append(tensors["h"])
        users.append(tensors["user"])
        positions.append(tensors["position"])
    if not hs or sum(len(h) for h in hs) != meta.get("n_samples"):
        raise ArtifactError(f"{folder / PROBE_META}: shards do not add up to n_samples={meta.get('n_samples')}")
    return torch.from_numpy(np.concatenate(hs)), np.concatenate(users), np.concatenate(positions)
