"""The operating point chosen on validation (recsae_core.debias.selection), on hand-made sweeps: isotonic smoothing of
the dev NDCG loss against strength, and the pick among the points whose smoothed loss fits the budget."""

from __future__ import annotations

import numpy as np
import pytest

from recsae_core.debias.selection import isotonic_increasing, pick_operating_point


def test_isotonic_regression_pools_adjacent_violators() -> None:
    assert isotonic_increasing(np.array([1.0, 3.0, 2.0, 4.0])).tolist() == pytest.approx([1.0, 2.5, 2.5, 4.0])
    assert isotonic_increasing(np.array([3.0, 2.0, 1.0])).tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert isotonic_increasing(np.array([0.0, 1.0, 1.0, 5.0])).tolist() == [0.0, 1.0, 1.0, 5.0]  # already monotone
    # A violation that reaches back over earlier blocks: 4 pools with 6 (5), that block with 5.5 (5.17), then 3 joins.
    pooled = isotonic_increasing(np.array([1.0, 5.5, 6.0, 4.0, 3.0]))
    assert pooled.tolist() == pytest.approx([1.0, 4.625, 4.625, 4.625, 4.625])
    weighted = isotonic_increasing(np.array([2.0, 1.0]), np.array([3.0, 1.0]))
    assert weighted.tolist() == pytest.approx([1.75, 1.75])


def test_the_pick_is_not_fooled_by_a_lucky_dev_loss() -> None:
    """Point 3's raw dev loss (1.8%) fits a 2% budget only by chance: its neighbour at a weaker strength lost 3%.
    The isotonic loss pools them (2.4% each), so the pick is point 1, the strongest whose smoothed loss fits."""
    strengths = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    losses = np.array([0.005, 0.01, 0.03, 0.018, 0.04])
    arp = np.array([9.0, 8.0, 7.0, 6.0, 5.0])
    picked = pick_operating_point(strengths, losses, arp, budget=0.02)
    assert picked.smoothed.tolist() == pytest.approx([0.005, 0.01, 0.024, 0.024, 0.04])
    assert picked.eligible.tolist() == [True, True, False, False, False]
    assert picked.index == 1
    # Without the lucky point the raw and smoothed choices agree.
    assert pick_operating_point(strengths, np.array([0.005, 0.01, 0.015, 0.03, 0.04]), arp, 0.02).index == 2


def test_the_pick_respects_order_constraints_ties_and_an_empty_budget() -> None:
    # Strengths given out of order: smoothing follows the strength, not the list order.
    picked = pick_operating_point(np.array([3.0, 1.0, 2.0]), np.array([0.018, 0.005, 0.03]), np.array([6.0, 9.0, 7.0]),
                                  0.02)  # fmt: skip
    assert picked.smoothed.tolist() == pytest.approx([0.024, 0.005, 0.024]) and picked.index == 1
    # A constraint (fairness: the dev NDCG gap not wider) removes the best point.
    allowed = np.array([True, True, False])
    strengths, losses = np.array([1.0, 2.0, 3.0]), np.array([0.001, 0.002, 0.003])
    objective = np.array([0.2, 0.1, 0.05])
    assert pick_operating_point(strengths, losses, objective, 0.02).index == 2
    assert pick_operating_point(strengths, losses, objective, 0.02, allowed).index == 1
    # Equal objectives: the weaker strength.
    assert pick_operating_point(strengths, losses, np.array([0.1, 0.1, 0.1]), 0.02).index == 0
    # Nothing fits: no operating point.
    none = pick_operating_point(strengths, np.array([0.03, 0.04, 0.05]), objective, 0.02)
    assert none.index is None and not none.eligible.any()


def test_the_anchor_at_zero_strength_takes_part_in_the_smoothing() -> None:
    """Anchored methods start from the original lists (loss 0 at strength 0): a first point with a negative dev
    loss is pooled with it. PopSteer's zero strength is not the original, so its first point stands alone."""
    strengths, losses, objective = np.array([1.0, 2.0]), np.array([-0.02, 0.01]), np.array([1.0, 0.5])
    assert pick_operating_point(strengths, losses, objective, 0.02).smoothed.tolist() == pytest.approx([-0.01, 0.01])
    unanchored = pick_operating_point(strengths, losses, objective, 0.02, anchored=False)
    assert unanchored.smoothed.tolist() == pytest.approx([-0.02, 0.01])
    # An unanchored method whose every point costs more than the budget has no operating point.
    assert pick_operating_point(strengths, np.array([0.03, 0.025]), objective, 0.02, anchored=False).index is None
