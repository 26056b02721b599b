"""The concept catalog on a real (small) run: schema, honest held-out scoring, the HTML report in headless
Chromium, and the language-model labeler against a real llama.cpp server (cached reruns).

The run (ML-100K SASRec, 1 epoch, probe, 128-latent SAE) is built once per session; set RECSAE_TEST_RUN to a run
folder with recommender/, probe/ and sae/ to reuse one instead."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_llm_client import llama_server  # noqa: F401 (a fixture)

from recsae_core.common.artifacts import write_record
from recsae_core.common.errors import ArtifactError, ConfigError, IncompleteError
from recsae_core.common.layout import STATS_FILE, RunLayout
from recsae_core.concepts.catalog import CATALOG, REPORT, CatalogOptions, build_catalog
from recsae_core.concepts.llm_client import LLMOptions
from recsae_core.concepts.samples import SampleOptions
from recsae_core.pipeline.steps import probe_step, sae_step
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.stats import load_stats

pytestmark = pytest.mark.slow
SMALL = CatalogOptions(samples=SampleOptions(n_background=5000), progress=False)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, trained_run) -> Path:
    if os.environ.get("RECSAE_TEST_RUN"):
        source = Path(os.environ["RECSAE_TEST_RUN"])
        run = tmp_path_factory.mktemp("catalog-run")
        for part in ("recommender", "probe", "sae"):
            shutil.copytree(source / part, run / part)
        return run
    run = tmp_path_factory.mktemp("catalog-run")
    shutil.copytree(trained_run("sasrec") / "recommender", run / "recommender")
    probe_step(run, progress=False)
    sae_step(run, SAETrainConfig(n_latents=128, k=4, epochs=2, progress=False))
    return run


@pytest.fixture(scope="session")
def catalog(run_dir) -> dict:
    return build_catalog(run_dir, "tfidf", options=SMALL)


def test_catalog_schema(run_dir, catalog):
    on_disk = json.loads((RunLayout(run_dir).concepts / CATALOG).read_text())
    assert on_disk == catalog
    assert re.fullmatch(r"[0-9a-f]{16}", catalog["version"]) and catalog["labeler"] == "tfidf"
    summary = catalog["summary"]
    for key in ("live_latents", "mean_confidence", "share_confidence_ge_0.8", "mean_auc", "coherence"):
        assert key in summary
    assert set(summary["coherence"]) >= {"sae", "neurons", "random_sae"}
    assert all(v is None or -1 <= v <= 1 for k, v in summary["coherence"].items() if k != "high_confidence_latents")
    stats = load_stats(run_dir / "sae" / STATS_FILE)
    live = np.flatnonzero(stats.frequency.numpy() > 0)
    concepts = catalog["concepts"]
    assert summary["live_latents"] == len(live) == len(concepts)  # every live latent, no dead one
    assert [c["latent"] for c in concepts] == live.tolist()
    names = [c["name"] for c in concepts]
    assert len({n.casefold() for n in names}) == len(names), "names are unique"
    for c in concepts:
        assert set(c) >= {"latent", "name", "description", "terms", "confidence", "auc", "frequency", "labeler",
                          "examples"}  # fmt: skip
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", c["name"]), c["name"]
        assert c["description"].endswith(".") and c["labeler"] == "tfidf"
        assert c["confidence"] is None or 0 <= c["confidence"] <= 1
        assert c["auc"] is None or 0 <= c["auc"] <= 1
        assert c["frequency"] > 0 and c["examples"]["recommended"]
        assert all(t["lift"] >= 1.1 and 0 < t["share"] <= 1 for t in c["terms"])
        paper, detection = c["held_out"]["paper"], c["held_out"]["detection"]
        assert paper[1] == 5 and detection[1] == 25 and paper[0] <= 5 and detection[0] <= 25
    scored = [c["confidence"] for c in concepts if c["confidence"] is not None]
    assert summary["mean_confidence"] == pytest.approx(np.mean(scored), abs=1e-4)
    assert summary["share_confidence_ge_0.8"] == pytest.approx(np.sum(np.array(scored) >= 0.8) / len(live), abs=1e-4)
    # Even a 1-epoch model's latents carry metadata signal on held-out samples.
    assert summary["mean_auc"] > 0.6 and summary["mean_confidence"] > 0.6


def test_unknown_labeler_is_refused(run_dir):
    with pytest.raises(ConfigError, match="unknown labeler 'gpt'"):
        build_catalog(run_dir, "gpt")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    return path


def dump_dom(url: str, profile: Path) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", "--dump-dom", url]  # fmt: skip
    done = subprocess.run([chromium(), *flags], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_in_headless_chromium(run_dir, catalog, tmp_path):
    report = RunLayout(run_dir).concepts / REPORT
    assert report.is_file() and "http" not in re.sub(r'xmlns="http[^"]*"', "", report.read_text())  # self-contained
    n = len(catalog["concepts"])
    dom = dump_dom(report.as_uri(), tmp_path / "profile")
    rows = re.findall(r'<tr class="concept"[^>]*>', dom)
    assert len(rows) == n and not any("hidden" in r for r in rows)
    assert f"{n} of {n} concepts" in dom  # the table script ran
    assert dom.count('<svg class="hist"') == n and 'src="data:image/png;base64,' in dom
    # The search box filters rows; '#q=' pre-fills it.
    target = catalog["concepts"][0]
    dom = dump_dom(f"{report.as_uri()}#q={target['name']}", tmp_path / "profile2")
    visible = [r for r in re.findall(r'<tr class="concept"[^>]*>', dom) if "hidden" not in r]
    assert f'data-latent="{target["latent"]}"' in " ".join(visible)
    assert 1 <= len(visible) < n
    assert f"{len(visible)} of {n} concepts" in dom


def test_llm_labeler_against_a_real_server(run_dir, llama_server, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    for part in ("recommender", "probe", "sae"):
        shutil.copytree(run_dir / part, run / part)
    samples = SampleOptions(n_background=5000, n_paper=3, n_detect=3)
    options = CatalogOptions(samples=samples, llm_latents=1, llm_shown=2, llm_recent=3, progress=False)
    first = build_catalog(run, "llm", LLMOptions(url=llama_server, concurrency=1), options)
    usage = first["summary"]["llm"]
    # 1 explanation + P(Yes) for 2 + 2 calibration, 3 + 3 paper-protocol and 3 + 3 detection samples
    assert usage["calls"] == 1 + 2 + 2 + 3 + 3 + 3 + 3
    assert usage["cached"] <= 1  # only if two samples happen to read the same
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    llm = [c for c in first["concepts"] if c["labeler"] == "llm"]
    assert len(llm) == 1 and llm[0]["description"] and llm[0]["confidence"] is not None
    assert set(first["summary"]["by_labeler"]) == {"tfidf", "llm", "tfidf_same_latents"}
    assert first["summary"]["labelled"] == 1
    # A rerun costs nothing: every answer comes from RUN_DIR/concepts/llm_cache.
    second = build_catalog(run, "llm", LLMOptions(url=llama_server, concurrency=1), options)
    assert second["summary"]["llm"]["cached"] == second["summary"]["llm"]["calls"] == usage["calls"]
    assert [c["description"] for c in second["concepts"]] == [c["description"] for c in first["concepts"]]
    assert second["version"] == first["version"]
    # Cache-only, with nothing listening at the URL: the same catalog. Asked for every live latent, it labels only
    # the one whose answers are all cached; the others keep their metadata labels.
    cache_only = LLMOptions(url="http://127.0.0.1:9/v1", cache_only=True)
    third = build_catalog(run, "llm", cache_only, options)
    assert third["version"] == first["version"] and third["summary"]["llm"]["cached"] == usage["calls"]
    every = build_catalog(run, "llm", cache_only, replace(options, llm_latents=0))
    llm_usage = every["summary"]["llm"]
    assert llm_usage["latents_labelled"] == 1 and llm_usage["latents_asked"] == every["summary"]["live_latents"] > 1
    assert [c for c in every["concepts"] if c["labeler"] == "llm"] == llm


def test_catalog_complete_tracks_the_sae_and_missing_inputs_are_named(run_dir, catalog, tmp_path):
    assert RunLayout(run_dir).catalog_complete()
    assert catalog["run"]["sae"]["weights_sha256"] and catalog["summary"]["seconds"] > 0
    copy = tmp_path / "run"
    for part in ("recommender", "probe", "sae", "concepts"):
        shutil.copytree(run_dir / part, copy / part)
    assert RunLayout(copy).catalog_complete()
    weights = copy / "sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert not RunLayout(copy).catalog_complete()  # a changed SAE file: refused (test_crash_safety)
    write_record(copy / "sae")  # as if the SAE had been retrained: intact, and the catalog stale
    with pytest.raises(IncompleteError, match="built for another SAE"):
        RunLayout(copy).verify_catalog()
    shutil.rmtree(copy / "probe")
    with pytest.raises(ArtifactError, match=r"probe: not written; run 'recsae pipeline' \(or 'recsae train-sae"):
        build_catalog(copy, options=SMALL)


def test_catalog_is_named_from_the_tables_own_columns(run_dir, catalog, tmp_path, monkeypatch):
    """The same run with tables whose columns MovieLens does not name ('category' for the genres,
    'published_year', 'job', a free-text 'headline'): the catalog's terms carry those names through the generic
    path, and every latent's name and scores equal those under the MovieLens names, since the terms are the same
    ones renamed."""
    import recsae_core.concepts.catalog as catalog_module
    from recsae_core.concepts.metadata_terms import item_columns, user_columns
    from recsae_core.data.datasets import Column

    real_load_run = catalog_module.load_run

    def renamed_tables(path):
        ctx = real_load_run(path)
        data = ctx.dataset
        items, users = item_columns(data), user_columns(data)
        genre = next(items[name] for name in ("genre", "class", "genres") if name in items)
        data.item_meta.columns = {"headline": Column("text", texts=list(data.item_meta.titles)), "category": genre,
                                  "published_year": items["release_year"]}  # fmt: skip
        data.user_meta.columns = {"gender": users["gender"], "age": users["age"], "job": users["occupation"]}
        return ctx

    monkeypatch.setattr(catalog_module, "load_run", renamed_tables)
    run = tmp_path / "run"
    for part in ("recommender", "probe", "sae"):
        shutil.copytree(run_dir / part, run / part)
    other = build_catalog(run, "tfidf", options=SMALL)
    renames = {"genre": "category", "decade": "published_year", "occupation": "job"}

    def rename(term: str) -> str:
        where, _, rest = term.partition(" ") if term.startswith(("last ", "next ")) else ("", "", term)
        kind, _, value = rest.partition(":")
        return f"{where + ' ' if where else ''}{renames.get(kind, kind)}:{value}"

    keys = [t["term"] for c in other["concepts"] for t in c["terms"]]
    assert any(k.split(":")[0].endswith("category") for k in keys)
    assert not any(k.split(":")[0].endswith(("genre", "decade", "occupation", "headline")) for k in keys)
    assert [c["latent"] for c in other["concepts"]] == [c["latent"] for c in catalog["concepts"]]
    for mine, theirs in zip(catalog["concepts"], other["concepts"], strict=True):
        assert theirs["name"] == mine["name"]
        assert (theirs["confidence"], theirs["auc"]) == (mine["confidence"], mine["auc"])
        assert [t["term"] for t in theirs["terms"]] == [rename(t["term"]) for t in mine["terms"]]
        assert ("job" in theirs["skew"]) == ("occupation" in mine["skew"]) and "occupation" not in theirs["skew"]
    assert other["summary"]["mean_confidence"] == catalog["summary"]["mean_confidence"]
