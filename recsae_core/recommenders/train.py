"""Training with early stopping on validation NDCG@10, for every recommender family."""

from __future__ import annotations

import time
from collections.abc import Iterator
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


def build_model(name: str, n_users: int, n_items: int, split: Split | None = None, **overrides) -> Recommender:
    cls = MODELS[name]
    model = cls(cls.config_class(n_users=n_users, n_items=n_items, **overrides))
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


def train_recommender(model: Recommender, split: Split, config: TrainConfig) -> TrainResult:
    """Train in place; on return the model holds the weights of its best validation epoch."""
    config = config.resolved(model.name)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    windows = sequence_windows(split, model.config.max_len) if model.sequential else None
    n_samples = len(windows.inputs) if windows is not None else split.n_train
    n_batches = -(-n_samples // config.batch_size)

    best_ndcg, best_epoch, best_state, best_valid = -1.0, 0, None, {}
    history: list[dict] = []
    train_seconds, started, epoch = 0.0, time.perf_counter(), 0
    bar = tqdm(range(1, config.epochs + 1), desc=f"train {model.name}", disable=not config.progress, unit="epoch")
    for epoch in bar:
        model.train()
        epoch_start, total = time.perf_counter(), 0.0
        batches = (
            sequence_batches(windows, config.batch_size, rng)
            if windows is not None
            else pair_batches(split, config.batch_size, rng)
        )
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        train_seconds += time.perf_counter() - epoch_start
        if epoch % config.eval_every and epoch != config.epochs:
            continue
        if isinstance(model, LightGCN):
            model.freeze()
        valid = evaluate(model, split, "valid", device=device)
        history.append({"epoch": epoch, "loss": round(total / n_batches, 6), "valid_ndcg@10": valid["ndcg@10"]})
        bar.set_postfix(loss=f"{total / n_batches:.4f}", ndcg10=f"{valid['ndcg@10']:.4f}", best=f"{best_ndcg:.4f}")
        if valid["ndcg@10"] > best_ndcg:
            best_ndcg, best_epoch, best_valid = valid["ndcg@10"], epoch, valid
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= config.patience * config.eval_every:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if isinstance(model, LightGCN):
        model.freeze()
    return TrainResult(
        best_valid=best_valid,
        best_epoch=best_epoch,
        epochs_trained=epoch,
        seconds=round(time.perf_counter() - started, 2),
        seconds_per_epoch=round(train_seconds / max(epoch, 1), 3),
        history=history,
    )
