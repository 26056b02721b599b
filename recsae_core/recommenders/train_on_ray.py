"""Recommender training on Ray Train: a `TorchTrainer` of N data-parallel workers (gloo on CPU, NCCL on GPU) that
trains the model one process would, up to float rounding (and, for SASRec, dropout's draws).

Why N workers take the one-process steps:
- Every worker starts from the driver's initial weights and draws every global batch itself with the one-process
  sampler (`train.GlobalBatches`: one numpy generator seeded with the run's seed, the same calls in the same order),
  so all hold the same global batch at every step. Worker r trains on its contiguous r-th of it
  (`tensor_split`), and the gradients are summed over the workers, each weighted by its share of the loss's terms:
  every loss is a mean over terms (`Recommender.loss_terms`), so the sum over the workers of
  (slice terms / batch terms) x (gradient of the mean over the slice) is the gradient of the mean over the whole batch.
  BPR-MF and LightGCN average over rows (LightGCN's embedding penalty too, per row), so their weight is the slice's
  rows; SASRec averages its cross-entropy over the non-padded target positions, so its weight is the slice's count
  of those, not its rows (windows hold different numbers of targets). The summed gradients are identical on every
  worker (one all-reduce), so every worker's Adam takes the same step and the weights stay equal, which is checked
  every epoch; a worker left with no rows by the short last batch takes part with zeros.
- Rank 0 alone judges an evaluated epoch exactly as one process does (`train.BestEpoch`: valid NDCG@10, LightGCN's
  tables propagated first, the best weights kept, patience) and its stop is broadcast, so every worker leaves the same
  epoch; the epoch loop itself is the one-process loop (`train.run_epochs`).
- Rank 0 returns the kept weights and how training went as the run's one checkpoint through Ray Train
  (`common.ray_train`); the driver loads them into its model and writes the run folder, as after one process.

Where it is not exact: the summed gradients differ from the one-process gradient in their last bits (other sums, in
another order, and the workers' single-threaded kernels), which Adam's steps carry on. SASRec's dropout draws its masks
per worker from torch's generator (seeded with the seed plus the rank), so its masks are not those of one process:
the same training in distribution, not draw for draw. LightGCN propagates the whole graph on every worker (its loss
needs the propagated tables), so only its per-row part of a step is shared out.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from recsae_core.common.errors import ConfigError
from recsae_core.common.ray_cluster import RayConfig, cluster_workers
from recsae_core.common.ray_train import EpochProgress, check_in_sync, final_checkpoint, from_rank_zero, report_final
from recsae_core.data.splits import Split
from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.lightgcn import LightGCN
from recsae_core.recommenders.registry import MODELS
from recsae_core.recommenders.train import (
    BestEpoch,
    GlobalBatches,
    TrainResult,
    is_eval_epoch,
    make_optimizer,
    progress_postfix,
    run_epochs,
    with_graph,
)

WEIGHTS = "model.safetensors"
"""In the final checkpoint: the kept weights."""
TRAINING = "training.json"
"""Beside them: how training went (TrainResult's fields)."""


def train_recommender_on_ray(
    model: Recommender, split: Split, config: TrainConfig, ray_config: RayConfig, storage_beside: Path
) -> TrainResult:
    """`train.train_recommender` on `ray_config.workers` workers of the cluster at `ray_config.address`: on return
    the model holds the weights of its best validation epoch, on `config.device`, in eval mode. Ray Train keeps its
    checkpoint in a temporary folder in `storage_beside` (created if need be; on storage every node mounts), removed
    afterwards."""
    if ray_config.address is None:
        raise ConfigError("train_recommender_on_ray needs a Ray address (RayConfig.address)")
    config = config.resolved(model.name)
    gpu = config.device.startswith("cuda")
    workers = cluster_workers(ray_config, "GPU" if gpu else "CPU")  # more would leave Ray Train waiting forever
    if config.batch_size < 2 * workers:
        raise ConfigError(f"batch size {config.batch_size} leaves fewer than 2 rows per worker for {workers} workers")
    storage_beside.mkdir(parents=True, exist_ok=True)
    storage = Path(tempfile.mkdtemp(dir=storage_beside, prefix=".recommender-train.", suffix=".tmp"))
    desc = f"train {model.name} (Ray Train)"
    progress = EpochProgress(config.epochs, desc, progress_postfix) if config.progress else None
    loop_config = {
        "name": model.name, "model_config": model.config, "split": split, "config": config,
        "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "progress": progress and progress.queue,
    }  # fmt: skip
    with final_checkpoint(
        worker_loop, loop_config, name="recommender", workers=workers, gpu=gpu, storage=storage, own_storage=True,
        failed=f"{model.name} training on Ray failed", progress=progress,
    ) as folder:  # fmt: skip
        state = load_file(str(folder / WEIGHTS))
        final = json.loads((folder / TRAINING).read_text())
    model.load_state_dict(state)
    model.to(config.device).eval()
    if isinstance(model, LightGCN):
        model.freeze()
    return replace(TrainResult(**final), ray_workers=workers)


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One worker of `train_recommender_on_ray` (rank 0 also judges the evaluated epochs and checkpoints)."""
    import ray.train
    import ray.train.torch

    config: TrainConfig = loop_config["config"]
    split: Split = loop_config["split"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model = with_graph(MODELS[loop_config["name"]](loop_config["model_config"]), split)
    model.load_state_dict(loop_config["state"])
    model.to(device)
    torch.manual_seed(config.seed + rank)  # dropout's draws only (the weights are the driver's): a stream per worker
    optimizer = make_optimizer(model, config)
    best = BestEpoch(model, split, config, device) if rank == 0 else None
    queue = loop_config["progress"] if rank == 0 else None

    def end_epoch(epoch: int, loss: float) -> bool:
        check_in_sync(model, model.name)
        stop = False
        if is_eval_epoch(epoch, config):
            stop = from_rank_zero([best is not None and best.judge(epoch, loss)])[0]
        if queue is not None and best is not None:
            queue.put(best.progress_row(epoch))
        return stop

    step = SliceStep(model, optimizer, rank, world, device)
    times = run_epochs(model, GlobalBatches(model, split, config), config, step, end_epoch)

    def write(folder: Path) -> None:  # rank 0: the kept weights and how training went
        assert best is not None
        best.restore()
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
        (folder / TRAINING).write_text(json.dumps(asdict(best.result(times))))

    report_final(rank, write)


class SliceStep:
    """One optimiser step of a worker: the loss of its slice of the global batch, the gradients summed over the
    workers weighted by each slice's share of the loss's terms (see the module's docstring), then Adam. Returns the
    global batch's loss, as one process computes it (the weighted losses summed in the same all-reduce)."""

    def __init__(
        self, model: Recommender, optimizer: torch.optim.Optimizer, rank: int, world: int, device: torch.device
    ) -> None:
        self.model, self.optimizer, self.rank, self.world, self.device = model, optimizer, rank, world, device
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        import torch.distributed as dist

        part = {k: v.tensor_split(self.world)[self.rank] for k, v in batch.items()}
        terms = self.model.loss_terms(part)
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        if terms:  # the short last batch can leave a worker no rows: it adds zeros
            weight = terms / self.model.loss_terms(batch)
            loss = self.model.loss({k: v.to(self.device) for k, v in part.items()}) * weight
            loss.backward()
        # A parameter this slice left without a gradient still takes part, with zeros: every worker sends the same
        # layout. One buffer: one all-reduce per step, the loss riding along.
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
        dist.all_reduce(flat)
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.optimizer.step()
        return float(flat[-1])
