"""Fronts at equal test NDCG loss: each method's sweep is a set of points (relative NDCG loss, metric value); its
front keeps the points no other point beats at equal or lower loss, and is read at a requested loss by linear
interpolation between consecutive front points. Past the last front point (but within the losses the sweep measured)
the front stays at its best value, which a point of lower loss already reaches. A loss below the sweep's smallest or
above its largest measured loss is out of reach: reported as such, never extrapolated.

Every bootstrap replicate builds and reads its own front the same way (`bootstrap.PointReplicates`), which gives the
interval of the interpolated value; replicates whose own sweep does not reach the loss are counted, not filled in.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from recsae_core.debias.bias_metrics import lower_is_better
from recsae_core.debias.bootstrap import LEVEL, PointReplicates, interval

LOSSES = ("0.01", "0.02", "0.05")
"""Test NDCG losses at which methods are compared (as the report's keys)."""


class FrontValue(NamedTuple):
    """A method's front read at one loss."""

    value: float | None
    """The interpolated metric value; None when the loss is out of the sweep's reach."""
    replicates: np.ndarray
    """(n_boot,) the same on each bootstrap replicate (NaN where that replicate's sweep does not reach the loss)."""
    reason: str | None
    """Why there is no value (None when there is one)."""


def pareto_front(losses: np.ndarray, values: np.ndarray, lower: bool) -> np.ndarray:
    """Indices of the front, by increasing loss: each point strictly better than every point of equal or lower
    loss (non-finite points are skipped)."""
    losses, signed = np.asarray(losses, dtype=np.float64), np.asarray(values, dtype=np.float64) * (1 if lower else -1)
    order = np.lexsort((signed, losses))  # by loss, the best value first among equal losses
    front, best = [], np.inf
    for i in order:
        if np.isfinite(losses[i]) and np.isfinite(signed[i]) and signed[i] < best:
            front.append(i)
            best = signed[i]
    return np.array(front, dtype=np.int64)


def read_front(losses: np.ndarray, values: np.ndarray, at: Sequence[float], lower: bool) -> np.ndarray:
    """The front of (losses, values) read at each loss in `at`; NaN where `at` is outside the measured losses."""
    losses, values, at = (np.asarray(x, dtype=np.float64) for x in (losses, values, at))
    idx = pareto_front(losses, values, lower)
    if not len(idx):
        return np.full(len(at), np.nan)
    measured = losses[np.isfinite(losses) & np.isfinite(values)]
    inside = (at >= measured.min()) & (at <= measured.max())
    return np.where(inside, np.interp(at, losses[idx], values[idx]), np.nan)


def front_at(
    points: Sequence[PointReplicates], metric: str, at: Sequence[float], origin: PointReplicates | None = None
) -> list[FrontValue]:
    """A method's front for `metric` read at each loss in `at`, with every bootstrap replicate read the same way.
    `origin` (the original lists, loss 0) joins the sweep for methods whose zero strength is the original."""
    pts = [*points, *([origin] if origin is not None else [])]
    if not pts:
        return [FrontValue(None, np.zeros(0), "no sweep point") for _ in at]
    missing = [i for i, p in enumerate(pts) if metric not in p.values]
    if missing:
        raise KeyError(f"metric '{metric}' is not among the points' metrics ({', '.join(pts[missing[0]].values)})")
    lower = lower_is_better(metric)
    losses = np.array([p.loss for p in pts])
    values = np.array([p.values[metric] for p in pts])
    point = read_front(losses, values, at, lower)
    loss_reps = np.stack([p.loss_replicates for p in pts], axis=1)  # (n_boot, points)
    value_reps = np.stack([p.replicates[metric] for p in pts], axis=1)
    reps = np.zeros((0, len(at)))  # no resamples (a run without intervals): values only
    if len(loss_reps):
        reps = np.stack([read_front(loss_reps[b], value_reps[b], at, lower) for b in range(len(loss_reps))])
    finite = losses[np.isfinite(losses) & np.isfinite(values)]
    out = []
    for j, loss in enumerate(at):
        if np.isfinite(point[j]):
            out.append(FrontValue(float(point[j]), reps[:, j], None))
        elif not len(finite):
            out.append(FrontValue(None, reps[:, j], "no finite sweep point"))
        elif loss < finite.min():
            out.append(FrontValue(None, reps[:, j], f"below reach: the sweep's smallest test NDCG loss is "
                                                    f"{finite.min():.4f}"))  # fmt: skip
        else:
            out.append(FrontValue(None, reps[:, j], f"beyond reach: the sweep's largest test NDCG loss is "
                                                    f"{finite.max():.4f}"))  # fmt: skip
    return out


def describe(front: FrontValue, origin_value: float | None = None, origin_replicates: np.ndarray | None = None,
             level: float = LEVEL, digits: int = 6) -> dict[str, Any]:  # fmt: skip
    """A front value as the report writes it: {"value", "ci95"}, with "rel_change" and "rel_change_ci95" against
    the original when given, "replicates_out_of_reach" when some replicates' sweeps do not reach the loss, and
    "reason" instead of a value when the loss is out of reach."""
    if front.value is None:
        return {"value": None, "ci95": None, "reason": front.reason}
    ci = interval(front.replicates, front.value, level)
    out: dict[str, Any] = {"value": round(front.value, digits),
                           "ci95": None if ci is None else [round(c, digits) for c in ci]}  # fmt: skip
    if origin_value is not None and origin_value != 0:
        change = front.value / origin_value - 1
        out["rel_change"] = round(change, digits)
        if origin_replicates is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                change_ci = interval(front.replicates / origin_replicates - 1, change, level)
            out["rel_change_ci95"] = None if change_ci is None else [round(c, digits) for c in change_ci]
    out_of_reach = int((~np.isfinite(front.replicates)).sum())
    if out_of_reach:
        out["replicates_out_of_reach"] = out_of_reach
    return out


def difference(a: FrontValue, b: FrontValue, level: float = LEVEL, digits: int = 6) -> dict[str, Any]:
    """a - b at the same loss, with the interval of the paired replicate differences (both fronts read on the same
    resamples); None value when either is out of reach."""
    if a.value is None or b.value is None:
        return {"value": None, "ci95": None, "reason": a.reason or b.reason}
    ci = interval(a.replicates - b.replicates, a.value - b.value, level)
    return {"value": round(a.value - b.value, digits), "ci95": None if ci is None else [round(c, digits) for c in ci]}


def comparison(
    methods: Mapping[str, Sequence[PointReplicates]], metrics: Sequence[str], origin: PointReplicates | None = None,
    losses: Sequence[str] = LOSSES, unanchored: Collection[str] = (),
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:  # fmt: skip
    """`{loss: {method: {metric: {"value": v, "ci95": [lo, hi], ...}}}}`: each method's front read at each test
    NDCG loss (`describe`). `origin` anchors every method's front at loss 0 except those in `unanchored` (a method
    whose zero strength is not the original, such as PopSteer serving the SAE reconstruction), and gives the
    relative changes. For 'the best steering family', pass the union of the families' points as one method."""
    at = [float(loss) for loss in losses]
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {loss: {} for loss in losses}
    for method, points in methods.items():
        anchor = None if method in unanchored else origin
        for metric in metrics:
            fronts = front_at(points, metric, at, anchor)
            base = None if origin is None else origin.values[metric]
            base_reps = None if origin is None else origin.replicates[metric]
            for loss, front in zip(losses, fronts, strict=True):
                out[loss].setdefault(method, {})[metric] = describe(front, base, base_reps)
    return out
