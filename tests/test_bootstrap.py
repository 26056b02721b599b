"""The paired bootstrap over users: a case of known variance, reproducibility, pairing, and set-level metrics
recomputed on each resample."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recsae_core.debias.bias_metrics import list_metrics, metric_context, ndcg_at_k, popularity_metrics
from recsae_core.debias.bootstrap import (
    interval,
    mean_replicates,
    measure_point,
    rel_loss_replicates,
    resample_users,
    statistic_replicates,
    summary,
)


def test_interval_of_a_mean_matches_the_normal_theory_width() -> None:
    """Per-user values iid N(3, 2^2), n = 2000: the mean's 95% interval is about 2 * 1.96 * 2 / sqrt(2000) wide and
    holds the sample mean."""
    n, sigma = 2000, 2.0
    values = np.random.default_rng(7).normal(3.0, sigma, n)
    replicates = mean_replicates(values, resample_users(n, n_boot=2000, seed=3))
    low, high = interval(replicates, values.mean())
    expected = 2 * 1.96 * sigma / np.sqrt(n)
    assert high - low == pytest.approx(expected, rel=0.1)
    assert replicates.std() == pytest.approx(sigma / np.sqrt(n), rel=0.1)
    assert low < values.mean() < high


def test_resamples_are_seeded_and_are_draws_of_all_users() -> None:
    a, b, c = resample_users(50, 20, seed=1), resample_users(50, 20, seed=1), resample_users(50, 20, seed=2)
    assert np.array_equal(a.weights, b.weights) and not np.array_equal(a.weights, c.weights)
    assert (a.weights.sum(axis=1) == 50).all() and a.n_boot == 20
    assert np.bincount(a.indices(4), minlength=50).tolist() == a.weights[4].tolist()
    with pytest.raises(ValueError, match="at least one user"):
        resample_users(0)


def test_rel_loss_is_paired() -> None:
    """A point that loses exactly 10% NDCG for every user loses 10% on every resample: the interval has no width,
    where an unpaired bootstrap would carry the users' spread."""
    original = np.random.default_rng(0).uniform(0, 1, 500)
    resamples = resample_users(500, 300, seed=0)
    loss = rel_loss_replicates(0.9 * original, original, resamples)
    assert np.allclose(loss, 0.1)
    assert np.allclose(rel_loss_replicates(original, original, resamples), 0.0)


def test_measure_point_recomputes_set_level_metrics_per_resample() -> None:
    rng = np.random.default_rng(5)
    n_users, n_items = 60, 40
    popularity = rng.integers(0, 30, n_items)
    lists = np.stack([rng.choice(n_items, 5, replace=False) for _ in range(n_users)])
    targets = [rng.choice(n_items, 2, replace=False) for _ in range(n_users)]
    histories = [rng.choice(n_items, 6, replace=False) for _ in range(n_users)]
    group = np.arange(n_users) % 3 == 0
    scores = rng.uniform(size=n_users)
    ctx = metric_context(popularity, histories, group)
    ndcg = ndcg_at_k(lists, targets)
    original = ndcg_at_k(np.stack([rng.choice(n_items, 5, replace=False) for _ in range(n_users)]), targets)
    resamples = resample_users(n_users, 25, seed=9)
    point = measure_point(lists, ndcg, original, ctx, resamples, scores)
    assert point.values == pytest.approx(list_metrics(lists, ndcg, ctx, scores))
    assert point.loss == pytest.approx(1 - ndcg.mean() / original.mean())
    for b in (0, 7, 24):
        drawn = resamples.indices(b)
        direct = popularity_metrics(lists[drawn], popularity, ctx.head, ctx.deep, ctx.history_mix[drawn])
        for key, value in direct.items():
            assert point.replicates[key][b] == pytest.approx(value), key
        assert point.replicates["leakage_auc"][b] == pytest.approx(roc_auc_score(group[drawn], scores[drawn]))
        assert point.loss_replicates[b] == pytest.approx(1 - ndcg[drawn].mean() / original[drawn].mean())
    # The generic path agrees with the weighted one on a set-level metric.
    coverage = statistic_replicates(lambda idx: popularity_metrics(lists[idx], popularity)["coverage@5"], resamples)
    assert coverage == pytest.approx(point.replicates["coverage@5"])
    with pytest.raises(ValueError, match="resamples are of 60 users"):
        measure_point(lists[:10], ndcg[:10], original[:10], ctx, resamples, scores[:10])


def test_set_level_interval_is_centred_on_the_estimate() -> None:
    """Coverage of 400 users' lists: a resample with replacement holds ~63% distinct users, so every replicate's
    coverage lies below the estimate and a plain percentile interval would miss it; the re-centred interval holds it
    and keeps the replicates' spread."""
    rng = np.random.default_rng(2)
    n_users, n_items = 400, 3000
    lists = rng.integers(0, n_items, (n_users, 10))
    popularity = rng.integers(1, 50, n_items)
    estimate = popularity_metrics(lists, popularity)["coverage@10"]
    resamples = resample_users(n_users, 500, seed=4)
    replicates = statistic_replicates(lambda idx: popularity_metrics(lists[idx], popularity)["coverage@10"], resamples)
    assert replicates.max() < estimate  # the artefact the re-centring removes
    low, high = interval(replicates, estimate)
    assert low < estimate < high
    spread = np.percentile(replicates, [2.5, 97.5])
    assert high - low == pytest.approx(spread[1] - spread[0])
    assert interval(replicates, float("nan")) is None


def test_summary_form() -> None:
    s = summary(1.23456789, np.array([1.0, 2.0, np.nan, 3.0]))
    assert s["value"] == 1.234568 and len(s["ci95"]) == 2 and s["ci95"][0] < s["ci95"][1]
    assert summary(1.0, np.array([np.nan]))["ci95"] is None
