"""Re-ranking baselines on tiny hand-checkable cases: penalty shapes and their common scale, calibrated popularity
re-ranking, xQuAD's fallback when candidates run out, and equal-length sweep grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsae_core.common.errors import ConfigError
from recsae_core.debias.calibration import HEAD, MID, TAIL
from recsae_core.debias.rerank import calibrated_popularity, penalty_scale, popularity_penalty, xquad
from recsae_core.debias.sweeps import SWEEP_RANGES, sweep_grid


def test_penalty_shapes_hand_computed() -> None:
    popularity = np.array([100.0, 25.0, 0.0])
    scores = torch.tensor([[1.0, 0.9, 0.45]])
    # linear, lam 0.006: 1 - 0.6 = 0.4, 0.9 - 0.15 = 0.75, 0.45 -> item 1 first, then item 2.
    assert popularity_penalty(scores, popularity, 0.006, 2, shape="linear").tolist() == [[1, 2]]
    # sqrt, lam 0.06: 1 - 0.6 = 0.4, 0.9 - 0.3 = 0.6, 0.45 -> 1, 2.
    assert popularity_penalty(scores, popularity, 0.06, 2, shape="sqrt").tolist() == [[1, 2]]
    # log, lam 0.06: 1 - 0.277 = 0.723, 0.9 - 0.195 = 0.705, 0.45 -> 0, 1 (the log barely separates 25 from 100).
    assert popularity_penalty(scores, popularity, 0.06, 2, shape="log").tolist() == [[0, 1]]
    assert popularity_penalty(scores, popularity, 0.06, 2).tolist() == [[0, 1]]  # log is the default
    with pytest.raises(ValueError, match="unknown penalty shape 'cube'"):
        popularity_penalty(scores, popularity, 1.0, 2, shape="cube")


def test_penalty_scale_puts_every_shape_on_the_score_spread() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [-torch.inf, 0.0, 2.0]])
    popularity = np.array([0.0, 10.0, 40.0])
    spread = (np.std([1.0, 2.0, 3.0]) + np.std([0.0, 2.0])) / 2  # masked items left out
    assert penalty_scale(scores, popularity, "linear") == pytest.approx(spread / 40)
    assert penalty_scale(scores, popularity, "sqrt") == pytest.approx(spread / np.sqrt(40))
    assert penalty_scale(scores, popularity, "log") == pytest.approx(spread / np.log1p(40))
    assert penalty_scale(scores, np.zeros(3), "linear") == 0.0


def test_calibrated_popularity_hand_computed() -> None:
    """Items 0 head, 1 mid, 2 and 3 tail; normalised relevance 1, 2/3, 1/3, 0; the user's history is all tail.
    lam 0.5, first pick: head or mid item -> JS 1 bit, tail -> 0: values 0, -1/6, 1/6, 0 -> item 2.
    Second: a head item makes the list (1/2, 0, 1/2): JS 0.311; values 0.344 (item 0), 0.178 (1), 0 (3) -> item 0."""
    groups = np.array([HEAD, MID, TAIL, TAIL])
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    all_tail = np.array([[0.0, 0.0, 1.0]])
    assert calibrated_popularity(scores, groups, all_tail, 0.0, 3, n_candidates=4).tolist() == [[0, 1, 2]]
    assert calibrated_popularity(scores, groups, all_tail, 0.5, 2, n_candidates=4).tolist() == [[2, 0]]
    assert calibrated_popularity(scores, groups, all_tail, 1.0, 2, n_candidates=4).tolist() == [[2, 3]]
    # A user whose history matches the original list's mix keeps the original list at any lam.
    mixed = np.array([[1 / 3, 1 / 3, 1 / 3]])
    assert calibrated_popularity(scores, groups, mixed, 0.3, 3, n_candidates=4).tolist() == [[0, 1, 2]]
    # No history (NaN mix): relevance only.
    assert calibrated_popularity(scores, groups, np.full((1, 3), np.nan), 0.9, 2, n_candidates=4).tolist() == [[0, 1]]


def test_rerankers_fall_back_to_masked_items_without_repeating() -> None:
    scores = torch.tensor([[3.0, -torch.inf, 1.0, -torch.inf]])
    head = np.array([True, False, False, False])
    picked = xquad(scores, head, np.array([0.5]), 0.5, 3, n_candidates=4)
    assert picked[0, :2].tolist() == [0, 2] and len(set(picked[0].tolist())) == 3
    groups = np.array([HEAD, MID, TAIL, TAIL])
    cp = calibrated_popularity(scores, groups, np.array([[0.5, 0.0, 0.5]]), 0.5, 3, n_candidates=4)
    assert sorted(cp[0, :2].tolist()) == [0, 2] and len(set(cp[0].tolist())) == 3


def test_sweep_grids_have_equal_length() -> None:
    for method in SWEEP_RANGES:
        grid = sweep_grid(method, 12)
        assert len(grid) == 12 and np.all(np.diff(grid) > 0), method
        known = SWEEP_RANGES[method]
        assert grid[0] == pytest.approx(known.low) and grid[-1] == pytest.approx(known.high)
    assert sweep_grid("xquad", 3, low=0.1, high=0.4, spacing="linear").tolist() == pytest.approx([0.1, 0.25, 0.4])
    assert sweep_grid("unlisted", 3, low=0.5, high=2.0).tolist() == pytest.approx([0.5, 1.0, 2.0])  # geometric
    with pytest.raises(ConfigError, match="no sweep range known for method 'unlisted'"):
        sweep_grid("unlisted", 8)
    with pytest.raises(ConfigError, match="at least one point"):
        sweep_grid("xquad", 0)
    with pytest.raises(ConfigError, match="needs low > 0"):
        sweep_grid("popsteer", 4, spacing="geometric")
