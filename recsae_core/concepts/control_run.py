"""`recsae concept-control`: every concept of the run's catalog whose label names an item attribute, measured as
`recsae_core.concepts.control` defines it, with medians over the genre concepts and over all of them and whether the
issue's figure is met, written to RUN/debias/concepts.json.

Each concept is measured on its own: `control.measure_concept` reads the run, the SAE and both stages, all fixed
before the first concept, and changes none of them. So on a Ray cluster (`ray_config`) the concepts are measured by
an actor pool that receives that state once (`recsae_core.common.ray_map`; the run travels as its folder,
`recsae_core.recommenders.run_on_ray`), and concepts.json is the one-process one (tests/test_distributed_pools.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from recsae_core.common.artifacts import read_json, write_json
from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import RunLayout
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.common.ray_map import item_map
from recsae_core.concepts.control import (
    GENRE_ROLE,
    OPS,
    PRECISION_FLOOR,
    Attributes,
    K,
    Stage,
    item_attributes,
    load_stage,
    measure_concept,
    named_attribute,
)
from recsae_core.concepts.control_config import ConceptControlConfig
from recsae_core.recommenders.run import RunContext, load_run
from recsae_core.recommenders.run_on_ray import RUN_BY_FOLDER
from recsae_core.sae.runtime import SAERuntime


class Measuring(NamedTuple):
    """What measuring a concept needs, the same for every concept (shipped once to each actor of a Ray map)."""

    ctx: RunContext
    """The run."""
    runtime: SAERuntime
    """The SAE as served."""
    attrs: Attributes
    """The item attribute terms."""
    dev: Stage
    """The validation users (the op is chosen on them)."""
    test: Stage
    """The test users (the measures)."""
    config: ConceptControlConfig
    """Limits and goal."""


class Named(NamedTuple):
    """A catalog concept whose label names an item attribute."""

    latent: int
    """Its latent."""
    term: int
    """The attribute's term index (`Attributes.keys`)."""


def measure_named(measuring: Measuring, concept: Named) -> dict[str, Any] | str:
    """`control.measure_concept` of one named concept: its record, or why it cannot be measured."""
    m = measuring
    return measure_concept(m.ctx, m.runtime, m.attrs, m.dev, m.test, concept.latent, concept.term, m.config)


def named_concepts(
    catalog: dict[str, Any], attrs: Attributes, n_latents: int, path: Path
) -> list[tuple[dict[str, Any], Named]]:  # fmt: skip
    """The catalog's concepts that name an item attribute, in catalog order, each with the head of its record; a
    concept without a usable latent, name or terms is refused, naming the catalog at `path`."""
    named = []
    for concept in catalog["concepts"]:
        try:
            found = named_attribute(concept, attrs)
            latent, label = int(concept["latent"]), str(concept["name"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path}: a concept without a usable latent, name or terms: {err!r}") from None
        if not 0 <= latent < n_latents:
            raise ArtifactError(f"{path}: concept '{label}' has latent {latent}, outside the SAE's {n_latents}")
        if found is None:
            continue
        term, named_by = found
        head = {"latent": latent, "label": label, "attribute": attrs.keys[term], "kind": attrs.kinds[term],
                "role": attrs.roles[term], "named_by": named_by}  # fmt: skip
        named.append((head, Named(latent, term)))
    return named


def concept_control(
    run_dir: Path, config: ConceptControlConfig | None = None, ray_config: RayConfig | None = None
) -> dict[str, Any]:
    """Measure every attribute-naming concept of the run's catalog (on the Ray cluster of `ray_config` when it names
    one: the same result); write RUN/debias/concepts.json."""
    config = config or ConceptControlConfig()
    started = time.perf_counter()
    layout = RunLayout(run_dir)
    if not layout.sae_complete():
        raise ArtifactError(f"{run_dir}: no trained SAE here; run 'recsae train-sae --run {run_dir}' first")
    if not layout.catalog_complete():
        raise ArtifactError(f"{layout.catalog}: missing, or built for another SAE; run 'recsae interpret --run "
                            f"{run_dir}' first")  # fmt: skip
    each = item_map(ray_config, RUN_BY_FOLDER)  # joined before the heavy work: a bad cluster is refused at once
    catalog = read_json(layout.catalog)
    ctx = load_run(run_dir)
    ctx.model.eval()
    runtime = SAERuntime.load(layout.sae)
    attrs = item_attributes(ctx)
    dev, test = load_stage(ctx, runtime, "valid"), load_stage(ctx, runtime, "test")
    if attrs.items.shape[0] != test.scores.shape[1]:
        raise ArtifactError(f"{run_dir}: the item table has {attrs.items.shape[0]} items, the model scores "
                            f"{test.scores.shape[1]}")  # fmt: skip
    named = named_concepts(catalog, attrs, runtime.n_latents, layout.catalog)
    records = each(measure_named, Measuring(ctx, runtime, attrs, dev, test, config), [c for _, c in named],
                   desc="concept control", progress=config.progress)  # fmt: skip
    measured, skipped = [], []
    for (head, _), record in zip(named, records, strict=True):
        if isinstance(record, str):
            skipped.append({**head, "reason": record})
        else:
            measured.append({**head, **record})
    result = {
        "run": str(run_dir), "catalog_version": catalog.get("version"), "k": K,
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "ops": [f"{e.op} {e.value:g} {e.unit}" if e.op != "ablate" else "ablate" for e in OPS],
        "definitions": DEFINITIONS, "concepts": measured, "skipped": skipped,
        "summary": summarise(measured, config), "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    write_json(layout.concept_control, result)
    return result


DEFINITIONS = {
    "users": "test users in whom the concept's latent fires (validation users for choosing the op)",
    "target_drop": "(S_a - S'_a) / S_a: relative drop of the share of top-10 slots holding an item with attribute a",
    "collateral": "sum_b |S'_b - S_b| / sum_b S_b over the other values b of a's column (the other genres)",
    "collateral_all": "the same over every other item attribute term",
    "ndcg_rel_loss": "relative NDCG@10 loss over the affected test users",
    "oracle": "score - penalty x [item has a], penalty bisected to the smallest that removes at least as many "
    "attribute slots as the steering",
    "precision": f"target_drop / max(collateral, {PRECISION_FLOOR})",
    "figure": "met when at least half the genre concepts reach target_drop >= goal with collateral <= "
    "max_collateral and ndcg_rel_loss <= budget (the median genre concept meets all three)",
}


def summarise(measured: list[dict[str, Any]], config: ConceptControlConfig) -> dict[str, Any]:
    """Medians over genre concepts and over all concepts, and whether the issue's figure is met."""

    def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
        keys = ("target_drop", "collateral", "ndcg_rel_loss", "precision")
        out: dict[str, Any] = {"n": len(rows)}
        for k in keys:
            out[k] = round(float(np.median([r[k] for r in rows])), 6) if rows else None
            out[f"oracle_{k}"] = round(float(np.median([r["oracle"][k] for r in rows])), 6) if rows else None
        return out

    genre = [r for r in measured if r["role"] == GENRE_ROLE]
    meets = [r["target_drop"] >= config.goal and r["collateral"] <= config.max_collateral
             and r["ndcg_rel_loss"] <= config.budget for r in genre]  # fmt: skip
    share = float(np.mean(meets)) if meets else 0.0
    return {
        "genre": {**medians(genre), "share_meeting_figure": round(share, 4), "met": bool(genre) and share >= 0.5},
        "all": medians(measured),
        "figure": {"target_drop": f">= {config.goal}", "collateral": f"<= {config.max_collateral}",
                   "ndcg_rel_loss": f"<= {config.budget}"},
    }  # fmt: skip
