"""Paired bootstrap over users: one seeded set of user resamples, shared by every method and sweep point, so that
differences between methods (and each method's NDCG loss against the original) are measured on the same users.

A resample is held as per-user multiplicities (how often each user was drawn); every metric is recomputed on it
through `bias_metrics.metric_replicates`, so set-level metrics (Gini, coverages, set-ARP, AUCs) are recomputed on the
resampled users, not averaged. The leakage AUC's out-of-fold scores are resampled, not refitted per replicate.

Intervals are percentile intervals of the replicates re-centred on the estimate (`interval`). A resample drawn with
replacement holds about 63% distinct users, so a set-level metric's replicates are shifted against the estimate
(coverage falls with fewer distinct users: measured on ML-100K, the whole 95% percentile interval of coverage@10 lay
below its value). That shift is an artefact of the resampling, not a bias of the estimate, so it is removed and the
spread kept; for means the shift is about zero and nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from recsae_core.debias.bias_metrics import MetricContext, metric_replicates

N_BOOT = 1000
LEVEL = 0.95


class Resamples(NamedTuple):
    """Bootstrap resamples of a stage's users."""

    weights: np.ndarray
    """(n_boot, n_users) float64: how often each user is drawn in each resample (each row sums to n_users)."""
    seed: int
    """The seed they were drawn with."""

    @property
    def n_boot(self) -> int:
        """Number of resamples."""
        return len(self.weights)

    def indices(self, replicate: int) -> np.ndarray:
        """The user indices drawn in one resample (each repeated as often as it was drawn)."""
        return np.repeat(np.arange(self.weights.shape[1]), self.weights[replicate].astype(np.int64))


class PointReplicates(NamedTuple):
    """One sweep point (or the original) measured on all users and on every resample."""

    loss: float
    """Relative NDCG@K loss against the original on all users (0 for the original)."""
    loss_replicates: np.ndarray
    """(n_boot,) the same loss on each resample, the original measured on the same users."""
    values: dict[str, float]
    """Every metric on all users."""
    replicates: dict[str, np.ndarray]
    """Every metric on each resample: (n_boot,) per key."""


def resample_users(n_users: int, n_boot: int = N_BOOT, seed: int = 0) -> Resamples:
    """`n_boot` resamples of `n_users` users with replacement; the same (n_users, n_boot, seed) gives the same ones."""
    if n_users < 1 or n_boot < 1:
        raise ValueError(f"a bootstrap needs at least one user and one resample, got {n_users} and {n_boot}")
    rng = np.random.default_rng(seed)
    weights = np.empty((n_boot, n_users))
    for b in range(n_boot):  # a row at a time: the draws of all rows at once would be n_boot x n_users int64
        weights[b] = np.bincount(rng.integers(0, n_users, size=n_users), minlength=n_users)
    return Resamples(weights, seed)


def interval(replicates: np.ndarray, estimate: float, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile interval of the finite replicates, shifted so that their median is `estimate` (module docstring);
    None when none is finite or the estimate is not."""
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite) or not np.isfinite(estimate):
        return None
    tail = (1 - level) / 2 * 100
    low, median, high = np.percentile(finite, [tail, 50, 100 - tail])
    shift = float(estimate) - median
    return float(low + shift), float(high + shift)


def summary(value: float, replicates: np.ndarray, level: float = LEVEL, digits: int = 6) -> dict[str, Any]:
    """{"value": v, "ci95": [lo, hi]} (the interval None when no replicate is finite)."""
    ci = interval(replicates, value, level)
    return {"value": round(float(value), digits), "ci95": None if ci is None else [round(c, digits) for c in ci]}


def mean_replicates(values: np.ndarray, resamples: Resamples) -> np.ndarray:
    """(n_boot,) mean of per-user values on each resample (non-finite values left out)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return (resamples.weights @ np.where(finite, values, 0.0)) / (resamples.weights @ finite.astype(np.float64))


def statistic_replicates(statistic: Callable[[np.ndarray], float], resamples: Resamples) -> np.ndarray:
    """(n_boot,) any statistic of a set of users, recomputed on each resample's user indices (slow path for what
    `metric_replicates` does not cover)."""
    return np.array([statistic(resamples.indices(b)) for b in range(resamples.n_boot)], dtype=np.float64)


def rel_loss_replicates(ndcg: np.ndarray, original_ndcg: np.ndarray, resamples: Resamples) -> np.ndarray:
    """(n_boot,) relative NDCG loss 1 - mean(ndcg) / mean(original) on each resample, both on the same users."""
    steered, original = mean_replicates(ndcg, resamples), mean_replicates(original_ndcg, resamples)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(original > 0, 1 - steered / original, 0.0)


def measure_point(
    topk: np.ndarray, ndcg: np.ndarray, original_ndcg: np.ndarray, ctx: MetricContext, resamples: Resamples,
    list_scores: np.ndarray | None = None,
) -> PointReplicates:  # fmt: skip
    """Every metric of a point's lists on all users and on each resample, and its NDCG loss against the original
    (`original_ndcg`: per-user NDCG of the unsteered lists; pass the point's own for the original itself)."""
    ndcg, original_ndcg = np.asarray(ndcg, dtype=np.float64), np.asarray(original_ndcg, dtype=np.float64)
    if len(ndcg) != resamples.weights.shape[1] or len(original_ndcg) != len(ndcg):
        raise ValueError(f"resamples are of {resamples.weights.shape[1]} users, the point has {len(ndcg)} and the "
                         f"original {len(original_ndcg)}")  # fmt: skip
    weights = np.vstack([np.ones((1, len(ndcg))), resamples.weights])  # row 0: all users once
    measured = metric_replicates(topk, ndcg, ctx, weights, list_scores)
    base = original_ndcg.mean()
    loss = float(1 - ndcg.mean() / base) if base > 0 else 0.0
    return PointReplicates(
        loss, rel_loss_replicates(ndcg, original_ndcg, resamples),
        {name: float(v[0]) for name, v in measured.items()}, {name: v[1:] for name, v in measured.items()},
    )  # fmt: skip
