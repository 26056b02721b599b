"""Exact top-k over item blocks (recsae_core.recommenders.ranking) against a full stable sort: a synthetic catalogue
of a million items (float32, d = 64) with seen items masked and ties at the cut, its memory bounded by a block, and
a catalogue of one block scored by the very product the unblocked engine computed. Serving through the engine is
checked in test_service_engine.py (pass-through equals the original model's stable sort)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from recsae_core.recommenders.ranking import BLOCK_ITEMS, ItemScorer, Masked, count_above, top_k

N_ITEMS, D, USERS, K = 1_000_000, 64, 6, 200


def stable_top(scores: np.ndarray, k: int) -> np.ndarray:
    """The reference: a full stable sort of each row (score descending, then index ascending)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def seen_items(rng: np.random.Generator, scores: np.ndarray) -> Masked:
    """Per user: 300 random items, items on both sides of every block edge, and half of the items tied at its 50th
    best score (so the cut falls inside a run of ties that masking has thinned)."""
    rows, items = [], []
    edges = np.arange(BLOCK_ITEMS, N_ITEMS, BLOCK_ITEMS)
    for r, row in enumerate(scores):
        tied = np.flatnonzero(row == row[stable_top(row[None], 50)[0, -1]])
        chosen = np.unique(np.concatenate([rng.integers(0, N_ITEMS, 300), edges - 1, edges, tied[::2]]))
        rows.append(np.full(len(chosen), r))
        items.append(chosen)
    return Masked(np.concatenate(rows), np.concatenate(items))


def masked_copy(scores: np.ndarray, masked: Masked) -> np.ndarray:
    out = scores.copy()
    out[masked.rows, masked.items] = -np.inf
    return out


@pytest.fixture(scope="module")
def integer_catalogue() -> tuple[ItemScorer, np.ndarray, np.ndarray]:
    """Small integers in float32: every score is an exact integer whatever the summation order, so the full
    product is the reference bit for bit, and many items share each score (ties everywhere, a dozen or more even
    among the best few hundred)."""
    rng = np.random.default_rng(7)
    emb_t = np.ascontiguousarray(rng.integers(-4, 5, (D, N_ITEMS)).astype(np.float32))
    bias = rng.integers(-3, 4, N_ITEMS).astype(np.float32)
    h = rng.integers(-4, 5, (USERS, D)).astype(np.float32)
    return ItemScorer(emb_t, bias), h, h @ emb_t + bias


def test_million_items_equal_a_full_stable_sort_with_ties_and_masks(integer_catalogue) -> None:
    scorer, h, full = integer_catalogue
    masked = seen_items(np.random.default_rng(1), full)
    reference = masked_copy(full, masked)
    expected = stable_top(reference, K)
    for row, top in zip(reference, expected, strict=True):  # in every row the cut splits a run of tied items
        cut = row[top[-1]]
        assert (row == cut).sum() > (row[top] == cut).sum() > 0
    got = top_k(scorer, h, K, masked)
    np.testing.assert_array_equal(got.items, expected)
    np.testing.assert_array_equal(got.scores, np.take_along_axis(reference, expected, axis=1))
    assert not np.isin(got.items[0], masked.items[masked.rows == 0]).any()
    # A row's k only cuts its prefix, as the engine serves a batch of mixed k.
    np.testing.assert_array_equal(top_k(scorer, h[:2], 10, masked.take([0, 1])).items, expected[:2, :10])


def test_million_items_original_ranks_are_exact(integer_catalogue) -> None:
    """count_above: for served items and for items deep in the catalogue, the number of items scoring strictly
    higher (ties share a rank, masked items never count), as the full row says."""
    scorer, h, full = integer_catalogue
    rng = np.random.default_rng(2)
    masked = seen_items(rng, full)
    reference = masked_copy(full, masked)
    lists = [stable_top(reference, 20)[0], rng.integers(0, N_ITEMS, 25), np.zeros(0, np.int64), np.array([999_999])]
    sample = [0, 3, 4, 5]
    counts = count_above(scorer, h[sample], lists, masked.take(sample))
    for r, listed, got in zip(sample, lists, counts, strict=True):
        expected = (reference[r][None, :] > reference[r, listed][:, None]).sum(axis=1)
        np.testing.assert_array_equal(got, expected)
    assert counts[1].max() > 100_000  # items far down the ranking, not only near the top


def test_million_float_items_equal_a_full_stable_sort() -> None:
    """Real-valued scores (no ties), a sample of users: the blocks rank exactly as a full sort of their scores, and
    those scores are the single product's within float32 rounding."""
    rng = np.random.default_rng(3)
    emb_t = np.ascontiguousarray(rng.standard_normal((D, N_ITEMS), dtype=np.float32))
    h = rng.standard_normal((4, D), dtype=np.float32)
    scorer = ItemScorer(emb_t)
    blocked = scorer.scores(h)
    np.testing.assert_allclose(blocked, h @ emb_t, rtol=1e-5, atol=1e-4)
    masked = seen_items(rng, blocked)
    reference = masked_copy(blocked, masked)
    got = top_k(scorer, h, 50, masked)
    np.testing.assert_array_equal(got.items, stable_top(reference, 50))
    listed = [got.items[r, ::7] for r in range(4)]
    for r, (items, counts) in enumerate(zip(listed, count_above(scorer, h, listed, masked), strict=True)):
        np.testing.assert_array_equal(counts, np.arange(0, 50, 7))  # the served ranks, minus one
        assert (reference[r][None, :] > reference[r, items][:, None]).sum(axis=1).tolist() == counts.tolist()


def test_memory_is_one_block_not_the_catalogue(integer_catalogue) -> None:
    """Peak memory of ranking 4 rows over a million items stays within a few blocks; the full matrix and its
    argpartition indices would take 4 x 1M x 12 bytes = 48 MB."""
    scorer, h, full = integer_catalogue
    masked = seen_items(np.random.default_rng(4), full[:4])
    tracemalloc.start()
    try:
        top_k(scorer, h[:4], 100, masked)
        count_above(scorer, h[:4], [np.arange(10)] * 4, masked)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_matrix = 4 * N_ITEMS * (4 + 8)
    one_block = 4 * BLOCK_ITEMS * (4 + 8)
    assert peak < 3 * one_block and peak < full_matrix / 5, (peak, one_block, full_matrix)


def test_one_block_is_the_unblocked_product_and_breaks_ties_by_index() -> None:
    """A catalogue of one block: scores bit for bit `h @ E^T + b`, as the engine computed them before blocks, and a
    cut inside a run of ties takes the lowest indices (argpartition alone may not)."""
    rng = np.random.default_rng(5)
    n = 5_000
    emb_t = np.ascontiguousarray(rng.standard_normal((32, n), dtype=np.float32))
    emb_t[:, 1000:1100] = emb_t[:, [7]]  # 101 items with the same score in every row
    bias = rng.standard_normal(n).astype(np.float32)
    bias[1000:1100] = bias[7]
    h = rng.standard_normal((3, 32), dtype=np.float32)
    scorer = ItemScorer(emb_t, bias)
    unblocked = h @ emb_t
    unblocked += bias
    np.testing.assert_array_equal(scorer.block(h, 0, n), unblocked)
    for r in range(3):
        row = h[r : r + 1] @ emb_t  # one row alone: BLAS may round it differently from the 3-row product
        row += bias
        k = int((row[0] > row[0, 7]).sum()) + 50  # the cut falls halfway through the 101 tied items
        got = top_k(scorer, h[r : r + 1], k)
        np.testing.assert_array_equal(got.items, stable_top(row, k))
        np.testing.assert_array_equal(got.scores[0], row[0, got.items[0]])
        tied = got.items[0][got.scores[0] == row[0, 7]]
        assert tied.tolist() == [7, *range(1000, 1049)]


def test_small_blocks_and_edge_cases() -> None:
    """Blocks smaller than k, k past the catalogue, rows with more masked items than the rest can fill."""
    rng = np.random.default_rng(6)
    n = 1_000
    emb_t = np.ascontiguousarray(rng.integers(-2, 3, (8, n)).astype(np.float32))
    h = rng.integers(-2, 3, (3, 8)).astype(np.float32)
    full = h @ emb_t
    masked = Masked(np.repeat([0, 1, 2], [990, 5, 0]), np.concatenate([np.arange(990), rng.choice(n, 5, False)]))
    reference = masked_copy(full, masked)
    for block in (1, 7, 64, 999, n, 10 * n):
        scorer = ItemScorer(emb_t, None, block)
        for k in (1, 15, n, n + 5):
            got = top_k(scorer, h, k, masked)
            np.testing.assert_array_equal(got.items, stable_top(reference, k))
        assert np.isinf(got.scores[0, 10:]).all() and np.isfinite(got.scores[0, :10]).all()
        listed = [np.arange(0, n, 97), np.array([3, 3]), np.zeros(0, np.int64)]
        for r, counts in enumerate(count_above(scorer, h, listed, masked)):
            expected = (reference[r][None, :] > reference[r, listed[r]][:, None]).sum(axis=1)
            np.testing.assert_array_equal(counts, expected)
    with pytest.raises(ValueError, match="block_items must be at least 1"):
        ItemScorer(emb_t, None, 0)
    np.testing.assert_array_equal(Masked(np.array([0, 2, 2, 1]), np.array([5, 6, 7, 8])).take([2, 0]).rows, [1, 0, 0])


def test_best_of_scores_is_the_set_top_k_picks_ties_included():
    """The calibrated policy's unsteered lists: offline from a score matrix, served from blocks, the same sets."""
    from recsae_core.recommenders.ranking import best_of_scores

    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    assert [sorted(row) for row in best_of_scores(scores, 2).tolist()] == [[1, 2], [0, 1]]
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(16, 300)).astype(np.float32)  # ties everywhere, at every cut
    full = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    assert np.array_equal(np.sort(best_of_scores(scores, 7), axis=1), np.sort(full, axis=1))
