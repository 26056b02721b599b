"""The probe on Ray Data: the same batches as the one-process probe (`collect.batch_bounds`), computed by an actor
pool in which every actor loads the run's contract once (one ONNX Runtime session each), streamed back in order and
written by the driver into the same shards.

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
from recsae_core.probe.collect import ProbeResult, batch_bounds, probe_batch, sample_index, write_probe
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
    import ray.data

    if ray_config.address is None:
        raise ConfigError("collect_on_ray needs a Ray address (RayConfig.address)")
    workers = cluster_workers(ray_config)
    users, _ = sample_index(ctx)
    bounds = batch_bounds(len(users), batch_size)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    # One block per probe batch, so that every actor of the pool gets work (one block would feed one actor).
    rows = [{"batch": i, "start": a, "end": b} for i, (a, b) in enumerate(bounds)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    computed = dataset.map_batches(ProbeActor, fn_constructor_args=(str(ctx.root.resolve()),), batch_size=1,
                                   compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)  # fmt: skip

    def in_order() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        expected = 0
        for block in computed.iter_batches(batch_size=None, batch_format="numpy"):
            for index in np.unique(block["batch"]):
                if index != expected:
                    raise RuntimeError(f"Ray Data returned probe batch {index} where {expected} was due")
                rows = block["batch"] == index
                yield _rows(block, rows)
                expected += 1
        if expected != len(bounds):
            raise RuntimeError(f"Ray Data returned {expected} of {len(bounds)} probe batches")

    return write_probe(ctx, in_order(), rows_per_shard, progress, len(bounds), activations)


def _rows(block: dict[str, Any], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return block["h"][rows].astype(np.float32), block["user"][rows], block["position"][rows]
