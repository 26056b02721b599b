"""The methods `recsae debias` sweeps, per target: each is fit (or configured) once on validation users, before the
sweep, and then swept over the same number of strengths (`recsae_core.debias.sweeps`), so that no method wins a
comparison by having been searched more.

Steering families (what the service can serve, so what is measured is what is served):
- popularity: `nudge` (the screened latents' nudges, least-squares weighted to act like a popularity penalty, on
  n = min(8, candidates) latents fixed before the sweep; strength multiplies every nudge), `calibrated`, `spectral`
  (rank 1) and `popsteer` (PopSteer as its code does it: every pre-activation shifted, the reconstruction served);
- gender and any user attribute: `erase` (LEACE, pooled-mean anchor), `erase-midpoint` (LEACE, anchored halfway
  between the two groups' means) and `pin` (the screened latents that did not widen the dev NDCG gap, pinned at
  their dev mean; strength = how many of them).

Baselines: the popularity penalty re-rankers (`penalty-log`, `penalty-linear`, `penalty-sqrt`), `xquad`,
`calibrated-popularity` re-ranking; for fairness targets `inlp` (rank 4) and the `mean-difference` projection.

Every fitted method is fit on the validation users' h (erasers with their group labels); test users are never used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recsae_core.data.splits import Ragged
from recsae_core.debias.calibration import popularity_groups
from recsae_core.debias.policy_kinds import (
    FittedPolicy,
    fit_calibrated,
    fit_erase,
    fit_popsteer_policy,
    fit_spectral_policy,
    offline_transform,
)
from recsae_core.debias.rerank import calibrated_popularity, penalty_scale, popularity_penalty, xquad
from recsae_core.debias.screen import Candidate, Evaluator, K, fit_weights, policy_edits, policy_transform
from recsae_core.debias.sweeps import SWEEP_RANGES, sweep_grid
from recsae_core.debias.targets import Target
from recsae_core.debias.transforms import synthetic_profiles
from recsae_core.recommenders.batching import make_batch
from recsae_core.recommenders.run import RunContext
from recsae_core.sae.edits import Edit
from recsae_core.sae.runtime import SAERuntime

NUDGE_LATENTS = 8
"""Latents of the nudge family (fewer when fewer candidates lower the bias), fixed before the sweep."""
INLP_RANK = 4
"""Directions INLP removes, fixed before the sweep."""
RERANKERS = ("penalty-log", "penalty-linear", "penalty-sqrt", "xquad", "calibrated-popularity")
"""The popularity baselines that re-rank the original scores (PopSteer, a baseline too, edits h)."""


@dataclass
class Setup:
    """What fitting the methods needs: the run, the served SAE, the target and the validation stage."""

    ctx: RunContext
    """The run (model, split, data)."""
    runtime: SAERuntime
    """The SAE as served."""
    target: Target
    """The bias target."""
    dev: Evaluator
    """The validation stage: every fit and choice is made on it."""
    candidates: list[Candidate]
    """The screened latents, best first (nudge and pin)."""
    n_points: int
    """Strengths per method."""


@dataclass(frozen=True)
class Method:
    """One swept method."""

    name: str
    """Its name in the report ('nudge', 'erase-midpoint', 'penalty-log', ...)."""
    role: str
    """'steering' (a family the service serves) or 'baseline'."""
    strengths: np.ndarray
    """The swept strengths (empty when the method could not be built: see info['skipped'])."""
    lists: Callable[[Evaluator, float], np.ndarray]
    """(users, K) top-K lists of a stage at a strength."""
    meaning: str
    """What the strength is."""
    kind: str | None = None
    """The policy kind served (steering families): 'nudge', 'pin', 'erase', 'calibrated', ..."""
    anchored: bool = True
    """Strength 0 is the original lists (false for PopSteer, whose zero strength serves the reconstruction)."""
    fitted: FittedPolicy | None = None
    """Fitted kinds: the policy; a strength replaces its own."""
    edits: Callable[[float], list[Edit]] | None = None
    """Edit kinds: the edits at a strength."""
    info: dict[str, Any] = field(default_factory=dict)
    """How it was fit or configured (reported)."""


def topk(ev: Evaluator, transform: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """(users, K) lists of a stage after an h -> h' transform in numpy (None: the original lists)."""

    def torch_transform(h: Tensor) -> Tensor:
        return torch.from_numpy(np.asarray(transform(h.detach().cpu().numpy()), dtype=np.float32))  # type: ignore[misc]

    return ev.scores(None if transform is None else torch_transform).topk(K, dim=1).indices.numpy()


def histories(ev: Evaluator) -> list[np.ndarray]:
    """Each evaluated user's history (what was seen before the stage)."""
    return [ev.seen.row(u) for u in ev.data.users]


# ---------------------------------------------------------------- steering families


def _edit_method(setup: Setup, name: str, kind: str, strengths: np.ndarray, edits: Callable[[float], list[Edit]],
                 meaning: str, info: dict[str, Any]) -> Method:  # fmt: skip
    def lists(ev: Evaluator, s: float) -> np.ndarray:
        transform = policy_transform(setup.runtime, edits(s))
        return ev.scores(transform).topk(K, dim=1).indices.numpy()

    return Method(name, "steering", strengths, lists, meaning, kind, edits=edits, info=info)


def nudge(setup: Setup) -> Method:
    n = min(NUDGE_LATENTS, len(setup.candidates))
    meaning = SWEEP_RANGES["nudge"].meaning
    if n == 0:
        return _skipped("nudge", "steering", meaning, "no screened latent lowers the dev ARP", "nudge")
    model = setup.ctx.model
    family = fit_weights(setup.candidates[:n], setup.runtime, model.item_embeddings(), setup.dev.popularity)
    info = {"n_latents": n, "weighting": "fit",
            "latents": [{"latent": c.latent, "value": c.edit.value} for c in family]}  # fmt: skip
    grid = sweep_grid("nudge", setup.n_points)
    return _edit_method(setup, "nudge", "nudge", grid, lambda s: policy_edits(family, n, s), meaning, info)


def pin(setup: Setup) -> Method:
    family = [c for c in setup.candidates if c.gap_change <= 0]
    meaning = "how many of the gap-safe screened latents are pinned at their dev mean, best first"
    if not family:
        return _skipped("pin", "steering", meaning, "no screened latent lowers the dev leakage without widening "
                        "the dev NDCG gap", "pin")  # fmt: skip
    grid = np.arange(1, min(setup.n_points, len(family)) + 1, dtype=np.float64)
    info = {"family": "gap-safe", "latents": [c.latent for c in family[: len(grid)]]}
    if len(grid) < setup.n_points:
        info["short"] = f"only {len(family)} gap-safe latents: {len(grid)} points, not {setup.n_points}"
    return _edit_method(setup, "pin", "pin", grid, lambda n: policy_edits(family, int(n), 1.0), meaning, info)


def _fitted_method(setup: Setup, name: str, role: str, policy: FittedPolicy, grid: str,
                   anchored: bool = True, **info: Any) -> Method:  # fmt: skip
    popularity = setup.dev.popularity

    def lists(ev: Evaluator, s: float) -> np.ndarray:
        needs = policy.spec.needs_lists
        transform = offline_transform(
            policy.with_strength(s), sae=setup.runtime, popularity=popularity,
            unsteered_scores=ev.data.scores.numpy() if needs else None, histories=histories(ev) if needs else None,
        )  # fmt: skip
        return topk(ev, transform)

    kind = policy.kind if role == "steering" else None
    meaning = SWEEP_RANGES[grid].meaning
    return Method(name, role, sweep_grid(grid, setup.n_points), lists, meaning, kind, anchored, policy,
                  info={**policy.fit, **info})  # fmt: skip


def calibrated(setup: Setup) -> Method:
    emb = setup.ctx.model.item_embeddings().detach().cpu().numpy()
    policy = fit_calibrated(setup.dev.data.h.numpy(), emb, setup.dev.popularity, list_k=K)
    return _fitted_method(setup, "calibrated", "steering", policy, "calibrated")


def spectral(setup: Setup) -> Method:
    emb = setup.ctx.model.item_embeddings().detach().cpu().numpy()
    return _fitted_method(setup, "spectral", "steering", fit_spectral_policy(setup.dev.data.h.numpy(), emb, rank=1),
                          "spectral")  # fmt: skip


def popsteer(setup: Setup) -> Method:
    h_head, h_tail, profiles = popsteer_profiles(setup)
    policy = fit_popsteer_policy(setup.runtime, h_head, h_tail)
    return _fitted_method(setup, "popsteer", "steering", policy, "popsteer", anchored=False, profiles=profiles)


@torch.no_grad()
def popsteer_profiles(setup: Setup, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray, str]:
    """h of PopSteer's head-only and deep-tail-only profiles: every validation history with its items replaced by
    random head / deep-tail items (sequential models, whose h is a function of the history). A model that represents
    a user by id cannot represent a made-up history: there, the validation users in the top and bottom quartile of
    mean history log-popularity stand in for the two profile sets."""
    dev, ctx = setup.dev, setup.ctx
    if ctx.model.sequential:
        head, tail = synthetic_profiles(histories(dev), np.flatnonzero(dev.context.head),
                                        np.flatnonzero(dev.context.deep))  # fmt: skip
        out = []
        for profiles in (head, tail):
            seen = Ragged.from_lists(profiles)
            out.append(np.concatenate([
                ctx.model.represent(make_batch(ctx.model, np.arange(s, min(s + batch_size, len(profiles))), seen,
                                               "cpu")).float().numpy()
                for s in range(0, len(profiles), batch_size)
            ]))  # fmt: skip
        return out[0], out[1], "synthetic head-only and deep-tail-only copies of every validation history"
    log_pop = np.log1p(dev.popularity)
    mean = np.array([log_pop[r].mean() if len(r) else np.nan for r in histories(dev)])
    low, high = np.nanquantile(mean, [0.25, 0.75])
    h = dev.data.h.numpy()
    return (h[mean >= high], h[mean <= low], "validation users in the top vs bottom quartile of mean history "
            "log-popularity (the model represents users by id, so synthetic histories have no h)")  # fmt: skip


def eraser(method: str, anchor: str, name: str, role: str, rank: int = 1) -> Callable[[Setup], Method]:
    def build(setup: Setup) -> Method:
        data = setup.dev.data
        assert data.group is not None  # fairness targets only
        policy = fit_erase(data.h.numpy(), data.group, method, rank, anchor)  # type: ignore[arg-type]
        return _fitted_method(setup, name, role, policy, "erase")

    return build


# ---------------------------------------------------------------- re-ranking baselines


def penalty(shape: str) -> Callable[[Setup], Method]:
    def build(setup: Setup) -> Method:
        popularity = setup.dev.popularity
        scale = penalty_scale(setup.dev.data.scores, popularity, shape)  # on dev: test is never looked at

        def lists(ev: Evaluator, s: float) -> np.ndarray:
            return popularity_penalty(ev.data.scores, popularity, s * scale, K, shape)

        name = f"penalty-{shape}"
        return Method(name, "baseline", sweep_grid(name, setup.n_points), lists, SWEEP_RANGES[name].meaning,
                      info={"shape": shape, "scale": round(scale, 8)})  # fmt: skip

    return build


def xquad_method(setup: Setup) -> Method:
    def lists(ev: Evaluator, s: float) -> np.ndarray:
        head = ev.context.head
        share = np.array([(~head[r]).mean() if len(r) else 0.0 for r in histories(ev)])
        return xquad(ev.data.scores, head, share, s, K)

    return Method("xquad", "baseline", sweep_grid("xquad", setup.n_points), lists, SWEEP_RANGES["xquad"].meaning)


def calibrated_popularity_method(setup: Setup) -> Method:
    def lists(ev: Evaluator, s: float) -> np.ndarray:
        groups = popularity_groups(ev.context.head, ev.context.deep)
        return calibrated_popularity(ev.data.scores, groups, ev.context.history_mix, s, K)

    name = "calibrated-popularity"
    return Method(name, "baseline", sweep_grid(name, setup.n_points), lists, SWEEP_RANGES[name].meaning)


def _skipped(name: str, role: str, meaning: str, why: str, kind: str | None = None) -> Method:
    def nothing(ev: Evaluator, s: float) -> np.ndarray:
        raise RuntimeError(f"method '{name}' has no sweep ({why})")

    return Method(name, role, np.zeros(0), nothing, meaning, kind, info={"skipped": why})


POPULARITY: dict[str, Callable[[Setup], Method]] = {
    "nudge": nudge, "calibrated": calibrated, "spectral": spectral, "popsteer": popsteer,
    "penalty-log": penalty("log"), "penalty-linear": penalty("linear"), "penalty-sqrt": penalty("sqrt"),
    "xquad": xquad_method, "calibrated-popularity": calibrated_popularity_method,
}  # fmt: skip
"""Popularity methods, steering families first."""
FAIRNESS: dict[str, Callable[[Setup], Method]] = {
    "erase": eraser("leace", "pooled", "erase", "steering"),
    "erase-midpoint": eraser("leace", "midpoint", "erase-midpoint", "steering"),
    "pin": pin,
    "inlp": eraser("inlp", "pooled", "inlp", "baseline", INLP_RANK),
    "mean-difference": eraser("mean-difference", "pooled", "mean-difference", "baseline"),
}
"""Methods of gender and any user-attribute target, steering families first."""


def build_methods(setup: Setup) -> list[Method]:
    """Every method of the target, fit on validation."""
    table = FAIRNESS if setup.target.fairness else POPULARITY
    return [build(setup) for build in table.values()]
