"""Measuring sweep points on a stage: every metric on all users and, with the stage's one set of bootstrap resamples
(shared by every method and point, so comparisons are paired), on each resample."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from recsae_core.debias.bias_metrics import leakage_scores, ndcg_at_k
from recsae_core.debias.bootstrap import PointReplicates, Resamples, measure_point, resample_users, summary
from recsae_core.debias.methods import Method
from recsae_core.debias.screen import Evaluator


class StageMeasure:
    """A stage's evaluator with its metric context (history leakage scores included), resamples and original lists."""

    def __init__(self, ev: Evaluator, n_boot: int, seed: int = 0) -> None:
        self.ev = ev
        n_users = len(ev.data.users)
        group = ev.data.group
        self.n_items = ev.ctx.split.n_items
        history = None if group is None else leakage_scores([ev.seen.row(u) for u in ev.data.users], group,
                                                             self.n_items)  # fmt: skip
        self.context = ev.context._replace(history_scores=history)
        """Item groups, history mixes, the group and its history leakage scores."""
        self.resamples = resample_users(n_users, n_boot, seed) if n_boot else Resamples(np.zeros((0, n_users)), seed)
        """The stage's bootstrap resamples (none when n_boot is 0: values without intervals)."""
        self._none = Resamples(np.zeros((0, n_users)), seed)
        topk = ev.data.scores.topk(10, dim=1).indices.numpy()
        self.original_ndcg = ndcg_at_k(topk, ev.data.targets)
        self.original = self.measure(topk)
        """The original lists, measured with replicates."""

    def measure(self, topk: np.ndarray, replicates: bool = True) -> PointReplicates:
        """A point's lists: every metric and its NDCG loss against the original, on all users (and each resample)."""
        ndcg = ndcg_at_k(topk, self.ev.data.targets)
        group = self.ev.data.group
        scores = None if group is None else leakage_scores(topk, group, self.n_items)
        resamples = self.resamples if replicates else self._none
        return measure_point(topk, ndcg, self.original_ndcg, self.context, resamples, scores)


class SweepStages(NamedTuple):
    """What measuring a sweep point needs, the same for every point (shipped once to each actor of a Ray map)."""

    methods: list[Method]
    """The fitted methods."""
    dev: StageMeasure
    """The validation stage."""
    test: StageMeasure
    """The test stage, with its resamples."""


def sweep_point(stages: SweepStages, point: tuple[int, float]) -> tuple[PointReplicates, PointReplicates]:
    """Method `point[0]` at strength `point[1]`: its lists measured on dev without resamples (selection reads the
    values alone) and on test with them. A point reads only the fitted method and the two stages, and changes none of
    them, so the points may be measured in any order, anywhere (`common.ray_map.item_map`)."""
    method, strength = stages.methods[point[0]], point[1]
    dev = stages.dev.measure(method.lists(stages.dev.ev, strength), replicates=False)
    return dev, stages.test.measure(method.lists(stages.test.ev, strength))


def values(point: PointReplicates) -> dict[str, float]:
    """A point's metrics on all users, rounded as the report writes them."""
    return {name: round(v, 6) for name, v in point.values.items()}


def with_intervals(point: PointReplicates, original: PointReplicates | None = None) -> dict[str, Any]:
    """A point's metrics and NDCG loss as {"value", "ci95"} (no interval without resamples); with `original`, each
    metric's relative change against it, paired on the same resamples."""
    metrics = {k: summary(v, point.replicates[k]) for k, v in point.values.items()}
    out: dict[str, Any] = {"ndcg_rel_loss": summary(point.loss, point.loss_replicates), "metrics": metrics}
    if original is not None:
        change = {}
        for name, value in point.values.items():
            base = original.values[name]
            if base == 0 or not np.isfinite(base):
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                reps = point.replicates[name] / original.replicates[name] - 1
            change[name] = summary(value / base - 1, reps)
        out["rel_change"] = change
    return out
