"""Post-processing baselines for popularity de-biasing, on the same scores the steering policies see:
popularity-penalty re-ranking, (smooth) xQuAD with head/tail categories, and a PopSteer-style steer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from recsae_core.sae.model import TopKSAE
from recsae_core.sae.stats import LatentStats


def popularity_penalty(scores: Tensor, popularity: np.ndarray, lam: float, k: int = 10) -> np.ndarray:
    """Top-k of score - lam * log(1 + pop) (masked items stay -inf): (users, k) item indices."""
    penalty = torch.as_tensor(np.log1p(popularity), dtype=scores.dtype)
    return (scores - lam * penalty).topk(k, dim=1).indices.numpy()


def xquad(
    scores: Tensor, head: np.ndarray, user_tail_share: np.ndarray, lam: float, k: int = 10, n_candidates: int = 100
) -> np.ndarray:
    """Smooth xQuAD (Abdollahpouri et al. 2019) with the two categories head and tail.

    Greedily picks, from each user's top `n_candidates`, the item maximising
    (1 - lam) P(v|u) + lam * sum_c P(c|u) [v in c] (1 - share of c among the items picked so far),
    where P(v|u) is the min-max normalised score among the candidates and P(c|u) the category's share of the
    user's history. lam = 0 is the original ranking.
    """
    top = scores.topk(n_candidates, dim=1)
    cand = top.indices.numpy()
    rel = top.values.numpy().astype(np.float64)
    finite = np.isfinite(rel)
    low = np.where(finite, rel, np.inf).min(axis=1, keepdims=True)
    high = np.where(finite, rel, -np.inf).max(axis=1, keepdims=True)
    rel = np.where(finite, (rel - low) / np.maximum(high - low, 1e-12), -np.inf)
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
        value = np.where(taken | ~finite, -np.inf, (1 - lam) * np.where(finite, rel, 0.0) + lam * diversity)
        best = value.argmax(axis=1)
        picked[:, step] = cand[rows, best]
        taken[rows, best] = True
        n_tail[:, 0] += is_tail[rows, best]
    return picked


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
