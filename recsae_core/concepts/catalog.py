"""The concept catalog: every live latent named, described and scored, written to RUN_DIR/concepts/catalog.json,
with a self-contained HTML report beside it (`recsae_core.concepts.report`).

    build_catalog(run_dir, labeler="tfidf" | "llm", llm=LLMOptions(...), options=CatalogOptions()) -> catalog dict

The metadata (TF-IDF) labeler labels and scores every live latent; with the language-model labeler the metadata
labels are still computed (terms, fallback names, a baseline on the same latents) and the language model names,
describes and scores the latents it is given (`CatalogOptions.llm_latents`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from recsae_core.common.artifacts import add_recorded, forget_recorded, sha256_file, write_json
from recsae_core.common.errors import ArtifactError, ConfigError, IncompleteError
from recsae_core.common.layout import CATALOG, LLM_CACHE, REPORT, SAE_WEIGHTS, STATS_FILE, RunLayout
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.concepts.labelers import Simulator, TermSpace, make_tfidf_label, tfidf_terms
from recsae_core.concepts.llm_labeler import llm_label
from recsae_core.concepts.report import write_report
from recsae_core.concepts.samples import (
    LatentSamples,
    SampleOptions,
    activation_histogram,
    column_top_units,
    encode_sparse,
    latent_values,
    prefix_index,
    recommended_examples,
    render_sample,
    select_samples,
    top1_items,
    top_units,
)  # fmt: skip
from recsae_core.concepts.scoring import Labelled, coherence_summary, label_metrics, score_latent
from recsae_core.probe.shards import ProbeShards, open_probe
from recsae_core.recommenders.run import RunContext, load_run
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.runtime import SAERuntime, activation_levels
from recsae_core.sae.stats import load_stats
from recsae_core.sae.train import random_sae

if TYPE_CHECKING:  # httpx is only needed with the language-model labeler
    from recsae_core.concepts.llm_client import LLMClient, LLMOptions

LABELERS = ("tfidf", "llm")


@dataclass
class CatalogOptions:
    """How the catalog is built."""

    samples: SampleOptions = field(default_factory=SampleOptions)
    """Sample counts per latent (describing, paper protocol, detection, background)."""
    max_terms: int = 8
    """Terms per metadata label (the simulator uses exactly these)."""
    min_share: float = 0.05
    """A term must be carried by at least this share of describing samples."""
    recent: int = 10
    """History items per sample (its most recent ones)."""
    coherence_top: int = 10
    """Top samples per unit whose pairwise similarity is the unit's coherence."""
    high_confidence: float = 0.8
    """Confidence from which a latent counts as a high-confidence concept (RecSAE: 0.8)."""
    llm_latents: int = 0
    """Latents the language model labels (a seeded random subset of the live ones); 0 means all."""
    llm_shown: int = 5
    """Top samples shown to the language model (RecSAE: 5)."""
    llm_recent: int = 5
    """History items per sample in language-model prompts (prompt length drives local-model cost)."""
    progress: bool = True
    """Progress bars."""


def unique_names(names: list[str], longer: list[tuple[str, ...]] | None = None) -> list[str]:
    """Unique names (case-insensitively), in order: a taken name is replaced by its first free longer form, else
    suffixed -2, -3 ..."""
    seen: set[str] = set()
    out = []
    for i, name in enumerate(names):
        free = [c for c in (name, *(longer[i] if longer else ())) if c.casefold() not in seen]
        candidate, n = (free[0] if free else name), 1
        while candidate.casefold() in seen:
            n += 1
            candidate = f"{name}-{n}"
        seen.add(candidate.casefold())
        out.append(candidate)
    return out


class Prepared(NamedTuple):
    """A run's samples, codes and term matrix, ready to be labelled."""

    ctx: RunContext
    """The run."""
    h: np.ndarray
    """(N, d) probed representations."""
    users: np.ndarray
    """(N,) user of each sample."""
    positions: np.ndarray
    """(N,) position of each sample in its user's training sequence."""
    n_latents: int
    """SAE width."""
    k: int
    """SAE k."""
    frequency: np.ndarray
    """(n_latents,) firing frequency from the SAE statistics."""
    global_deciles: np.ndarray
    """(9,) cut points of the activation levels."""
    codes: sp.csc_matrix
    """(N, n_latents) SAE codes."""
    live: np.ndarray
    """Latents that fire at least once."""
    chosen: list[LatentSamples]
    """Samples per live latent."""
    background: np.ndarray
    """Background sample ids."""
    units: dict[str, list[np.ndarray]]
    """Top samples per unit for coherence: 'sae' (per live latent), 'neurons', 'random_sae'."""
    needed: np.ndarray
    """Sorted ids of the samples with a top-1 item and a row in `x`."""
    top1: np.ndarray
    """(N,) top-1 item (-1 where not computed)."""
    space: TermSpace
    """The metadata vocabulary."""
    x: sp.csr_matrix
    """Term matrix of the `needed` samples."""

    def rows(self, ids: np.ndarray) -> sp.csr_matrix:
        """Term rows of sample ids (all among `needed`)."""
        return term_rows(self.x, self.needed, ids)


def top_samples(
    sae: SAERuntime, h: np.ndarray, users: np.ndarray, n: int, probe: Path | ProbeShards,
    ray_config: RayConfig | None, progress: bool, codes: sp.csc_matrix | None = None,
) -> dict[int, np.ndarray]:  # fmt: skip
    """Every firing latent -> its top-n samples, one per user (`column_top_units`): a distributed top-k on the Ray
    cluster of `ray_config` when it names one (the same samples), else from `codes` (encoded here when not given)."""
    if ray_config is not None and ray_config.on_ray:
        from recsae_core.concepts.on_ray import top_units_on_ray

        return top_units_on_ray(sae, probe, users, n, ray_config)
    codes = codes if codes is not None else encode_sparse(sae, h, progress=progress)
    return {int(j): column_top_units(codes, users, j, n) for j in np.flatnonzero(np.diff(codes.indptr) > 0)}


def prepare(run_dir: Path, o: CatalogOptions, ray_config: RayConfig | None = None) -> Prepared:
    """Encode every sample, pick samples per latent and coherence units (the SAEs' top samples on Ray when
    `ray_config` names a cluster), compute top-1 items and terms."""
    layout = RunLayout(run_dir)
    try:  # a changed file raises ArtifactError naming it; an unfinished step says which one to run
        layout.verify_sae()  # and the probe and recommender it was made from
    except IncompleteError as err:
        raise ArtifactError(f"{err}; run 'recsae pipeline' (or 'recsae train-sae --run {run_dir}') first: the "
                            "catalog needs the run's recommender, probe and SAE") from None  # fmt: skip
    ctx = load_run(run_dir)
    probe = open_probe(layout.probe)  # once: the top samples on Ray read these shards again
    h, users, positions = probe.read_all()
    sae = TopKSAE.load(layout.sae)
    stats = load_stats(layout.sae / STATS_FILE, sae.cfg.n_latents)
    codes = encode_sparse(SAERuntime.from_model(sae), h, progress=o.progress)
    live = np.flatnonzero(np.diff(codes.indptr) > 0)
    chosen, background = select_samples(codes, users, o.samples, live)
    # Coherence units: SAE latents, raw neurons, and the random-init SAE (top samples, one per user).
    hn = h.numpy()
    top = partial(top_samples, h=hn, users=users, n=o.coherence_top, probe=probe, ray_config=ray_config,
                  progress=o.progress)  # fmt: skip
    sae_top = top(SAERuntime.from_model(sae), codes=codes)
    units = {
        "sae": [sae_top[j] for j in live],
        "neurons": [top_units(hn[:, d], users, o.coherence_top) for d in range(hn.shape[1])],
        "random_sae": list(top(SAERuntime.from_model(random_sae(sae.cfg, h, o.samples.seed))).values()),
    }
    sets = [a for s in chosen for a in s[1:]]
    needed = np.unique(np.concatenate([background, *sets, *(u for group in units.values() for u in group)]))
    top1 = np.full(len(users), -1, dtype=np.int64)
    top1[needed] = top1_items(ctx.model, h[needed], ctx.split.train, users[needed], positions[needed])
    space = TermSpace.build(ctx.dataset, ctx.split)
    x = space.sample_matrix(ctx.split, users[needed], positions[needed], top1[needed], o.recent)
    return Prepared(
        ctx, hn, users, positions, sae.cfg.n_latents, sae.cfg.k, stats.frequency.numpy(),
        stats.global_deciles.numpy(), codes, live, chosen, background, units, needed, top1, space, x,
    )  # fmt: skip


def background_mean(p: Prepared) -> np.ndarray:
    """Mean term vector of the background samples."""
    return np.asarray(p.rows(p.background).mean(axis=0)).ravel()


class LabelInputs(NamedTuple):
    """What the metadata labeler reads to label and score a latent (shipped once to the workers on Ray)."""

    x: sp.csr_matrix
    """Term matrix of the `needed` samples."""
    needed: np.ndarray
    """Sorted ids of the samples with a row in `x`."""
    bg_mean: np.ndarray
    """Mean term vector of the background samples."""
    n_background: int
    """Background samples."""
    terms: list[str]
    """Term keys, in the column order of `x`."""
    kinds: dict[str, Any]
    """Term kind -> what its terms say (TermSpace.kinds)."""

    def rows(self, ids: np.ndarray) -> sp.csr_matrix:
        """Term rows of sample ids (all among `needed`)."""
        return term_rows(self.x, self.needed, ids)


def term_rows(x: sp.csr_matrix, needed: np.ndarray, ids: np.ndarray) -> sp.csr_matrix:
    """Rows of `x` (one per sample of sorted `needed`) for sample ids, all among `needed`."""
    return x[np.searchsorted(needed, ids)]


def label_latents(
    inputs: LabelInputs, chosen: list[LatentSamples], o: CatalogOptions
) -> tuple[dict[int, Labelled], dict[int, list[dict[str, Any]]]]:
    """The metadata label of each latent of `chosen`, scored on its held-out samples; and each latent's terms."""
    labels: dict[int, Labelled] = {}
    terms_of: dict[int, list[dict[str, Any]]] = {}
    rows = inputs.rows
    for s in chosen:
        terms, columns = tfidf_terms(rows(s.describe), inputs.bg_mean, inputs.n_background, inputs.terms,
                                     o.max_terms, o.min_share)  # fmt: skip
        label = make_tfidf_label(terms, inputs.kinds)
        sim = Simulator(columns, [t.lift for t in terms], inputs.x.shape[1])
        threshold = sim.calibrate(rows(s.describe), rows(s.calibrate_neg))
        held = (s.paper_pos, s.paper_neg, s.detect_pos, s.detect_neg)
        scores = score_latent(*(sim.score(rows(a)) for a in held), threshold)
        labels[s.latent] = Labelled(label.name, label.description, scores, threshold, label.longer)
        terms_of[s.latent] = [{"term": t.term, "share": round(t.share, 4), "background": round(t.background, 4),
                               "lift": round(t.lift, 3)} for t in terms]  # fmt: skip
    return labels, terms_of


def tfidf_labels(
    p: Prepared, o: CatalogOptions, ray_config: RayConfig | None = None
) -> tuple[dict[int, Labelled], dict[int, list[dict[str, Any]]]]:
    """`label_latents` for every chosen latent: in chunks of latents on Ray actors when `ray_config` names a cluster
    (each latent's label depends on its samples alone: the same labels, in the same order)."""
    inputs = LabelInputs(p.x, p.needed, background_mean(p), len(p.background), p.space.terms, p.space.kinds)
    if ray_config is None or not ray_config.on_ray:
        return label_latents(inputs, p.chosen, o)
    from recsae_core.common.ray_map import map_chunks

    parts = map_chunks(label_latents, inputs, p.chosen, ray_config, o)
    return {j: v for part in parts for j, v in part[0].items()}, {j: v for part in parts for j, v in part[1].items()}


def build_catalog(
    run_dir: Path, labeler: str = "tfidf", llm: LLMOptions | None = None, options: CatalogOptions | None = None,
    ray_config: RayConfig | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Label and score every live latent of the run's SAE; write concepts/catalog.json and concepts/report.html
    (the same catalog with the latents' top samples found on the Ray cluster of `ray_config` when it names one)."""
    if labeler not in LABELERS:
        raise ConfigError(f"unknown labeler '{labeler}': expected one of {', '.join(LABELERS)}")
    o = options or CatalogOptions()
    started = time.perf_counter()
    out_dir = RunLayout(run_dir).concepts
    client = None
    if labeler == "llm":  # fail on a bad endpoint before any heavy work
        from recsae_core.concepts.llm_client import LLMClient, LLMOptions

        client = LLMClient(replace(llm or LLMOptions(), cache_dir=out_dir / LLM_CACHE))
        client.check()
    try:
        p = prepare(run_dir, o, ray_config)
        tfidf, terms_of = tfidf_labels(p, o, ray_config)
    except BaseException:
        if client is not None:
            client.close()
        raise
    llm_labels: dict[int, Labelled] = {}
    usage: dict[str, Any] = {}
    if client is not None:
        with client:
            llm_started = time.perf_counter()
            llm_labels = llm_labels_for(p, o, client, ray_config)
            asked = min(o.llm_latents or len(p.chosen), len(p.chosen))
            usage = {"model": client.model, "url": client.options.url, **client.usage.as_dict(),
                     "wall_seconds": round(time.perf_counter() - llm_started, 1),
                     "cache_only": client.options.cache_only, "latents_asked": asked,
                     "latents_labelled": len(llm_labels)}  # fmt: skip

    final = {j: llm_labels.get(j, tfidf[j]) for j in tfidf}
    bg_mean = background_mean(p)
    names = unique_names([final[s.latent].name for s in p.chosen], [final[s.latent].longer for s in p.chosen])
    titles = p.ctx.dataset.item_meta.titles
    train = p.ctx.split.train
    last = train.values[np.minimum(train.indptr[p.users] + p.positions, len(train.values) - 1)]
    concepts = []
    for s, name in zip(p.chosen, names, strict=True):
        lab = final[s.latent]
        concepts.append({
            "latent": s.latent, "name": name, "description": lab.description, "terms": terms_of[s.latent],
            "confidence": lab.scores.confidence, "auc": None if lab.scores.auc is None else round(lab.scores.auc, 4),
            "frequency": round(float(p.frequency[s.latent]), 6),
            "labeler": "llm" if s.latent in llm_labels else "tfidf",
            "examples": {"recommended": recommended_examples(p.top1[s.describe], titles),
                         "last_watched": recommended_examples(last[s.describe], titles)},
            "skew": _skew(p.space, p.rows(s.describe), bg_mean, p.top1[s.describe], p.top1[p.background]),
            "held_out": {"paper": list(lab.scores.n_paper), "detection": list(lab.scores.n_detect)},
        })  # fmt: skip
    by_labeler = {"tfidf": label_metrics(list(tfidf.values()), len(p.live))}
    if llm_labels:
        by_labeler["llm"] = label_metrics(list(llm_labels.values()), len(llm_labels))
        by_labeler["tfidf_same_latents"] = label_metrics([tfidf[j] for j in llm_labels], len(llm_labels))
    main = by_labeler["llm" if llm_labels else "tfidf"]
    summary = {
        "live_latents": len(p.live), "n_latents": p.n_latents, "labelled": main["scored"],
        **{k: main[k] for k in ("mean_confidence", "share_confidence_ge_0.8", "share_confidence_ge_0.9", "mean_auc")},
        "coherence": coherence_summary(p.h, p.top1, p.units, [c["confidence"] for c in concepts], o.high_confidence),
        "by_labeler": by_labeler, "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    if usage:
        summary["llm"] = usage
    body = json.dumps({"labeler": labeler, "concepts": concepts}, sort_keys=True)
    sae_sha = sha256_file(RunLayout(run_dir).sae / SAE_WEIGHTS)
    digest = hashlib.sha256((body + sae_sha).encode()).hexdigest()
    n_paper, n_detect = o.samples.n_paper, o.samples.n_detect
    catalog = {
        "version": digest[:16], "labeler": labeler,
        "run": {"dataset": p.ctx.config.get("dataset"), "model": p.ctx.model.name, "n_samples": len(p.users),
                "sae": {"n_latents": p.n_latents, "k": p.k, "weights_sha256": sae_sha}},
        "protocol": {"paper": f"{n_paper} activating + {n_paper} inactive held-out samples, confidence = accuracy",
                     "detection": f"ROC-AUC over <= {n_detect} activating + {n_detect} inactive held-out samples",
                     "describing": o.samples.n_describe},
        "summary": summary, "concepts": concepts,
    }  # fmt: skip
    # Forgotten by the record first, recorded last: a run killed in between finds the step unfinished.
    forget_recorded(out_dir, [CATALOG, REPORT])
    write_report(catalog, {s.latent: activation_histogram(p.codes, s.latent) for s in p.chosen}, out_dir / REPORT)
    write_json(out_dir / CATALOG, catalog)
    add_recorded(out_dir, [CATALOG, REPORT])
    return catalog


def concepts_step(run_dir: Path, progress: bool = True, ray_config: RayConfig | None = None) -> dict[str, Any]:
    """The pipeline step: the metadata catalog (parts on Ray when `ray_config` names a cluster), and its headline
    numbers."""
    catalog = build_catalog(run_dir, "tfidf", options=CatalogOptions(progress=progress), ray_config=ray_config)
    keys = ("live_latents", "mean_confidence", "share_confidence_ge_0.8", "mean_auc", "seconds")
    return {"version": catalog["version"], **{k: catalog["summary"][k] for k in keys}}


def llm_labels_for(
    p: Prepared, o: CatalogOptions, client: LLMClient, ray_config: RayConfig | None = None
) -> dict[int, Labelled]:
    """The language-model labels of `o.llm_latents` latents (a seeded random subset; all when 0), on Ray if asked."""
    subset = p.chosen
    if o.llm_latents and o.llm_latents < len(p.chosen):
        pick = np.random.default_rng(o.samples.seed).choice(len(p.chosen), o.llm_latents, replace=False)
        subset = [p.chosen[i] for i in np.sort(pick)]
    levels: dict[tuple[int, int], int] = {}
    for s in subset:
        shown = s.describe[: o.llm_shown]
        values = activation_levels(latent_values(p.codes, s.latent, shown), p.global_deciles)
        levels.update({(s.latent, int(i)): int(v) for i, v in zip(shown, values, strict=True)})

    def render(sample: int, level: int | None) -> str:
        hist = prefix_index(p.ctx.split.train, p.users[[sample]], p.positions[[sample]], o.llm_recent).values
        return render_sample(p.ctx.dataset, hist, int(p.top1[sample]), level, o.llm_recent)

    return llm_label(client, subset, render, levels, o.llm_shown, o.progress, ray_config)


def _skew(space: TermSpace, x: sp.csr_matrix, bg_mean: np.ndarray, top1: np.ndarray, bg_top1: np.ndarray) -> dict:
    """Popularity percentile of the recommended items and the most over-represented user group per attribute."""
    pct = space.popularity_percentile
    out: dict[str, Any] = {"popularity_percentile": {"latent": round(float(pct[top1].mean()), 3),
                                                     "background": round(float(pct[bg_top1].mean()), 3)}}  # fmt: skip
    share = np.asarray(x.mean(axis=0)).ravel()
    offset = space.user_offset
    for kind in space.user_kinds:
        cols = [offset + i for i, t in enumerate(space.user_terms) if t.startswith(kind + ":")]
        if not cols:
            continue
        lift = share[cols] / np.maximum(bg_mean[cols], 1e-9)
        best = cols[int(np.argmax(np.where(share[cols] >= 0.1, lift, 0)))]
        out[kind] = {"value": space.terms[best].split(":", 1)[1], "share": round(float(share[best]), 3),
                     "background": round(float(bg_mean[best]), 3)}  # fmt: skip
    return out
