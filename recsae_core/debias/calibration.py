"""User-centred popularity calibration (Abdollahpouri et al., UMAP 2021, arXiv 2103.06364): items fall into head /
mid / deep-tail groups (`recsae_core.debias.bias_metrics` defines them), each user's history and each list get a mix
over the three groups, and miscalibration is the Jensen-Shannon divergence between the two mixes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEAD, MID, TAIL = 0, 1, 2
GROUPS = ("head", "mid", "tail")
"""Names of the popularity groups, in label order."""


def popularity_groups(head: np.ndarray, deep: np.ndarray) -> np.ndarray:
    """(n_items,) int8 label per item: HEAD, TAIL (deep tail) or MID (all others); head wins over deep tail."""
    labels = np.full(len(head), MID, dtype=np.int8)
    labels[np.asarray(deep, dtype=bool)] = TAIL
    labels[np.asarray(head, dtype=bool)] = HEAD
    return labels


def group_mix(lists: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(users, 3) share of each list's (or history's) items in the head, mid and tail groups; NaN rows for empty
    lists."""
    if isinstance(lists, np.ndarray) and lists.ndim == 2:
        if lists.shape[1] == 0:
            return np.full((len(lists), len(GROUPS)), np.nan)
        return (labels[lists][..., None] == np.arange(len(GROUPS))).mean(axis=1)
    mix = np.full((len(lists), len(GROUPS)), np.nan)
    for row, items in enumerate(lists):
        items = np.asarray(items, dtype=np.int64)
        if len(items):
            mix[row] = np.bincount(labels[items], minlength=len(GROUPS)) / len(items)
    return mix


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon divergence in bits (in [0, 1]) between (rows, groups) distributions; NaN where either
    row is NaN."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2
    return 0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m)


def _kl_bits(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    # 0 log 0 = 0; m > 0 wherever p > 0, so no term is infinite.
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0) / np.where(m > 0, m, 1.0)), 0.0)
    return np.where(np.isnan(p).any(axis=1) | np.isnan(m).any(axis=1), np.nan, terms.sum(axis=1))
