"""Bias metrics of top-K lists: popularity (ARP, tail share, Gini of exposure, coverage) and the fairness of a
binary split of users, such as gender or any user attribute (each group's NDCG and the gap between them,
stereotype leakage AUC of the lists and of the users' own histories).

Head/tail: the head is the smallest set of most popular items (by training count, ties by item index) that together
hold 20% of training interactions; every other item is in the tail.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

HEAD_SHARE = 0.2
HEAD_DEFINITION = (
    "head = the most popular items (training-interaction count, ties by item index) that together hold 20% of "
    "training interactions; tail = all other items"
)


def head_mask(popularity: np.ndarray, share: float = HEAD_SHARE) -> np.ndarray:
    """Boolean (n_items,) mask of the head items (see the module docstring)."""
    popularity = np.asarray(popularity, dtype=np.float64)
    mask = np.zeros(len(popularity), dtype=bool)
    total = popularity.sum()
    if total <= 0:
        return mask
    order = np.lexsort((np.arange(len(popularity)), -popularity))
    cumulative = np.cumsum(popularity[order])
    n_head = int(np.searchsorted(cumulative, share * total, side="left")) + 1
    mask[order[:n_head]] = True
    return mask


def gini(counts: np.ndarray) -> float:
    """Gini index of a non-negative vector (0 = equal exposure, -> 1 = all exposure on one item)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(np.sum((2 * ranks - n - 1) * x) / (n * total))


def popularity_metrics(topk: np.ndarray, popularity: np.ndarray, head: np.ndarray | None = None) -> dict[str, float]:
    """arp, tail_share, gini (over all items) and coverage of (users, K) recommendation lists, keyed '<name>@K'."""
    topk = np.asarray(topk, dtype=np.int64)
    k = topk.shape[1]
    popularity = np.asarray(popularity, dtype=np.float64)
    head = head_mask(popularity) if head is None else head
    exposure = np.bincount(topk.ravel(), minlength=len(popularity))
    return {
        f"arp@{k}": float(popularity[topk].mean(axis=1).mean()),
        f"tail_share@{k}": float((~head[topk]).mean()),
        f"gini@{k}": gini(exposure),
        f"coverage@{k}": float((exposure > 0).sum() / len(popularity)),
    }


def bag_of_items(lists: Sequence[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """(users, n_items) binary sparse matrix: which items each list (or history) contains."""
    lengths = np.array([len(row) for row in lists], dtype=np.int64)
    cols = np.concatenate([np.asarray(r, dtype=np.int64) for r in lists]) if lengths.sum() else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    matrix = sparse.csr_matrix((np.ones(len(cols)), cols, indptr), shape=(len(lists), n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def leakage_auc(
    lists: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray, n_items: int, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated ROC-AUC of a logistic regression predicting the binary `labels` from the bag of items in
    each list (stratified `folds`-fold, fixed seed). 0.5 = the lists carry no signal about the label."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) != 2:
        raise ValueError("leakage_auc needs exactly two label values")
    features = bag_of_items(list(lists), n_items)
    model = LogisticRegression(C=1.0, max_iter=1000)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, features, labels, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, proba))


def group_ndcg(ndcg: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """(mean NDCG of the group's users, mean NDCG of the other users)."""
    ndcg, group = np.asarray(ndcg, dtype=np.float64), np.asarray(group, dtype=bool)
    return float(ndcg[group].mean()), float(ndcg[~group].mean())


def ndcg_gap(ndcg: np.ndarray, group: np.ndarray) -> float:
    """|mean NDCG of the group's users (female, for gender) - mean NDCG of the other users|."""
    inside, outside = group_ndcg(ndcg, group)
    return float(abs(inside - outside))


def ndcg_at_k(topk: np.ndarray, targets: Sequence[np.ndarray]) -> np.ndarray:
    """Per-user NDCG@K (RecBole definition, K = list length) of lists against each user's target items."""
    k = topk.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    hits = np.zeros(topk.shape, dtype=np.float64)
    n_targets = np.zeros(len(topk), dtype=np.int64)
    for row, target in enumerate(targets):
        hits[row] = np.isin(topk[row], target)
        n_targets[row] = len(target)
    ideal = np.cumsum(discounts)[np.clip(np.minimum(n_targets, k), 1, k) - 1]
    return (hits * discounts).sum(axis=1) / ideal
