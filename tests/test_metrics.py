"""Ranking metrics against hand-computed values, and full-ranking evaluation against a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsae_core.recommenders.evaluate import evaluate, make_batch
from recsae_core.recommenders.ranking_metrics import hit_matrix, mean_metrics, ranking_metrics
from recsae_core.recommenders.train import build_model


def metrics_for(topk: list[list[int]], targets: list[set[int]], ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    hits = hit_matrix(np.array(topk), [np.array(sorted(t)) for t in targets])
    return ranking_metrics(hits, np.array([len(t) for t in targets]), ks)


def test_hit_matrix_marks_target_positions():
    hits = hit_matrix(np.array([[7, 1, 3, 5], [2, 4, 6, 8]]), [np.array([3, 7]), np.array([9])])
    assert hits.tolist() == [[True, False, True, False], [False, False, False, False]]


def test_two_targets_hit_at_ranks_1_and_3():
    # targets {3, 7}; ranking 7, 1, 3, 5, 9: hits at ranks 1 and 3.
    m = metrics_for([[7, 1, 3, 5, 9]], [{3, 7}], ks=(1, 2, 3, 5))
    dcg_1 = 1 / math.log2(2)
    dcg_3 = 1 / math.log2(2) + 1 / math.log2(4)  # = 1.5
    idcg_2 = 1 / math.log2(2) + 1 / math.log2(3)  # two targets: the ideal has them at ranks 1 and 2
    expected = {
        "hit@1": 1.0, "hit@2": 1.0, "hit@3": 1.0, "hit@5": 1.0,
        "recall@1": 1 / 2, "recall@2": 1 / 2, "recall@3": 2 / 2, "recall@5": 2 / 2,
        "precision@1": 1 / 1, "precision@2": 1 / 2, "precision@3": 2 / 3, "precision@5": 2 / 5,
        "mrr@1": 1.0, "mrr@2": 1.0, "mrr@3": 1.0, "mrr@5": 1.0,
        "ndcg@1": dcg_1 / 1.0,  # ideal DCG@1 holds min(2, 1) = 1 hit
        "ndcg@2": dcg_1 / idcg_2,
        "ndcg@3": dcg_3 / idcg_2,
        "ndcg@5": dcg_3 / idcg_2,  # ideal capped at the 2 targets, not 5
    }  # fmt: skip
    assert set(m) == set(expected)
    for name, value in expected.items():
        assert m[name][0] == pytest.approx(value, abs=1e-12), name
    assert m["ndcg@3"][0] == pytest.approx(1.5 / 1.6309297535714575)


def test_single_target_at_rank_3():
    m = metrics_for([[1, 2, 4, 5, 6]], [{4}], ks=(1, 2, 3, 5))
    assert m["hit@2"][0] == 0.0 and m["hit@3"][0] == 1.0
    assert m["mrr@2"][0] == 0.0  # first hit lies beyond k
    assert m["mrr@3"][0] == pytest.approx(1 / 3)
    assert m["mrr@5"][0] == pytest.approx(1 / 3)
    assert m["ndcg@3"][0] == pytest.approx((1 / math.log2(4)) / 1.0)  # = 0.5
    assert m["ndcg@5"][0] == pytest.approx(0.5)
    assert m["recall@3"][0] == 1.0
    assert m["precision@3"][0] == pytest.approx(1 / 3)
    assert m["precision@5"][0] == pytest.approx(1 / 5)


def test_more_targets_than_k_uses_k_ideal_hits():
    # 10 targets, ranking hits at ranks 1 and 3 only: the ideal DCG@k has k hits.
    targets = set(range(10))
    m = metrics_for([[0, 100, 1, 101, 102]], [targets], ks=(2, 3, 5))
    ideal = lambda k: sum(1 / math.log2(r + 1) for r in range(1, k + 1))  # noqa: E731
    assert m["ndcg@2"][0] == pytest.approx(1.0 / ideal(2))
    assert m["ndcg@3"][0] == pytest.approx((1.0 + 0.5) / ideal(3))
    assert m["ndcg@5"][0] == pytest.approx((1.0 + 0.5) / ideal(5))
    assert m["recall@5"][0] == pytest.approx(2 / 10)
    assert m["precision@5"][0] == pytest.approx(2 / 5)


def test_perfect_ranking_scores_one():
    m = metrics_for([[3, 7, 1, 2]], [{3, 7}], ks=(2, 4))
    for name in ("hit@2", "recall@2", "precision@2", "mrr@2", "ndcg@2", "ndcg@4", "recall@4"):
        assert m[name][0] == pytest.approx(1.0), name
    assert m["precision@4"][0] == pytest.approx(0.5)


def test_user_without_hits_scores_zero_everywhere():
    m = metrics_for([[1, 2, 3, 4, 5]], [{9, 10}], ks=(1, 5))
    assert all(values[0] == 0.0 for values in m.values())


def test_mean_over_users_and_rounding():
    m = metrics_for([[7, 1, 3, 5, 9], [1, 2, 4, 5, 6], [1, 2, 3, 4, 5]], [{3, 7}, {4}, {9}], ks=(3,))
    means = mean_metrics(m)
    assert means["hit@3"] == pytest.approx(2 / 3, abs=1e-6)
    assert means["mrr@3"] == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-6)
    assert means["ndcg@3"] == round((1.5 / (1 + 1 / math.log2(3)) + 0.5 + 0) / 3, 6)
    assert all(isinstance(v, float) and v == round(v, 6) for v in means.values())


def test_k_larger_than_ranked_list_is_refused():
    hits = hit_matrix(np.array([[1, 2, 3]]), [np.array([2])])
    with pytest.raises(ValueError, match=r"k=5 exceeds the 3 ranked items"):
        ranking_metrics(hits, np.array([1]), ks=(1, 5))


def test_users_without_targets_are_refused():
    hits = hit_matrix(np.array([[1, 2, 3], [4, 5, 6]]), [np.array([2]), np.array([], dtype=np.int64)])
    with pytest.raises(ValueError, match="at least one target"):
        ranking_metrics(hits, np.array([1, 0]), ks=(3,))


def test_user_count_mismatch_is_refused():
    hits = np.zeros((2, 3), dtype=bool)
    with pytest.raises(ValueError, match="number of users"):
        ranking_metrics(hits, np.array([1, 1, 1]), ks=(3,))


def test_evaluate_matches_bruteforce_full_ranking(ml100k, ml100k_split):
    """evaluate() masks seen items and ranks all others: compare with a plain numpy re-implementation."""
    torch.manual_seed(0)
    model = build_model("bprmf", ml100k.n_users, ml100k.n_items, ml100k_split).eval()
    split = ml100k_split
    for stage in ("valid", "test"):
        got = evaluate(model, split, stage, batch_size=300)  # several batches
        seen, targets = split.seen(stage), split.targets(stage)
        users = np.flatnonzero(targets.lengths > 0)
        with torch.no_grad():
            scores = model.score(model.represent(make_batch(model, users, seen, "cpu"))).numpy().astype(np.float64)
        ndcg, hit, recall = [], [], []
        for row, u in enumerate(users):
            s = scores[row].copy()
            s[seen.row(u)] = -np.inf
            top = np.argsort(-s, kind="stable")[:10]
            assert not np.isin(top, seen.row(u)).any()
            t = set(targets.row(u).tolist())
            gains = [1 / math.log2(r + 2) for r, item in enumerate(top) if item in t]
            ideal = sum(1 / math.log2(r + 2) for r in range(min(len(t), 10)))
            ndcg.append(sum(gains) / ideal)
            hit.append(float(bool(gains)))
            recall.append(len(gains) / len(t))
        assert got["ndcg@10"] == pytest.approx(np.mean(ndcg), abs=2e-6), stage
        assert got["hit@10"] == pytest.approx(np.mean(hit), abs=2e-6), stage
        assert got["recall@10"] == pytest.approx(np.mean(recall), abs=2e-6), stage
