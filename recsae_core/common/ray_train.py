"""What every training on Ray Train shares (the SAE's, `sae.on_ray`, and the recommender's,
`recommenders.train_on_ray`): the `TorchTrainer` run whose rank 0 hands its result back as the run's one checkpoint,
the collectives that keep the workers in step (rank 0's verdicts broadcast, weights checked equal), the driver's
progress bar, and a worker's error as one line.

The process group is gloo on CPU and, on GPUs, `cpu:gloo,cuda:nccl`: NCCL for the gradients, which live on the GPU,
and gloo for the small CPU tensors the verdicts and checks travel in (NCCL alone refuses CPU tensors)."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from recsae_core.common.errors import ConfigError

Postfix = Callable[[dict[str, Any]], dict[str, str]]
"""A progress row -> what the bar shows beside the count (kept until a later row shows the same key again)."""


@contextmanager
def final_checkpoint(
    loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], *, name: str, workers: int, gpu: bool,
    storage: Path, own_storage: bool, failed: str, progress: EpochProgress | None = None,
    datasets: dict[str, Any] | None = None,
) -> Iterator[Path]:  # fmt: skip
    """Run `loop` on `workers` Ray Train workers and yield the folder of the checkpoint rank 0 reported last
    (`report_final`). Ray Train keeps it under `storage` (removed afterwards when `own_storage`), which must be on
    storage every node mounts. A worker's error comes back as one line starting with `failed`."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop, train_loop_config=loop_config, datasets=datasets or {},
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage.resolve()),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )  # fmt: skip
    try:
        try:
            if progress is None:
                result = trainer.fit()
            else:
                with progress:
                    result = trainer.fit()
        except Exception as err:  # Ray wraps a worker's error: its first line is what the user needs
            raise worker_error(err, failed) from None
        if result.checkpoint is None:
            raise RuntimeError(f"{failed}: Ray Train returned no checkpoint from rank 0")
        with result.checkpoint.as_directory() as folder:
            yield Path(folder)
    finally:
        if own_storage:
            shutil.rmtree(storage, ignore_errors=True)


def report_final(rank: int, write: Callable[[Path], None]) -> None:
    """On every worker, at the end of its loop: rank 0 `write`s the result into a folder that becomes the run's
    checkpoint; the others report without one (every worker must report the same number of times)."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            write(Path(folder))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"final": 1}, checkpoint=checkpoint)


def from_rank_zero(flags: list[bool]) -> list[bool]:
    """Rank 0's `flags` on every worker (a verdict only rank 0 can reach, so that every worker acts on it)."""
    import torch.distributed as dist

    values = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
    dist.broadcast(values, src=0)
    return [bool(v) for v in values.tolist()]


def check_in_sync(module: nn.Module, what: str) -> None:
    """Refuse to go on if the workers' parameters differ: steps from identical gradients must keep them equal."""
    import torch.distributed as dist

    sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).cpu()
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"{what} weights differ between workers after an epoch (parameter sums {low} vs {high})")


def worker_error(err: Exception, failed: str) -> Exception:
    """A Ray Train failure as one line: a worker's ConfigError as itself, anything else as `failed: ` and the last
    line of its message."""
    text = str(err)
    for line in text.splitlines():
        if "ConfigError" in line or ("recsae" in line and "error" in line.lower()):
            return ConfigError(line.split("ConfigError:", 1)[-1].strip()[:300])
    first = next((line for line in reversed(text.splitlines()) if line.strip()), type(err).__name__)
    return RuntimeError(f"{failed}: {first.strip()[:300]}")


class EpochProgress:
    """The driver's progress bar of a Ray Train run, as one process shows it: rank 0 puts each epoch's row (a dict
    with its "epoch") on a Ray queue, and a thread of the driver moves the bar while `trainer.fit()` blocks its main
    thread. Create it after joining the cluster (the queue is an actor)."""

    def __init__(self, total: int, desc: str, postfix: Postfix) -> None:
        from ray.util.queue import Queue

        self.total, self.desc, self.postfix = total, desc, postfix
        # No CPU for the queue's actor: the training workers may hold every CPU of the cluster.
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._show, name="train-progress", daemon=True)

    def __enter__(self) -> EpochProgress:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()
        self.queue.shutdown()

    def _show(self) -> None:
        from ray.util.queue import Empty

        shown: dict[str, str] = {}
        with tqdm(total=self.total, desc=self.desc, unit="epoch") as bar:
            while True:
                try:
                    row = self.queue.get(timeout=0.5)
                except Empty:
                    if self.done.is_set():
                        return
                    continue
                except Exception:  # the queue's actor is gone with a failed run: fit() raises the cause
                    return
                shown.update(self.postfix(row))
                bar.set_postfix(shown, refresh=False)
                bar.update(int(row["epoch"]) - bar.n)
