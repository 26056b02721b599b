"""Bias metrics of top-K lists: popularity (per-list ARP, tail share, Gini of exposure, coverage, long-tail and
deep-long-tail coverage, set-ARP, user popularity miscalibration) and the fairness of a binary split of users, such as
gender or any user attribute (each group's NDCG and the gap between them, stereotype leakage AUC of the lists and of
the users' own histories).

Item popularity groups, by training-interaction count, items ordered from most to least popular (ties by item index):
- head: the smallest prefix that holds at least 20% of training interactions; the (long) tail is every other item;
- deep (long) tail: the longest suffix that holds at most 20% of training interactions, so items nobody interacted with
  are in it (PopSteer's `popularity_label == -1`); at 20% each it never meets the head (were it to, the head wins);
- mid: the rest. Head / mid / deep tail are Abdollahpouri et al. (2021)'s H / M / T groups.

Every metric is written once, over per-user weights (`metric_replicates`): one row of ones gives the metric of the
lists, a row of bootstrap multiplicities gives one replicate (`recsae_core.debias.bootstrap`). Metrics that are not
means over users (Gini, the coverages, set-ARP, the AUCs) are recomputed from the weighted users, not averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from recsae_core.debias.calibration import group_mix, jensen_shannon, popularity_groups

HEAD_SHARE = 0.2
DEEP_TAIL_SHARE = 0.2
HEAD_DEFINITION = (
    "head = the most popular items (training-interaction count, ties by item index) that together hold 20% of "
    "training interactions; tail = all other items; deep tail = the least popular items that together hold at most "
    "20% of training interactions (PopSteer's definition)"
)
LOWER_IS_BETTER = {"arp": True, "tail_share": False, "gini": True, "coverage": False, "tail_coverage": False,
                   "deep_tail_coverage": False, "set_arp": True, "miscalibration": True, "leakage_distance": True,
                   "ndcg_gap": True}  # fmt: skip
"""Direction of each bias metric, by its name without '@K' (`lower_is_better`); the leakage AUC has none (below
0.5 is over-correction): its front is the leakage distance's."""
CHUNK = 256
"""Weight rows measured at a time (bounds the (rows, n_items) exposure matrix)."""


class MetricContext(NamedTuple):
    """What a stage's metrics need besides the lists; the same for every sweep point."""

    popularity: np.ndarray
    """(n_items,) training-interaction count per item."""
    head: np.ndarray
    """(n_items,) bool: head items."""
    deep: np.ndarray
    """(n_items,) bool: deep-long-tail items."""
    history_mix: np.ndarray | None
    """(users, 3) share of head / mid / deep-tail items in each user's history (None: no miscalibration)."""
    group: np.ndarray | None
    """(users,) bool: in the fairness target's group (None: a popularity target)."""
    history_scores: np.ndarray | None = None
    """(users,) out-of-fold P(group) from each user's history (`leakage_scores`); None: no history AUC."""


def metric_context(
    popularity: np.ndarray, histories: Sequence[np.ndarray] | None = None, group: np.ndarray | None = None,
    history_scores: np.ndarray | None = None,
) -> MetricContext:  # fmt: skip
    """The context of a stage: item groups from `popularity`, each user's head/mid/tail mix from `histories`."""
    popularity = np.asarray(popularity, dtype=np.float64)
    head, deep = head_mask(popularity), deep_tail_mask(popularity)
    mix = None if histories is None else group_mix(histories, popularity_groups(head, deep))
    member = None if group is None else np.asarray(group, dtype=bool)
    return MetricContext(popularity, head, deep, mix, member, history_scores)


def lower_is_better(metric: str) -> bool:
    """Whether a lower value of `metric` ('arp@10', 'leakage_distance', ...) means less bias."""
    name = metric.split("@")[0]
    if name not in LOWER_IS_BETTER:
        raise KeyError(f"no direction known for metric '{metric}'; known: {', '.join(LOWER_IS_BETTER)}")
    return LOWER_IS_BETTER[name]


# ---------------------------------------------------------------- item groups


def _popularity_order(popularity: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(len(popularity)), -popularity))


def head_mask(popularity: np.ndarray, share: float = HEAD_SHARE) -> np.ndarray:
    """Boolean (n_items,) mask of the head items (see the module docstring)."""
    popularity = np.asarray(popularity, dtype=np.float64)
    mask = np.zeros(len(popularity), dtype=bool)
    total = popularity.sum()
    if total <= 0:
        return mask
    order = _popularity_order(popularity)
    cumulative = np.cumsum(popularity[order])
    n_head = int(np.searchsorted(cumulative, share * total, side="left")) + 1
    mask[order[:n_head]] = True
    return mask


def deep_tail_mask(popularity: np.ndarray, share: float = DEEP_TAIL_SHARE) -> np.ndarray:
    """Boolean (n_items,) mask of the deep-long-tail items (see the module docstring)."""
    popularity = np.asarray(popularity, dtype=np.float64)
    mask = np.zeros(len(popularity), dtype=bool)
    total = popularity.sum()
    if total <= 0:
        return mask
    backwards = _popularity_order(popularity)[::-1]
    cumulative = np.cumsum(popularity[backwards])
    # Counts are integers: the tolerance only keeps 0.2 * total's rounding from dropping an item that fits exactly.
    n_deep = int(np.searchsorted(cumulative, share * total * (1 + 1e-12), side="right"))
    mask[backwards[:n_deep]] = True
    return mask & ~head_mask(popularity)


# ---------------------------------------------------------------- point metrics (one value for all users)


def gini(counts: np.ndarray) -> float:
    """Gini index of a non-negative vector (0 = equal exposure, -> 1 = all exposure on one item)."""
    counts = np.asarray(counts, dtype=np.float64)
    return float(gini_rows(counts[None, :])[0]) if len(counts) else 0.0


def gini_rows(counts: np.ndarray) -> np.ndarray:
    """Gini index of each row of a (rows, n) non-negative matrix (0 for an all-zero row)."""
    x = np.sort(np.asarray(counts, dtype=np.float64), axis=1)
    n, total = x.shape[1], x.sum(axis=1)
    coefficients = 2 * np.arange(1, n + 1) - n - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (x @ coefficients) / (n * total), 0.0)


def popularity_metrics(
    topk: np.ndarray, popularity: np.ndarray, head: np.ndarray | None = None, deep: np.ndarray | None = None,
    history_mix: np.ndarray | None = None,
) -> dict[str, float]:  # fmt: skip
    """arp, tail_share, gini (over all items), coverage, tail_coverage, deep_tail_coverage, set_arp and, with
    `history_mix`, miscalibration of (users, K) recommendation lists, keyed '<name>@K' (`popularity_replicates`)."""
    replicates = popularity_replicates(topk, popularity, np.ones((1, len(topk))), head, deep, history_mix)
    return {name: float(v[0]) for name, v in replicates.items()}


def popularity_replicates(
    topk: np.ndarray, popularity: np.ndarray, weights: np.ndarray, head: np.ndarray | None = None,
    deep: np.ndarray | None = None, history_mix: np.ndarray | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Popularity metrics of (users, K) lists under each row of (rows, users) user weights, keyed '<name>@K':

    - arp: mean over users of the mean training count of the list's items (per-list ARP);
    - tail_share: share of list slots holding a (long-)tail item, i.e. a non-head item;
    - gini: Gini index of the exposure (slots per item) over all items;
    - coverage, tail_coverage, deep_tail_coverage: share of all / long-tail / deep-tail items in at least one list;
    - set_arp: mean training count over the distinct recommended items (PopSteer v1's 'ARP');
    - miscalibration (with `history_mix`): mean over users of the Jensen-Shannon divergence (base 2, in [0, 1])
      between the head / mid / deep-tail shares of the user's history and of the list (Abdollahpouri et al. 2021,
      arXiv 2103.06364); users with an empty history are left out.
    """
    topk = np.asarray(topk, dtype=np.int64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_users, k = topk.shape
    popularity = np.asarray(popularity, dtype=np.float64)
    head = head_mask(popularity) if head is None else np.asarray(head, dtype=bool)
    deep = deep_tail_mask(popularity) if deep is None else np.asarray(deep, dtype=bool)
    per_user = {"arp": popularity[topk].mean(axis=1), "tail_share": (~head[topk]).mean(axis=1)}
    if history_mix is not None:
        per_user["miscalibration"] = jensen_shannon(history_mix, group_mix(topk, popularity_groups(head, deep)))
    out = {name: _weighted_mean(values, weights) for name, values in per_user.items()}
    lists = sparse.csr_matrix((np.ones(topk.size), topk.ravel(), np.arange(0, topk.size + 1, k)),
                              shape=(n_users, len(popularity))).T.tocsr()  # fmt: skip
    set_level: dict[str, list[np.ndarray]] = {"gini": [], "coverage": [], "tail_coverage": [],
                                              "deep_tail_coverage": [], "set_arp": []}  # fmt: skip
    for start in range(0, len(weights), CHUNK):
        exposure = np.asarray(lists @ weights[start : start + CHUNK].T).T  # (rows, n_items) slots per item
        shown = exposure > 0
        n_shown = shown.sum(axis=1)
        set_level["gini"].append(gini_rows(exposure))
        set_level["coverage"].append(n_shown / len(popularity))
        set_level["tail_coverage"].append(_share_shown(shown, ~head))
        set_level["deep_tail_coverage"].append(_share_shown(shown, deep))
        with np.errstate(invalid="ignore", divide="ignore"):
            set_level["set_arp"].append(np.where(n_shown > 0, (shown @ popularity) / n_shown, np.nan))
    out.update({name: np.concatenate(parts) for name, parts in set_level.items()})
    order = ("arp", "tail_share", "gini", "coverage", "tail_coverage", "deep_tail_coverage", "set_arp",
             "miscalibration")  # fmt: skip
    return {f"{name}@{k}": out[name] for name in order if name in out}


def _share_shown(shown: np.ndarray, items: np.ndarray) -> np.ndarray:
    n = int(items.sum())
    return shown[:, items].sum(axis=1) / n if n else np.full(len(shown), np.nan)


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of weights, the weighted mean of the per-user values that are finite."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.where(finite, values, 0.0)) / (weights @ finite.astype(np.float64))


# ---------------------------------------------------------------- fairness


def bag_of_items(lists: Sequence[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """(users, n_items) binary sparse matrix: which items each list (or history) contains."""
    lengths = np.array([len(row) for row in lists], dtype=np.int64)
    cols = np.concatenate([np.asarray(r, dtype=np.int64) for r in lists]) if lengths.sum() else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    matrix = sparse.csr_matrix((np.ones(len(cols)), cols, indptr), shape=(len(lists), n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def leakage_scores(
    lists: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray, n_items: int, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """(users,) out-of-fold P(label) of a logistic regression on the bag of items in each list (stratified
    `folds`-fold, fixed seed). The bootstrap resamples these scores rather than refitting on every replicate."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) != 2:
        raise ValueError("leakage_auc needs exactly two label values")
    features = bag_of_items(list(lists), n_items)
    model = LogisticRegression(C=1.0, max_iter=1000)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, features, labels, cv=cv, method="predict_proba")[:, 1]


def leakage_auc(
    lists: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray, n_items: int, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated ROC-AUC of a logistic regression predicting the binary `labels` from the bag of items in
    each list (`leakage_scores`). 0.5 = the lists carry no signal about the label."""
    return float(roc_auc_score(np.asarray(labels).astype(int), leakage_scores(lists, labels, n_items, folds, seed)))


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC of `scores` for the binary `labels` under each row of (rows, users) weights (ties count one half);
    a row of ones gives sklearn's roc_auc_score. NaN for a row without both classes."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(scores, kind="stable")
    ranked, positive = scores[order], labels[order][:, None]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # one block per distinct score
    out = []
    for start in range(0, len(weights), CHUNK):
        w = weights[start : start + CHUNK, order].T  # (users by score, rows): blocks are contiguous rows
        pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=0)
        neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=0)
        below = np.cumsum(neg, axis=0) - neg
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append((pos * (below + 0.5 * neg)).sum(axis=0) / (pos.sum(axis=0) * neg.sum(axis=0)))
    return np.concatenate(out)


def group_ndcg(ndcg: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """(mean NDCG of the group's users, mean NDCG of the other users)."""
    ndcg, group = np.asarray(ndcg, dtype=np.float64), np.asarray(group, dtype=bool)
    return float(ndcg[group].mean()), float(ndcg[~group].mean())


def ndcg_gap(ndcg: np.ndarray, group: np.ndarray) -> float:
    """|mean NDCG of the group's users (female, for gender) - mean NDCG of the other users|."""
    inside, outside = group_ndcg(ndcg, group)
    return float(abs(inside - outside))


def fairness_replicates(
    ndcg: np.ndarray, group: np.ndarray, weights: np.ndarray, list_scores: np.ndarray,
    history_scores: np.ndarray | None = None, k: int = 10,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Fairness metrics under each row of (rows, users) weights: leakage_auc (of `list_scores`, from
    `leakage_scores`), leakage_distance |AUC - 0.5|, history_leakage_auc (with `history_scores`), the NDCG gap
    (ndcg_gap = |group - rest|, ndcg_gap_signed = group - rest: F - M for gender) and group_ndcg@K / rest_ndcg@K."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    member = np.asarray(group, dtype=bool)
    inside = _weighted_mean(np.where(member, ndcg, np.nan), weights)
    outside = _weighted_mean(np.where(member, np.nan, ndcg), weights)
    auc = weighted_auc(member, list_scores, weights)
    out = {"leakage_auc": auc, "leakage_distance": np.abs(auc - 0.5)}
    if history_scores is not None:
        out["history_leakage_auc"] = weighted_auc(member, history_scores, weights)
    out.update({"ndcg_gap": np.abs(inside - outside), "ndcg_gap_signed": inside - outside,
                f"group_ndcg@{k}": inside, f"rest_ndcg@{k}": outside})  # fmt: skip
    return out


# ---------------------------------------------------------------- accuracy, and all metrics of a stage


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


def metric_replicates(
    topk: np.ndarray, ndcg: np.ndarray, ctx: MetricContext, weights: np.ndarray,
    list_scores: np.ndarray | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every metric of a stage's lists under each row of (rows, users) user weights: ndcg@K, the popularity
    metrics, and for a fairness context (needs `list_scores` from `leakage_scores`) the fairness metrics."""
    k = np.asarray(topk).shape[1]
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    out = {f"ndcg@{k}": _weighted_mean(np.asarray(ndcg, dtype=np.float64), weights)}
    out.update(popularity_replicates(topk, ctx.popularity, weights, ctx.head, ctx.deep, ctx.history_mix))
    if ctx.group is not None:
        if list_scores is None:
            raise ValueError("a fairness context needs the lists' leakage scores (leakage_scores)")
        out.update(fairness_replicates(ndcg, ctx.group, weights, list_scores, ctx.history_scores, k))
    return out


def list_metrics(
    topk: np.ndarray, ndcg: np.ndarray, ctx: MetricContext, list_scores: np.ndarray | None = None
) -> dict[str, float]:
    """Every metric of a stage's lists over all its users (`metric_replicates` with one weight per user)."""
    weights = np.ones((1, len(topk)))
    return {name: float(v[0]) for name, v in metric_replicates(topk, ndcg, ctx, weights, list_scores).items()}
