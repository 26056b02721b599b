"""`recsae debias`: sweep the steering policy and the baselines, pick the operating point on validation, write
RUN_DIR/debias/<name>.json, RUN_DIR/debias/report.html and RUN_DIR/policies/<name>.json, where <name> is the
target's file name (`recsae_core.debias.targets`: 'popularity', 'gender', 'attribute-occupation-student')."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from recsae_core.common.artifacts import write_json
from recsae_core.common.errors import ConfigError
from recsae_core.common.layout import STATS_FILE, RunLayout
from recsae_core.debias.bias_metrics import (
    HEAD_DEFINITION,
    head_mask,
)
from recsae_core.debias.report import write_report
from recsae_core.debias.rerank import cohens_d, popsteer_transform, popularity_penalty, xquad
from recsae_core.debias.screen import (
    POLICY,
    Evaluator,
    K,
    find_latents,
    fit_weights,
    objective,
    policy_document,
    policy_edits,
    policy_transform,
    rel_loss,
    stage_data,
)
from recsae_core.debias.targets import Target, parse_target, user_groups
from recsae_core.recommenders.evaluate import make_batch
from recsae_core.recommenders.run import RunContext, load_run
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.runtime import SAERuntime
from recsae_core.sae.stats import load_stats

# Every method's grid is dense where the ~2% NDCG budget is crossed (each method is compared at its best point inside
# the budget, so a coarse grid would hand it a point well short of the boundary): on ML-1M the policy crosses it
# between strengths 0.15 and 3 depending on the latent count, the popularity penalty between 0.05 and 0.2 x the
# score spread, xQuAD between 0.1 and 0.4.
STRENGTHS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 8.0)
PENALTIES = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.0625, 0.075, 0.0875, 0.1, 0.1125, 0.125, 0.15, 0.175, 0.2, 0.3,
             0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # fmt: skip
XQUAD = (0.02, 0.05, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
POPSTEER = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
LOWER_IS_BETTER = {f"arp@{K}": True, f"tail_share@{K}": False, f"gini@{K}": True, f"coverage@{K}": False,
                   "leakage_distance": True, "ndcg_gap": True}  # fmt: skip


@torch.no_grad()
def popsteer_d(ctx: RunContext, sae: TopKSAE, head: np.ndarray, dev: Evaluator, n: int = 300) -> np.ndarray:
    """PopSteer's Cohen's d between popular-only and unpopular-only synthetic profiles (sequential models), or,
    for user-embedding models, between dev users in the top and bottom quartile of history popularity."""
    if ctx.model.sequential:
        rng = np.random.default_rng(0)
        head_items, tail_items = np.flatnonzero(head), np.flatnonzero(~head)
        length = min(30, ctx.model.config.max_len, len(head_items))
        profiles = [rng.choice(pool, length, replace=False) for pool in (head_items, tail_items) for _ in range(n)]
        from recsae_core.data.splits import Ragged

        seen = Ragged.from_lists(profiles)
        h = ctx.model.represent(make_batch(ctx.model, np.arange(len(profiles)), seen, "cpu"))
        z = sae.encode(h.float()).numpy()
        return cohens_d(z[:n], z[n:])
    seen = ctx.split.seen("valid")
    mean_pop = np.array([dev.popularity[seen.row(u)].mean() if len(seen.row(u)) else 0 for u in dev.data.users])
    z = sae.encode(dev.data.h.float()).detach().numpy()
    low, high = np.quantile(mean_pop, [0.25, 0.75])
    return cohens_d(z[mean_pop >= high], z[mean_pop <= low])


def _point(method: str, strength: float, dev: dict, test: dict, original: dict, **extra: Any) -> dict[str, Any]:
    return {"method": method, "strength": strength, **extra, "metrics": test["metrics"], "dev_metrics": dev["metrics"],
            "ndcg_rel_loss": round(rel_loss(test["metrics"], original["test"]), 6),
            "dev_ndcg_rel_loss": round(rel_loss(dev["metrics"], original["dev"]), 6)}  # fmt: skip


def pick(points: list[dict], method: str, target: Target, budget: float, original_dev: dict) -> dict | None:
    """The method's point with the lowest dev bias objective within the dev NDCG budget (fairness targets: the dev
    NDCG gap no wider than the original's)."""
    ok = [p for p in points if p["method"] == method and p["dev_ndcg_rel_loss"] <= budget]
    if target.fairness:
        ok = [p for p in ok if p["dev_metrics"]["ndcg_gap"] <= original_dev["ndcg_gap"] + 1e-12]
    return min(ok, key=lambda p: objective(p["dev_metrics"], target), default=None)


def pareto(points: list[dict], metric: str) -> list[int]:
    """Indices of points on the (NDCG@10 up, metric down/up) front, by test metrics."""
    sign = 1.0 if LOWER_IS_BETTER[metric] else -1.0

    def value(p: dict) -> float:
        m = p["metrics"]
        return sign * (abs(m["leakage_auc"] - 0.5) if metric == "leakage_distance" else m[metric])

    front = []
    for i, p in enumerate(points):
        dominated = any(
            q["metrics"][f"ndcg@{K}"] >= p["metrics"][f"ndcg@{K}"] and value(q) <= value(p)
            and (q["metrics"][f"ndcg@{K}"] > p["metrics"][f"ndcg@{K}"] or value(q) < value(p))
            for q in points
        )  # fmt: skip
        if not dominated:
            front.append(i)
    return front


def run_debias(
    run_dir: Path, target: str, budget: float = 0.02, fdr: float = 0.05, max_candidates: int = 24,
    progress: bool = True, log: Callable[[str], None] = print, strengths: Sequence[float] = STRENGTHS,
) -> dict[str, Any]:  # fmt: skip
    """See recsae_core.debias.experiment.debias."""
    parsed = parse_target(target)
    if not 0 < budget < 1:
        raise ConfigError(f"--budget must be in (0, 1), got {budget}")
    started = time.perf_counter()
    ctx = load_run(run_dir)
    groups = user_groups(ctx.dataset, parsed) if parsed.fairness else None  # refuse before any heavy work
    ctx.model.eval()
    layout = RunLayout(run_dir)
    sae = TopKSAE.load(layout.sae).eval()
    stats = load_stats(layout.sae / STATS_FILE, sae.cfg.n_latents)
    runtime = SAERuntime.from_model(sae, stats)
    popularity = ctx.split.item_popularity().astype(np.float64)
    head = head_mask(popularity)
    fair = parsed.fairness
    dev = Evaluator(ctx, stage_data(ctx, "valid", groups, parsed), popularity, head)
    test = Evaluator(ctx, stage_data(ctx, "test", groups, parsed), popularity, head)
    original = {"dev": dev.steer(None), "test": test.steer(None)}
    log(f"original test metrics: {original['test']}")
    assoc, candidates = find_latents(dev, runtime, parsed, original["dev"], fdr, max_candidates, progress=progress)
    log(f"{int(assoc.significant.sum())} latents pass BH at FDR {fdr}; {len(candidates)} reduce the bias on dev")

    jobs: list[tuple[str, float, dict, Callable[[Evaluator], np.ndarray]]] = []
    families = {"screened": candidates}
    if fair:
        families["gap-safe"] = [c for c in candidates if c.gap_change <= 0]
        for weighting in ("screened", "gap-safe"):
            family = families[weighting]
            for n in sorted({n for n in (1, 2, 3, 4, 6, 8, 12, 16, len(family)) if 0 < n <= len(family)}):
                edits = policy_edits(family, n, 1.0)
                jobs.append((POLICY, float(n), {"n_latents": n, "weighting": weighting}, _steered(runtime, edits)))
    else:
        sizes = sorted({n for n in (1, 2, 4, 8, 16, len(candidates)) if 0 < n <= len(candidates)})
        for n in sizes:
            families[f"fit{n}"] = fit_weights(candidates[:n], runtime, ctx.model.item_embeddings(), popularity)
            for weighting, family in (("screened", candidates), ("fit", families[f"fit{n}"])):
                for s in strengths:
                    edits = policy_edits(family, n, s)
                    extra = {"n_latents": n, "weighting": weighting}
                    jobs.append((POLICY, s, extra, _steered(runtime, edits)))
        spread = float(np.nanmean(np.nanstd(torch.nan_to_num(dev.data.scores, neginf=float("nan")).numpy(), axis=1)))
        for lam in PENALTIES:
            jobs.append(("popularity-penalty", round(lam * spread, 6), {}, _penalty(lam * spread, popularity)))
        for lam in XQUAD:
            jobs.append(("xquad", lam, {}, _xquad(lam, head)))
        d = popsteer_d(ctx, sae, head, dev)
        for alpha in POPSTEER:
            jobs.append(("popsteer", alpha, {"n_latents": 32}, _steered_transform(popsteer_transform(
                sae, stats, d, alpha))))  # fmt: skip
    points = []
    for method, strength, extra, lists in tqdm(jobs, desc=f"sweep ({target})", disable=not progress):
        dev_m, test_m = {"metrics": dev.metrics(lists(dev))}, {"metrics": test.metrics(lists(test))}
        points.append(_point(method, strength, dev_m, test_m, original, **extra))

    chosen_point = pick(points, POLICY, parsed, budget, original["dev"])
    chosen: dict[str, Any] = {"policy": None, "strength": None, "metrics": None, "ndcg_rel_loss": None}
    policy_path = RunLayout(run_dir).policy(parsed.name)
    if chosen_point is not None:
        n, s = chosen_point["n_latents"], chosen_point["strength"]
        weighting = chosen_point["weighting"]
        family = families[f"fit{n}" if weighting == "fit" else weighting]
        edits = policy_edits(family, n, 1.0 if fair else s)
        doc = policy_document(ctx, parsed, edits, s, n, budget, chosen_point["dev_metrics"], policy_path, weighting)
        write_json(policy_path, doc)
        chosen = {"policy": parsed.name, "version": doc["version"], "strength": s, "n_latents": n,
                  "weighting": chosen_point["weighting"], "edits": doc["edits"], "metrics": chosen_point["metrics"],
                  "ndcg_rel_loss": chosen_point["ndcg_rel_loss"], "dev_metrics": chosen_point["dev_metrics"],
                  "dev_ndcg_rel_loss": chosen_point["dev_ndcg_rel_loss"], "policy_file": str(policy_path)}  # fmt: skip
        log(f"chosen: {n} latents at strength {s}: {chosen_point['metrics']}")
    else:
        why = " with the NDCG gap no wider than the original's" if fair else ""
        log(f"no policy point stays within {budget:.1%} relative NDCG@{K} loss on dev{why}; no policy written")
    baselines = {}
    for method in ("popularity-penalty", "xquad", "popsteer") if not fair else ():
        best = pick(points, method, parsed, budget, original["dev"])
        baselines[method] = (
            None
            if best is None
            else {"strength": best["strength"], "metrics": best["metrics"], "ndcg_rel_loss": best["ndcg_rel_loss"]}
        )
    metrics = [f"arp@{K}", f"tail_share@{K}", f"gini@{K}", f"coverage@{K}"]
    metrics = ["leakage_distance", "ndcg_gap"] if fair else metrics
    result = {
        "target": target,
        "name": parsed.name,
        "run": str(run_dir),
        "budget": budget,
        "selection": f"latents, strength and baseline points chosen on the validation stage; metrics are test; "
        f"NDCG@{K} budget is relative to the original model on validation",
        "head_tail": HEAD_DEFINITION,
        "n_head_items": int(head.sum()),
        "original": original["test"],
        "original_dev": original["dev"],
        "latents": {
            "fdr": fdr,
            "n_significant": int(assoc.significant.sum()),
            "candidates": [
                {
                    "latent": c.latent,
                    "edit": c.edit.__dict__,
                    "bias_drop": round(c.bias_drop, 6),
                    "ndcg_loss": round(c.ndcg_loss, 6),
                    "efficiency": round(c.efficiency, 6),
                    **({"gap_change": round(c.gap_change, 6)} if fair else {}),
                    "cohens_d": round(float(assoc.d[c.latent]), 6),
                    "p": float(assoc.p[c.latent]),
                }
                for c in candidates
            ],
        },
        "sweep": points,
        "pareto": {m: pareto(points, m) for m in metrics},
        "chosen": chosen,
        "baselines_at_budget": baselines,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if groups is not None:
        result["groups"] = {"column": parsed.column, "group": groups.label, "rest": groups.rest,
                            "users": {stage: {"group": int(ev.data.group.sum()), "rest": int((~ev.data.group).sum())}
                                      for stage, ev in (("dev", dev), ("test", test))}}  # fmt: skip
    out = RunLayout(run_dir).debias
    write_json(out / f"{parsed.name}.json", result)
    write_report(out)
    return result


def _steered(sae: SAERuntime, edits: list) -> Callable[[Evaluator], np.ndarray]:
    return _steered_transform(policy_transform(sae, edits))


def _steered_transform(transform: Callable | None) -> Callable[[Evaluator], np.ndarray]:
    return lambda ev: ev.scores(transform).topk(K, dim=1).indices.numpy()


def _penalty(lam: float, popularity: np.ndarray) -> Callable[[Evaluator], np.ndarray]:
    return lambda ev: popularity_penalty(ev.data.scores, popularity, lam, K)


def _xquad(lam: float, head: np.ndarray) -> Callable[[Evaluator], np.ndarray]:
    def lists(ev: Evaluator) -> np.ndarray:
        seen = ev.seen
        share = np.array([(~head[seen.row(u)]).mean() if len(seen.row(u)) else 0.0 for u in ev.data.users])
        return xquad(ev.data.scores, head, share, lam, K)

    return lists


def debias(
    run_dir: Path, target: str, budget: float = 0.02, fdr: float = 0.05, max_candidates: int = 24,
    progress: bool = True, log: Callable[[str], None] = print, strengths: Sequence[float] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Find the latents behind `target`'s bias, sweep the policy and the baselines, choose on validation within
    `budget` relative NDCG@10 loss, and write RUN_DIR/debias/<name>.json, RUN_DIR/debias/report.html and
    RUN_DIR/policies/<name>.json (the last only when a point fits the budget). Returns the report dict.

    `target`: 'popularity', 'gender' or 'attribute:COLUMN=VALUE' (see `recsae_core.debias.targets`); <name> is
    its file name."""
    from recsae_core.debias.experiment import STRENGTHS, run_debias

    return run_debias(run_dir, target, budget, fdr, max_candidates, progress, log, strengths or STRENGTHS)
