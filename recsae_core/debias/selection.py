"""The operating point of a swept method, chosen on validation.

A method's dev NDCG loss is noisy from point to point, so the point with the best dev objective among those whose raw
dev loss fits the budget is often one whose dev loss happens to be low: the winner's curse, which turned 2% on dev
into 2.5% on test. The loss is therefore first smoothed against the strength by isotonic regression (stronger never
costs less), and a point is eligible when its smoothed dev loss fits the budget (`pick_operating_point`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def isotonic_increasing(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The non-decreasing sequence closest to `values` in weighted least squares (pool-adjacent-violators)."""
    y = np.asarray(values, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    means: list[float] = []
    totals: list[float] = []
    sizes: list[int] = []
    for value, weight in zip(y, w, strict=True):
        means.append(value)
        totals.append(weight)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:  # pool the violating pair into one block
            weight = totals[-2] + totals[-1]
            mean = (means[-2] * totals[-2] + means[-1] * totals[-1]) / weight
            size = sizes[-2] + sizes[-1]
            del means[-1], totals[-1], sizes[-1]
            means[-1], totals[-1], sizes[-1] = mean, weight, size
    return np.repeat(np.asarray(means), sizes)


class OperatingPoint(NamedTuple):
    """Which point of a method's sweep is its operating point, and why."""

    index: int | None
    """Index into the method's points (None: no point is eligible; the original stays)."""
    smoothed: np.ndarray
    """(points,) the isotonic dev NDCG loss of each point."""
    eligible: np.ndarray
    """(points,) bool: smoothed dev loss within the budget and any extra constraint (`allowed`) met."""


def pick_operating_point(
    strengths: np.ndarray, dev_losses: np.ndarray, objectives: np.ndarray, budget: float,
    allowed: np.ndarray | None = None, anchored: bool = True,
) -> OperatingPoint:  # fmt: skip
    """The point with the lowest dev `objectives` among those whose isotonic dev loss (against strength) is within
    `budget` and that are `allowed`. `anchored`: the method's strength 0 is the original lists, so the smoothing
    starts from a loss of 0 there (the anchor is not a candidate)."""
    strengths, losses = np.asarray(strengths, dtype=np.float64), np.asarray(dev_losses, dtype=np.float64)
    objectives = np.asarray(objectives, dtype=np.float64)
    order = np.argsort(strengths, kind="stable")
    sequence = np.concatenate([[0.0], losses[order]]) if anchored else losses[order]
    fitted = isotonic_increasing(sequence)[1 if anchored else 0 :]
    smoothed = np.empty_like(losses)
    smoothed[order] = fitted
    eligible = (smoothed <= budget) & np.isfinite(objectives)
    if allowed is not None:
        eligible &= np.asarray(allowed, dtype=bool)
    if not eligible.any():
        return OperatingPoint(None, smoothed, eligible)
    # Ties in the objective go to the weaker strength (the smaller change to what is served).
    candidates = np.flatnonzero(eligible)
    best = candidates[np.lexsort((strengths[candidates], objectives[candidates]))[0]]
    return OperatingPoint(int(best), smoothed, eligible)
