"""Concept control on a small real run (SASRec on ML-100K, 1 epoch, 128-latent SAE, metadata catalog): which
attribute a label names, the measures against hand computations, the oracle's fixed points, concepts.json and its
section of the debias report, and the command's refusal of a run without a catalog.

Set RECSAE_TEST_RUN to a run folder with recommender/, probe/ and sae/ to skip training one (it is copied first)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from recsae_core.common.layout import RunLayout
from recsae_core.concepts.catalog import CatalogOptions, build_catalog
from recsae_core.concepts.control import (
    Attributes,
    Stage,
    carriers,
    effect,
    item_attributes,
    load_stage,
    match_penalty,
    named_attribute,
    oracle_lists,
    steered_lists,
)
from recsae_core.concepts.control_config import ConceptControlConfig
from recsae_core.concepts.control_run import concept_control
from recsae_core.concepts.samples import SampleOptions
from recsae_core.debias.report import write_report
from recsae_core.pipeline.cli import main
from recsae_core.pipeline.options import CONTROL_OPTIONS, build_parser
from recsae_core.pipeline.steps import probe_step, sae_step
from recsae_core.recommenders.run import RunContext, load_run
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.edits import Edit
from recsae_core.sae.runtime import SAERuntime

pytestmark = pytest.mark.slow
CONFIG = ConceptControlConfig(min_users=5, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, trained_run) -> Path:
    """recommender + probe + SAE + metadata catalog."""
    run = tmp_path_factory.mktemp("concept-control-run")
    if os.environ.get("RECSAE_TEST_RUN"):
        for part in ("recommender", "probe", "sae"):
            shutil.copytree(Path(os.environ["RECSAE_TEST_RUN"]) / part, run / part)
    else:
        shutil.copytree(trained_run("sasrec") / "recommender", run / "recommender")
        probe_step(run, progress=False)
        sae_step(run, SAETrainConfig(n_latents=128, k=4, epochs=2, progress=False))
    build_catalog(run, "tfidf", options=CatalogOptions(samples=SampleOptions(n_background=5000), progress=False))
    return run


@pytest.fixture(scope="module")
def measured(run: Path) -> dict:
    return concept_control(run, CONFIG)


@pytest.fixture(scope="module")
def parts(run: Path) -> tuple[RunContext, SAERuntime, Attributes, Stage]:
    ctx = load_run(run)
    ctx.model.eval()
    runtime = SAERuntime.load(RunLayout(run).sae)
    return ctx, runtime, item_attributes(ctx), load_stage(ctx, runtime, "test")


def test_named_attribute(parts) -> None:
    attrs = parts[2]
    war, comedy, sci_fi = (attrs.keys.index(k) for k in ("genre:War", "genre:Comedy", "genre:Sci-Fi"))

    def concept(name: str, *terms: str) -> dict:
        return {"name": name, "terms": [{"term": t} for t in terms]}

    # The recommendation side wins over the history side, a genre over a decade, wherever they are in the name.
    both = concept("comedy-war", "last genre:Comedy", "next genre:War")
    assert named_attribute(both, attrs) == (war, "next genre:War")
    assert named_attribute(concept("comedy-war", "last genre:Comedy", "last genre:War"), attrs)[0] == comedy
    assert named_attribute(concept("1980s-sci-fi", "next decade:1980s", "next genre:Sci-Fi"), attrs)[0] == sci_fi
    # Terms the name does not spell are not named; popularity, titles and users are not item attributes here.
    assert named_attribute(concept("war-2", "next genre:Comedy"), attrs) is None
    assert named_attribute(concept("niche-female", "next pop:niche", "gender:female"), attrs) is None


def test_oracle_penalty_on_a_constructed_list() -> None:
    """16 items scored 16..1, the even ones carry the attribute (8 each way): the top 10 hold 5 carriers. Penalties
    change the list only at a carrier's score minus another item's (odd numbers here), and the answer lies between
    two of them."""
    scores = torch.arange(16, 0, -1, dtype=torch.float32)[None]
    carries = np.arange(16) % 2 == 0
    assert carries[oracle_lists(scores, carries, 0.0)].sum() == 5
    penalty = match_penalty(scores, carries, 1)
    assert 3 < penalty < 5  # item 8 (score 8) must fall below item 11 (score 5), not yet below item 13 (3)
    assert carries[oracle_lists(scores, carries, penalty)].sum() == 4
    penalty = match_penalty(scores, carries, 3)
    assert 11 < penalty < 13  # item 4 (score 12) below item 15 (score 1), item 2 (score 14) still above it
    assert carries[oracle_lists(scores, carries, penalty)].sum() == 2
    # 8 other items fill at most 8 slots: no penalty removes 6, the largest one leaves 2 carriers.
    assert carries[oracle_lists(scores, carries, match_penalty(scores, carries, 6))].sum() == 2


def test_unfired_latent_and_zero_penalty_change_nothing(parts) -> None:
    ctx, runtime, attrs, test = parts
    counts = np.bincount(test.latents[test.latents >= 0], minlength=runtime.n_latents)
    latent = int(np.argmax(counts))
    quiet = np.flatnonzero(~(test.latents == latent).any(axis=1))  # users in whom it does not fire
    term = int(np.argmax(np.asarray(attrs.items[test.top.ravel()].sum(axis=0)).ravel()))
    (after,) = steered_lists(ctx, runtime, test, quiet, [Edit(latent, "ablate")])
    assert np.array_equal(after, test.top[quiet])
    got = effect(attrs, term, test.top[quiet], after, test.ndcg[quiet], test.ndcg[quiet])
    assert got.slots_before > 0 and got.target_drop == got.collateral == got.collateral_all == got.ndcg_rel_loss == 0
    scores = test.scores[quiet]
    assert np.array_equal(oracle_lists(scores, carriers(attrs, term), 0.0), test.top[quiet])
    assert match_penalty(scores, carriers(attrs, term), 0) == 0.0
    # A large enough penalty removes every carrier, and the bisection finds one that removes at least as many.
    penalty = match_penalty(scores, carriers(attrs, term), got.slots_before)
    assert not carriers(attrs, term)[oracle_lists(scores, carriers(attrs, term), penalty)].any()


def test_measures_by_hand(parts) -> None:
    """One user's list, its first item of the list's most common genre replaced by an unseen item without it: the
    drop and the collateral counted from the dataset's own genre lists."""
    ctx, _, attrs, test = parts
    genres = ctx.dataset.item_meta.genres
    row = next(r for r in range(len(test.users)) if sum(len(genres[i]) for i in test.top[r]) >= 12)
    before = test.top[row]
    counted = {g: sum(g in genres[i] for i in before) for g in {g for i in before for g in genres[i]}}
    genre = max(sorted(counted), key=counted.get)
    seen = set(test.seen.row(test.users[row]).tolist()) | set(before.tolist())
    scores = test.scores[row].numpy()
    substitute = next(int(i) for i in np.argsort(-scores) if i not in seen and genre not in genres[i])
    after = before.copy()
    after[next(p for p, i in enumerate(before) if genre in genres[i])] = substitute
    got = effect(attrs, attrs.keys.index(f"genre:{genre}"), before[None], after[None], np.ones(1), np.array([0.5]))
    assert got.target_drop == pytest.approx(1 / counted[genre])
    others = sorted({g for i in (*before, substitute) for g in genres[i]} - {genre})
    change = sum(abs(sum(g in genres[i] for i in after) - counted.get(g, 0)) for g in others)
    assert got.collateral == pytest.approx(change / sum(counted.get(g, 0) for g in others))
    assert got.ndcg_rel_loss == pytest.approx(0.5)


def test_concepts_json_and_report(run: Path, measured: dict) -> None:
    on_disk = json.loads(RunLayout(run).concept_control.read_text())
    assert on_disk == json.loads(json.dumps(measured))
    assert measured["concepts"], "the catalog names genres, so some concepts are measured"
    for c in measured["concepts"]:
        assert {"attribute", "latent", "label", "n_users", "target_drop", "collateral", "ndcg_rel_loss"} <= set(c)
        assert {"collateral", "ndcg_rel_loss", "penalty", "target_drop"} <= set(c["oracle"])
        assert c["n_users"] >= CONFIG.min_users and c["n_users_dev"] >= CONFIG.min_users
        assert c["attribute"] == c["named_by"].removeprefix("next ").removeprefix("last ")
        assert c["share_after"] == pytest.approx(c["share_before"] * (1 - c["target_drop"]), abs=2e-6)
        oracle = c["oracle"]
        if c["target_drop"] <= 0:  # nothing to match: the oracle leaves the lists alone
            assert oracle["penalty"] == 0 and oracle["target_drop"] == oracle["collateral"] == 0
        else:  # the oracle reaches at least the steering's drop
            assert oracle["penalty"] > 0 and oracle["target_drop"] >= c["target_drop"] - 1e-6
    genre = [c for c in measured["concepts"] if c["role"] == "category"]
    summary = measured["summary"]["genre"]
    assert summary["n"] == len(genre)
    assert summary["target_drop"] == pytest.approx(np.median([c["target_drop"] for c in genre]), abs=1e-6)
    assert summary["oracle_collateral"] == pytest.approx(np.median([c["oracle"]["collateral"] for c in genre]),
                                                         abs=1e-6)  # fmt: skip
    meets = [c["target_drop"] >= 0.5 and c["collateral"] <= 0.1 and c["ndcg_rel_loss"] <= 0.02 for c in genre]
    assert summary["met"] == (np.mean(meets) >= 0.5)
    page = write_report(RunLayout(run).debias).read_text()
    assert "Concept control" in page and 'id="concept-control"' in page and "data:image/png;base64" in page
    table = page[page.index('id="concept-control"') :]
    assert table[: table.index("</table>")].count("<tr>") == len(measured["concepts"]) + 1
    assert all(len(c["label"]) and c["label"] in page for c in measured["concepts"][:5])


def test_command_refuses_a_run_without_catalog(tmp_path: Path, run: Path, capsys) -> None:
    bare = tmp_path / "bare"
    for part in ("recommender", "probe", "sae"):
        shutil.copytree(run / part, bare / part)
    assert main(["concept-control", "--run", str(bare), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "catalog.json" in err and "recsae interpret" in err


def test_options_are_the_config_fields(capsys) -> None:
    parse = build_parser().parse_args
    assert CONTROL_OPTIONS.build(parse(["concept-control", "--run", "r"])) == ConceptControlConfig()
    argv = ["concept-control", "--run", "r", "--min-users", "3", "--goal", "0.4", "--budget", "0.05",
            "--max-collateral", "0.2", "--quiet"]  # fmt: skip
    assert CONTROL_OPTIONS.build(parse(argv)) == ConceptControlConfig(3, 0.4, 0.05, 0.2, progress=False)
    with pytest.raises(SystemExit) as info:
        parse(["concept-control", "--run", "r", "--goal", "1.5"])
    assert info.value.code == 2 and "--goal: expected a number in [0, 1], got 1.5" in capsys.readouterr().err
