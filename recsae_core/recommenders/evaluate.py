"""Full-ranking evaluation: score every item, mask what the user has already seen, rank, compare with targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from recsae_core.common.ray_map import ItemMap, map_here
from recsae_core.data.splits import Split, Stage
from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.batching import make_batch, mask_seen
from recsae_core.recommenders.ranking_metrics import DEFAULT_KS, hit_matrix, mean_metrics, ranking_metrics

EVAL_BATCH = 1024
"""Users ranked per model call in an evaluation."""


def users_with_targets(split: Split, stage: Stage) -> np.ndarray:
    """The users an evaluation at `stage` ranks for: those with targets there, in id order."""
    return np.flatnonzero(split.targets(stage).lengths > 0)


@torch.no_grad()
def top_items(
    model: Recommender, split: Split, stage: Stage, users: np.ndarray, k: int, device: str | torch.device = "cpu",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:  # fmt: skip
    """(len(users), k) best unseen items of one batch of users, best first."""
    seen = split.seen(stage)  # cached by the split: not rebuilt per batch
    h = model.represent(make_batch(model, users, seen, device))
    if transform is not None:
        h = transform(h)
    return mask_seen(model.score(h).float().cpu(), users, seen).topk(k, dim=1).indices.numpy()


def metrics_of_top(top: np.ndarray, split: Split, stage: Stage, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Mean metrics of the top items of every user with targets at `stage` (rows in `users_with_targets` order)."""
    targets, users = split.targets(stage), users_with_targets(split, stage)
    hits = hit_matrix(top, [targets.row(u) for u in users])
    return mean_metrics(ranking_metrics(hits, targets.lengths[users], ks))


def user_batches(split: Split, stage: Stage, batch_size: int = EVAL_BATCH) -> list[np.ndarray]:
    """The batches an evaluation at `stage` ranks, cut the same wherever they are computed (each batch's scores come
    out of the same model call either way, so its top items are the same)."""
    users = users_with_targets(split, stage)
    return [users[start : start + batch_size] for start in range(0, len(users), batch_size)]


@torch.no_grad()
def evaluate(
    model: Recommender,
    split: Split,
    stage: Stage,
    device: str | torch.device = "cpu",
    batch_size: int = EVAL_BATCH,
    ks: tuple[int, ...] = DEFAULT_KS,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean metrics over users with targets at `stage`. `transform(h) -> h'` lets callers evaluate interventions."""
    was_training = model.training
    model.eval()
    tops = [top_items(model, split, stage, chunk, max(ks), device, transform) for chunk in
            user_batches(split, stage, batch_size)]  # fmt: skip
    model.train(was_training)
    return metrics_of_top(np.concatenate(tops), split, stage, ks)


class Ranker(Protocol):
    """What `evaluate_stages` ranks with: a recommender in eval mode and its split."""

    model: Recommender
    split: Split


def top_of_batch(ranker: Ranker, job: tuple[Stage, np.ndarray, int]) -> np.ndarray:
    """`top_items` of one (stage, users, k) job: the unit of work an item map deals out."""
    stage, users, k = job
    return top_items(ranker.model, ranker.split, stage, users, k)


def evaluate_stages(
    ranker: Ranker, stages: tuple[Stage, ...], on: ItemMap = map_here, ks: tuple[int, ...] = DEFAULT_KS,
    progress: bool = False,
) -> dict[Stage, dict[str, float]]:  # fmt: skip
    """`evaluate` at each stage, its batches computed by `on` (in this process, or an actor pool on Ray: the same
    batches, so the same metrics)."""
    jobs = [(stage, chunk, max(ks)) for stage in stages for chunk in user_batches(ranker.split, stage)]
    tops = on(top_of_batch, ranker, jobs, desc="evaluate", progress=progress)
    of_stage = {stage: [top for (s, _, _), top in zip(jobs, tops, strict=True) if s == stage] for stage in stages}
    return {stage: metrics_of_top(np.concatenate(of_stage[stage]), ranker.split, stage, ks) for stage in stages}


def popularity_baseline(split: Split, stage: Stage, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Most-popular (by training count) unseen items for everyone: the floor a trained model must beat."""
    seen, targets = split.seen(stage), split.targets(stage)
    users = np.flatnonzero(targets.lengths > 0)
    popularity = torch.as_tensor(split.item_popularity(), dtype=torch.float32)
    scores = mask_seen(popularity.repeat(len(users), 1), users, seen)
    topk = scores.topk(max(ks), dim=1).indices.numpy()
    hits = hit_matrix(topk, [targets.row(u) for u in users])
    return mean_metrics(ranking_metrics(hits, targets.lengths[users], ks))
