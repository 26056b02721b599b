"""The probe on Ray Data: the same batches as the one-process probe (`collect.batch_bounds`), computed by an actor
pool in which every actor loads the run's contract once (one ONNX Runtime session each), streamed back in order and
written by the driver into the same shards. The probe of an outside model without a run (`bundle --import-onnx`) runs
the same way, each actor holding that model's session and input rows.

The dataset holds one row per probe batch, its [start, end) over the probe's samples, so every h comes out of the
same batch of the same model as in one process: the shards are byte for byte those of `collect.collect` (tested).
Ray Data keeps the order (`preserve_order`); each batch carries its index, and the driver refuses any other order.
Workers read the run folder, so on a cluster it must be on storage every node mounts; the driver writes the shards
there too, or to the local path or pyarrow filesystem URI given (`activations`), from which the later steps' workers
read them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from recsae_core.common.errors import ConfigError
from recsae_core.common.ray_cluster import RayConfig, cluster_workers
from recsae_core.common.storage import ShardStore
from recsae_core.probe.collect import (
    ONNX_BATCH,
    OnnxInputs,
    ProbeResult,
    batch_bounds,
    probe_batch,
    sample_index,
    write_onnx_probe,
    write_probe,
)
from recsae_core.recommenders.run import RunContext, load_run


class ProbeActor:
    """One Ray actor: the run's recommender as its contract, single-threaded (one CPU per actor)."""

    def __init__(self, run_dir: str) -> None:
        self.ctx = load_run(Path(run_dir), threads=1)
        self.ctx.model.eval()
        self.users, self.positions = sample_index(self.ctx)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for index, start, end in zip(rows["batch"], rows["start"], rows["end"], strict=True):
            users, positions = self.users[start:end], self.positions[start:end]
            h = probe_batch(self.ctx, users, positions)
            parts.append((h, users, positions, np.full(len(users), index, dtype=np.int64)))
        h, users, positions, batch = (np.concatenate(column) for column in zip(*parts, strict=True))
        return {"h": h, "user": users, "position": positions, "batch": batch}


def collect_on_ray(
    ctx: RunContext, ray_config: RayConfig, rows_per_shard: int = 131072, batch_size: int = 2048,
    progress: bool = True, activations: ShardStore | None = None,
) -> ProbeResult:  # fmt: skip
    """Probe the run into RUN_DIR/probe with an actor pool on the Ray cluster of `ray_config`; the same files as
    `collect.collect` with the same batch size (the shards to `activations` when given)."""
    users, _ = sample_index(ctx)
    bounds = batch_bounds(len(users), batch_size)
    computed = on_actor_pool(ProbeActor, (str(ctx.root.resolve()),), bounds, ray_config)
    blocks = in_order(computed, bounds)
    batches = ((block["h"].astype(np.float32), block["user"], block["position"]) for block in blocks)
    return write_probe(ctx, batches, rows_per_shard, progress, len(bounds), activations)


class OnnxProbeActor:
    """One Ray actor of the probe of an outside model: its ONNX session (single-threaded: one CPU per actor) and its
    input rows, read from the same files as the driver names."""

    def __init__(self, model_path: str, inputs_path: str, output_name: str | None) -> None:
        self.source = OnnxInputs(Path(model_path), Path(inputs_path), output_name, threads=1)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [(self.source.h(int(start), int(end)), np.full(end - start, index, dtype=np.int64))
                 for index, start, end in zip(rows["batch"], rows["start"], rows["end"], strict=True)]  # fmt: skip
        return {"h": np.concatenate([h for h, _ in parts]), "batch": np.concatenate([b for _, b in parts])}


def collect_onnx_on_ray(
    model_path: Path, inputs_path: Path, out: Path, ray_config: RayConfig, output_name: str | None = None,
    batch_size: int = ONNX_BATCH, rows_per_shard: int = 131072, progress: bool = True,
    activations: ShardStore | None = None,
) -> ProbeResult:  # fmt: skip
    """`collect.collect_onnx` with an actor pool on the Ray cluster of `ray_config`: the same batches, so the same
    shards. The model and inputs files are read by every actor, so they must be on storage every node mounts; the
    driver reads them first, so a bad file is refused before any actor starts."""
    source = OnnxInputs(model_path, inputs_path, output_name)
    bounds = batch_bounds(source.n_rows, batch_size)
    args = (str(model_path.resolve()), str(inputs_path.resolve()), output_name)
    computed = on_actor_pool(OnnxProbeActor, args, bounds, ray_config)
    batches = (block["h"].astype(np.float32) for block in in_order(computed, bounds))
    return write_onnx_probe(source, batches, out, rows_per_shard, progress, len(bounds), activations)


def on_actor_pool(actor: type, args: tuple[Any, ...], bounds: list[tuple[int, int]], ray_config: RayConfig) -> Any:
    """The Ray Dataset of probe batches [start, end) computed by a pool of `actor(*args)`, one block per batch (so
    that every actor of the pool gets work: one block would feed one actor), in order."""
    import ray.data

    if ray_config.address is None:
        raise ConfigError("a probe on Ray needs a Ray address (RayConfig.address)")
    workers = cluster_workers(ray_config)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    rows = [{"batch": i, "start": a, "end": b} for i, (a, b) in enumerate(bounds)]
    dataset = ray.data.from_items(rows, override_num_blocks=max(len(rows), 1))
    return dataset.map_batches(actor, fn_constructor_args=args, batch_size=1,
                               compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)  # fmt: skip


def in_order(computed: Any, bounds: list[tuple[int, int]]) -> Iterator[dict[str, np.ndarray]]:
    """Each probe batch's columns as the pool computed them, in probe order; any other order, or a batch missing,
    is refused (Ray Data keeps the order: `preserve_order`)."""
    expected = 0
    for block in computed.iter_batches(batch_size=None, batch_format="numpy"):
        for index in np.unique(block["batch"]):
            if index != expected:
                raise RuntimeError(f"Ray Data returned probe batch {index} where {expected} was due")
            rows = block["batch"] == index
            yield {column: values[rows] for column, values in block.items()}
            expected += 1
    if expected != len(bounds):
        raise RuntimeError(f"Ray Data returned {expected} of {len(bounds)} probe batches")
