"""SAE training on Ray Train: a `TorchTrainer` of N workers (DDP: gloo on CPU, NCCL on GPU), each streaming its share
of the probe's shards with `iter_torch_batches` (the run, its collectives and its progress bar: `common.ray_train`).

What makes N workers train one SAE rather than N:
- DDP all-reduces the gradients, so every worker takes the same Adam step from the same weights; the decoder is then
  renormalised on every worker from identical rows, and every epoch the workers check that their weights still agree.
- The latents that fired anywhere in the global batch are all-reduced (max) before the dead-latent clock ticks, so
  AuxK's dead set is global, not a worker's.
- Rank 0 alone scores an epoch (dev NDCG with the reconstruction substituted, on the fixed `valid` sample) and judges
  it with the one-process rules (`selection.CheckpointKeeper`); its verdict (keep, lower the rate, stop) and the
  wall-clock safety stop are broadcast, so every worker leaves the same epoch. Rank 0 holds the kept weights, as one
  process does, and reports them at the end as the run's checkpoint through `ray.train.report`; the driver loads it
  from there.

Each worker's share comes from Ray Data's `read_binary_files` over the shards, with the probe's filesystem (the run
folder's, or the pyarrow filesystem of the URI the probe wrote them to), decoded by the probe's one shard reader.

The global batch is `batch_size` rows (batch_size // N per worker), and the sample budget counts global samples, so
the same config asks the same of one worker and of N. The batch order differs from one process (Ray Data splits the
shards between workers), so the SAE is not bit-identical to one-process training: it meets the same FVU, dead and
NDCG-ratio targets within the tolerances tests/test_distributed.py states.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recsae_core.common.errors import ConfigError
from recsae_core.common.ray_cluster import RayConfig, cluster_workers
from recsae_core.common.ray_train import EpochProgress, check_in_sync, final_checkpoint, from_rank_zero, report_final
from recsae_core.probe.shards import LeaveOut, ProbeShards, as_probe, h_of_shard_bytes
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.selection import CheckpointKeeper, FireClock, Select, score_epoch, scored
from recsae_core.sae.train import SAETrainResult, evaluate_reconstruction, random_sae, warn_safety_stop

TRAINING = "training.json"
"""Beside the SAE in the final checkpoint: how training went (SAETrainResult's fields)."""
CACHE_BYTES = 1 << 30
"""A worker keeps its share in memory after the first epoch when it is at most this large (`WorkerShare`)."""
SHUFFLE_BATCHES = 8
"""Each worker shuffles its rows in a buffer of this many of its batches (Ray Data's local shuffle)."""


def train_sae_on_ray(
    probe: Path | ProbeShards, config: SAETrainConfig, ray_config: RayConfig, select: Select | None = None,
    valid: Tensor | None = None, storage: Path | None = None, leave_out: np.ndarray | None = None,
) -> SAETrainResult:  # fmt: skip
    """`train.train_sae` on a probe (its folder, or its shards already verified) with `ray_config.workers` DDP
    workers of the cluster at `ray_config.address`. `select` runs on rank 0, so it must pickle (`fit.DevNDCG` loads
    its run there). Ray Train keeps its checkpoints under `storage` (default: a temporary folder beside the probe
    folder, removed afterwards), which, like the probe folder, must be on storage every node mounts."""
    import ray.data

    if ray_config.address is None:
        raise ConfigError("train_sae_on_ray needs a Ray address (RayConfig.address)")
    probe = as_probe(probe)
    tc = config.resolve(probe.n_rows - (0 if leave_out is None else len(np.unique(leave_out))))
    gpu = tc.device.startswith("cuda")
    workers = cluster_workers(ray_config, "GPU" if gpu else "CPU")  # more would leave Ray Train waiting forever
    if tc.batch_size < 2 * workers:
        raise ConfigError(f"batch size {tc.batch_size} leaves fewer than 2 rows per worker for {workers} workers")
    first = torch.from_numpy(probe.read_rows(0, min(32768, probe.headers[0].rows)))  # the first shard's rows
    sae = random_sae(tc.sae_config(first.shape[1]), first, tc.seed)

    # One block per shard; reading takes no CPU: the training workers hold every CPU.
    dataset = ray.data.read_binary_files(
        probe.paths(), filesystem=probe.store.filesystem, include_paths=True, override_num_blocks=len(probe.headers),
        ray_remote_args={"num_cpus": 0},
    ).map_batches(h_of_shard_bytes, batch_size=1, batch_format="numpy", num_cpus=0,
                  fn_kwargs={"leave_out": None if leave_out is None else LeaveOut.of(probe, leave_out)})  # fmt: skip
    dataset = dataset.randomize_block_order(seed=tc.seed)
    ray.data.DataContext.get_current().enable_progress_bars = False
    own_storage = storage is None
    storage = Path(storage or tempfile.mkdtemp(dir=probe.folder.parent, prefix=".sae-train.", suffix=".tmp"))
    progress = EpochProgress(tc.epochs, "sae (Ray Train)", sae_postfix) if tc.progress else None
    loop_config = {"tc": tc, "sae_cfg": sae.cfg, "state": sae.state_dict(), "select": select, "valid": valid,
                   "progress": progress and progress.queue}  # fmt: skip
    with final_checkpoint(
        worker_loop, loop_config, name="sae", workers=workers, gpu=gpu, storage=storage, own_storage=own_storage,
        failed="SAE training on Ray failed", progress=progress, datasets={"train": dataset},
    ) as folder:  # fmt: skip
        trained = TopKSAE.load(folder / "sae", device="cpu").eval()
        final = json.loads((folder / TRAINING).read_text())
    if final["stopped_by"] == "wall_clock_safety":
        warn_safety_stop(tc, final["epochs_trained"], final["samples_seen"])
    return SAETrainResult(
        sae=trained, config=tc, best_epoch=final["best_epoch"], best_score=final["best_score"],
        epochs_trained=final["epochs_trained"], seconds=final["seconds"],
        samples_per_second=final["samples_seen"] / max(final["seconds"], 1e-9), history=final["history"],
        stopped_by=final["stopped_by"], samples_seen=final["samples_seen"], workers=workers,
    )  # fmt: skip


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One DDP worker of `train_sae_on_ray` (rank 0 also scores, judges and checkpoints)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    tc: SAETrainConfig = loop_config["tc"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    sae = TopKSAE(loop_config["sae_cfg"])
    sae.load_state_dict(loop_config["state"])
    sae = sae.to(device).train()
    model = ray.train.torch.prepare_model(sae, move_to_device=False)
    optimizer = torch.optim.Adam(sae.parameters(), lr=tc.lr)
    cfg, per_worker = sae.cfg, tc.batch_size // world
    clock, keeper = FireClock(cfg.n_latents, cfg.dead_after, device), CheckpointKeeper(tc)
    shard = ray.train.get_dataset_shard("train")
    history: list[dict[str, float]] = []
    seen, start, stopped_by = 0, time.perf_counter(), "epochs"
    best_state = copy.deepcopy(sae.state_dict())
    share = WorkerShare(shard, per_worker, device, tc.seed + 7919 * rank)
    for epoch in range(1, tc.epochs + 1):
        fired = torch.zeros(cfg.n_latents, dtype=torch.bool, device=device)
        sums = torch.zeros(2, dtype=torch.float64)
        n_batches = epoch_samples = 0
        for x in _in_step(share.epoch(epoch)):
            out = model(x, clock.dead_mask() if cfg.aux_coef > 0 else None)
            loss = out.fvu + cfg.aux_coef * out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP: the gradients are now the mean over the workers
            sae.remove_parallel_gradient()
            optimizer.step()
            sae.normalize_decoder()

            active = (out.z > 0).any(0).to(torch.int32).cpu()
            dist.all_reduce(active, op=dist.ReduceOp.MAX)
            active = active.bool().to(device)
            fired |= active
            clock.tick(active, len(x) * world)
            sums += torch.tensor([out.fvu.item(), out.aux_loss.item()], dtype=torch.float64)
            n_batches += 1
            epoch_samples += len(x) * world
        if n_batches == 0:
            raise ConfigError(f"no training batch: fewer than {per_worker} rows per worker")
        dist.all_reduce(sums)
        check_in_sync(sae, "SAE")
        seen += epoch_samples
        clock.epoch_length(epoch_samples)
        row: dict[str, float] = {"epoch": epoch, "fvu": float(sums[0]) / (n_batches * world),
                                 "aux_loss": float(sums[1]) / (n_batches * world),
                                 "dead_fraction": 1.0 - float(fired.float().mean())}  # fmt: skip
        history.append(row)
        spent = bool(tc.max_samples) and seen >= tc.max_samples
        out_of_time = from_rank_zero([tc.max_seconds is not None and time.perf_counter() - start >= tc.max_seconds])[0]
        keep = lr_drop = stop = False
        is_scored = scored(epoch, tc, spent or out_of_time)
        if is_scored:
            if rank == 0:
                score_epoch(sae, row, tc, loop_config["select"], loop_config["valid"], evaluate_reconstruction)
                verdict = keeper.judge(epoch, row)
                keep, lr_drop, stop = verdict.keep, verdict.lr_drop, verdict.stop
            keep, lr_drop, stop = from_rank_zero([keep, lr_drop, stop])
        if lr_drop:
            for group in optimizer.param_groups:
                group["lr"] *= tc.lr_drop_factor
            row["lr"] = optimizer.param_groups[0]["lr"]
        if keep:
            best_state = copy.deepcopy(sae.state_dict())
        if is_scored:  # every worker reports the same epochs: a report is a barrier
            ray.train.report(dict(row))
        if rank == 0 and loop_config["progress"] is not None:
            loop_config["progress"].put(dict(row))
        if stop or spent or out_of_time:
            stopped_by = "patience" if stop else "samples" if spent else "wall_clock_safety"
            break
    seconds = time.perf_counter() - start
    summary = {"best_epoch": keeper.best_epoch, "best_score": keeper.best_score, "epochs_trained": len(history),
               "samples_seen": seen, "seconds": seconds, "stopped_by": stopped_by, "history": history}  # fmt: skip

    def write(folder: Path) -> None:  # rank 0: the kept weights and how training went, as the run's checkpoint
        sae.load_state_dict(best_state)
        sae.save(folder / "sae")
        (folder / TRAINING).write_text(json.dumps(summary))

    report_final(rank, write)


def sae_postfix(row: dict[str, Any]) -> dict[str, str]:
    """The progress bar's figures of an epoch (the last scored epoch's score stays until the next)."""
    shown = {"fvu": f"{row['fvu']:.4f}", "dead": f"{row['dead_fraction']:.3f}"}
    return {**shown, "score": f"{row['score']:.4f}"} if "score" in row else shown


class WorkerShare:
    """A worker's share of the activations, epoch after epoch. The first epoch streams it with Ray Data's
    `iter_torch_batches` (shuffled in a local buffer); a share of at most `CACHE_BYTES` is then kept and reshuffled in
    memory for later epochs, because a Ray Data pass costs a second or more to start: with small epochs (a sample per
    user) that, not the SAE, would set the pace. A larger share is streamed again every epoch."""

    def __init__(self, shard: Any, batch_size: int, device: torch.device, seed: int) -> None:
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.kept: list[Tensor] | None = []

    def epoch(self, epoch: int) -> Iterator[Tensor]:
        if epoch > 1 and self.kept is not None:
            rows = torch.cat(self.kept)
            rows = rows[torch.randperm(len(rows), generator=self.generator)]
            yield from rows[: len(rows) - len(rows) % self.batch_size].split(self.batch_size)
            return
        keeping = epoch == 1 and self.kept is not None
        # The short last batch is read when keeping (later epochs cut their remainder anew), never trained on.
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size, dtypes=torch.float32, device=self.device, drop_last=not keeping,
            local_shuffle_buffer_size=SHUFFLE_BATCHES * self.batch_size,
            local_shuffle_seed=int(torch.randint(2**31 - 1, (1,), generator=self.generator)),
        )  # fmt: skip
        held = 0
        for batch in batches:
            x = batch["h"]
            if keeping and self.kept is not None:
                held += x.numel() * x.element_size()
                if held <= CACHE_BYTES:
                    self.kept.append(x)
                else:
                    self.kept = None
            if len(x) == self.batch_size:
                yield x
        if keeping and self.kept is not None and not self.kept:
            self.kept = None


def _in_step(batches: Any) -> Any:
    """The worker's batches while every worker still has one: a worker that ran out ends the epoch for all (DDP
    needs every worker in every step)."""
    import torch.distributed as dist

    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        have = torch.tensor([0 if batch is None else 1], dtype=torch.int32)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if not have.item():
            return
        yield batch
