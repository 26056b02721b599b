"""Concept control, measured: does switching off a concept's latent take what its label names out of the lists?

For every catalog concept whose label names an item attribute (a genre, a decade, a value of another item column:
`named_attribute`), on the test users in whom its latent fires:

- the latent is edited with the served runtime (`SAERuntime.steer`, after `validate_edits`, as the service does):
  ablated, or pinned below zero when ablation is too weak (`OPS`); the op is chosen on the validation users in whom
  the latent fires, never on test (`choose_op`);
- the top-10 lists (seen items masked, as served) are compared before and after (`effect`): the relative drop of
  the attribute's share, the collateral change of the other attributes' shares, and the relative NDCG@10 loss;
- an oracle re-ranker lowers the score of every item carrying the attribute by one penalty, the smallest that
  removes at least as many attribute slots as the steering did (`match_penalty`); its collateral and NDCG loss at
  that drop are the yardstick.

Definitions (U: the affected users, L_u: a user's top-10 list, S_b: share of the 10|U| list slots whose item
carries term b, primes after the edit):
- target_drop = (S_a - S'_a) / S_a for the named attribute a;
- collateral = sum_b |S'_b - S_b| / sum_b S_b over the other values b of a's column (the other genres): the
  share-weighted mean absolute relative change of their shares; collateral_all: the same over every other item
  attribute term (all columns);
- ndcg_rel_loss = (mean NDCG@10 - mean NDCG'@10) / mean NDCG@10 over U (RecBole NDCG, test targets).

`recsae_core.concepts.control_run` measures every such concept of a catalog and writes RUN/debias/concepts.json (the
debias report renders it, `recsae_core.debias.concept_report`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from recsae_core.concepts.control_config import ConceptControlConfig
from recsae_core.concepts.labelers import display, slug
from recsae_core.concepts.metadata_terms import item_term_groups
from recsae_core.data.splits import Ragged
from recsae_core.recommenders.batching import make_batch, mask_seen
from recsae_core.recommenders.ranking_metrics import hit_matrix, ranking_metrics
from recsae_core.recommenders.run import RunContext
from recsae_core.sae.edits import Edit, EditBounds, validate_edits
from recsae_core.sae.runtime import SAERuntime

K = 10
ITEM_ROLES = ("category", "era", "measure")
"""Term roles that are item attributes. Popularity bands are left out: they come from the log, not the item table,
and popularity has its own de-biasing target."""
GENRE_ROLE = "category"
"""Genre concepts: attributes from categorical item columns (the genres on MovieLens)."""
OPS = (Edit(0, "ablate"), Edit(0, "pin", -0.5, "std"), Edit(0, "pin", -1.0, "std"), Edit(0, "pin", -2.0, "std"),
       Edit(0, "pin", -4.0, "std"))  # fmt: skip
"""The edits tried, mildest first (the latent is filled in per concept)."""
PRECISION_FLOOR = 0.01
"""Collateral below this counts as this in precision = target_drop / collateral (no infinite precision)."""


class Attributes(NamedTuple):
    """The item attribute terms of a run, and which items carry them."""

    keys: list[str]
    """Term keys ('genre:Horror', 'decade:1980s')."""
    kinds: list[str]
    """Each term's column kind ('genre')."""
    roles: list[str]
    """Each term's role (one of ITEM_ROLES)."""
    items: sp.csr_matrix
    """(n_items, len(keys)) 0/1."""


class Stage(NamedTuple):
    """A stage's users with targets, as served before any edit."""

    users: np.ndarray
    """User ids."""
    seen: Ragged
    """The items masked for each user (the stage's history)."""
    h: np.ndarray
    """(users, d) float32 representations."""
    scores: Tensor
    """(users, n_items) scores, seen items at -inf."""
    top: np.ndarray
    """(users, K) top-K lists."""
    ndcg: np.ndarray
    """(users,) NDCG@K of `top`."""
    targets: list[np.ndarray]
    """Each user's target items."""
    latents: np.ndarray
    """(users, k) firing latents of each user's code (-1 where a slot did not fire)."""


class Effect(NamedTuple):
    """What an edit or a re-ranker did to the affected users' lists."""

    slots_before: int
    """List slots holding an item with the attribute, before."""
    slots_after: int
    """The same, after."""
    target_drop: float
    """Relative drop of the attribute's share (0 when it had none)."""
    collateral: float
    """Share-weighted mean absolute relative change of the other values of its column (module docstring)."""
    collateral_all: float
    """The same over every other item attribute term."""
    ndcg_rel_loss: float
    """Relative NDCG@K loss."""

    def brief(self) -> dict[str, float]:
        return {k: round(float(getattr(self, k)), 6) for k in self._fields[2:]}


def item_attributes(ctx: RunContext) -> Attributes:
    """The item attribute terms as the catalog's metadata labeler names them (`metadata_terms`)."""
    groups = [g for g in item_term_groups(ctx.dataset, ctx.split.item_popularity()) if g.role in ITEM_ROLES]
    if not groups:
        return Attributes([], [], [], sp.csr_matrix((ctx.split.n_items, 0)))
    keys = [k for g in groups for k in g.keys]
    kinds = [g.kind for g in groups for _ in g.keys]
    roles = [str(g.role) for g in groups for _ in g.keys]
    return Attributes(keys, kinds, roles, sp.hstack([g.matrix for g in groups]).tocsr().astype(np.float64))


def named_attribute(concept: dict[str, Any], attrs: Attributes) -> tuple[int, str] | None:
    """(term index, the catalog term that names it) of the item attribute a concept's label names, or None.

    A catalog term names an attribute when its display word (as the labeler spells it into names) is a run of the
    name's words. Among several: a categorical one (a genre) first, then one on the recommendation side ('next
    genre:War' over 'last genre:Comedy': what the model recommends is what an edit should change), then the first
    in the name."""
    words = str(concept.get("name", "")).split("-")
    index = {k: i for i, k in enumerate(attrs.keys)}
    found = []
    for term in (t["term"] for t in concept.get("terms", [])):
        base = term.removeprefix("next ").removeprefix("last ")
        if base not in index:
            continue
        at = _run_at(words, slug(display(term)).split("-"))
        if at is not None:
            i = index[base]
            found.append(((attrs.roles[i] != GENRE_ROLE, not term.startswith("next "), at), i, term))
    return None if not found else min(found)[1:]


def _run_at(words: list[str], run: list[str]) -> int | None:
    for start in range(len(words) - len(run) + 1):
        if words[start : start + len(run)] == run:
            return start
    return None


@torch.no_grad()
def load_stage(ctx: RunContext, runtime: SAERuntime, stage: str, batch_size: int = 1024) -> Stage:
    """The stage's users with targets: h, masked scores, top-K lists, NDCG and SAE codes."""
    seen, targets = ctx.split.seen(stage), ctx.split.targets(stage)
    users = np.flatnonzero(targets.lengths > 0)
    hs, scores = [], []
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        h = ctx.model.represent(make_batch(ctx.model, chunk, seen, "cpu")).float()
        hs.append(h.numpy())
        scores.append(mask_seen(ctx.model.score(h).float(), chunk, seen))
    h_all, scores_all = np.concatenate(hs), torch.cat(scores)
    top = scores_all.topk(K, dim=1).indices.numpy()
    rows = [targets.row(u) for u in users]
    codes = runtime.encode(h_all)
    latents = np.where(codes.values > 0, codes.indices, -1)
    return Stage(users, seen, h_all, scores_all, top, _ndcg(top, rows), rows, latents)


def _ndcg(top: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    n_targets = np.array([len(t) for t in targets], dtype=np.int64)
    return ranking_metrics(hit_matrix(top, targets), n_targets, (K,))[f"ndcg@{K}"]


@torch.no_grad()
def steered_lists(
    ctx: RunContext, runtime: SAERuntime, stage: Stage, rows: np.ndarray, edits: list[Edit]
) -> list[np.ndarray]:
    """The top-K lists of `rows` under each edit, applied as served: validated, steered, scored, seen items masked
    (one scoring pass for all the edits)."""
    rows_per = [[validate_edits([e], runtime.n_latents, EditBounds(), runtime.stats)] * len(rows) for e in edits]
    h = np.concatenate([runtime.steer(stage.h[rows], per).h for per in rows_per])
    users = np.tile(stage.users[rows], len(edits))
    top = mask_seen(ctx.model.score(torch.from_numpy(h)).float(), users, stage.seen).topk(K, dim=1).indices.numpy()
    return np.split(top, len(edits))


def oracle_lists(scores: Tensor, carries: np.ndarray, penalty: float) -> np.ndarray:
    """Top-K after lowering the score of every item carrying the attribute (`carries`) by `penalty`."""
    # float64: the penalties `match_penalty` returns sit between score differences that float32 could round into ties
    return (scores.double() - penalty * torch.as_tensor(carries, dtype=torch.float64)).topk(K, dim=1).indices.numpy()


def carriers(attrs: Attributes, term: int) -> np.ndarray:
    """(n_items,) bool: the items that carry `term`."""
    return attrs.items[:, term].toarray().ravel() > 0


def slots(lists: np.ndarray, carries: np.ndarray) -> int:
    """List slots holding an item that carries the attribute (`carries`: from `carriers`)."""
    return int(carries[lists].sum())


def effect(
    attrs: Attributes, term: int, before: np.ndarray, after: np.ndarray, ndcg_before: np.ndarray,
    ndcg_after: np.ndarray,
) -> Effect:  # fmt: skip
    """The module docstring's measures of `after` against `before`, (users, K) lists of the same users."""
    share_before, share_after = _shares(before, attrs), _shares(after, attrs)
    carries = carriers(attrs, term)
    n_before, n_after = slots(before, carries), slots(after, carries)
    drop = (n_before - n_after) / n_before if n_before else 0.0
    others = np.arange(len(attrs.keys)) != term
    same = others & (np.asarray(attrs.kinds) == attrs.kinds[term])
    base = float(ndcg_before.mean()) if len(ndcg_before) else 0.0
    loss = (base - float(ndcg_after.mean())) / base if base > 0 else 0.0
    return Effect(n_before, n_after, drop, _collateral(share_before, share_after, same),
                  _collateral(share_before, share_after, others), loss)  # fmt: skip


def _shares(lists: np.ndarray, attrs: Attributes) -> np.ndarray:
    return np.asarray(attrs.items[lists.ravel()].sum(axis=0)).ravel() / max(lists.size, 1)


def _collateral(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    total = before[mask].sum()
    return float(np.abs(after[mask] - before[mask]).sum() / total) if total > 0 else 0.0


def match_penalty(scores: Tensor, carries: np.ndarray, removed: int) -> float:
    """A penalty at which the oracle removes at least `removed` attribute slots from the lists, from the first
    interval of penalties that does: the lists change only where the penalty crosses a difference between a
    carrier's and another item's score, so the answer is the midpoint between two such breakpoints (never a tie).
    0 when `removed` <= 0; past the largest breakpoint (every carrier below every other item) when no penalty
    removes that many."""
    if removed <= 0:
        return 0.0
    # Only a user's K best carriers and K best other items can make a penalised top-K.
    flag = torch.as_tensor(carries)
    own, other = (scores.double().masked_fill(mask, -torch.inf).topk(K, dim=1).values.numpy() for mask in (~flag, flag))
    with np.errstate(invalid="ignore"):  # -inf - -inf: masked on both sides, dropped below
        cuts = np.unique((own[:, :, None] - other[:, None, :]).ravel())
    cuts = cuts[np.isfinite(cuts) & (cuts > 0)]
    candidates = np.append((cuts[:-1] + cuts[1:]) / 2, cuts[-1] + 1.0) if len(cuts) else np.ones(1)
    both = np.concatenate([own, other], axis=1)
    is_carrier = np.arange(2 * K) < K

    def kept(penalty: float) -> int:
        top = np.argsort(-(both - penalty * is_carrier), axis=1, kind="stable")[:, :K]
        return int((is_carrier[top] & np.isfinite(np.take_along_axis(both, top, axis=1))).sum())

    start, low, high = kept(0.0), 0, len(candidates) - 1
    while low < high:  # the first candidate that removes enough (removal grows with the penalty)
        mid = (low + high) // 2
        if start - kept(candidates[mid]) >= removed:
            high = mid
        else:
            low = mid + 1
    return float(candidates[low])


def choose_op(trials: list[tuple[Edit, Effect]], config: ConceptControlConfig) -> tuple[Edit, Effect, str]:
    """On validation users: the mildest op that reaches the goal within the NDCG budget and the collateral limit;
    else the one with the largest drop within them; else the mildest (ablation). With the reason."""
    ok = [t for t in trials if t[1].ndcg_rel_loss <= config.budget and t[1].collateral <= config.max_collateral]
    if reach := [t for t in ok if t[1].target_drop >= config.goal]:
        return (*reach[0], "mildest op reaching the goal within the limits")
    if ok:
        return (*max(ok, key=lambda t: t[1].target_drop), "largest drop within the limits (goal not reached)")
    return (*trials[0], "no op within the limits: ablation")


def measure_concept(
    ctx: RunContext, runtime: SAERuntime, attrs: Attributes, dev: Stage, test: Stage, latent: int, term: int,
    config: ConceptControlConfig,
) -> dict[str, Any] | str:  # fmt: skip
    """One concept's record, or why it cannot be measured."""
    dev_rows = np.flatnonzero((dev.latents == latent).any(axis=1))
    rows = np.flatnonzero((test.latents == latent).any(axis=1))
    if min(len(dev_rows), len(rows)) < config.min_users:
        return f"fires in {len(dev_rows)} validation and {len(rows)} test users (< {config.min_users})"
    carries = carriers(attrs, term)
    if slots(test.top[rows], carries) == 0 or slots(dev.top[dev_rows], carries) == 0:
        return "the attribute is absent from the affected users' lists"
    edits, dev_targets = [replace(op, latent=latent) for op in OPS], [dev.targets[r] for r in dev_rows]
    lists = steered_lists(ctx, runtime, dev, dev_rows, edits)
    trials = [(edit, effect(attrs, term, dev.top[dev_rows], after, dev.ndcg[dev_rows], _ndcg(after, dev_targets)))
              for edit, after in zip(edits, lists, strict=True)]  # fmt: skip
    edit, dev_effect, why = choose_op(trials, config)
    targets = [test.targets[r] for r in rows]
    (after,) = steered_lists(ctx, runtime, test, rows, [edit])
    steer = effect(attrs, term, test.top[rows], after, test.ndcg[rows], _ndcg(after, targets))
    scores = test.scores[torch.as_tensor(rows)]
    penalty = match_penalty(scores, carries, steer.slots_before - steer.slots_after)
    reranked = oracle_lists(scores, carries, penalty)
    oracle = effect(attrs, term, test.top[rows], reranked, test.ndcg[rows], _ndcg(reranked, targets))
    return {
        "n_users": len(rows), "n_users_dev": len(dev_rows),
        "op": {"op": edit.op, "value": edit.value, "unit": edit.unit}, "op_choice": why,
        "share_before": round(steer.slots_before / (K * len(rows)), 6),
        "share_after": round(steer.slots_after / (K * len(rows)), 6), **steer.brief(),
        "precision": round(steer.target_drop / max(steer.collateral, PRECISION_FLOOR), 4), "dev": dev_effect.brief(),
        "oracle": {"penalty": float(f"{penalty:.6g}"), **oracle.brief(),
                   "precision": round(oracle.target_drop / max(oracle.collateral, PRECISION_FLOOR), 4)},
    }  # fmt: skip
