"""Collect the representation h right before the prediction layer, streamed into safetensors shards (probe.shards)
in RUN/probe, or at a local path or any pyarrow filesystem URI with the metadata in RUN/probe.

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
from tqdm.auto import tqdm

from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import MADE_FROM, RunLayout
from recsae_core.common.onnx import h_output, load_inputs, open_onnx
from recsae_core.common.storage import ShardStore
from recsae_core.probe.shards import open_probe, writing_probe
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
    activations: str | None = None
    """Where the shards are when not in `folder`: the local path or pyarrow filesystem URI its meta records."""


ONNX_BATCH = 1024
"""Input rows per model call in the probe of an outside model."""


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
    progress: bool, total: int, activations: ShardStore | None = None,
) -> ProbeResult:  # fmt: skip
    """Stream (h, user, position) batches, in probe order, into RUN_DIR/probe (atomically), the shards to
    `activations` when given (`shards.writing_probe`)."""
    layout = RunLayout(ctx.root)
    about = {"source": ctx.model.name, "sample": "position" if ctx.model.sequential else "user",
             MADE_FROM: layout.made_from(layout.recommender)}  # fmt: skip
    with writing_probe(layout.probe, rows_per_shard, about, activations) as writer:
        for h, users, positions in tqdm(batches, desc="probe", total=total, disable=not progress, unit="batch"):
            writer.add(h, users.astype(np.int64), positions.astype(np.int64))
    return ProbeResult(folder=layout.probe, n_samples=writer.total, d=writer.d, shards=writer.shards,
                       activations=None if activations is None else activations.uri)  # fmt: skip


def collect(
    ctx: RunContext, rows_per_shard: int = 131072, batch_size: int = 2048, progress: bool = True,
    activations: ShardStore | None = None,
) -> ProbeResult:  # fmt: skip
    """Probe a trained run into RUN_DIR/probe (atomically), in this process (recsae_core.probe.on_ray: on Ray); the
    shards to `activations` when given."""
    ctx.model.cpu().eval()
    users, positions = sample_index(ctx)
    bounds = batch_bounds(len(users), batch_size)
    batches = ((probe_batch(ctx, users[a:b], positions[a:b]), users[a:b], positions[a:b]) for a, b in bounds)
    return write_probe(ctx, batches, rows_per_shard, progress, len(bounds), activations)


class OnnxInputs:
    """A recommender we did not train, as the probe of `bundle --import-onnx` sees it: an ONNX model mapping its own
    inputs to h, and one input row per user from a safetensors file whose tensors are named like the model's inputs
    and share their first (batch) axis."""

    def __init__(self, model_path: Path, inputs_path: Path, output_name: str | None = None, threads: int = 0) -> None:
        self.model_path, self.inputs_path, self.output_name = model_path, inputs_path, output_name
        self.session = open_onnx(model_path, threads)
        self.inputs = load_inputs(inputs_path, self.session)
        self.n_rows = len(next(iter(self.inputs.values())))
        self.output = h_output(self.session, model_path, output_name)

    def h(self, start: int, end: int) -> np.ndarray:
        """h (float32) of input rows [start, end); refuses an output that is not (rows, d) or not finite."""
        feed = {k: v[start:end] for k, v in self.inputs.items()}
        h = self.session.run([self.output], feed)[0]
        if h.ndim != 2 or len(h) != end - start:
            raise ArtifactError(f"{self.model_path}: output '{self.output}' has shape {h.shape}; expected (batch, d)")
        if not np.isfinite(h).all():
            raise ArtifactError(f"{self.model_path}: output '{self.output}' has NaN/inf for input rows from {start}")
        return h.astype(np.float32)


def write_onnx_probe(
    source: OnnxInputs, batches: Iterator[np.ndarray], out: Path, rows_per_shard: int, progress: bool, total: int,
    activations: ShardStore | None = None,
) -> ProbeResult:  # fmt: skip
    """Stream the h of consecutive input-row batches, in order, into the probe folder `out` (each sample's user: its
    input row), the shards to `activations` when given."""
    about = {"source": str(source.model_path), "sample": "input-row"}
    first = 0
    with writing_probe(out, rows_per_shard, about, activations) as writer:
        for h in tqdm(batches, desc="probe onnx", total=total, disable=not progress, unit="batch"):
            writer.add(h, np.arange(first, first + len(h), dtype=np.int64), np.zeros(len(h), dtype=np.int64))
            first += len(h)
    return ProbeResult(folder=out, n_samples=writer.total, d=writer.d, shards=writer.shards,
                       activations=None if activations is None else activations.uri)  # fmt: skip


def collect_onnx(
    model_path: Path,
    inputs_path: Path,
    out: Path,
    output_name: str | None = None,
    batch_size: int = ONNX_BATCH,
    rows_per_shard: int = 131072,
    progress: bool = True,
    activations: ShardStore | None = None,
) -> ProbeResult:
    """Probe a recommender we did not train (`OnnxInputs`) into the probe folder `out`, in this process
    (probe.on_ray.collect_onnx_on_ray: on Ray), the shards to `activations` when given."""
    source = OnnxInputs(model_path, inputs_path, output_name)
    bounds = batch_bounds(source.n_rows, batch_size)
    batches = (source.h(start, end) for start, end in bounds)
    return write_onnx_probe(source, batches, out, rows_per_shard, progress, len(bounds), activations)


def load_activations(folder: Path) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """All probed h (N, d) as one float32 tensor, with each sample's user and position, wherever the shards are;
    the folder and its shards are checked against their record first (ArtifactError naming a changed or missing
    shard)."""
    return open_probe(folder).read_all()
