"""Full-ranking evaluation: score every item, mask what the user has already seen, rank, compare with targets."""

from __future__ import annotations

import numpy as np
import torch

from recsae_core.data.splits import Split, Stage
from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.batching import make_batch, mask_seen
from recsae_core.recommenders.ranking_metrics import DEFAULT_KS, hit_matrix, mean_metrics, ranking_metrics


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
