"""The issue-16 bias metrics on hand-computed lists: item groups, long-tail and deep-long-tail coverage, set-ARP,
popularity miscalibration, and the fairness metrics under user weights (the bootstrap's form)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recsae_core.debias.bias_metrics import (
    deep_tail_mask,
    fairness_replicates,
    head_mask,
    leakage_auc,
    leakage_scores,
    list_metrics,
    lower_is_better,
    metric_context,
    ndcg_at_k,
    popularity_metrics,
    popularity_replicates,
    weighted_auc,
)
from recsae_core.debias.calibration import HEAD, MID, TAIL, group_mix, jensen_shannon, popularity_groups

# Training counts: total 20, so the head holds >= 4 and the deep tail <= 4 interactions.
POPULARITY = np.array([10, 6, 2, 2, 0])


def test_deep_tail_is_the_longest_unpopular_set_holding_at_most_20_percent() -> None:
    # From the least popular: 0 (item 4), 2 (item 3), 4 (item 2) <= 4; adding item 1 (6) would pass it.
    assert deep_tail_mask(POPULARITY).tolist() == [False, False, True, True, True]
    # Exactly 20 of 100 is in; items nobody interacted with are in.
    assert deep_tail_mask(np.array([50, 30, 10, 5, 5])).tolist() == [False, False, True, True, True]
    assert deep_tail_mask(np.array([0, 0, 10])).tolist() == [True, True, False]
    assert not deep_tail_mask(np.zeros(3)).any()
    groups = popularity_groups(head_mask(POPULARITY), deep_tail_mask(POPULARITY))
    assert groups.tolist() == [HEAD, MID, TAIL, TAIL, TAIL]


def test_new_popularity_metrics_hand_computed() -> None:
    lists = np.array([[0, 1], [2, 3]])
    histories = [np.array([0, 2]), np.array([2, 3, 4])]
    ctx = metric_context(POPULARITY, histories)
    m = popularity_metrics(lists, POPULARITY, ctx.head, ctx.deep, ctx.history_mix)
    assert m["tail_coverage@2"] == pytest.approx(3 / 4)  # non-head items 1, 2, 3, 4; 1, 2, 3 shown
    assert m["deep_tail_coverage@2"] == pytest.approx(2 / 3)  # deep tail 2, 3, 4; 2, 3 shown
    assert m["set_arp@2"] == pytest.approx((10 + 6 + 2 + 2) / 4)  # distinct items shown, once each
    assert m["arp@2"] == pytest.approx((8 + 2) / 2)  # per-list ARP as before
    # User 0: history (1/2, 0, 1/2) against list (1/2, 1/2, 0): JS = 0.5 bit. User 1: all tail in both: 0.
    assert m["miscalibration@2"] == pytest.approx(0.25)
    assert "miscalibration@2" not in popularity_metrics(lists, POPULARITY)  # no histories, no miscalibration


def test_set_arp_counts_an_item_once_however_often_it_is_shown() -> None:
    lists = np.array([[0, 1], [0, 1], [0, 4]])
    m = popularity_metrics(lists, POPULARITY)
    assert m["set_arp@2"] == pytest.approx((10 + 6 + 0) / 3)
    assert m["arp@2"] == pytest.approx((8 + 8 + 5) / 3)


def test_jensen_shannon_and_group_mix() -> None:
    assert jensen_shannon(np.array([[0.0, 0, 1]]), np.array([[1.0, 0, 0]])).tolist() == pytest.approx([1.0])
    assert jensen_shannon(np.array([[0.5, 0, 0.5]]), np.array([[0.5, 0.5, 0]])).tolist() == pytest.approx([0.5])
    assert jensen_shannon(np.array([[0.2, 0.3, 0.5]]), np.array([[0.2, 0.3, 0.5]])).tolist() == pytest.approx([0.0])
    labels = np.array([HEAD, MID, TAIL, TAIL])
    mix = group_mix([np.array([0, 2, 3, 3]), np.array([], dtype=np.int64)], labels)
    assert mix[0].tolist() == pytest.approx([0.25, 0.0, 0.75]) and np.isnan(mix[1]).all()
    # A user without history is left out of the miscalibration mean.
    ctx = metric_context(POPULARITY, [np.array([0, 2]), np.array([], dtype=np.int64)])
    m = popularity_metrics(np.array([[0, 1], [2, 3]]), POPULARITY, ctx.head, ctx.deep, ctx.history_mix)
    assert m["miscalibration@2"] == pytest.approx(0.5)


def test_weighted_auc_is_roc_auc_and_follows_the_weights() -> None:
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.1, 0.8])  # pairs: 1, 1, 1 and a tie (1/2) -> 3.5 / 4
    assert weighted_auc(labels, scores, np.ones((1, 4)))[0] == pytest.approx(0.875)
    assert weighted_auc(labels, scores, np.array([[2.0, 1, 1, 0]]))[0] == pytest.approx(1.0)  # the tie drawn 0 times
    assert np.isnan(weighted_auc(labels, scores, np.array([[1.0, 1, 0, 0]]))[0])  # one class only
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 300), rng.integers(0, 20, 300) / 20  # many ties
    assert weighted_auc(y, s, np.ones((1, 300)))[0] == pytest.approx(roc_auc_score(y, s))


def test_fairness_metrics_hand_computed() -> None:
    ndcg = np.array([1.0, 0.5, 0.25, 0.25])
    group = np.array([True, True, False, False])
    scores = np.array([0.9, 0.8, 0.1, 0.8])
    m = {k: float(v[0]) for k, v in fairness_replicates(ndcg, group, np.ones((1, 4)), scores, scores).items()}
    assert m["group_ndcg@10"] == pytest.approx(0.75) and m["rest_ndcg@10"] == pytest.approx(0.25)
    assert m["ndcg_gap"] == pytest.approx(0.5) and m["ndcg_gap_signed"] == pytest.approx(0.5)
    assert m["leakage_auc"] == pytest.approx(0.875) and m["leakage_distance"] == pytest.approx(0.375)
    assert m["history_leakage_auc"] == pytest.approx(0.875)
    flipped = fairness_replicates(ndcg, ~group, np.ones((1, 4)), 1 - scores)
    assert float(flipped["ndcg_gap_signed"][0]) == pytest.approx(-0.5)  # signed: group minus rest


def test_leakage_auc_is_the_auc_of_the_out_of_fold_scores() -> None:
    rng = np.random.default_rng(1)
    labels = np.arange(120) % 2 == 0
    lists = np.where(labels[:, None], rng.integers(0, 30, (120, 5)), rng.integers(20, 50, (120, 5)))
    scores = leakage_scores(lists, labels, 50)
    assert leakage_auc(lists, labels, 50) == pytest.approx(roc_auc_score(labels, scores))


def test_list_metrics_gathers_every_key_of_a_stage() -> None:
    lists = np.array([[0, 1], [2, 3], [1, 4], [0, 2]])
    targets = [np.array([1]), np.array([4]), np.array([1]), np.array([3])]
    ndcg = ndcg_at_k(lists, targets)
    group = np.array([True, False, True, False])
    histories = [np.array([0]), np.array([2, 3]), np.array([1]), np.array([4])]
    ctx = metric_context(POPULARITY, histories, group, history_scores=np.array([0.7, 0.2, 0.6, 0.4]))
    m = list_metrics(lists, ndcg, ctx, list_scores=np.array([0.6, 0.3, 0.9, 0.5]))
    assert m["ndcg@2"] == pytest.approx(ndcg.mean())
    for key in ("arp@2", "tail_share@2", "gini@2", "coverage@2", "tail_coverage@2", "deep_tail_coverage@2",
                "set_arp@2", "miscalibration@2", "leakage_auc", "leakage_distance", "history_leakage_auc",
                "ndcg_gap", "ndcg_gap_signed", "group_ndcg@2", "rest_ndcg@2"):  # fmt: skip
        assert key in m, key
    assert m["leakage_auc"] == 1.0 and m["history_leakage_auc"] == 1.0
    with pytest.raises(ValueError, match="leakage scores"):
        list_metrics(lists, ndcg, ctx)


def test_replicates_recompute_set_level_metrics_on_the_drawn_users() -> None:
    """A weight row of multiplicities gives exactly the metrics of the lists drawn with repetition."""
    rng = np.random.default_rng(2)
    popularity = rng.integers(0, 50, 40)
    lists = np.stack([rng.choice(40, 5, replace=False) for _ in range(30)])
    histories = [rng.choice(40, 8, replace=False) for _ in range(30)]
    ctx = metric_context(popularity, histories)
    draw = rng.integers(0, 30, 30)
    weights = np.bincount(draw, minlength=30)[None, :].astype(float)
    replicates = popularity_replicates(lists, popularity, weights, ctx.head, ctx.deep, ctx.history_mix)
    weighted = {k: float(v[0]) for k, v in replicates.items()}
    direct = popularity_metrics(lists[draw], popularity, ctx.head, ctx.deep, ctx.history_mix[draw])
    assert weighted == pytest.approx(direct)


def test_metric_directions() -> None:
    assert lower_is_better("arp@10") and lower_is_better("miscalibration@10") and lower_is_better("set_arp@10")
    assert not lower_is_better("deep_tail_coverage@10") and not lower_is_better("tail_coverage@10")
    assert lower_is_better("leakage_distance") and lower_is_better("ndcg_gap")
    with pytest.raises(KeyError, match="leakage_auc"):
        lower_is_better("leakage_auc")
