"""Bias metrics and re-ranking baselines on hand-computed lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsae_core.debias.bias_metrics import (
    bag_of_items,
    gini,
    head_mask,
    leakage_auc,
    ndcg_at_k,
    ndcg_gap,
    popularity_metrics,
)
from recsae_core.debias.rerank import cohens_d, popsteer_weights, popularity_penalty, xquad


def test_head_is_the_smallest_popular_set_holding_20_percent() -> None:
    assert head_mask(np.array([50, 30, 10, 5, 5])).tolist() == [True, False, False, False, False]
    # 20% of 100 = 20: 15 alone is not enough, 15 + 10 is; ties broken by item index.
    assert head_mask(np.array([10, 15, 10, 65])).tolist() == [False, False, False, True]
    assert head_mask(np.array([10, 10, 10, 10, 10, 10, 10, 10, 10, 10])).tolist() == [True, True] + [False] * 8
    assert not head_mask(np.zeros(3)).any()


def test_gini_hand_values() -> None:
    assert gini(np.array([3, 3, 3, 3])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 8])) == pytest.approx(0.75)  # (n - 1) / n
    assert gini(np.array([0, 1, 1, 1, 1])) == pytest.approx(0.2)  # sum((2i - n - 1) x) / (n sum x) = 4 / 20
    assert gini(np.zeros(4)) == 0.0


def test_popularity_metrics_hand_computed() -> None:
    popularity = np.array([10, 6, 2, 2, 0])  # total 20; head = item 0 (10 >= 4)
    lists = np.array([[0, 1], [2, 3]])
    m = popularity_metrics(lists, popularity)
    assert m["arp@2"] == pytest.approx((8 + 2) / 2)
    assert m["tail_share@2"] == pytest.approx(3 / 4)
    assert m["gini@2"] == pytest.approx(0.2)  # exposure [1, 1, 1, 1, 0] over ALL items
    assert m["coverage@2"] == pytest.approx(4 / 5)


def test_ndcg_and_gap_hand_computed() -> None:
    topk = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    ndcg = ndcg_at_k(topk, [np.array([2]), np.array([9]), np.array([7, 8])])
    assert ndcg.tolist() == pytest.approx([1 / np.log2(3), 0.0, 1.0])
    female = np.array([True, False, False])
    assert ndcg_gap(ndcg, female) == pytest.approx(abs(1 / np.log2(3) - 0.5))


def test_bag_of_items_is_binary() -> None:
    bag = bag_of_items([np.array([0, 2, 2]), np.array([], dtype=np.int64), np.array([1])], 3)
    assert bag.toarray().tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]


def test_leakage_auc_separable_and_random() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2 == 0
    separable = np.where(labels[:, None], rng.integers(0, 50, (200, 10)), rng.integers(50, 100, (200, 10)))
    assert leakage_auc(separable, labels, 100) > 0.95
    random_lists = rng.integers(0, 100, (200, 10))
    assert abs(leakage_auc(random_lists, labels, 100) - 0.5) < 0.15
    assert leakage_auc(random_lists, labels, 100) == leakage_auc(random_lists, labels, 100)  # fixed seed


def test_popularity_penalty_and_xquad() -> None:
    popularity = np.array([100.0, 50.0, 1.0, 1.0])
    scores = torch.tensor([[3.0, 2.0, 1.0, -torch.inf]])
    assert popularity_penalty(scores, popularity, 0.0, 2).tolist() == [[0, 1]]
    assert popularity_penalty(scores, popularity, 2.0, 2)[0, 0] == 2  # the tail item wins under a strong penalty
    head = head_mask(popularity)  # item 0 only
    assert xquad(scores, head, np.array([0.5]), 0.0, 3, n_candidates=4).tolist() == [[0, 1, 2]]
    # lam=1: only coverage counts; a user whose history is all tail gets a tail item first; masked items never come.
    picked = xquad(scores, head, np.array([1.0]), 1.0, 3, n_candidates=4)
    assert picked[0, 0] == 1 and 3 not in picked[0]
    # Head = items 0 and 1, balanced user: once a head item is in, the tail's coverage bonus lifts item 2 over item 1.
    head2 = np.array([True, True, False, False])
    assert xquad(scores, head2, np.array([0.5]), 0.6, 2, n_candidates=4).tolist() == [[0, 2]]


def test_cohens_d_and_popsteer_weights() -> None:
    a = np.array([[1.0, 0.0], [3.0, 0.0]])
    b = np.array([[0.0, 0.0], [2.0, 0.0]])
    d = cohens_d(a, b)
    assert d[0] == pytest.approx(1 / np.sqrt(2)) and d[1] == 0.0
    latents, weights = popsteer_weights(np.array([0.1, -2.0, 1.0]), 1.5, 2)
    assert latents.tolist() == [1, 2] and weights.tolist() == pytest.approx([1.5, 0.0])
