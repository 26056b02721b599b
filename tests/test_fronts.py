"""Fronts at equal test loss on hand-made points: the Pareto front, interpolation along it, out-of-reach losses, the
bootstrap interval carried through, and the report's `comparison` structure."""

from __future__ import annotations

import numpy as np
import pytest

from recsae_core.debias.bootstrap import PointReplicates
from recsae_core.debias.fronts import comparison, difference, front_at, pareto_front, read_front

# (loss, ARP): lower ARP is better. (0.02, 9.5) is beaten by (0.01, 9); (0.06, 8) by (0.03, 7).
LOSSES = np.array([0.0, 0.01, 0.02, 0.03, 0.06])
ARP = np.array([10.0, 9.0, 9.5, 7.0, 8.0])
SHIFTS = np.array([-0.2, 0.0, 0.1, 0.3])
"""Each bootstrap replicate moves every value by its shift (losses unchanged)."""


def _point(loss: float, arp: float, coverage: float = 0.5, loss_shift: float = 0.0) -> PointReplicates:
    return PointReplicates(
        loss, np.full(len(SHIFTS), loss + loss_shift), {"arp@10": arp, "coverage@10": coverage},
        {"arp@10": arp + SHIFTS, "coverage@10": np.full(len(SHIFTS), coverage)},
    )  # fmt: skip


def test_pareto_front_keeps_points_unbeaten_at_lower_loss() -> None:
    assert pareto_front(LOSSES, ARP, lower=True).tolist() == [0, 1, 3]
    # Higher is better: coverage rising with loss keeps every point that rises.
    assert pareto_front(LOSSES, np.array([0.1, 0.2, 0.15, 0.3, 0.3]), lower=False).tolist() == [0, 1, 3]
    # Equal losses: only the better point; non-finite points skipped.
    assert pareto_front(np.array([0.0, 0.01, 0.01]), np.array([5.0, 4.0, 3.0]), lower=True).tolist() == [0, 2]
    assert pareto_front(np.array([0.0, np.nan]), np.array([5.0, 1.0]), lower=True).tolist() == [0]


def test_read_front_interpolates_and_stays_within_reach() -> None:
    read = read_front(LOSSES, ARP, [0.005, 0.02, 0.05, 0.06, 0.07], lower=True)
    assert read[0] == pytest.approx(9.5)  # halfway from (0, 10) to (0.01, 9)
    assert read[1] == pytest.approx(8.0)  # halfway from (0.01, 9) to (0.03, 7)
    assert read[2] == pytest.approx(7.0) and read[3] == pytest.approx(7.0)  # past the last front point: its value
    assert np.isnan(read[4])  # beyond the largest measured loss: no value


def test_front_at_carries_the_bootstrap_through() -> None:
    points = [_point(loss, arp) for loss, arp in zip(LOSSES[1:], ARP[1:], strict=True)]
    origin = _point(0.0, 10.0)
    at = front_at(points, "arp@10", [0.02, 0.05, 0.07], origin)
    assert at[0].value == pytest.approx(8.0) and at[0].replicates == pytest.approx(8.0 + SHIFTS)
    assert at[1].value == pytest.approx(7.0)
    assert at[2].value is None and "beyond reach" in at[2].reason and np.isnan(at[2].replicates).all()
    # Without the origin the front starts at the smallest swept loss: 0.005 is below reach.
    below = front_at(points, "arp@10", [0.005], None)[0]
    assert below.value is None and "below reach" in below.reason and "0.0100" in below.reason


def test_replicates_whose_sweep_falls_short_are_counted_not_filled() -> None:
    # In the replicates the largest loss is 0.06 - 0.015 = 0.045 < 0.05.
    points = [_point(loss, arp, loss_shift=-0.015 if loss == 0.06 else 0.0)
              for loss, arp in zip(LOSSES, ARP, strict=True)]  # fmt: skip
    [front] = front_at(points, "arp@10", [0.05])
    assert front.value == pytest.approx(7.0) and np.isnan(front.replicates).all()
    entry = comparison({"m": points}, ["arp@10"], losses=("0.05",))["0.05"]["m"]["arp@10"]
    assert entry["value"] == pytest.approx(7.0) and entry["ci95"] is None
    assert entry["replicates_out_of_reach"] == len(SHIFTS)


def test_comparison_structure_and_relative_change() -> None:
    origin = _point(0.0, 10.0, coverage=0.5)
    steering = [_point(0.01, 9.0, 0.6), _point(0.03, 7.0, 0.7), _point(0.06, 8.0, 0.65)]
    penalty = [_point(0.02, 9.5, 0.55), _point(0.04, 9.0, 0.6)]
    popsteer = [_point(0.028, 9.9, 0.5), _point(0.05, 9.0, 0.55)]  # its zero strength is not the original
    table = comparison({"steering": steering, "penalty": penalty, "popsteer": popsteer}, ["arp@10", "coverage@10"],
                       origin, unanchored={"popsteer"})  # fmt: skip
    assert set(table) == {"0.01", "0.02", "0.05"}
    assert set(table["0.02"]) == {"steering", "penalty", "popsteer"}
    arp = table["0.02"]["steering"]["arp@10"]
    assert arp["value"] == pytest.approx(8.0) and arp["rel_change"] == pytest.approx(-0.2)
    assert arp["ci95"][0] < 8.0 < arp["ci95"][1]
    assert table["0.02"]["steering"]["coverage@10"]["value"] == pytest.approx(0.65)  # higher is better here
    assert table["0.01"]["penalty"]["arp@10"]["value"] == pytest.approx(9.75)  # anchored at the original
    assert table["0.02"]["popsteer"]["arp@10"] == {"value": None, "ci95": None,
                                                   "reason": "below reach: the sweep's smallest test NDCG loss is "
                                                             "0.0280"}  # fmt: skip
    assert table["0.05"]["penalty"]["arp@10"]["reason"].startswith("beyond reach")
    # Paired difference at equal loss: the shifts cancel, so the interval has no width.
    a, b = (front_at(p, "arp@10", [0.02], origin)[0] for p in (steering, penalty))
    diff = difference(a, b)
    assert diff["value"] == pytest.approx(8.0 - 9.5) and diff["ci95"] == pytest.approx([-1.5, -1.5])
    with pytest.raises(KeyError, match="gini@10"):
        comparison({"steering": steering}, ["gini@10"], origin)
