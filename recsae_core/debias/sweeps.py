"""Equal-length sweep grids: every method's front is drawn from the same number of strengths, so that no method wins
a comparison by having been searched more densely.

Grids leave out the zero strength: for every method but PopSteer it is the original lists, which the fronts add as
their anchor (`recsae_core.debias.fronts`). Geometric grids are dense at small strengths, where the 1-5% NDCG losses
the comparison reads are crossed.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from recsae_core.common.errors import ConfigError

SWEEP_POINTS = 16
"""Strengths per method, unless asked otherwise."""


class SweepRange(NamedTuple):
    """Where a method's strength is swept."""

    low: float
    """Smallest strength."""
    high: float
    """Largest strength."""
    spacing: Literal["geometric", "linear"]
    """How the points are spread between them."""
    meaning: str
    """What the strength is."""


_PENALTY = "relative strength: lam / rerank.penalty_scale(scores, popularity, shape)"
SWEEP_RANGES: dict[str, SweepRange] = {
    "penalty-log": SweepRange(0.02, 20.0, "geometric", _PENALTY),
    "penalty-linear": SweepRange(0.02, 20.0, "geometric", _PENALTY),
    "penalty-sqrt": SweepRange(0.02, 20.0, "geometric", _PENALTY),
    "xquad": SweepRange(0.01, 0.95, "geometric", "lam of smooth xQuAD, weight of the coverage term"),
    "calibrated-popularity": SweepRange(0.01, 0.95, "geometric", "lam of CP, weight of the divergence term"),
    "nudge": SweepRange(0.1, 8.0, "geometric", "multiplier of a policy's nudge values (std units)"),
    "erase": SweepRange(0.05, 1.0, "linear", "t of h' = h - t ((h - m) . b) a; 1 = full erasure"),
    "calibrated": SweepRange(0.02, 1.5, "geometric", "t of h' = h - t g_u p (g_u: list minus history log-pop)"),
    "spectral": SweepRange(0.02, 1.0, "geometric", "t: each user's top singular loading of H E^T scaled by 1 - t"),
    "popsteer": SweepRange(0.0, 4.0, "linear", "alpha, PopSteer's largest shift in std units (0 = reconstruction)"),
}
"""Known methods' ranges; a method not listed needs its range given to `sweep_grid`."""


def sweep_grid(
    method: str, n_points: int = SWEEP_POINTS, low: float | None = None, high: float | None = None,
    spacing: Literal["geometric", "linear"] | None = None,
) -> np.ndarray:  # fmt: skip
    """`n_points` strengths for `method`, from its `SWEEP_RANGES` entry or from `low`, `high`, `spacing` (which
    override it): increasing, both ends included."""
    known = SWEEP_RANGES.get(method)
    if known is None and (low is None or high is None):
        raise ConfigError(f"no sweep range known for method '{method}'; give low and high, or use one of: "
                          f"{', '.join(SWEEP_RANGES)}")  # fmt: skip
    low = known.low if low is None else low  # type: ignore[union-attr]
    high = known.high if high is None else high  # type: ignore[union-attr]
    spacing = (known.spacing if known is not None else "geometric") if spacing is None else spacing
    if n_points < 1:
        raise ConfigError(f"a sweep needs at least one point, got {n_points}")
    if not low < high and n_points > 1:
        raise ConfigError(f"sweep of '{method}': low {low} must be below high {high}")
    if n_points == 1:
        return np.array([high], dtype=np.float64)
    if spacing == "geometric":
        if low <= 0:
            raise ConfigError(f"geometric sweep of '{method}' needs low > 0, got {low}")
        return np.geomspace(low, high, n_points)
    if spacing == "linear":
        return np.linspace(low, high, n_points)
    raise ConfigError(f"unknown spacing '{spacing}' for method '{method}': geometric or linear")
