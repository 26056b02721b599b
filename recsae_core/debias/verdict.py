"""What the report concludes from the measured sweeps: every method's front read at equal test NDCG loss with its
bootstrap band (for the plots), and the verdict on the issue's figures: for popularity, the steering front against the
best re-ranker front at 2% and 5% loss; for fairness targets, the steering operating point against the original."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from recsae_core.debias.bias_metrics import lower_is_better
from recsae_core.debias.bootstrap import PointReplicates, interval, summary
from recsae_core.debias.fronts import FrontValue, describe, difference, front_at
from recsae_core.debias.methods import RERANKERS
from recsae_core.debias.screen import K

POPULARITY_METRICS = (f"arp@{K}", f"tail_share@{K}", f"gini@{K}", f"coverage@{K}", f"tail_coverage@{K}",
                      f"deep_tail_coverage@{K}", f"set_arp@{K}", f"miscalibration@{K}")  # fmt: skip
"""Bias metrics of the popularity target, compared along the fronts."""
FAIRNESS_METRICS = ("leakage_distance", "ndcg_gap")
"""Bias metrics of gender and user-attribute targets."""
VERDICT_LOSSES = ("0.02", "0.05")
"""Test NDCG losses at which steering must beat the best re-ranker."""
VERDICT_METRICS = (f"arp@{K}", f"miscalibration@{K}")
"""Metrics on which it must beat it."""
DEEP_TAIL_GOAL = 0.40
"""Deep-long-tail coverage gain the issue asks of steering at <= 2% loss."""
LEAKAGE_GOAL = -0.50
"""Leakage-distance change the issue asks of steering at <= 2% loss (at least halved), gap not wider."""


def bands(
    methods: Mapping[str, Sequence[PointReplicates]], metrics: Sequence[str], origin: PointReplicates,
    unanchored: Collection[str], upper: float, n: int = 41,
) -> dict[str, Any]:  # fmt: skip
    """Each method's front of each metric read on a grid of test losses in [0, upper], with its 95% band
    ({"loss": grid, "methods": {method: {metric: {"value", "low", "high"}}}}; None out of reach)."""
    grid = np.linspace(0.0, upper, n)
    out: dict[str, dict[str, dict[str, list]]] = {}
    for method, points in methods.items():
        anchor = None if method in unanchored else origin
        for metric in metrics:
            read = front_at(points, metric, grid, anchor)
            cis = [interval(f.replicates, f.value) if f.value is not None else None for f in read]
            out.setdefault(method, {})[metric] = {
                "value": [None if f.value is None else round(f.value, 6) for f in read],
                "low": [None if ci is None else round(ci[0], 6) for ci in cis],
                "high": [None if ci is None else round(ci[1], 6) for ci in cis],
            }
    return {"loss": [round(float(x), 6) for x in grid], "methods": out}


def _better(diff: dict[str, Any], lower: bool) -> tuple[bool | None, bool | None]:
    """(steering better, better by more than the interval) from a steering - re-ranker difference."""
    if diff["value"] is None:
        return None, None
    ci = diff["ci95"]
    if lower:
        return bool(diff["value"] < 0), None if ci is None else bool(ci[1] < 0)
    return bool(diff["value"] > 0), None if ci is None else bool(ci[0] > 0)


def popularity_verdict(
    methods: Mapping[str, Sequence[PointReplicates]], steering: str | None, origin: PointReplicates,
    unanchored: Collection[str],
) -> dict[str, Any]:  # fmt: skip
    """At 2% and 5% test loss: the steering front against the best re-ranker front (the re-ranker with the best value
    at that loss, read on test: the comparison favours the re-rankers) on per-list ARP and miscalibration, with the
    paired difference's interval; and the deep-long-tail coverage change of steering at 2%."""
    if steering is None:
        return {"steering": None, "reason": "no steering family has an operating point within the budget on dev"}
    at = [float(loss) for loss in VERDICT_LOSSES]
    anchor = None if steering in unanchored else origin
    out: dict[str, Any] = {"steering": steering, "rerankers": [m for m in RERANKERS if m in methods], "at": {}}
    for metric in VERDICT_METRICS:
        lower = lower_is_better(metric)
        mine = front_at(methods[steering], metric, at, anchor)
        theirs = {name: front_at(methods[name], metric, at, origin) for name in out["rerankers"]}
        for j, loss in enumerate(VERDICT_LOSSES):
            reached = {name: fronts[j] for name, fronts in theirs.items() if fronts[j].value is not None}
            best = min(reached, key=lambda n: (1 if lower else -1) * reached[n].value, default=None)  # type: ignore[operator]
            other = reached[best] if best is not None else FrontValue(None, np.zeros(0), "no re-ranker reaches it")
            diff = difference(mine[j], other)
            better, beyond = _better(diff, lower)
            out["at"].setdefault(loss, {})[metric] = {
                "steering": describe(mine[j], origin.values[metric], origin.replicates[metric]),
                "best_reranker": best,
                "reranker": describe(other, origin.values[metric], origin.replicates[metric]),
                "difference": diff, "steering_better": better, "better_beyond_interval": beyond,
            }  # fmt: skip
    deep = f"deep_tail_coverage@{K}"
    front = front_at(methods[steering], deep, [0.02], anchor)[0]
    change = describe(front, origin.values[deep], origin.replicates[deep])
    out["deep_tail_coverage_at_0.02"] = {**change, "goal": DEEP_TAIL_GOAL,
                                         "met": change.get("rel_change", -np.inf) >= DEEP_TAIL_GOAL}  # fmt: skip
    out["met"] = bool(
        all(v["better_beyond_interval"] for loss in out["at"].values() for v in loss.values())
        and out["deep_tail_coverage_at_0.02"]["met"]
    )
    return out


def fairness_verdict(
    steering: str | None, point: PointReplicates | None, strength: float | None, origin: PointReplicates,
    methods: Mapping[str, Sequence[PointReplicates]], unanchored: Collection[str],
) -> dict[str, Any]:  # fmt: skip
    """At the steering operating point (test): the leakage distance's change, the NDCG gap against the original's
    (paired difference), each group's NDCG and the NDCG loss; and the steering front's leakage change at 2% loss."""
    if steering is None or point is None:
        return {"steering": None, "reason": "no steering family has an operating point within the budget on dev "
                "with the dev NDCG gap no wider than the original's"}  # fmt: skip
    k = f"@{K}"
    with np.errstate(invalid="ignore", divide="ignore"):
        change_reps = point.replicates["leakage_distance"] / origin.replicates["leakage_distance"] - 1
    base = origin.values["leakage_distance"]
    change = summary(point.values["leakage_distance"] / base - 1 if base else np.nan, change_reps)
    gap = summary(point.values["ndcg_gap"] - origin.values["ndcg_gap"],
                  point.replicates["ndcg_gap"] - origin.replicates["ndcg_gap"])  # fmt: skip
    anchor = None if steering in unanchored else origin
    front = front_at(methods[steering], "leakage_distance", [0.02], anchor)[0]
    loss = summary(point.loss, point.loss_replicates)
    met = bool(change["value"] <= LEAKAGE_GOAL and point.loss <= 0.02 and gap["value"] <= 1e-12)
    return {
        "steering": steering, "strength": strength, "ndcg_rel_loss": loss,
        "leakage_auc": {"original": round(origin.values["leakage_auc"], 6),
                        "steered": summary(point.values["leakage_auc"], point.replicates["leakage_auc"])},
        "leakage_distance_change": change,
        "ndcg_gap": {"original": round(origin.values["ndcg_gap"], 6),
                     "steered": summary(point.values["ndcg_gap"], point.replicates["ndcg_gap"]), "change": gap},
        "group_ndcg": {side: {"original": round(origin.values[f"{side}_ndcg{k}"], 6),
                              "steered": summary(point.values[f"{side}_ndcg{k}"], point.replicates[f"{side}_ndcg{k}"])}
                       for side in ("group", "rest")},
        "leakage_distance_at_0.02": describe(front, base, origin.replicates["leakage_distance"]),
        "goal": {"leakage_distance_change": LEAKAGE_GOAL, "ndcg_rel_loss": 0.02, "ndcg_gap": "not wider"},
        "met": met,
    }  # fmt: skip
