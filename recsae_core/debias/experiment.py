"""`recsae debias`: sweep every steering family and baseline of a target (`recsae_core.debias.methods`) over the same
number of strengths, choose each one's operating point on validation, compare the fronts at equal test NDCG loss with
paired-bootstrap intervals, and write RUN_DIR/debias/<name>.json, RUN_DIR/debias/report.html and, for the steering
family chosen on validation, RUN_DIR/policies/<name>.json, where <name> is the target's file name
(`recsae_core.debias.targets`: 'popularity', 'gender', 'attribute-occupation-student').

On a Ray cluster (`ray_config`), the two maps of independent measurements run on an actor pool that receives the
shared state once (`recsae_core.common.ray_map`; the run itself travels as its folder,
`recsae_core.recommenders.run_on_ray`): the causal screen, one discovery per item (`screen.screen_latent`), and the
sweep, one (method, strength) point per item (`measure.sweep_point`). Each item reads only state fixed before its
map and changes none, so the report is the one-process one (tests/test_distributed_pools.py). What combines items
stays here: the association, fitting the methods, selection, the operating points (one dev measurement per method,
against the sweep's 16 per method by default: not worth starting a third pool) and the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from recsae_core.common.artifacts import read_json, write_json, write_json_recorded
from recsae_core.common.errors import ConfigError
from recsae_core.common.layout import STATS_FILE, RunLayout
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.common.ray_map import item_map
from recsae_core.debias import policy_kinds
from recsae_core.debias.bias_metrics import HEAD_DEFINITION, head_mask
from recsae_core.debias.bootstrap import LEVEL, N_BOOT, PointReplicates
from recsae_core.debias.fronts import LOSSES, comparison
from recsae_core.debias.measure import StageMeasure, SweepStages, sweep_point, values, with_intervals
from recsae_core.debias.methods import Method, Setup, build_methods
from recsae_core.debias.report import write_report
from recsae_core.debias.screen import Evaluator, K, find_latents, made_for, objective, policy_document, stage_data
from recsae_core.debias.selection import pick_operating_point
from recsae_core.debias.sweeps import SWEEP_POINTS
from recsae_core.debias.targets import Target, parse_target, user_groups
from recsae_core.debias.verdict import FAIRNESS_METRICS, POPULARITY_METRICS, bands, fairness_verdict, popularity_verdict
from recsae_core.recommenders.run import RunContext, load_run
from recsae_core.recommenders.run_on_ray import RUN_BY_FOLDER
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.runtime import SAERuntime
from recsae_core.sae.stats import load_stats

SELECTION = (
    "every method is fit on validation users and swept over the same number of strengths; its operating point is the "
    "point with the best validation bias objective (ARP@10; fairness targets: the leakage distance |AUC - 0.5|) among "
    "those whose validation NDCG@10 loss, smoothed against the strength by isotonic regression (a stronger edit never "
    "costs less; counters the winner's curse of picking a point whose dev loss is low by chance), is within the "
    "budget (fairness targets: and whose validation NDCG gap is not wider than the original's); 'steering' is the "
    "steering family whose operating point has the best validation objective; test is only measured, with 95% "
    "paired-bootstrap intervals over users (one set of resamples per stage shared by every method); fronts are "
    "compared at equal test NDCG loss, interpolated along each front"
)


class Swept:
    """One method's points, measured."""

    def __init__(self, method: Method) -> None:
        self.method = method
        self.dev: list[PointReplicates] = []
        """Validation measurements (no resamples) of each strength."""
        self.test: list[PointReplicates] = []
        """Test measurements (with resamples) of each strength."""
        self.pick: int | None = None
        """Index of the operating point (None: none within the budget)."""
        self.smoothed = np.zeros(0)
        """Isotonic dev NDCG loss of each point."""


def run_debias(
    run_dir: Path, target: str, budget: float = 0.02, fdr: float = 0.05, max_candidates: int = 24,
    progress: bool = True, log: Callable[[str], None] = print, sweep_points: int = SWEEP_POINTS,
    bootstrap: int = N_BOOT, seed: int = 0, ray_config: RayConfig | None = None,
) -> dict[str, Any]:  # fmt: skip
    """See recsae_core.debias.experiment.debias."""
    parsed = parse_target(target)
    if not 0 < budget < 1:
        raise ConfigError(f"--budget must be in (0, 1), got {budget}")
    if sweep_points < 2:
        raise ConfigError(f"--sweep-points must be at least 2 (a front needs points), got {sweep_points}")
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap is a number of resamples (0 = no intervals), got {bootstrap}")
    started = time.perf_counter()
    each = item_map(ray_config, RUN_BY_FOLDER)  # the screen's and the sweep's independent measurements
    ctx = load_run(run_dir)
    groups = user_groups(ctx.dataset, parsed) if parsed.fairness else None  # refuse before any heavy work
    ctx.model.eval()
    layout = RunLayout(run_dir)
    layout.verify_recommender()  # a changed file is refused, naming it
    layout.verify_sae()
    sae = TopKSAE.load(layout.sae).eval()
    runtime = SAERuntime.from_model(sae, load_stats(layout.sae / STATS_FILE, sae.cfg.n_latents))
    popularity = ctx.split.item_popularity().astype(np.float64)
    head = head_mask(popularity)
    dev_ev = Evaluator(ctx, stage_data(ctx, "valid", groups, parsed), popularity, head)
    test_ev = Evaluator(ctx, stage_data(ctx, "test", groups, parsed), popularity, head)
    dev, test = StageMeasure(dev_ev, bootstrap, seed), StageMeasure(test_ev, bootstrap, seed + 1)
    log(f"original test metrics: {values(test.original)}")
    assoc, candidates = find_latents(dev_ev, runtime, parsed, values(dev.original), fdr, max_candidates,
                                     progress=progress, each=each)  # fmt: skip
    log(f"{int(assoc.significant.sum())} latents pass BH at FDR {fdr}; {len(candidates)} reduce the bias on dev")
    methods = build_methods(Setup(ctx, runtime, parsed, dev_ev, candidates, sweep_points))
    swept = [Swept(m) for m in methods]
    points = [(i, float(strength)) for i, m in enumerate(methods) for strength in m.strengths]
    measured = each(sweep_point, SweepStages(methods, dev, test), points, desc=f"sweep ({target})",
                    progress=progress)  # fmt: skip
    for (i, _), (dev_point, test_point) in zip(points, measured, strict=True):
        swept[i].dev.append(dev_point)
        swept[i].test.append(test_point)
    for s in swept:
        select(s, parsed, budget, dev.original)
    steering = best_steering(swept, parsed)
    operating = {s.method.name: operating_point(s, dev, dev_ev, test.original, dev.original) for s in swept}
    result = summarise(parsed, run_dir, budget, swept, steering, dev, test, operating)
    result["latents"] = latents_block(assoc, candidates, fdr, parsed)
    result["chosen"] = chosen_block(ctx, layout, parsed, steering, budget, runtime, log)
    if groups is not None:
        result["groups"] = {"column": parsed.column, "group": groups.label, "rest": groups.rest,
                            "users": {stage: {"group": int(ev.data.group.sum()), "rest": int((~ev.data.group).sum())}
                                      for stage, ev in (("dev", dev_ev), ("test", test_ev))}}  # fmt: skip
    result["bootstrap"] = {"resamples": bootstrap, "level": LEVEL, "seed": {"dev": seed, "test": seed + 1}}
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(layout.debias / f"{parsed.name}.json", result)
    write_report(layout.debias)
    return result


def select(s: Swept, target: Target, budget: float, original_dev: PointReplicates) -> None:
    """The method's operating point on validation (`selection.pick_operating_point`)."""
    if not s.dev:
        return
    dev_values = [p.values for p in s.dev]
    allowed = None
    if target.fairness:
        allowed = np.array([v["ndcg_gap"] <= original_dev.values["ndcg_gap"] + 1e-12 for v in dev_values])
    picked = pick_operating_point(s.method.strengths, np.array([p.loss for p in s.dev]),
                                  np.array([objective(v, target) for v in dev_values]), budget, allowed,
                                  s.method.anchored)  # fmt: skip
    s.pick, s.smoothed = picked.index, picked.smoothed


def best_steering(swept: list[Swept], target: Target) -> Swept | None:
    """The steering family whose operating point has the best validation objective (ties: registry order)."""
    chosen = [s for s in swept if s.method.role == "steering" and s.pick is not None]
    return min(chosen, key=lambda s: objective(s.dev[s.pick].values, target), default=None)  # type: ignore[index]


def operating_point(
    s: Swept, dev: StageMeasure, dev_ev: Evaluator, original_test: PointReplicates, original_dev: PointReplicates
) -> dict[str, Any]:
    """A method's operating point: strength, dev and test metrics with intervals and changes against the original
    (dev measured again at that strength, with the dev resamples)."""
    if s.pick is None:
        why = s.method.info.get("skipped") or "no point's smoothed dev NDCG loss fits the budget (and constraint)"
        return {"strength": None, "reason": why}
    strength = float(s.method.strengths[s.pick])
    dev_point = dev.measure(s.method.lists(dev_ev, strength))
    return {
        "strength": round(strength, 8),
        "smoothed_dev_ndcg_rel_loss": round(float(s.smoothed[s.pick]), 6),
        "dev": with_intervals(dev_point, original_dev),
        "test": with_intervals(s.test[s.pick], original_test),
    }


def summarise(
    target: Target, run_dir: Path, budget: float, swept: list[Swept], steering: Swept | None, dev: StageMeasure,
    test: StageMeasure, operating: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The report dict: originals, methods, sweep, operating points, comparison, bands and verdict."""
    metrics = FAIRNESS_METRICS if target.fairness else POPULARITY_METRICS
    measured = {s.method.name: s.test for s in swept if s.test}
    unanchored = {s.method.name for s in swept if not s.method.anchored}
    fronts = dict(measured)
    if steering is not None:
        fronts = {"steering": steering.test, **measured}
        if not steering.method.anchored:
            unanchored.add("steering")
    sweep = [
        {"method": s.method.name, "role": s.method.role, "strength": round(float(strength), 8),
         "metrics": values(t), "ndcg_rel_loss": round(t.loss, 6), "dev_metrics": values(d),
         "dev_ndcg_rel_loss": round(d.loss, 6), "smoothed_dev_ndcg_rel_loss": round(float(s.smoothed[i]), 6),
         "operating_point": i == s.pick}
        for s in swept for i, (strength, d, t) in enumerate(zip(s.method.strengths, s.dev, s.test, strict=True))
    ]  # fmt: skip
    upper = max(0.10, 2 * budget)
    name, point, strength = None, None, None
    if steering is not None and steering.pick is not None:
        name, point = "steering", steering.test[steering.pick]
        strength = float(steering.method.strengths[steering.pick])
    if target.fairness:
        verdict = fairness_verdict(name, point, strength, test.original, fronts, unanchored)
    else:
        verdict = popularity_verdict(fronts, name, test.original, unanchored)
    return {
        "target": target.spec, "name": target.name, "run": str(run_dir), "budget": budget, "selection": SELECTION,
        "head_tail": HEAD_DEFINITION, "n_head_items": int(test.context.head.sum()),
        "n_deep_tail_items": int(test.context.deep.sum()), "bias_metrics": list(metrics),
        "original": values(test.original), "original_dev": values(dev.original),
        "original_ci95": with_intervals(test.original)["metrics"],
        "methods": {s.method.name: {"role": s.method.role, "kind": s.method.kind, "anchored": s.method.anchored,
                                    "strength": s.method.meaning, "points": len(s.method.strengths),
                                    "strengths": [round(float(x), 8) for x in s.method.strengths],
                                    "fit": s.method.info} for s in swept},
        "steering": None if steering is None else steering.method.name,
        "operating_points": operating,
        "comparison": comparison(fronts, metrics, test.original, LOSSES, unanchored),
        "fronts": bands(fronts, metrics, test.original, unanchored, upper),
        "verdict": verdict,
        "sweep": sweep,
    }  # fmt: skip


def latents_block(assoc: Any, candidates: list, fdr: float, target: Target) -> dict[str, Any]:
    """The screened latents (nudge and pin families)."""
    return {"fdr": fdr, "n_significant": int(assoc.significant.sum()), "candidates": [
        {"latent": c.latent, "edit": c.edit.__dict__, "bias_drop": round(c.bias_drop, 6),
         "ndcg_loss": round(c.ndcg_loss, 6), "efficiency": round(c.efficiency, 6),
         **({"gap_change": round(c.gap_change, 6)} if target.fairness else {}),
         "cohens_d": round(float(assoc.d[c.latent]), 6), "p": float(assoc.p[c.latent])}
        for c in candidates]}  # fmt: skip


def chosen_block(
    ctx: RunContext, layout: RunLayout, target: Target, steering: Swept | None, budget: float, runtime: SAERuntime,
    log: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """Write the chosen steering family's policy at its operating point (recorded: `recsae bundle` refuses it if its
    bytes change) and describe it; no policy when no steering family fits the budget on dev."""
    empty = {"policy": None, "kind": None, "method": None, "strength": None, "metrics": None, "ndcg_rel_loss": None}
    if steering is None or steering.pick is None:
        why = " with the NDCG gap no wider than the original's" if target.fairness else ""
        log(f"no steering point stays within {budget:.1%} relative NDCG@{K} loss on dev{why}; no policy written")
        return empty
    method, i = steering.method, steering.pick
    strength = float(method.strengths[i])
    dev_point, test_point = steering.dev[i], steering.test[i]
    path = layout.policy(target.name)
    extra: dict[str, Any] = {}
    if method.fitted is not None:
        policy = policy_kinds.with_report(method.fitted.with_strength(strength), runtime.w_dec, concept_names(layout))
        description = (f"{target.spec} de-biasing: {method.name} ({policy.kind}) at strength {strength:g}, chosen on "
                       f"validation within {budget:.1%} relative NDCG@{K} loss")  # fmt: skip
        doc = policy_kinds.policy_document(policy, target.name, target.spec, description, made_for(ctx),
                                           next_version(path), method=method.name, budget=budget,
                                           dev_metrics=values(dev_point))  # fmt: skip
    else:
        assert method.edits is not None
        edits = method.edits(strength)
        n = int(strength) if method.kind == "pin" else int(method.info["n_latents"])
        family = method.info.get("weighting") or method.info.get("family", "screened")
        doc = policy_document(ctx, target, edits, strength, n, budget, values(dev_point), path, family)
        doc = {"kind": method.kind, **doc, "method": method.name}
        extra = {"n_latents": n, "edits": doc["edits"]}
    write_json_recorded(path, doc)
    log(f"chosen: {method.name} at strength {strength:g}: test {values(test_point)}")
    return {"policy": target.name, "kind": method.kind, "method": method.name, "version": doc["version"],
            "strength": round(strength, 8), **extra, "metrics": values(test_point),
            "ndcg_rel_loss": round(test_point.loss, 6), "dev_metrics": values(dev_point),
            "dev_ndcg_rel_loss": round(dev_point.loss, 6),
            "smoothed_dev_ndcg_rel_loss": round(float(steering.smoothed[i]), 6), "policy_file": str(path)}  # fmt: skip


def next_version(path: Path) -> int:
    """One more than the version of the policy file already there (1 when none, or unreadable)."""
    if path.is_file():
        try:
            return int(read_json(path).get("version", 0)) + 1
        except (ValueError, TypeError, AttributeError):
            return 1
    return 1


def concept_names(layout: RunLayout) -> dict[int, str]:
    """The catalog's concept name per latent (empty without a catalog): policies report what they load on."""
    if not layout.catalog.is_file():
        return {}
    try:
        return {int(c["latent"]): str(c["name"]) for c in read_json(layout.catalog).get("concepts", [])}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


def debias(
    run_dir: Path, target: str, budget: float = 0.02, fdr: float = 0.05, max_candidates: int = 24,
    progress: bool = True, log: Callable[[str], None] = print, sweep_points: int = SWEEP_POINTS,
    bootstrap: int = N_BOOT, ray_config: RayConfig | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fit and sweep every method of `target`, choose operating points on validation within `budget` relative
    NDCG@10 loss, compare the fronts on test with `bootstrap` paired resamples (0: no intervals), and write
    RUN_DIR/debias/<name>.json, RUN_DIR/debias/report.html and RUN_DIR/policies/<name>.json (the last only when a
    steering family has a point within the budget). Returns the report dict.

    `target`: 'popularity', 'gender' or 'attribute:COLUMN=VALUE' (see `recsae_core.debias.targets`); <name> is
    its file name. With `ray_config` naming a cluster, the causal screen and the sweep's points are measured on it
    (module docstring); the report is the one-process one."""
    return run_debias(run_dir, target, budget, fdr, max_candidates, progress, log, sweep_points, bootstrap,
                      ray_config=ray_config)  # fmt: skip
