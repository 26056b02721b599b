"""The math of the de-biasing transforms of h, in numpy: one place, called by the offline sweep and by the service.

- Affine edits `h' = h - t ((h - m) B^T) A` of rank r (`Affine`): concept erasers fit on (h, binary attribute) --
  LEACE in closed form (`fit_leace`), INLP (`fit_inlp`), the mean-difference projection (`fit_mean_difference`) --
  and the spectral shrink of each user's loading on the top singular directions of the score matrix H E^T
  (`fit_spectral`). One form, so one serving path.
- The calibrated popularity shift `h' = h - t g_u p` (`popularity_direction`, `calibration_gap`): p is a fitted
  popularity direction in h-space, g_u how far the user's unsteered list is more popular than the user's history.
- PopSteer as its code does it (`synthetic_profiles`, `fit_popsteer`): Cohen's d per latent on the dense encoder
  pre-activations of head-only against deep-tail-only profiles, every latent's pre-activation shifted (the SAE part
  is `SAERuntime.shift_pre`).
- What a fitted direction loads on (`direction_loadings`): the SAE decoder rows it is closest to, so the SAE still
  names what a policy removes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np

from recsae_core.common.errors import ConfigError
from recsae_core.debias.rerank import cohens_d
from recsae_core.sae.runtime import SAERuntime

Anchor = Literal["pooled", "midpoint", "zero"]
ANCHORS = ("pooled", "midpoint", "zero")
"""pooled: mean of all h; midpoint: halfway between the two groups' means (splits the move between the groups);
zero: the origin (a linear projection, as INLP and the spectral shrink are usually written)."""
_TOL = 1e-6


class Affine(NamedTuple):
    """h' = h - t ((h - m) B^T) A, per row t: rank r erasers and the spectral shrink. With rows of A and B in
    biorthogonal pairs (B A^T = I) and t = 1 the read-outs B h' equal B m: the component is removed."""

    a: np.ndarray
    """(r, d) float32: the directions h moves along."""
    b: np.ndarray
    """(r, d) float32: the read-outs whose values (relative to the anchor) set the move."""
    anchor: np.ndarray
    """(d,) float32: m, the point every row's read-out is moved to."""

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def coefficients(self, h: np.ndarray) -> np.ndarray:
        """(B, r) each row's read-outs (h - m) . b_i."""
        return (np.asarray(h, dtype=np.float32) - self.anchor) @ self.b.T

    def apply(self, h: np.ndarray, strength: float | np.ndarray = 1.0) -> np.ndarray:
        """h' for every row; `strength` t is a number or (B,) per row."""
        h = np.asarray(h, dtype=np.float32)
        t = np.broadcast_to(np.asarray(strength, dtype=np.float32), (len(h),))
        return h - (t[:, None] * self.coefficients(h)) @ self.a


def _binary(z: np.ndarray, n: int) -> np.ndarray:
    z = np.asarray(z)
    if z.shape != (n,):
        raise ConfigError(f"the attribute must be one value per row of h ({n}), got shape {z.shape}")
    if z.dtype != bool and not np.isin(z, (0, 1)).all():
        raise ConfigError("the attribute must be binary (bool or 0/1)")
    z = z.astype(bool)
    if z.all() or not z.any():
        raise ConfigError("the attribute takes one value on every row; an eraser needs both groups")
    return z


def _rows(h: np.ndarray) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 2 or len(h) < 2 or not np.isfinite(h).all():
        raise ConfigError(f"h must be a finite (n >= 2, d) matrix, got shape {h.shape}")
    return h


def anchor_point(h: np.ndarray, z: np.ndarray, anchor: Anchor) -> np.ndarray:
    """(d,) the anchor m of an eraser (see ANCHORS)."""
    h = _rows(h)
    if anchor == "pooled":
        return h.mean(0)
    if anchor == "zero":
        return np.zeros(h.shape[1])
    if anchor == "midpoint":
        z = _binary(z, len(h))
        return (h[z].mean(0) + h[~z].mean(0)) / 2
    raise ConfigError(f"unknown anchor {anchor!r}; expected one of {', '.join(ANCHORS)}")


def _affine(a: np.ndarray, b: np.ndarray, anchor: np.ndarray) -> Affine:
    f32 = (np.ascontiguousarray(x, dtype=np.float32) for x in (np.atleast_2d(a), np.atleast_2d(b), anchor))
    return Affine(*f32)


def fit_leace(h: np.ndarray, z: np.ndarray, rank: int = 1, anchor: Anchor = "pooled") -> Affine:
    """LEACE (Belrose et al. 2023) in closed form: whiten with W = Sigma^-1/2, take the top `rank` left singular
    vectors U of W Sigma_hz, and erase h' = h - W^+ U U^T W (h - m), i.e. A = (W^+ U)^T, B = (W U)^T. At t = 1 no
    linear classifier does better than chance on h'. `z`: (n,) binary, or (n, c) attributes (rank <= c; a binary
    attribute gives rank 1)."""
    h = _rows(h)
    n = len(h)
    attr = np.asarray(z, dtype=np.float64)
    binary = attr.ndim == 1
    attr = _binary(z, n)[:, None].astype(np.float64) if binary else attr
    if attr.ndim != 2 or len(attr) != n:
        raise ConfigError(f"the attribute must be (n,) or (n, c) with n = {n}, got shape {np.shape(z)}")
    x = h - h.mean(0)
    values, vectors = np.linalg.eigh(x.T @ x / n)
    keep = values > _TOL * max(values.max(), _TOL)
    v, root = vectors[:, keep], np.sqrt(values[keep])
    whiten, unwhiten = (v / root) @ v.T, (v * root) @ v.T
    cross = x.T @ (attr - attr.mean(0)) / n
    u, s, _ = np.linalg.svd(whiten @ cross, full_matrices=False)
    available = int((s > _TOL * max(s.max(initial=0.0), _TOL)).sum())
    if not 1 <= rank <= available:
        raise ConfigError(f"rank {rank}: the attribute is linearly related to h along {available} direction(s); "
                          f"rank must be in [1, {available}]")  # fmt: skip
    if anchor == "midpoint" and not binary:
        raise ConfigError("the midpoint anchor needs a binary attribute (two groups)")
    u = u[:, :rank]
    return _affine((unwhiten @ u).T, (whiten @ u).T, anchor_point(h, z, anchor))


def logistic_direction(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iterations: int = 100) -> np.ndarray:
    """(d,) unit weight vector of an L2-regularised logistic regression of y on x (with intercept), by Newton's
    method. x is rescaled to unit mean variance first, which leaves the direction unchanged."""
    x = np.asarray(x, dtype=np.float64)
    scale = max(float(np.sqrt(x.var(0).mean())), 1e-12)
    design = np.hstack([x / scale, np.ones((len(x), 1))])
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0
    beta = np.zeros(design.shape[1])
    y = np.asarray(y, dtype=np.float64)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ beta, -30, 30)))
        grad = design.T @ (p - y) / len(y) + penalty * beta
        hess = (design * (p * (1 - p))[:, None]).T @ design / len(y) + np.diag(penalty + 1e-10)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-9:
            break
    w = beta[:-1]
    return w / max(float(np.linalg.norm(w)), 1e-300)


def fit_inlp(h: np.ndarray, z: np.ndarray, rank: int, anchor: Anchor = "pooled", l2: float = 1e-3) -> Affine:
    """INLP (Ravfogel et al. 2020): `rank` rounds of fitting a linear classifier (logistic regression) of the
    attribute on h projected onto the nullspace of the directions found so far; h' = h - t Q^T Q (h - m) with Q
    the orthonormal classifier directions (A = B = Q: an orthogonal projection)."""
    h = _rows(h)
    z = _binary(z, len(h))
    if rank < 1:
        raise ConfigError(f"INLP needs rank >= 1, got {rank}")
    x = h - h.mean(0)
    q = np.zeros((0, h.shape[1]))
    for _ in range(rank):
        w = logistic_direction(x - (x @ q.T) @ q, z)
        w = w - q.T @ (q @ w)
        norm = float(np.linalg.norm(w))
        if norm < _TOL:
            raise ConfigError(f"INLP found only {len(q)} direction(s) before the classifier had nothing left")
        q = np.vstack([q, w / norm])
    return _affine(q, q, anchor_point(h, z, anchor))


def fit_mean_difference(h: np.ndarray, z: np.ndarray, anchor: Anchor = "pooled") -> Affine:
    """Rank-1 orthogonal projection off the difference of the two groups' means: A = B = v / |v|."""
    h = _rows(h)
    z = _binary(z, len(h))
    v = h[z].mean(0) - h[~z].mean(0)
    norm = float(np.linalg.norm(v))
    if norm < _TOL:
        raise ConfigError("the two groups have the same mean h; there is no mean difference to project off")
    return _affine(v / norm, v / norm, anchor_point(h, z, anchor))


def fit_spectral(h: np.ndarray, item_embeddings: np.ndarray, rank: int = 1) -> Affine:
    """The top `rank` singular directions of the score matrix S = H E^T (item bias left out), from two thin QRs
    (H = Q_H R_H, E = Q_E R_E, S = Q_H R_H R_E^T Q_E^T): with R_H R_E^T = U S V^T, b_i = R_E^T v_i reads a user's
    loading (h . b_i = (h E^T) . (Q_E v_i)) and a_i = R_H^T u_i / s_i satisfies E a_i = Q_E v_i, so
    h' = h - t (h . b_i) a_i scales the loading by (1 - t), and the scores change by -t (h . b_i) along the item-side
    singular vector. Anchored at zero."""
    h, emb = _rows(h), _rows(item_embeddings)
    if emb.shape[1] != h.shape[1]:
        raise ConfigError(f"item embeddings are {emb.shape[1]}-dimensional but h is {h.shape[1]}-dimensional")
    r_h, r_e = np.linalg.qr(h, mode="r"), np.linalg.qr(emb, mode="r")
    u, s, vt = np.linalg.svd(r_h @ r_e.T)
    if not 1 <= rank <= int((s > _TOL * s[0]).sum()):
        raise ConfigError(f"rank {rank} exceeds the score matrix's numerical rank")
    a = (r_h.T @ u[:, :rank] / s[:rank]).T
    b = (r_e.T @ vt[:rank].T).T
    return _affine(a, b, np.zeros(h.shape[1]))


# ---------------------------------------------------------------- calibrated popularity shift


def popularity_direction(item_embeddings: np.ndarray, popularity: np.ndarray, h: np.ndarray) -> np.ndarray:
    """(d,) float32 p with E p ~ sigma z(log(1 + pop)) by least squares (items centred: a constant offset does not
    rank): moving h by -g p lowers each item's score by about g sigma per standard deviation of its log popularity,
    where sigma is the mean spread (std over items) of the users' scores in `h`. A dense direction in h-space, not a
    sum of decoder rows, because the best one is: E explains most of log popularity (R^2 0.81 on ML-1M), and no
    handful of latents spans it; `direction_loadings` still names the latents it lies along."""
    emb, h = _rows(item_embeddings), _rows(h)
    log_pop = np.log1p(np.asarray(popularity, dtype=np.float64))
    if log_pop.shape != (len(emb),):
        raise ConfigError(f"popularity covers {log_pop.shape} items but there are {len(emb)} item embeddings")
    target = (log_pop - log_pop.mean()) / max(float(log_pop.std()), 1e-12)
    centred = emb - emb.mean(0)
    spread = float(np.sqrt(np.einsum("ud,de,ue->u", h, centred.T @ centred / len(emb), h).clip(0)).mean())
    p = np.linalg.lstsq(centred, spread * target, rcond=None)[0]
    return p.astype(np.float32)


def calibration_gap(lists: np.ndarray, histories: Sequence[np.ndarray], popularity: np.ndarray) -> np.ndarray:
    """(B,) float32 how much more popular each user's list is than the user's history: mean log(1 + pop) over the
    list minus over the history, clipped at 0 (a list already less popular than the history is left alone; an
    empty history gives 0)."""
    log_pop = np.log1p(np.asarray(popularity, dtype=np.float64))
    lists = np.asarray(lists, dtype=np.int64)
    if len(histories) != len(lists):
        raise ValueError(f"{len(histories)} histories for {len(lists)} lists")
    listed = log_pop[lists].mean(1) if lists.shape[1] else np.zeros(len(lists))
    past = np.array([log_pop[np.asarray(r, dtype=np.int64)].mean() if len(r) else np.inf for r in histories])
    return np.maximum(np.where(np.isfinite(past), listed - past, 0.0), 0.0).astype(np.float32)


# ---------------------------------------------------------------- PopSteer


class PopSteerFit(NamedTuple):
    """PopSteer's statistics per latent and the shift they give at alpha = 1."""

    d: np.ndarray
    """(n_latents,) Cohen's d of the dense pre-activations, head-only minus deep-tail-only profiles."""
    sd: np.ndarray
    """(n_latents,) std of each latent's pre-activation in the group it favours (head where d > 0)."""
    shift: np.ndarray
    """(n_latents,) float32 -sign(d) |d| / max|d| sd: alpha scales it (PopSteer's w = |d| rescaled to [0, alpha])."""


def synthetic_profiles(
    histories: Sequence[np.ndarray], head_items: np.ndarray, tail_items: np.ndarray, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """PopSteer's profiles: every history copied twice, its items replaced by random head items and by random
    deep-tail items (same length; distinct items while the pool is large enough). The caller represents them."""
    rng = np.random.default_rng(seed)
    out: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for pool, profiles in zip((np.asarray(head_items), np.asarray(tail_items)), out, strict=True):
        if not len(pool):
            raise ConfigError("synthetic profiles need a non-empty head and deep-tail item pool")
        for history in histories:
            n = len(history)
            profiles.append(rng.choice(pool, n, replace=n > len(pool)).astype(np.int64))
    return out


def fit_popsteer(sae: SAERuntime, h_head: np.ndarray, h_tail: np.ndarray, n_latents: int | None = None) -> PopSteerFit:
    """Cohen's d per latent between the head-only and deep-tail-only profiles' pre-activations, and the unit
    shift. `n_latents`: steer only the latents of largest |d| (PopSteer v1 steers all of them: None)."""
    pre_head, pre_tail = sae.pre_activations(h_head), sae.pre_activations(h_tail)
    if len(pre_head) < 2 or len(pre_tail) < 2:
        raise ConfigError("PopSteer needs at least two profiles in each group")
    d = cohens_d(pre_head, pre_tail)
    sd = np.where(d > 0, pre_head.std(0, ddof=1), pre_tail.std(0, ddof=1))
    weight = np.abs(d) / max(float(np.abs(d).max()), 1e-12)
    if n_latents is not None:
        weight[np.argsort(-np.abs(d), kind="stable")[n_latents:]] = 0.0
    return PopSteerFit(d, sd, (-np.sign(d) * weight * sd).astype(np.float32))


# ---------------------------------------------------------------- what a direction loads on


class Loading(NamedTuple):
    """One SAE latent a direction lies along."""

    latent: int
    """The latent."""
    cosine: float
    """Cosine of the direction with the latent's decoder row."""
    concept: str | None
    """The latent's catalog concept, if named."""


class DirectionReport(NamedTuple):
    """The SAE latents a fitted direction loads on."""

    loads_on: list[Loading]
    """The latents of largest |cosine|, strongest first."""
    span_share: float
    """Share of the direction's squared norm inside the span of the `span_rows` decoder rows of largest |cosine|."""
    span_rows: int
    """How many decoder rows span_share uses."""


def direction_loadings(
    directions: np.ndarray, w_dec: np.ndarray, names: Mapping[int, str] | None = None, top: int = 5,
    span_rows: int = 16,
) -> list[DirectionReport]:  # fmt: skip
    """For each row of `directions` (r, d): its cosine with every decoder row, the `top` largest in magnitude with
    their concepts, and how much of it the `span_rows` closest rows span (least squares)."""
    directions = np.atleast_2d(np.asarray(directions, dtype=np.float64))
    w = np.asarray(w_dec, dtype=np.float64)
    unit = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    names = names or {}
    reports = []
    for v in directions:
        norm = float(np.linalg.norm(v))
        cos = unit @ v / max(norm, 1e-12)
        order = np.argsort(-np.abs(cos), kind="stable")
        rows = w[order[:span_rows]]
        coef = np.linalg.lstsq(rows.T, v, rcond=None)[0]
        share = float(np.linalg.norm(rows.T @ coef) ** 2 / max(norm**2, 1e-24))
        loads = [Loading(int(j), round(float(cos[j]), 6), names.get(int(j))) for j in order[:top]]
        reports.append(DirectionReport(loads, round(share, 6), min(span_rows, len(w))))
    return reports
