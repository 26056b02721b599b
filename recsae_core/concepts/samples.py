"""Samples per latent, as RecSAE shows them: activation levels, top-activating samples to describe a latent, and
held-out activating and inactive samples to score the description, never overlapping the describing ones.

A sample is one probed row: a user (general models) or a (user, position) prefix of the user's training sequence
(sequential models). It is shown as the user's recent items and the model's top-1 item (seen items excluded).

Leakage rules, enforced by `select_samples` and checked in the tests:
- held-out samples (paper protocol and detection) share no sample and no *user* with the describing samples, so
  neighbouring positions of one user's sequence cannot leak the answer;
- held-out inactive samples never come from the background set that describing-side statistics and thresholds use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from recsae_core.data.datasets import Dataset
from recsae_core.data.splits import Ragged
from recsae_core.recommenders.base import Recommender
from recsae_core.sae.runtime import SAERuntime


def encode_sparse(
    sae: SAERuntime, h: np.ndarray | torch.Tensor, batch_size: int = 4096, progress: bool = False
) -> sp.csc_matrix:
    """The SAE codes of every sample as a sparse (N, n_latents) float32 matrix in column (per-latent) form, with
    sorted indices: SAERuntime.encode's non-zeros, a batch at a time, without dense (N, n_latents) codes."""
    rows, cols, vals = [], [], []
    starts = range(0, len(h), batch_size)
    for start in tqdm(starts, desc="encode", unit="batch", disable=not progress, mininterval=1.0):
        x = h[start : start + batch_size]
        codes = sae.encode(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
        keep = codes.values > 0
        rows.append(np.nonzero(keep)[0] + start)
        cols.append(codes.indices[keep])
        vals.append(codes.values[keep])
    shape = (len(h), sae.n_latents)
    if not rows:
        return sp.csc_matrix(shape, dtype=np.float32)
    coo = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape)
    codes = coo.tocsc().astype(np.float32)
    codes.sort_indices()
    return codes


def _member(sorted_values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Boolean mask: which ids occur in the sorted array."""
    if len(sorted_values) == 0:
        return np.zeros(len(ids), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_values, ids), len(sorted_values) - 1)
    return sorted_values[where] == ids


def latent_values(codes: sp.csc_matrix, latent: int, ids: np.ndarray) -> np.ndarray:
    """The latent's activation on samples `ids` (0 where inactive); `codes` must have sorted indices."""
    start, end = codes.indptr[latent], codes.indptr[latent + 1]
    rows, vals = codes.indices[start:end], codes.data[start:end]
    where = np.clip(np.searchsorted(rows, ids), 0, max(len(rows) - 1, 0))
    hit = (rows[where] == ids) if len(rows) else np.zeros(len(ids), dtype=bool)
    return np.where(hit, vals[where] if len(rows) else 0.0, 0.0).astype(np.float32)


def activation_histogram(codes: sp.csc_matrix, latent: int, bins: int = 20) -> list[int]:
    """Counts of the latent's positive activations in `bins` equal bins from 0 to its maximum."""
    values = codes.data[codes.indptr[latent] : codes.indptr[latent + 1]]
    return np.histogram(values, bins=bins, range=(0, float(values.max()) if len(values) else 1.0))[0].tolist()


def prefix_index(train: Ragged, users: np.ndarray, positions: np.ndarray, recent: int | None = None) -> Ragged:
    """Each sample's history as indices into `train.values`: the prefix `train.row(u)[:p+1]`, or only its last
    `recent` items. Vectorised (no loop over samples)."""
    ends = train.indptr[users] + positions + 1
    starts = train.indptr[users] if recent is None else np.maximum(train.indptr[users], ends - recent)
    lengths = (ends - starts).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    offsets = np.repeat(starts - indptr[:-1], lengths)
    return Ragged(indptr=indptr, values=train.values[offsets + np.arange(indptr[-1])])


@torch.no_grad()
def top1_items(
    model: Recommender, h: torch.Tensor, train: Ragged, users: np.ndarray, positions: np.ndarray, chunk: int = 4096
) -> np.ndarray:
    """The model's top-1 item for each sample's h, with the sample's own history (its prefix) masked out."""
    emb = model.item_embeddings().detach().float()
    bias = model.item_bias()
    out = np.empty(len(users), dtype=np.int64)
    for start in range(0, len(users), chunk):
        sl = slice(start, start + chunk)
        scores = h[sl].float() @ emb.T
        if bias is not None:
            scores += bias.detach().float()
        seen = prefix_index(train, users[sl], positions[sl])
        rows = np.repeat(np.arange(len(seen.indptr) - 1), seen.lengths)
        scores[torch.from_numpy(rows), torch.from_numpy(seen.values)] = -torch.inf
        out[sl] = scores.argmax(dim=1).numpy()
    return out


def recommended_examples(top1: np.ndarray, titles: list[str], n: int = 5) -> list[str]:
    """Titles of the samples' top-1 items, most frequent first (ties: first seen first)."""
    items, first, counts = np.unique(top1, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    return [titles[int(i)] for i in items[order][:n]]


def render_sample(data: Dataset, history: np.ndarray, top1: int, level: int | None = None, recent: int = 10) -> str:
    """A sample as RecSAE shows it: recent items (title + genres), then the model's top-1 item and, for describing
    samples only, the activation level."""

    def item(i: int) -> str:
        meta = data.item_meta
        year = f", {meta.years[i]}" if meta.years[i] > 0 else ""
        genres = "|".join(meta.genres[i]) or "no genre"
        return f"{meta.titles[i]} ({genres}{year})"

    lines = ["Recent items: " + "; ".join(item(int(i)) for i in history[-recent:])]
    lines.append(f"Recommended next: {item(int(top1))}")
    if level is not None:
        lines.append(f"Activation level: {level}")
    return "\n".join(lines)


@dataclass
class SampleOptions:
    """How many samples of each kind to pick per latent."""

    n_paper: int = 5
    """The paper protocol: this many top samples describe, as many held out, plus as many random inactive."""
    n_describe: int = 40
    """Describing samples in total: the n_paper top ones plus samples spread over the latent's activation range."""
    n_detect: int = 25
    """Held-out activating and (as many) held-out inactive samples for detection scoring (ROC-AUC)."""
    n_background: int = 20000
    """Random samples forming the background term frequencies and the inactive side of threshold calibration."""
    n_calibrate: int = 400
    """Background samples where the latent is inactive, used to calibrate the simulator's threshold."""
    seed: int = 0
    """Seed of every random choice."""


class LatentSamples(NamedTuple):
    """Sample ids (rows of the probe) chosen for one latent."""

    latent: int
    """The latent."""
    describe: np.ndarray
    """Describing samples, the top-activating ones first (the first n_paper are the ones shown to a language model)."""
    paper_pos: np.ndarray
    """Held-out top-activating samples for the paper protocol (interleaved with the top describing ones)."""
    paper_neg: np.ndarray
    """Held-out random inactive samples for the paper protocol."""
    detect_pos: np.ndarray
    """Held-out activating samples spread over the latent's activation quantiles."""
    detect_neg: np.ndarray
    """Held-out random inactive samples for detection scoring."""
    calibrate_neg: np.ndarray
    """Inactive samples from the background set (describing side: thresholds, never scored)."""


def _spread(ids: np.ndarray, values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n of `ids` stratified over the quantiles of `values` (one random pick per equal-count stratum)."""
    if len(ids) <= n:
        return ids[np.argsort(-values, kind="stable")]
    order = np.argsort(-values, kind="stable")
    picks = np.floor((np.arange(n) + rng.random(n)) * len(ids) / n).astype(np.int64)
    return ids[order[picks]]


def _one_per_user(ids: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Positions (into ids) of the first occurrence of each user, in the original order."""
    _, first = np.unique(users[ids], return_index=True)
    return np.sort(first)


def _top_band(ranked: np.ndarray, in_background: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave the top-ranked samples into n describing and n held-out ones (ranks 0, 2, 4 ... describe;
    1, 3, 5 ... are held out), a background sample never being held out."""
    describe: list[int] = []
    held: list[int] = []
    for sample in ranked[: 4 * n + 16]:
        if len(describe) >= n and len(held) >= n:
            break
        if len(held) < len(describe) and len(held) < n and not in_background[sample]:
            held.append(int(sample))
        elif len(describe) < n:
            describe.append(int(sample))
        elif len(held) < n and not in_background[sample]:
            held.append(int(sample))
    return np.asarray(describe, dtype=np.int64), np.asarray(held, dtype=np.int64)


def select_samples(
    codes: sp.csc_matrix, users: np.ndarray, options: SampleOptions, latents: np.ndarray
) -> tuple[list[LatentSamples], np.ndarray]:
    """Pick describing and held-out samples for `latents` (see the module docstring for the leakage rules).

    The top band is ranked by activation, so samples of level >= 5 come first whenever the latent reaches level 5
    (RecSAE's top-10 with level >= 5); latents that never do are described by their best samples anyway.
    Returns the per-latent samples and the background sample ids."""
    o = options
    n = codes.shape[0]
    rng = np.random.default_rng(o.seed)
    background = np.sort(rng.choice(n, size=min(o.n_background, n), replace=False))
    in_background = np.zeros(n, dtype=bool)
    in_background[background] = True
    heldout_pool = np.flatnonzero(~in_background)
    n_neg = o.n_paper + o.n_detect
    out: list[LatentSamples] = []
    for latent in latents:
        start, end = codes.indptr[latent], codes.indptr[latent + 1]
        rows, vals = codes.indices[start:end].astype(np.int64), codes.data[start:end]
        order = np.argsort(-vals, kind="stable")
        ranked = rows[order][_one_per_user(rows[order], users)]  # one (best) sample per user, best first
        top_describe, paper_pos = _top_band(ranked, in_background, o.n_paper)
        taken_users = users[np.concatenate([top_describe, paper_pos])]
        # The rest: one random activating sample per remaining user, split between detection (never background
        # samples) and describing (the remainder).
        shuffled = rng.permutation(len(rows))
        shuffled = shuffled[~np.isin(users[rows[shuffled]], taken_users)]
        shuffled = shuffled[_one_per_user(rows[shuffled], users)]
        rest, rest_vals = rows[shuffled], vals[shuffled]
        want_describe = max(o.n_describe - len(top_describe), 0)
        if len(rest) >= o.n_detect + want_describe:
            n_detect = o.n_detect
            share = max(o.n_detect * len(rest) // (o.n_detect + want_describe), n_detect)
        else:  # too few users: detection gets at most half of them
            n_detect = share = min(o.n_detect, len(rest) // 2)
        eligible = np.flatnonzero(~in_background[rest])[:share]
        is_detect = np.zeros(len(rest), dtype=bool)
        is_detect[eligible] = True
        detect_pos = _spread(rest[is_detect], rest_vals[is_detect], n_detect, rng)
        more_describe = _spread(rest[~is_detect], rest_vals[~is_detect], want_describe, rng)
        describe = np.concatenate([top_describe, more_describe])
        # Inactive held-out samples: outside the background, inactive for this latent, not a describing user.
        draw = rng.integers(0, len(heldout_pool), size=8 * n_neg + 64) if len(heldout_pool) else np.zeros(0, int)
        candidates = np.unique(heldout_pool[draw])
        candidates = candidates[rng.permutation(len(candidates))]
        bad = _member(rows, candidates) | np.isin(users[candidates], users[describe])
        negatives = candidates[~bad][:n_neg]
        calibrate = background[~_member(rows, background)]
        calibrate = calibrate[rng.permutation(len(calibrate))[: o.n_calibrate]]
        out.append(
            LatentSamples(
                latent=int(latent),
                describe=describe.astype(np.int64),
                paper_pos=paper_pos,
                paper_neg=negatives[: o.n_paper].astype(np.int64),
                detect_pos=detect_pos.astype(np.int64),
                detect_neg=negatives[o.n_paper :].astype(np.int64),
                calibrate_neg=np.sort(calibrate).astype(np.int64),
            )
        )
    return out, background


def top_units(values: np.ndarray, users: np.ndarray, n: int) -> np.ndarray:
    """Top-n sample ids by `values` (positive only), at most one per user: the samples coherence compares."""
    candidates = np.flatnonzero(values > 0)
    if len(candidates) > 50 * n:
        candidates = candidates[np.argpartition(-values[candidates], 50 * n)[: 50 * n]]
    ranked = candidates[np.argsort(-values[candidates], kind="stable")]
    return ranked[_one_per_user(ranked, users)][:n]


def column_top_units(codes: sp.csc_matrix, users: np.ndarray, latent: int, n: int) -> np.ndarray:
    """`top_units` for one latent of a sparse code matrix."""
    start, end = codes.indptr[latent], codes.indptr[latent + 1]
    rows, vals = codes.indices[start:end].astype(np.int64), codes.data[start:end]
    return rows[ranked_top_units(np.full(len(rows), latent), rows, vals, users, n)]


def ranked_top_units(
    latents: np.ndarray, samples: np.ndarray, values: np.ndarray, users: np.ndarray, n: int
) -> np.ndarray:
    """Positions, into the given (latent, sample, value) triples, of each latent's top-n samples by value (ties: the
    lower sample id first), at most one per user, ordered by latent then rank. Any subset of the triples holding
    each latent's top ones gives the same answer, which is what lets workers pick candidates from their own rows."""
    order = np.lexsort((samples, -values, latents))
    lat = latents[order]
    # First sample of each (latent, user), in ranked order.
    _, first = np.unique(np.stack([lat, users[samples[order]]]), axis=1, return_index=True)
    kept = order[np.sort(first)]
    lat = latents[kept]
    run_start = np.flatnonzero(np.r_[True, lat[1:] != lat[:-1]]) if len(kept) else np.zeros(0, dtype=np.int64)
    rank = np.arange(len(kept)) - np.repeat(run_start, np.diff(np.r_[run_start, len(kept)]))
    return kept[rank < n]
