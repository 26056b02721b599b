"""Scoring a latent's description on held-out samples, and the coherence of a set of units.

- Paper protocol (RecSAE): n activating + n inactive held-out samples; a simulator predicts active / inactive;
  confidence = accuracy.
- Detection (delphi): ROC-AUC of a continuous simulator score over dozens of held-out activating and inactive
  samples.
- Coherence (RecSAE): mean cosine similarity of the original representations of pairs of a unit's top samples
  whose top-1 items differ.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class Scores(NamedTuple):
    """One latent's scores on held-out samples."""

    confidence: float | None
    """Paper protocol accuracy; None without held-out activating samples."""
    auc: float | None
    """Detection ROC-AUC; None without both activating and inactive held-out samples."""
    n_paper: tuple[int, int]
    """(activating, inactive) samples behind the confidence."""
    n_detect: tuple[int, int]
    """(activating, inactive) samples behind the AUC."""


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """P(score of a random positive > that of a random negative), ties counting one half (Mann-Whitney U)."""
    positives, negatives = np.asarray(positives, float), np.asarray(negatives, float)
    if len(positives) == 0 or len(negatives) == 0:
        return None
    values = np.concatenate([positives, negatives])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, ends - starts)
    n_pos, n_neg = len(positives), len(negatives)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def paper_confidence(predicted_pos: np.ndarray, predicted_neg: np.ndarray) -> float | None:
    """(activating samples predicted active + inactive samples predicted inactive) / all: RecSAE's confidence."""
    predicted_pos, predicted_neg = np.asarray(predicted_pos, bool), np.asarray(predicted_neg, bool)
    if len(predicted_pos) == 0:
        return None
    return float((predicted_pos.sum() + (~predicted_neg).sum()) / (len(predicted_pos) + len(predicted_neg)))


def best_threshold(positives: np.ndarray, negatives: np.ndarray) -> float:
    """The threshold t (predict active iff score >= t) with the best balanced accuracy; the midpoint between
    neighbouring distinct scores, the highest such on ties. +inf when there are no positives."""
    positives, negatives = np.asarray(positives, float), np.asarray(negatives, float)
    if len(positives) == 0:
        return float("inf")
    if len(negatives) == 0:
        return float(positives.min())
    candidates = np.unique(np.concatenate([positives, negatives]))
    cuts = np.concatenate([[candidates[0] - 1.0], (candidates[1:] + candidates[:-1]) / 2, [candidates[-1] + 1.0]])
    tpr = 1.0 - np.searchsorted(np.sort(positives), cuts, side="left") / len(positives)
    tnr = np.searchsorted(np.sort(negatives), cuts, side="left") / len(negatives)
    balanced = (tpr + tnr) / 2
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(cuts[best[-1]])


def score_latent(
    paper_pos: np.ndarray, paper_neg: np.ndarray, detect_pos: np.ndarray, detect_neg: np.ndarray, threshold: float
) -> Scores:
    """Both protocols from simulator scores of the held-out samples and a threshold calibrated elsewhere."""
    return Scores(
        confidence=paper_confidence(np.asarray(paper_pos) >= threshold, np.asarray(paper_neg) >= threshold),
        auc=roc_auc(detect_pos, detect_neg),
        n_paper=(len(paper_pos), len(paper_neg)),
        n_detect=(len(detect_pos), len(detect_neg)),
    )


def unit_coherence(h: np.ndarray, top1: np.ndarray) -> float | None:
    """Mean cosine similarity of the rows of h over pairs whose top-1 items differ; None with no such pair."""
    if len(h) < 2:
        return None
    unit = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    upper = np.triu(np.ones(cos.shape, dtype=bool), k=1) & (top1[:, None] != top1[None, :])
    return float(cos[upper].mean()) if upper.any() else None


def mean_coherence(h: np.ndarray, top1: np.ndarray, groups: list[np.ndarray]) -> float | None:
    """Average `unit_coherence` over units, each given as the sample ids of its top samples."""
    values = [c for ids in groups if (c := unit_coherence(h[ids], top1[ids])) is not None]
    return float(np.mean(values)) if values else None


def summarize(values: list[float | None], thresholds: tuple[float, ...] = (0.8, 0.9)) -> dict[str, float | int]:
    """Mean over scored values and, for each threshold, the share of *all* units (unscored count as below)."""
    scored = np.asarray([v for v in values if v is not None], dtype=float)
    out: dict[str, float | int] = {"scored": len(scored), "mean": float(scored.mean()) if len(scored) else 0.0}
    for t in thresholds:
        out[f"share_ge_{t}"] = float((scored >= t).sum() / max(len(values), 1))
    return out


class Labelled(NamedTuple):
    """One latent's label and held-out scores from one labeler."""

    name: str
    """Name before de-duplication."""
    description: str
    """One sentence."""
    scores: Scores
    """Held-out scores."""
    threshold: float
    """The simulator's threshold, calibrated on describing-side samples only."""
    longer: tuple[str, ...] = ()
    """Longer names to try before a numeric suffix when the name is taken."""


def label_metrics(labels: list[Labelled], n_units: int) -> dict[str, Any]:
    """The catalog's headline numbers for one labeler over `n_units` latents (unlabelled ones count as below every
    confidence threshold; means are over scored latents)."""
    conf = summarize([lab.scores.confidence for lab in labels] + [None] * (n_units - len(labels)))
    auc = summarize([lab.scores.auc for lab in labels])
    return {"scored": conf["scored"], "mean_confidence": round(conf["mean"], 4),
            "share_confidence_ge_0.8": round(conf["share_ge_0.8"], 4),
            "share_confidence_ge_0.9": round(conf["share_ge_0.9"], 4), "mean_auc": round(auc["mean"], 4)}  # fmt: skip


def coherence_summary(
    h: np.ndarray, top1: np.ndarray, units: dict[str, list[np.ndarray]], confidences: list[float | None], high: float
) -> dict[str, Any]:
    """RecSAE coherence of the high-confidence SAE latents ('sae'), of all live latents ('sae_all'), and of every
    other unit group given (raw 'neurons', 'random_sae'); `confidences` are in the order of units['sae']."""
    confident = [u for u, c in zip(units["sae"], confidences, strict=True) if (c or 0) >= high]
    out: dict[str, Any] = {"sae": mean_coherence(h, top1, confident)}
    out.update({k if k != "sae" else "sae_all": mean_coherence(h, top1, v) for k, v in units.items()})
    out["high_confidence_latents"] = len(confident)
    return out
