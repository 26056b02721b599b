"""Top-k ranking metrics (RecBole definitions) over full rankings with seen items masked."""

from __future__ import annotations

import numpy as np

METRICS: tuple[str, ...] = ("hit", "recall", "precision", "mrr", "ndcg")
DEFAULT_KS: tuple[int, ...] = (5, 10, 20)


def hit_matrix(topk: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """Boolean (users, K): whether the item at each rank is one of that user's targets."""
    hits = np.zeros(topk.shape, dtype=bool)
    for row, target in enumerate(targets):
        hits[row] = np.isin(topk[row], target)
    return hits


def ranking_metrics(hits: np.ndarray, n_targets: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-user metric values, keyed 'ndcg@10' etc.

    Recall divides by all of a user's targets; NDCG's ideal DCG places min(n_targets, k) hits at the top;
    MRR is the reciprocal rank of the first hit within k (0 without one).
    """
    if hits.shape[0] != len(n_targets):
        raise ValueError("hits and n_targets disagree on the number of users")
    if np.any(n_targets <= 0):
        raise ValueError("every evaluated user needs at least one target")
    max_k = hits.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, max_k + 2))
    cum_hits = np.cumsum(hits, axis=1)
    cum_dcg = np.cumsum(hits * discounts, axis=1)
    ideal = np.cumsum(discounts)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, max_k + 1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        if k > max_k:
            raise ValueError(f"k={k} exceeds the {max_k} ranked items")
        found = cum_hits[:, k - 1]
        out[f"hit@{k}"] = (found > 0).astype(np.float64)
        out[f"recall@{k}"] = found / n_targets
        out[f"precision@{k}"] = found / k
        out[f"mrr@{k}"] = np.where(first_hit <= k, 1.0 / first_hit, 0.0)
        out[f"ndcg@{k}"] = cum_dcg[:, k - 1] / ideal[np.minimum(n_targets, k) - 1]
    return out


def mean_metrics(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """Average per-user values, rounded for reports."""
    return {name: round(float(values.mean()), 6) for name, values in per_user.items()}
