"""Post-processing baselines for popularity de-biasing, on the same scores the steering policies see:
popularity-penalty re-ranking (log, linear and sqrt shapes), (smooth) xQuAD with head/tail categories, calibrated
popularity re-ranking (Abdollahpouri et al. 2021), and a PopSteer-style steer. Each takes one strength; equal-length
sweep grids for them come from `recsae_core.debias.sweeps`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from recsae_core.debias.calibration import GROUPS, jensen_shannon
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.stats import LatentStats

PENALTY_SHAPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"log": np.log1p, "linear": np.asarray,
                                                                  "sqrt": np.sqrt}  # fmt: skip
"""Penalty f(pop) of each penalty re-ranker, on the training-interaction count."""


def popularity_penalty(
    scores: Tensor, popularity: np.ndarray, lam: float, k: int = 10, shape: str = "log"
) -> np.ndarray:
    """Top-k of score - lam * f(pop), f = log(1 + pop), pop or sqrt(pop) by `shape` (masked items stay -inf):
    (users, k) item indices."""
    penalty = torch.as_tensor(_penalty(popularity, shape), dtype=scores.dtype)
    return (scores - lam * penalty).topk(k, dim=1).indices.numpy()


def penalty_scale(scores: Tensor, popularity: np.ndarray, shape: str = "log") -> float:
    """The lam at which a penalty's spread over items (max f - min f) equals the mean per-user standard deviation
    of the finite scores: a relative strength times this is the lam of `popularity_penalty`, so that one grid of
    relative strengths fits every shape and model."""
    finite = torch.nan_to_num(scores.float(), neginf=float("nan"), posinf=float("nan")).numpy()
    with np.errstate(invalid="ignore"):
        spread = float(np.nanmean(np.nanstd(finite, axis=1)))
    penalty = _penalty(popularity, shape)
    width = float(penalty.max() - penalty.min()) if len(penalty) else 0.0
    return spread / width if width > 0 and np.isfinite(spread) else 0.0


def _penalty(popularity: np.ndarray, shape: str) -> np.ndarray:
    if shape not in PENALTY_SHAPES:
        raise ValueError(f"unknown penalty shape '{shape}'; known: {', '.join(PENALTY_SHAPES)}")
    return PENALTY_SHAPES[shape](np.asarray(popularity, dtype=np.float64)).astype(np.float64)


def xquad(
    scores: Tensor, head: np.ndarray, user_tail_share: np.ndarray, lam: float, k: int = 10, n_candidates: int = 100
) -> np.ndarray:
    """Smooth xQuAD (Abdollahpouri et al. 2019) with the two categories head and tail.

    Greedily picks, from each user's top `n_candidates`, the item maximising
    (1 - lam) P(v|u) + lam * sum_c P(c|u) [v in c] (1 - share of c among the items picked so far),
    where P(v|u) is the min-max normalised score among the candidates and P(c|u) the category's share of the
    user's history. lam = 0 is the original ranking.
    """
    cand, rel, finite = _candidates(scores, n_candidates)
    is_tail = ~head[cand]
    p_tail = np.asarray(user_tail_share, dtype=np.float64)[:, None]
    n_users = len(cand)
    picked = np.zeros((n_users, k), dtype=np.int64)
    taken = np.zeros(cand.shape, dtype=bool)
    n_tail = np.zeros((n_users, 1))
    rows = np.arange(n_users)
    for step in range(k):
        tail_cov = 1.0 - n_tail / step if step else np.ones((n_users, 1))
        head_cov = 1.0 - (step - n_tail) / step if step else np.ones((n_users, 1))
        diversity = np.where(is_tail, p_tail * tail_cov, (1 - p_tail) * head_cov)
        best = _best((1 - lam) * rel + lam * diversity, finite, taken)
        picked[:, step] = cand[rows, best]
        taken[rows, best] = True
        n_tail[:, 0] += is_tail[rows, best]
    return picked


def calibrated_popularity(
    scores: Tensor, groups: np.ndarray, history_mix: np.ndarray, lam: float, k: int = 10, n_candidates: int = 100
) -> np.ndarray:
    """Calibrated popularity re-ranking, CP (Abdollahpouri et al., UMAP 2021, after Steck's calibrated
    recommendations): from each user's top `n_candidates`, greedily picks the item maximising
    (1 - lam) P(v|u) - lam * JS(history mix, mix of the list with v added),
    where `groups` labels every item head / mid / tail (`calibration.popularity_groups`), `history_mix` is each
    user's (users, 3) share of the groups in the history (a NaN row: relevance only), JS the Jensen-Shannon
    divergence in bits and P(v|u) the min-max normalised score among the candidates. lam = 0 is the original
    ranking. Returns (users, k) item indices."""
    cand, rel, finite = _candidates(scores, n_candidates)
    cand_group = np.asarray(groups)[cand]
    n_users, n_groups = len(cand), len(GROUPS)
    history = np.repeat(np.asarray(history_mix, dtype=np.float64), n_groups, axis=0)  # (users * 3, 3)
    counts = np.zeros((n_users, n_groups))
    picked = np.zeros((n_users, k), dtype=np.int64)
    taken = np.zeros(cand.shape, dtype=bool)
    rows = np.arange(n_users)
    for step in range(k):
        # The divergence after adding one item of each group: a candidate's term is its group's.
        after = (counts[:, None, :] + np.eye(n_groups)[None]) / (step + 1)
        js = np.nan_to_num(jensen_shannon(history, after.reshape(-1, n_groups)).reshape(n_users, n_groups))
        value = (1 - lam) * rel - lam * js[rows[:, None], cand_group]
        best = _best(value, finite, taken)
        picked[:, step] = cand[rows, best]
        taken[rows, best] = True
        counts[rows, cand_group[rows, best]] += 1
    return picked


def _candidates(scores: Tensor, n_candidates: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's top `n_candidates` items, their scores min-max normalised to [0, 1] over the finite ones (0
    for masked items), and which are finite (not masked)."""
    top = scores.topk(min(n_candidates, scores.shape[1]), dim=1)
    cand = top.indices.numpy()
    rel = top.values.numpy().astype(np.float64)
    finite = np.isfinite(rel)
    low = np.where(finite, rel, np.inf).min(axis=1, keepdims=True)
    high = np.where(finite, rel, -np.inf).max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        rel = np.where(finite, (rel - low) / np.maximum(high - low, 1e-12), 0.0)
    return cand, rel, finite


def _best(value: np.ndarray, finite: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """Per user, the untaken candidate of highest value; a masked candidate only when no unmasked one is left."""
    return np.where(taken, -np.inf, np.where(finite, value, np.finfo(np.float64).min)).argmax(axis=1)


def cohens_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Cohen's d of group a against group b (pooled std; 0 where both groups are constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = len(a), len(b)
    pooled = np.sqrt(((na - 1) * a.var(axis=0, ddof=1) + (nb - 1) * b.var(axis=0, ddof=1)) / max(na + nb - 2, 1))
    diff = a.mean(axis=0) - b.mean(axis=0)
    return np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1.0), 0.0)


def popsteer_weights(d: np.ndarray, alpha: float, n_latents: int) -> tuple[np.ndarray, np.ndarray]:
    """PopSteer: the `n_latents` latents of largest |d|, each with weight w = |d| rescaled to [0, alpha]."""
    order = np.argsort(-np.abs(d))[:n_latents]
    magnitude = np.abs(d[order])
    span = magnitude.max() - magnitude.min()
    scaled = (magnitude - magnitude.min()) / span if span > 0 else np.ones_like(magnitude)
    return order, alpha * scaled


def popsteer_transform(
    sae: TopKSAE, stats: LatentStats, d: np.ndarray, alpha: float, n_latents: int = 32
) -> Callable[[Tensor], Tensor]:
    """h -> decode(z + shift): latents that favour popular profiles (d > 0) go down by w * sigma, those favouring
    unpopular ones go up. The plain reconstruction is served (no error term), as in PopSteer."""
    latents, weights = popsteer_weights(d, alpha, n_latents)
    shift = torch.zeros(sae.cfg.n_latents)
    sigma = stats.std_activation.float()[torch.as_tensor(latents)]
    shift[torch.as_tensor(latents)] = -torch.as_tensor(np.sign(d[latents]) * weights, dtype=torch.float32) * sigma

    @torch.no_grad()
    def apply(h: Tensor) -> Tensor:
        z = sae.encode(h.float())
        return sae.decode(z + shift.to(z.device)).to(h.dtype)

    return apply
