"""Training with early stopping on validation NDCG@10, for every recommender family."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from recsae_core.data.splits import Split
from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.batching import pad_histories
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.evaluate import evaluate
from recsae_core.recommenders.lightgcn import LightGCN
from recsae_core.recommenders.registry import MODELS


@dataclass
class TrainResult:
    """What training produced."""

    best_valid: dict[str, float]
    """Validation metrics of the kept (best) epoch."""
    best_epoch: int
    """1-based epoch whose weights were kept."""
    epochs_trained: int
    """Epochs actually run (early stopping may end before `epochs`)."""
    seconds: float
    """Wall time of the whole loop, evaluation included."""
    seconds_per_epoch: float
    """Mean wall time of one training epoch, evaluation excluded."""
    history: list[dict] = field(default_factory=list)
    """Per evaluated epoch: epoch, loss, valid ndcg@10."""
    ray_workers: int = 0
    """Ray Train workers it was trained on (0: in this process)."""


def build_model(name: str, n_users: int, n_items: int, split: Split | None = None, **overrides) -> Recommender:
    cls = MODELS[name]
    return with_graph(cls(cls.config_class(n_users=n_users, n_items=n_items, **overrides)), split)


def with_graph(model: Recommender, split: Split | None) -> Recommender:
    """The model, with LightGCN's propagation graph built from `split`'s training interactions."""
    if isinstance(model, LightGCN) and split is not None:
        users = np.repeat(np.arange(split.n_users), split.train.lengths)
        model.set_graph(users, split.train.values)
    return model


def pair_batches(split: Split, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """(user, positive, uniform negative not among the user's training items) in shuffled batches."""
    users = np.repeat(np.arange(split.n_users), split.train.lengths)
    items = split.train.values
    known = np.unique(users * split.n_items + items)  # sorted, so membership is a binary search
    order = rng.permutation(len(users))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        u = users[idx]
        neg = rng.integers(0, split.n_items, len(idx))
        for _ in range(10):  # resample the few collisions with positives
            keys = u * split.n_items + neg
            clash = known[np.minimum(np.searchsorted(known, keys), len(known) - 1)] == keys
            if not clash.any():
                break
            neg[clash] = rng.integers(0, split.n_items, int(clash.sum()))
        yield {"users": torch.from_numpy(u), "pos": torch.from_numpy(items[idx]), "neg": torch.from_numpy(neg)}


class Windows(NamedTuple):
    """All-position training windows over users' training sequences."""

    inputs: np.ndarray
    """(W, max_len) left-padded input items."""
    targets: np.ndarray
    """(W, max_len) next item at each position (padding where the input is padding)."""
    users: np.ndarray
    """(W,) owner of each window."""
    ends: np.ndarray
    """(W,) index in the owner's training sequence just past the window's last input item."""


def sequence_windows(split: Split, max_len: int) -> Windows:
    """Windows in which each training item after a user's first is a target exactly once."""
    inputs, targets, users, ends = [], [], [], []
    for u in range(split.n_users):
        seq = split.train.row(u)
        end = len(seq)
        while end > 1:
            start = max(0, end - max_len - 1)
            chunk = seq[start:end]
            inputs.append(chunk[:-1])
            targets.append(chunk[1:])
            users.append(u)
            ends.append(end - 1)
            end = start + 1
    pad = split.n_items
    return Windows(
        pad_histories(inputs, max_len, pad),
        pad_histories(targets, max_len, pad),
        np.asarray(users, dtype=np.int64),
        np.asarray(ends, dtype=np.int64),
    )


def sequence_batches(windows: Windows, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
    inputs, targets = windows.inputs, windows.targets
    order = rng.permutation(len(inputs))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield {"history": torch.from_numpy(inputs[idx]), "targets": torch.from_numpy(targets[idx])}


def is_eval_epoch(epoch: int, config: TrainConfig) -> bool:
    """Whether `epoch` is evaluated on validation: every `eval_every` epochs, and the last."""
    return epoch % config.eval_every == 0 or epoch == config.epochs


class GlobalBatches:
    """The training batches of each epoch as one process draws them: one numpy generator seeded with the run's seed,
    called in the same order. Every Ray Train worker draws them all too, so every worker holds the same global batch
    at every step and trains on its own slice of it (`train_on_ray`)."""

    def __init__(self, model: Recommender, split: Split, config: TrainConfig) -> None:
        self.split, self.batch_size = split, config.batch_size
        self.rng = np.random.default_rng(config.seed)
        self.windows = sequence_windows(split, model.config.max_len) if model.sequential else None
        n_samples = len(self.windows.inputs) if self.windows is not None else split.n_train
        self.n_batches = -(-n_samples // config.batch_size)

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """The next epoch's batches (on the CPU)."""
        if self.windows is not None:
            return sequence_batches(self.windows, self.batch_size, self.rng)
        return pair_batches(self.split, self.batch_size, self.rng)


class LoopTimes(NamedTuple):
    """How long the epoch loop ran."""

    epochs_trained: int
    """Epochs run (early stopping may end before `epochs`)."""
    seconds: float
    """Wall time of the whole loop, evaluation included."""
    train_seconds: float
    """Wall time of the training steps alone."""


class BestEpoch:
    """The judgement of an evaluated epoch, made by one process (or by rank 0 of a Ray Train run, for all): valid
    NDCG@10 (LightGCN's tables propagated first), the best epoch's weights kept, stop after `patience` evaluations
    without a gain."""

    def __init__(self, model: Recommender, split: Split, config: TrainConfig, device: torch.device) -> None:
        self.model, self.split, self.config, self.device = model, split, config, device
        self.best_ndcg, self.best_epoch = -1.0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_valid: dict[str, float] = {}
        self.history: list[dict] = []

    def judge(self, epoch: int, loss: float) -> bool:
        """Evaluate `epoch` (its mean training loss `loss`), keep its weights if best; whether to stop."""
        if isinstance(self.model, LightGCN):
            self.model.freeze()
        valid = evaluate(self.model, self.split, "valid", device=self.device)
        self.history.append({"epoch": epoch, "loss": round(loss, 6), "valid_ndcg@10": valid["ndcg@10"]})
        if valid["ndcg@10"] > self.best_ndcg:
            self.best_ndcg, self.best_epoch, self.best_valid = valid["ndcg@10"], epoch, valid
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return False
        return epoch - self.best_epoch >= self.config.patience * self.config.eval_every

    def progress_row(self, epoch: int) -> dict[str, float]:
        """What the progress bar shows after `epoch`: its loss and NDCG when it was evaluated, and the best so far."""
        last = self.history[-1] if self.history and self.history[-1]["epoch"] == epoch else {"epoch": epoch}
        return {**last, "best": self.best_ndcg}

    def restore(self) -> None:
        """Leave the model with the kept weights, in eval mode, ready to infer."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        if isinstance(self.model, LightGCN):
            self.model.freeze()

    def result(self, times: LoopTimes) -> TrainResult:
        return TrainResult(
            best_valid=self.best_valid,
            best_epoch=self.best_epoch,
            epochs_trained=times.epochs_trained,
            seconds=round(times.seconds, 2),
            seconds_per_epoch=round(times.train_seconds / max(times.epochs_trained, 1), 3),
            history=self.history,
        )


def progress_postfix(row: dict[str, float]) -> dict[str, str]:
    """The progress bar's figures of an epoch row (`BestEpoch.progress_row`), in one process and on Ray alike."""
    if "loss" not in row:
        return {}
    return {"loss": f"{row['loss']:.4f}", "ndcg10": f"{row['valid_ndcg@10']:.4f}", "best": f"{row['best']:.4f}"}


def make_optimizer(model: Recommender, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def run_epochs(
    model: Recommender, batches: GlobalBatches, config: TrainConfig, step: Callable[[dict[str, torch.Tensor]], float],
    end_epoch: Callable[[int, float], bool],
) -> LoopTimes:  # fmt: skip
    """The epoch loop of every training: `step(batch)` trains on one global batch and returns its loss;
    `end_epoch(epoch, mean loss)` judges the epoch and says whether to stop."""
    train_seconds, started, epoch = 0.0, time.perf_counter(), 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start, total = time.perf_counter(), 0.0
        for batch in batches.epoch():
            total += step(batch)
        train_seconds += time.perf_counter() - epoch_start
        if end_epoch(epoch, total / batches.n_batches):
            break
    return LoopTimes(epoch, time.perf_counter() - started, train_seconds)


def train_recommender(model: Recommender, split: Split, config: TrainConfig) -> TrainResult:
    """Train in place; on return the model holds the weights of its best validation epoch."""
    config = config.resolved(model.name)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device)
    optimizer = make_optimizer(model, config)
    best = BestEpoch(model, split, config, device)
    bar = tqdm(total=config.epochs, desc=f"train {model.name}", disable=not config.progress, unit="epoch")

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = model.loss({k: v.to(device) for k, v in batch.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def end_epoch(epoch: int, loss: float) -> bool:
        stop = is_eval_epoch(epoch, config) and best.judge(epoch, loss)
        if postfix := progress_postfix(best.progress_row(epoch)):
            bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        return stop

    times = run_epochs(model, GlobalBatches(model, split, config), config, step, end_epoch)
    bar.close()
    best.restore()
    return best.result(times)
