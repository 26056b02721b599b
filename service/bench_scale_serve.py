"""The serving part of `recsae bench scale`: one bundle per catalogue size around the same run and SAE, each served
locally and measured in every mode (service.bench.ModeLoad), with the replica's resident memory (service.soak).

The run's recommender is the synthetic two-tower model imported over its smallest catalogue; h does not depend on
the catalogue, so the SAE trained on its probe serves every size. A larger catalogue is the first n rows of the same
seeded item matrix (recsae_core.recommenders.synthetic), so the run's items, and every user's seen items, are its
first rows; the added items have no interactions (popularity 0) and their ids stand in for titles.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from recsae_core.bundle.export import contents_from_run, ridge_foldin
from recsae_core.bundle.format import BundleContents, verify_bundle, write_bundle
from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import MADE_FROM, RunLayout
from recsae_core.data.datasets import item_meta_from_table
from recsae_core.recommenders.run import load_run
from recsae_core.recommenders.synthetic import SyntheticSpec, item_id, item_matrix
from service.bench import ModeLoad, load_quietly, ratios
from service.bench_load import summarize
from service.bench_modes import MODES, plan_steering
from service.engine import limit_threads
from service.local import MODEL_DEPLOYMENT, free_port, start_local
from service.schemas import ServiceConfig
from service.soak import serve_processes


def catalog_contents(base: BundleContents, spec: SyntheticSpec, n_items: int) -> BundleContents:
    """`base` (the run's bundle contents) over the first `n_items` items of the seeded catalogue."""
    n_run = len(base.item_ids)
    if n_items < n_run or base.model_index is not None or base.item_bias is not None:
        raise ArtifactError(f"a catalogue of {n_items} items cannot extend the run's {n_run} identity-indexed items")
    embeddings = item_matrix(spec, n_items)
    if not np.array_equal(embeddings[:n_run], base.item_embeddings):
        raise ArtifactError("the seeded item matrix does not start with the run's items: another seed or spec")
    added = [item_id(i) for i in range(n_run, n_items)]
    meta, _ = item_meta_from_table(None, added)  # as an import without an item table has it
    years = np.concatenate([base.years if base.years is not None else np.full(n_run, -1), meta.years])
    return dataclasses.replace(
        base, item_embeddings=embeddings, item_ids=[*base.item_ids, *added], titles=[*base.titles, *meta.titles],
        genres=[*base.genres, *meta.genres], years=years,
        popularity=np.concatenate([base.popularity, np.zeros(len(added), np.int64)]),
        foldin=None if base.foldin is None else ridge_foldin(embeddings),
        meta={**base.meta, "catalogue": f"first {n_items} items of the seeded synthetic catalogue"},
    )  # fmt: skip


def write_catalog_bundles(run: Path, spec: SyntheticSpec, sizes: list[int], out: Path) -> dict[int, Path]:
    """A verified bundle per catalogue size, out/items-N (rewritten each time: seconds, against minutes of load)."""
    layout = RunLayout(run)
    ctx = load_run(run)
    with tempfile.TemporaryDirectory() as work:
        base, parity = contents_from_run(ctx, layout.sae, Path(work))
    base.meta[MADE_FROM] = layout.made_from(layout.recommender, layout.sae)
    bundles = {}
    for n in sizes:
        folder = out / f"items-{n}"
        if folder.exists():
            shutil.rmtree(folder)
        write_bundle(catalog_contents(base, spec, n), folder, parity=parity)
        verify_bundle(folder)
        bundles[n] = folder
    return bundles


def replica_rss_mb() -> dict[str, float]:
    """Summed RSS (MiB) of each deployment's replicas of the running local service."""
    replicas, _ = serve_processes()
    return {name: round(sum(rss for _, rss in actors.values()), 1) for name, actors in sorted(replicas.items())}


def serve_catalog(
    bundle: Path, n_items: int, concurrencies: list[int], duration: float, warmup: float, rounds: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """One `serve` entry per concurrency: p50/p99 ms and rps of bare, monitor and steer (steer: the bundle's default
    steering, service.bench_modes.default_steering), their ratios to bare, and the replica's RSS after the runs."""
    limit_threads(1)  # as in a one-CPU replica
    config = ServiceConfig.model_validate({"bundle": str(bundle)})
    served = load_quietly(bundle, config)
    plan = plan_steering(served, config)
    service = start_local(bundle, port=free_port(), metrics_port=free_port())
    entries = []
    try:
        rss_started = replica_rss_mb()
        modes = ModeLoad(service, served, plan, duration, warmup)
        for concurrency in concurrencies:
            log(f"serve: {n_items} items, concurrency {concurrency}, {rounds} round(s) of {', '.join(MODES)}")
            runs = modes.rounds(MODES, concurrency, rounds)
            row = {mode: summarize(runs[mode]) for mode in MODES}
            rss = replica_rss_mb()
            entries.append({
                "n_items": n_items, "concurrency": concurrency,
                "p50_ms": {mode: row[mode]["p50_ms"] for mode in MODES},
                "p99_ms": {mode: row[mode]["p99_ms"] for mode in MODES},
                "rps": {mode: row[mode]["rps"] for mode in MODES},
                "rss_mb": rss.get(MODEL_DEPLOYMENT),
                "rss_mb_by_deployment": rss, "rss_mb_at_start": rss_started.get(MODEL_DEPLOYMENT),
                "requests": {mode: row[mode]["requests"] for mode in MODES},
                "errors": {mode: row[mode]["errors"] for mode in MODES},
                "ratios": ratios(row), "steer": plan.record(served),
            })  # fmt: skip
    finally:
        service.stop()
    return entries
