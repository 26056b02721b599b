"""Full-ranking evaluation: score every item, mask what the user has already seen, rank, compare with targets."""

from __future__ import annotations

import numpy as np
import torch

from recsae_core.metrics import DEFAULT_KS, hit_matrix, mean_metrics, ranking_metrics
from recsae_core.recommenders.base import Batch, Recommender
from recsae_core.splits import Ragged, Split, Stage


def pad_histories(rows: list[np.ndarray], max_len: int, pad: int) -> np.ndarray:
    """Left-padded (B, max_len) int64 histories keeping each row's most recent max_len items."""
    out = np.full((len(rows), max_len), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        tail = row[-max_len:]
        if len(tail):
            out[i, max_len - len(tail) :] = tail
    return out


def make_batch(model: Recommender, users: np.ndarray, seen: Ragged, device: str | torch.device) -> Batch:
    """The model input for `users`, whose histories are their `seen` items."""
    user_tensor = torch.as_tensor(users, dtype=torch.long, device=device)
    if model.sequential:
        history = pad_histories([seen.row(u) for u in users], model.config.max_len, model.config.n_items)
        return Batch(user_tensor, torch.as_tensor(history, device=device))
    return Batch(user_tensor, torch.zeros((len(users), 0), dtype=torch.long, device=device))


def mask_seen(scores: torch.Tensor, users: np.ndarray, seen: Ragged) -> torch.Tensor:
    """Set scores of already-seen items to -inf, in place."""
    rows = np.repeat(np.arange(len(users)), seen.lengths[users])
    cols = np.concatenate([seen.row(u) for u in users]) if len(users) else np.zeros(0, np.int64)
    scores[torch.as_tensor(rows), torch.as_tensor(cols)] = -torch.inf
    return scores


@torch.no_grad()
def evaluate(
    model: Recommender,
    split: Split,
    stage: Stage,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    ks: tuple[int, ...] = DEFAULT_KS,
    transform=None,
) -> dict[str, float]:
    """Mean metrics over users with targets at `stage`. `transform(h) -> h'` lets callers evaluate interventions."""
    was_training = model.training
    model.eval()
    seen, targets = split.seen(stage), split.targets(stage)
    users = np.flatnonzero(targets.lengths > 0)
    max_k = max(ks)
    topk_rows = []
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        h = model.represent(make_batch(model, chunk, seen, device))
        if transform is not None:
            h = transform(h)
        scores = mask_seen(model.score(h).float().cpu(), chunk, seen)
        topk_rows.append(scores.topk(max_k, dim=1).indices.numpy())
    model.train(was_training)
    topk = np.concatenate(topk_rows)
    hits = hit_matrix(topk, [targets.row(u) for u in users])
    return mean_metrics(ranking_metrics(hits, targets.lengths[users], ks))


def popularity_baseline(split: Split, stage: Stage, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Most-popular (by training count) unseen items for everyone: the floor a trained model must beat."""
    seen, targets = split.seen(stage), split.targets(stage)
    users = np.flatnonzero(targets.lengths > 0)
    popularity = torch.as_tensor(split.item_popularity(), dtype=torch.float32)
    scores = mask_seen(popularity.repeat(len(users), 1), users, seen)
    topk = scores.topk(max(ks), dim=1).indices.numpy()
    hits = hit_matrix(topk, [targets.row(u) for u in users])
    return mean_metrics(ranking_metrics(hits, targets.lengths[users], ks))
