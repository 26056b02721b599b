"""Targeted de-biasing: find the SAE latents behind a bias, rank them by measured effect, sweep a steering policy's
strength against re-ranking baselines, and save the policy the service applies by name.

Everything is selected on the validation stage (latent association, causal screen, operating point); the test
stage is only measured. Policies are applied exactly as the service applies them (the SAE runtime's error-preserving
steer, after the same validation).

Policy families and what "strength" means:
- popularity: nudges in std units on the n best-screened latents, either each latent's own screened direction
  (+-1 std, "screened") or least-squares weights that make the nudges act like a popularity penalty ("fit");
  strength multiplies every value. The sweep covers n and strength.
- gender and any user attribute (`recsae_core.debias.targets`): each of the n best-screened latents is pinned at
  its dev mean (std units), which removes that latent's variation across users (and so its signal about the
  group) without shifting the average h; strength = n. A second family ("gap-safe") takes only the latents whose
  pin alone did not widen the dev NDCG gap, because the operating point must not widen it and pins that each widen
  it rarely add up to one that does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from recsae_core.common.artifacts import read_json, sha256_file
from recsae_core.common.errors import ConfigError
from recsae_core.common.layout import SAE_WEIGHTS, RunLayout
from recsae_core.common.ray_map import ItemMap, map_here
from recsae_core.data.splits import Stage
from recsae_core.debias.bias_metrics import leakage_auc, leakage_scores, list_metrics, metric_context, ndcg_at_k
from recsae_core.debias.rerank import cohens_d
from recsae_core.debias.targets import Groups, Target
from recsae_core.recommenders.evaluate import make_batch, mask_seen
from recsae_core.recommenders.run import RunContext
from recsae_core.sae.edits import Edit, EditBounds, validate_edits
from recsae_core.sae.runtime import SAERuntime

K = 10
MIN_GROUP_USERS = 5
"""Users each group needs at a stage: the leakage AUC is cross-validated over 5 stratified folds."""


@dataclass
class StageData:
    """Everything about one evaluation stage that does not change between sweep points."""

    stage: Stage
    """'valid' (selection) or 'test' (reporting)."""
    users: np.ndarray
    """Evaluated users (those with targets at this stage)."""
    h: Tensor
    """(users, d) unedited representations."""
    scores: Tensor
    """(users, n_items) unedited scores, seen items at -inf."""
    targets: list[np.ndarray]
    """Each user's target items."""
    group: np.ndarray | None
    """Boolean per user: in the target's group (female users for gender); fairness targets only."""
    history_auc: float | None
    """Leakage AUC of the users' own histories (fairness targets only)."""


class LatentAssociation(NamedTuple):
    """Association of every latent with the bias, on the dev stage."""

    d: np.ndarray
    """(n_latents,) Cohen's d, group a (popular lists / the target's group of users) minus group b."""
    p: np.ndarray
    """(n_latents,) Welch t-test p-values (1 for latents constant in both groups)."""
    significant: np.ndarray
    """(n_latents,) bool: discoveries under Benjamini-Hochberg at the chosen FDR."""


class Candidate(NamedTuple):
    """A latent with its measured causal effect on the dev stage."""

    latent: int
    """Latent index."""
    edit: Edit
    """The unit-strength edit tested."""
    bias_drop: float
    """Reduction of the bias objective (relative ARP drop, or drop of |AUC - 0.5|)."""
    ndcg_loss: float
    """Relative NDCG@10 loss."""
    efficiency: float
    """bias_drop / max(ndcg_loss, floor)."""
    gap_change: float = 0.0
    """Change of the dev NDCG@10 gap between the two groups of users (fairness targets; 0 for popularity)."""


def benjamini_hochberg(p: np.ndarray, q: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """BH step-up: (reject mask, adjusted p-values) controlling the false discovery rate at q."""
    p = np.asarray(p, dtype=np.float64)
    n = len(p)
    order = np.argsort(p, kind="stable")
    ranked = p[order] * n / np.arange(1, n + 1)
    adjusted_sorted = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    adjusted = np.empty(n)
    adjusted[order] = adjusted_sorted
    passing = np.flatnonzero(p[order] <= q * np.arange(1, n + 1) / n)
    reject = np.zeros(n, dtype=bool)
    if len(passing):
        reject[order[: passing.max() + 1]] = True
    return reject, adjusted


def associate(z: np.ndarray, group_a: np.ndarray, group_b: np.ndarray, q: float = 0.05) -> LatentAssociation:
    """Cohen's d and Welch t-test of each latent's activation between two groups of rows, with BH at q."""

    a, b = z[group_a], z[group_b]
    d = cohens_d(a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = sps.ttest_ind(a, b, axis=0, equal_var=False).pvalue
    p = np.where(np.isfinite(p), p, 1.0)
    significant, _ = benjamini_hochberg(p, q)
    return LatentAssociation(d, p, significant)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def stage_data(
    ctx: RunContext, stage: Stage, groups: Groups | None = None, target: Target | None = None, batch_size: int = 1024
) -> StageData:
    """A stage's users, their unedited h and scores; with `groups` (a fairness target), only the users in one of
    the two groups, refused when a group has fewer than `MIN_GROUP_USERS` of them."""
    seen, targets = ctx.split.seen(stage), ctx.split.targets(stage)
    users = np.flatnonzero(targets.lengths > 0)
    keep = np.ones(len(users), dtype=bool) if groups is None else groups.known[users]
    if groups is not None:
        member = groups.member[users[keep]]
        sizes = {groups.label: int(member.sum()), groups.rest: int((~member).sum())}
        if min(sizes.values()) < MIN_GROUP_USERS:
            spec = target.spec if target is not None else groups.label
            counts = ", ".join(f"{n} with {label}" for label, n in sizes.items())
            raise ConfigError(f"target '{spec}': too few {stage} users to measure it ({counts}); each group needs "
                              f"at least {MIN_GROUP_USERS}")  # fmt: skip
    hs, scores = [], []
    # Every user with targets is represented in the same batches whatever the target, and the group's users are
    # taken afterwards, so a user's h and scores do not depend on which target is measured.
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        h = ctx.model.represent(make_batch(ctx.model, chunk, seen, "cpu"))
        hs.append(h)
        scores.append(mask_seen(ctx.model.score(h).float(), chunk, seen))
    h_all, scores_all, users = torch.cat(hs), torch.cat(scores), users[keep]
    if groups is not None:
        h_all, scores_all = h_all[torch.as_tensor(keep)], scores_all[torch.as_tensor(keep)]
    group, history_auc = None, None
    if groups is not None:
        group = groups.member[users]
        history_auc = leakage_auc([seen.row(u) for u in users], group, ctx.split.n_items)
    return StageData(stage, users, h_all, scores_all, [targets.row(u) for u in users], group, history_auc)


class Evaluator:
    """Top-10 lists and all metrics for a stage under a representation transform or a re-ranker."""

    def __init__(self, ctx: RunContext, data: StageData, popularity: np.ndarray, head: np.ndarray) -> None:
        self.ctx, self.data, self.popularity, self.head = ctx, data, popularity, head
        self.seen = ctx.split.seen(data.stage)
        self.context = metric_context(popularity, [self.seen.row(u) for u in data.users], data.group)
        """Item groups, each user's history mix and group: what every point's metrics share."""

    @torch.no_grad()
    def scores(self, transform: Callable[[Tensor], Tensor] | None) -> Tensor:
        if transform is None:
            return self.data.scores
        h = transform(self.data.h)
        return mask_seen(self.ctx.model.score(h).float(), self.data.users, self.seen)

    def metrics(self, topk: np.ndarray) -> dict[str, float]:
        ndcg = ndcg_at_k(topk, self.data.targets)
        group = self.data.group
        scores = None if group is None else leakage_scores(topk, group, self.ctx.split.n_items)
        out = list_metrics(topk, ndcg, self.context, scores)
        if group is not None:
            out["history_leakage_auc"] = float(self.data.history_auc)
        return {k: round(v, 6) for k, v in out.items()}

    def steer(self, transform: Callable[[Tensor], Tensor] | None) -> dict[str, float]:
        return self.metrics(self.scores(transform).topk(K, dim=1).indices.numpy())


def policy_transform(sae: SAERuntime, edits: Sequence[Edit]) -> Callable[[Tensor], Tensor] | None:
    """h -> h' as served: the same edits on every row, validated as the service validates a policy, then steered
    by the service's runtime (error-preserving)."""
    edits = list(edits)
    if not edits:
        return None
    edits = validate_edits(edits, sae.n_latents, EditBounds(), sae.stats)

    def steer(h: Tensor) -> Tensor:
        return torch.from_numpy(sae.steer(h.detach().cpu().numpy(), [edits] * len(h)).h)

    return steer


def objective(metrics: dict[str, float], target: Target) -> float:
    """The bias number a target minimises: ARP@10, or the leakage AUC's distance from 0.5 (fairness targets)."""
    return abs(metrics["leakage_auc"] - 0.5) if target.fairness else metrics[f"arp@{K}"]


def rel_loss(metrics: dict[str, float], original: dict[str, float]) -> float:
    base = original[f"ndcg@{K}"]
    return (base - metrics[f"ndcg@{K}"]) / base if base > 0 else 0.0


# ---------------------------------------------------------------- latent finding


def contrast_groups(ev: Evaluator, target: Target) -> tuple[np.ndarray, np.ndarray]:
    """Popularity: users whose original top-10 ARP is in the top vs bottom quartile. Fairness targets: the group
    (female users, for gender) vs the other users."""
    if target.fairness and ev.data.group is not None:
        return ev.data.group, ~ev.data.group
    topk = ev.data.scores.topk(K, dim=1).indices.numpy()
    arp = ev.popularity[topk].mean(axis=1)
    low, high = np.quantile(arp, [0.25, 0.75])
    return arp >= high, arp <= low


def screen_edits(latent: int, d: float, target: Target, mean_std: float) -> list[Edit]:
    """Unit-strength edits tried for a candidate: both nudge directions (popularity), or pinning the latent at
    its dev mean, in std units (fairness targets: removes the latent's variation across users)."""
    if not target.fairness:
        return [Edit(latent, "nudge", -1.0, "std"), Edit(latent, "nudge", 1.0, "std")]
    return [Edit(latent, "pin", round(mean_std, 6), "std")]


class Screen(NamedTuple):
    """What screening a latent needs, the same for every latent (shipped once to each actor of a Ray map)."""

    ev: Evaluator
    """The dev stage."""
    sae: SAERuntime
    """The SAE as served."""
    target: Target
    """The bias target."""
    original: dict[str, float]
    """The original lists' dev metrics."""
    loss_floor: float
    """Relative NDCG loss below this counts as this in a candidate's efficiency."""


class ScreenItem(NamedTuple):
    """A discovery to screen."""

    latent: int
    """Latent index."""
    d: float
    """Its Cohen's d."""
    mean_std: float
    """Its dev mean activation in std units (the value fairness pins hold it at)."""


def find_latents(
    ev: Evaluator, sae: SAERuntime, target: Target, original: dict[str, float], q: float = 0.05,
    max_candidates: int = 24, loss_floor: float = 0.005, progress: bool = True, each: ItemMap = map_here,
) -> tuple[LatentAssociation, list[Candidate]]:  # fmt: skip
    """BH-controlled association on dev, then the causal screen of the strongest discoveries, ranked by bias
    reduction per unit of relative NDCG@10 lost (only latents that reduce the bias are kept). Each discovery is
    screened on its own (`screen_latent`), so `each` may run them anywhere (`common.ray_map.item_map`)."""
    z = sae.encode(ev.data.h.numpy()).dense(sae.n_latents)
    group_a, group_b = contrast_groups(ev, target)
    assoc = associate(z, group_a, group_b, q)
    std = sae.stats.std_activation.numpy()
    found = np.flatnonzero(assoc.significant & (std > 0))
    found = found[np.argsort(-np.abs(assoc.d[found]))][:max_candidates]
    items = [ScreenItem(int(j), float(assoc.d[j]), float(z[:, j].mean() / std[j])) for j in found]
    screened = each(screen_latent, Screen(ev, sae, target, original, loss_floor), items,
                    desc=f"causal screen ({target.spec})", progress=progress)  # fmt: skip
    candidates = [c for c in screened if c is not None]
    candidates.sort(key=lambda c: -c.efficiency)
    return assoc, candidates


def screen_latent(screen: Screen, item: ScreenItem) -> Candidate | None:
    """A discovery's most efficient unit-strength edit on dev, or None when no edit of it reduces the bias."""
    target, original = screen.target, screen.original
    base = objective(original, target)
    best: Candidate | None = None
    for edit in screen_edits(item.latent, item.d, target, item.mean_std):
        metrics = screen.ev.steer(policy_transform(screen.sae, [edit]))
        drop = base - objective(metrics, target)
        drop = drop / base if not target.fairness and base > 0 else drop
        loss = rel_loss(metrics, original)
        gap = metrics["ndcg_gap"] - original["ndcg_gap"] if target.fairness else 0.0
        cand = Candidate(item.latent, edit, drop, loss, drop / max(loss, screen.loss_floor), gap)
        if best is None or cand.efficiency > best.efficiency:
            best = cand
    return best if best is not None and best.bias_drop > 0 else None


def fit_weights(
    candidates: Sequence[Candidate], sae: SAERuntime, item_embeddings: Tensor, popularity: np.ndarray
) -> list[Candidate]:
    """Nudge values for the candidates by least squares: the per-item score shift of a 1-std nudge of each latent
    (W_dec[j] . e_i * std_j) regressed onto -zscore(log(1 + pop)), so that together they act like a popularity
    penalty; values are rescaled to a largest |value| of 1 std (strength then multiplies them)."""
    if not candidates:
        return []
    latents = torch.as_tensor([c.latent for c in candidates])
    with torch.no_grad():
        std = sae.stats.std_activation.float()[latents]
        shift = (torch.from_numpy(sae.w_dec)[latents] @ item_embeddings.float().T) * std[:, None]
    log_pop = np.log1p(popularity)
    goal = -(log_pop - log_pop.mean()) / max(log_pop.std(), 1e-12)
    weights = np.linalg.lstsq(shift.numpy().T.astype(np.float64), goal, rcond=None)[0]
    weights = weights / max(np.abs(weights).max(), 1e-12)
    return [
        c._replace(edit=Edit(c.latent, "nudge", round(float(w), 6), "std"))
        for c, w in zip(candidates, weights, strict=True)
    ]


def policy_edits(candidates: Sequence[Candidate], n_latents: int, strength: float) -> list[Edit]:
    """The first `n_latents` candidates' edits; nudge values are multiplied by `strength` (pins are kept)."""
    out = []
    for cand in candidates[:n_latents]:
        e = cand.edit
        value = e.value * strength if e.op == "nudge" else e.value
        if e.op == "nudge" and value == 0:
            continue
        out.append(Edit(e.latent, e.op, round(float(value), 6), e.unit))
    return out


def made_for(ctx: RunContext) -> dict[str, Any]:
    """The model and SAE a policy was made for (compared by the service against the bundle it loads): the
    recommender's file (weights, or the imported ONNX model) is hashed as the bundle export hashes it."""
    recommender = RunLayout(ctx.root).recommender_model
    return {
        "dataset": ctx.config.get("dataset"),
        "model_type": ctx.model.name,
        "recommender_sha256": sha256_file(recommender) if recommender.is_file() else None,
        "sae_sha256": sha256_file(RunLayout(ctx.root).sae / SAE_WEIGHTS),
    }


def policy_document(
    ctx: RunContext, target: Target, edits: Sequence[Edit], strength: float, n_latents: int, budget: float,
    dev_metrics: dict[str, float], previous: Path | None = None, family: str = "screened",
) -> dict[str, Any]:  # fmt: skip
    """The JSON the service reads (description + edits) with target, strength, version and provenance; named
    after the target's file name ('popularity', 'gender', 'attribute-occupation-student')."""
    version = 1
    if previous is not None and previous.is_file():
        try:
            version = int(read_json(previous).get("version", 0)) + 1
        except (ValueError, TypeError, AttributeError):
            version = 1
    body = [{"latent": e.latent, "op": e.op, "value": e.value, "unit": e.unit} for e in edits]
    return {
        "name": target.name,
        "version": version,
        "description": f"{target.spec} de-biasing: {len(body)} SAE latent edits ({family}) at strength "
        f"{strength:g}, chosen on validation within {budget:.1%} relative NDCG@{K} loss",
        "target": target.spec,
        "strength": strength,
        "n_latents": n_latents,
        "family": family,
        "edits": body,
        "made_for": made_for(ctx),
        "dev_metrics": dev_metrics,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


POLICY = "recsae-policy"
