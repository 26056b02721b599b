"""Exact top-k of scores = h E^T (+ b) over a catalogue of any size, one block of items at a time.

A full (rows, n_items) score matrix costs 4 bytes per item per row in scores and 8 more in argpartition's indices:
at a million items, 12 MB per request. Here the scores of one block of `BLOCK_ITEMS` items exist at a time; each
block keeps its own exact top k (argpartition, O(block)), merged into a running top k, so memory per row is bounded
by the block and time is O(n_items) (no sort of the catalogue). Known items are masked by (row, item) index pairs
(`Masked`), a block at a time, never as a dense (rows, n_items) mask.

The order is a stable sort's: score descending, then item index ascending, so `top_k` equals
`np.argsort(-scores, kind="stable")[:, :k]` of the full matrix, ties included (at the cut too, where argpartition
alone picks any of the tied items). A catalogue of at most `BLOCK_ITEMS` items is one block: its scores are the same
matrix product as the unblocked `h @ E^T`, bit for bit. Across blocks, a BLAS may round the last bit of an item's
score differently from the single product (its kernels can depend on a block's edges), so at a million items the
ranking is exact for the scores computed here, and within one float32 rounding of the single product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

BLOCK_ITEMS = 65_536
"""Items scored at once: per row, 256 KiB of float32 scores and 512 KiB of partition indices."""


class Masked(NamedTuple):
    """Items a row may not be served, as (row, item) index pairs; their scores count as -inf."""

    rows: np.ndarray
    """The row of each pair (int64)."""
    items: np.ndarray
    """Its item index (int64)."""

    @classmethod
    def none(cls) -> Masked:
        """No masked item."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    def take(self, rows: Sequence[int]) -> Masked:
        """The pairs of `rows` (distinct), renumbered 0 .. len(rows) - 1 in that order."""
        chosen = np.asarray(rows, dtype=np.int64)
        position = np.full(max(int(self.rows.max(initial=-1)), int(chosen.max(initial=-1))) + 1, -1, np.int64)
        position[chosen] = np.arange(len(chosen))
        keep = position[self.rows] >= 0
        return Masked(position[self.rows[keep]], self.items[keep])

    def by_item(self) -> Masked:
        """The same pairs ordered by item, as ItemScorer.negated reads them."""
        order = np.argsort(self.items, kind="stable")
        return Masked(self.rows[order], self.items[order])


class TopK(NamedTuple):
    """Each row's best items, best first."""

    items: np.ndarray
    """(rows, k) item indices (int64)."""
    scores: np.ndarray
    """(rows, k) their scores (float32; -inf for a masked item, chosen only when fewer than k are unmasked)."""


class ItemScorer:
    """scores = h E^T (+ b), a block of items at a time."""

    def __init__(self, emb_t: np.ndarray, bias: np.ndarray | None = None, block_items: int = BLOCK_ITEMS) -> None:
        """`emb_t`: (d, n_items) float32, the item matrix transposed (contiguous, as the engine keeps it)."""
        if block_items < 1:
            raise ValueError(f"block_items must be at least 1 (got {block_items})")
        self.emb_t, self.bias, self.block_items = emb_t, bias, block_items
        self.n_items = emb_t.shape[1]

    def spans(self) -> list[tuple[int, int]]:
        """The blocks' [start, stop) item ranges."""
        return [(s, min(s + self.block_items, self.n_items)) for s in range(0, self.n_items, self.block_items)]

    def block(self, h: np.ndarray, start: int, stop: int) -> np.ndarray:
        """(rows, stop - start) float32 scores of items start .. stop - 1 (a new array the caller may overwrite)."""
        whole = start == 0 and stop == self.n_items  # the very product the unblocked scorer computes
        out = h @ (self.emb_t if whole else self.emb_t[:, start:stop])
        if self.bias is not None:
            out += self.bias[start:stop]
        return out

    def scores(self, h: np.ndarray) -> np.ndarray:
        """The full (rows, n_items) matrix, block by block (for small catalogues and checks)."""
        return np.concatenate([self.block(h, start, stop) for start, stop in self.spans()], axis=1)

    def negated(self, h: np.ndarray, masked_by_item: Masked, start: int, stop: int) -> np.ndarray:
        """-scores of a block, masked items at +inf (`masked_by_item`: Masked.by_item): ascending is best first."""
        neg = self.block(h, start, stop)
        np.negative(neg, out=neg)
        lo, hi = np.searchsorted(masked_by_item.items, [start, stop])
        neg[masked_by_item.rows[lo:hi], masked_by_item.items[lo:hi] - start] = np.inf
        return neg


def top_k(scorer: ItemScorer, h: np.ndarray, k: int, masked: Masked | None = None) -> TopK:
    """Each row's k best items by score (then by index), masked items last; k is capped at the catalogue size."""
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")
    k = min(k, scorer.n_items)
    masked = (masked or Masked.none()).by_item()
    best_items = np.zeros((len(h), 0), dtype=np.int64)
    best_neg = np.zeros((len(h), 0), dtype=np.float32)
    for start, stop in scorer.spans():
        neg = scorer.negated(h, masked, start, stop)
        local = _block_top(neg, k)
        items = np.concatenate([best_items, local + start], axis=1)
        values = np.concatenate([best_neg, np.take_along_axis(neg, local, axis=1)], axis=1)
        order = np.lexsort((items, values), axis=1)[:, :k]
        best_items, best_neg = np.take_along_axis(items, order, axis=1), np.take_along_axis(values, order, axis=1)
    return TopK(best_items, np.negative(best_neg))


def best_of_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """(rows, min(k, n_items)) each row's k best items of a score matrix, in no particular order: the set `top_k`
    picks (ties at the cut to the lowest indices), for callers that already hold the scores."""
    return _block_top(np.negative(scores), k)


def _block_top(neg: np.ndarray, k: int) -> np.ndarray:
    """(rows, min(k, width)) local indices of each row's k smallest of `neg`, in no particular order; among items
    tied at the cut, the lowest indices (argpartition alone may pick any of them)."""
    width = neg.shape[1]
    if k >= width:
        return np.broadcast_to(np.arange(width), neg.shape)
    part = np.argpartition(neg, k - 1, axis=1)[:, :k]
    chosen = np.take_along_axis(neg, part, axis=1)
    cut = chosen.max(axis=1, keepdims=True)  # the kth smallest
    short = np.flatnonzero((neg == cut).sum(axis=1) > (chosen == cut).sum(axis=1))
    for r in short:  # rows with more items tied at the cut than were chosen: rare outside masked (+inf) rows
        above = part[r][chosen[r] < cut[r, 0]]
        tied = np.flatnonzero(neg[r] == cut[r, 0])[: k - len(above)]
        part[r] = np.concatenate([above, tied])
    return part


def count_above(
    scorer: ItemScorer, h: np.ndarray, items: Sequence[np.ndarray], masked: Masked | None = None
) -> list[np.ndarray]:
    """Per row of h, for each of its listed items, how many items score strictly higher (masked items never do):
    its rank minus one, tied items sharing a rank. Exact without a sort of the catalogue: the listed items' scores
    are read from the blocks that hold them, then every block is counted against them; both passes use the same
    products (a block is recomputed with the same call, and the last one read is reused)."""
    masked = (masked or Masked.none()).by_item()
    spans = scorer.spans()
    lists = [np.asarray(row_items, dtype=np.int64) for row_items in items]
    values = [np.zeros(len(row_items), dtype=np.float32) for row_items in lists]
    kept, kept_neg = -1, None
    for b in np.unique(np.concatenate([np.zeros(0, np.int64), *lists]) // scorer.block_items):
        kept, kept_neg = int(b), scorer.negated(h, masked, *spans[b])
        start, stop = spans[kept]
        for r, row_items in enumerate(lists):
            inside = (row_items >= start) & (row_items < stop)
            values[r][inside] = kept_neg[r, row_items[inside] - start]
    # Negated scores: an item scores higher than a listed one iff its -score is lower than the listed one's.
    order = [np.argsort(v, kind="stable") for v in values]
    cuts = [v[o] for v, o in zip(values, order, strict=True)]
    counts = [np.zeros(len(v), dtype=np.int64) for v in values]
    for b in sorted(range(len(spans)) if kept >= 0 else [], key=lambda i: i != kept):  # the block in hand first
        neg = kept_neg if b == kept else scorer.negated(h, masked, *spans[b])
        for r, cut in enumerate(cuts):
            if len(cut):
                lower = neg[r][neg[r] < cut[-1]]
                # x is below cut[j] iff at most j cuts are <= x.
                at = np.searchsorted(cut, lower, side="right")
                counts[r] += np.cumsum(np.bincount(at, minlength=len(cut) + 1))[: len(cut)]
    out = []
    for row_order, row_counts in zip(order, counts, strict=True):
        unsorted = np.empty_like(row_counts)
        unsorted[row_order] = row_counts
        out.append(unsorted)
    return out
