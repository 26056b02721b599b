"""De-biasing: the FDR procedure, latent association, and on a small real run (SASRec on ML-100K, 128-latent SAE)
the debias sweep of every method (same number of points each, operating points chosen on validation, fronts compared
with bootstrap intervals), the chosen policy's effect as served, its round trip through the service catalog, refusal
of a mismatched policy, and (slow) the policy applied by name over HTTP.

Set RECSAE_TEST_RUN to a run folder with recommender/ probe/ sae/ to skip building one (it is copied first).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recsae_core.bundle.format import sha256_file
from recsae_core.common.errors import ConfigError
from recsae_core.common.layout import STATS_FILE
from recsae_core.debias.bias_metrics import metric_context, popularity_metrics
from recsae_core.debias.experiment import debias
from recsae_core.debias.methods import FAIRNESS, POPULARITY, RERANKERS
from recsae_core.debias.policy_kinds import FITTED_KINDS, offline_transform, parse_policy
from recsae_core.debias.screen import associate, benjamini_hochberg, made_for
from recsae_core.debias.selection import pick_operating_point
from recsae_core.debias.targets import Target, parse_target, user_groups
from recsae_core.pipeline.steps import probe_step, sae_step
from recsae_core.recommenders.run import load_run
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.edits import Edit, EditBounds, validate_edits
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.runtime import SAERuntime
from recsae_core.sae.stats import load_stats
from service.steering import Catalog, RequestError

RUN_ENV = "RECSAE_TEST_RUN"
POINTS = 4
"""Strengths per method in these tests (the CLI's default is 16)."""
NEW_KEYS = {"tail_coverage@10", "deep_tail_coverage@10", "set_arp@10", "miscalibration@10"}


@pytest.fixture(scope="session")
def debias_run(tmp_path_factory: pytest.TempPathFactory, trained_run) -> tuple[Path, dict]:
    """A run with recommender, probe and a 128-latent SAE, and its popularity debias result (budget 20%: a tiny
    run's NDCG is noisy, and these tests need a written policy, not a figure)."""
    run = tmp_path_factory.mktemp("debias-run")
    if os.environ.get(RUN_ENV):
        source = Path(os.environ[RUN_ENV])
        for name in ("recommender", "probe", "sae"):
            shutil.copytree(source / name, run / name)
    else:
        shutil.copytree(trained_run("sasrec") / "recommender", run / "recommender")
        probe_step(run, progress=False)
        sae_step(run, SAETrainConfig(n_latents=128, k=4, epochs=3, progress=False))
    result = debias(run, "popularity", budget=0.2, max_candidates=6, progress=False, sweep_points=POINTS,
                    bootstrap=50, log=lambda _: None)  # fmt: skip
    return run, result


def test_benjamini_hochberg_constructed() -> None:
    reject, adjusted = benjamini_hochberg(np.array([0.001, 0.01, 0.02, 0.5]), q=0.05)
    assert reject.tolist() == [True, True, True, False]  # thresholds 0.0125, 0.025, 0.0375, 0.05
    # Step-up: the smallest p fails its own threshold (0.0167) but is rejected with the second (0.03 <= 0.0333).
    reject, adjusted = benjamini_hochberg(np.array([0.03, 0.9, 0.03]), q=0.05)
    assert reject.tolist() == [True, False, True]
    assert adjusted.tolist() == pytest.approx([0.045, 0.9, 0.045])
    assert not benjamini_hochberg(np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.5]), q=0.05)[0].any()


def test_fdr_is_controlled_on_simulated_latents() -> None:
    rng = np.random.default_rng(1)
    n, n_true = 2000, 100
    groups = np.arange(n) % 2 == 0
    z = rng.normal(size=(n, 1000))
    z[groups, :n_true] += 0.4  # only the first 100 latents differ between the groups
    assoc = associate(z, groups, ~groups, q=0.05)
    discoveries = np.flatnonzero(assoc.significant)
    false = np.sum(discoveries >= n_true)
    assert len(discoveries) >= 80 and false / len(discoveries) <= 0.1
    assert np.all(assoc.d[:n_true] > 0.2)


def _check_operating_points(result: dict, budget: float) -> None:
    """Each method's operating point is the one `pick_operating_point` gives on the sweep's dev figures, and the
    chosen steering family is the one whose operating point has the best dev objective."""
    fair = "leakage_distance" in result["bias_metrics"]
    objective = "leakage_distance" if fair else "arp@10"
    best = {}
    for name, method in result["methods"].items():
        points = [p for p in result["sweep"] if p["method"] == name]
        assert len(points) == method["points"]
        op = result["operating_points"][name]
        if not points:
            assert op["strength"] is None and "skipped" in method["fit"]
            continue
        allowed = None
        if fair:
            allowed = np.array([p["dev_metrics"]["ndcg_gap"] <= result["original_dev"]["ndcg_gap"] + 1e-12
                                for p in points])  # fmt: skip
        picked = pick_operating_point(np.array([p["strength"] for p in points]),
                                      np.array([p["dev_ndcg_rel_loss"] for p in points]),
                                      np.array([p["dev_metrics"][objective] for p in points]), budget, allowed,
                                      method["anchored"])  # fmt: skip
        assert [p["operating_point"] for p in points] == [i == picked.index for i in range(len(points))]
        if picked.index is None:
            assert op["strength"] is None
            continue
        chosen = points[picked.index]
        assert op["strength"] == chosen["strength"] and chosen["smoothed_dev_ndcg_rel_loss"] <= budget
        assert op["test"]["metrics"][objective]["value"] == pytest.approx(chosen["metrics"][objective], abs=2e-6)
        if method["role"] == "steering":
            best[name] = chosen["dev_metrics"][objective]
    steering = result["steering"]
    assert steering == (min(best, key=best.get) if best else None)
    if steering is not None:
        chosen = result["chosen"]
        assert chosen["method"] == steering and chosen["kind"] == result["methods"][steering]["kind"]
        assert chosen["strength"] == result["operating_points"][steering]["strength"]


def test_report_layout(debias_run: tuple[Path, dict]) -> None:
    run, _ = debias_run
    saved = json.loads((run / "debias" / "popularity.json").read_text())
    assert set(saved) >= {"original", "sweep", "chosen", "comparison", "operating_points", "fronts", "verdict"}
    assert {"ndcg@10", "arp@10", "tail_share@10", "gini@10", "coverage@10", *NEW_KEYS} <= set(saved["original"])
    assert all(set(p["metrics"]) >= NEW_KEYS and set(p["dev_metrics"]) >= NEW_KEYS for p in saved["sweep"])
    # Every method of the target, each swept over the same number of strengths (nudge only if a latent was found).
    assert list(saved["methods"]) == list(POPULARITY)
    built = {name for name, m in saved["methods"].items() if "skipped" not in m["fit"]}
    assert built >= set(POPULARITY) - {"nudge"}
    assert all(saved["methods"][name]["points"] == POINTS for name in built)
    assert {p["method"] for p in saved["sweep"]} == built
    popsteer = saved["methods"]["popsteer"]
    assert not popsteer["anchored"] and popsteer["strengths"][0] == 0 and popsteer["kind"] == "popsteer"
    assert "synthetic" in popsteer["fit"]["profiles"]  # SASRec represents made-up histories
    _check_operating_points(saved, 0.2)
    # The comparison: every method's front (and the chosen steering family's as 'steering') read at each loss.
    assert list(saved["comparison"]) == ["0.01", "0.02", "0.05"]
    for by_method in saved["comparison"].values():
        assert set(by_method) == built | ({"steering"} if saved["steering"] else set())
        for metrics in by_method.values():
            assert set(metrics) == set(saved["bias_metrics"]) and set(metrics) >= NEW_KEYS
            for entry in metrics.values():
                assert {"value", "ci95"} <= set(entry)
                if entry["value"] is None:
                    assert entry["reason"]
    chosen = saved["chosen"]
    if saved["steering"] is not None:
        assert chosen["policy"] == "popularity" and chosen["smoothed_dev_ndcg_rel_loss"] <= 0.2
        assert {"policy", "kind", "strength", "metrics", "ndcg_rel_loss", "policy_file"} <= set(chosen)
        verdict = saved["verdict"]
        assert verdict["rerankers"] == list(RERANKERS) and list(verdict["at"]) == ["0.02", "0.05"]
        for by_metric in verdict["at"].values():
            assert set(by_metric) == {"arp@10", "miscalibration@10"}
            for v in by_metric.values():
                assert {"steering", "best_reranker", "reranker", "difference", "better_beyond_interval"} <= set(v)
        assert "rel_change" in verdict["deep_tail_coverage_at_0.02"] or verdict["deep_tail_coverage_at_0.02"]["reason"]
    page = (run / "debias" / "report.html").read_text()
    assert "data:image/png;base64" in page and 'id="comparison-0.02"' in page and 'id="operating-points"' in page


def _test_users(run: Path) -> tuple:
    """The test stage's users, their h, unsteered scores (history masked) and histories."""
    from recsae_core.recommenders.evaluate import make_batch, mask_seen

    ctx = load_run(run)
    seen = ctx.split.seen("test")
    users = np.flatnonzero(ctx.split.targets("test").lengths > 0)
    with torch.no_grad():
        h = ctx.model.represent(make_batch(ctx.model, users, seen, "cpu"))
        scores = mask_seen(ctx.model.score(h).float(), users, seen)
    return ctx, users, h, scores, [seen.row(u) for u in users]


def test_chosen_policy_is_what_was_measured(debias_run: tuple[Path, dict]) -> None:
    """The saved policy, applied as the service applies its kind (edits through the SAE runtime's steer, a fitted
    kind through `apply_policy`), gives the test lists the report measured, and they are less popular."""
    run, result = debias_run
    if result["steering"] is None:
        pytest.skip("no steering family fits the budget on this run")
    policy = json.loads((run / "policies" / "popularity.json").read_text())
    ctx, users, h, scores, histories = _test_users(run)
    assert policy["version"] >= 1 and policy["target"] == "popularity" and policy["made_for"] == made_for(ctx)
    assert policy["kind"] == result["chosen"]["kind"]
    sae = TopKSAE.load(run / "sae")
    runtime = SAERuntime.from_model(sae, load_stats(run / "sae" / STATS_FILE, sae.cfg.n_latents))
    popularity = ctx.split.item_popularity().astype(np.float64)
    if policy["kind"] in FITTED_KINDS:
        fitted = parse_policy(policy, h.shape[1], sae.cfg.n_latents)
        assert fitted.strength == pytest.approx(result["chosen"]["strength"])
        steered = offline_transform(fitted, sae=runtime, unsteered_scores=scores.numpy(), histories=histories,
                                    popularity=popularity)(h.numpy())  # fmt: skip
    else:
        edits = validate_edits([Edit(**e) for e in policy["edits"]], sae.cfg.n_latents, EditBounds(), runtime.stats)
        steered = runtime.steer(h.numpy(), [edits] * len(h)).h
    from recsae_core.recommenders.evaluate import mask_seen

    with torch.no_grad():
        after = mask_seen(ctx.model.score(torch.from_numpy(steered)).float(), users, ctx.split.seen("test"))
    before, after = scores.topk(10, dim=1).indices.numpy(), after.topk(10, dim=1).indices.numpy()
    context = metric_context(popularity, histories)
    m0 = popularity_metrics(before, popularity, context.head, context.deep, context.history_mix)
    m1 = popularity_metrics(after, popularity, context.head, context.deep, context.history_mix)
    for key in ("arp@10", "deep_tail_coverage@10", "miscalibration@10"):
        assert m1[key] == pytest.approx(result["chosen"]["metrics"][key], rel=1e-4, abs=1e-6), key
        assert m0[key] == pytest.approx(result["original"][key], rel=1e-4, abs=1e-6), key
    assert m1["arp@10"] < m0["arp@10"]


def test_gender_report_keys_and_constraint(debias_run: tuple[Path, dict]) -> None:
    """The gender target sweeps the erasers (fit on validation users with their labels), the gap-safe pins and the
    INLP and mean-difference baselines; reports leakage of lists and histories, the NDCG gap and each group's NDCG;
    any chosen policy keeps the dev gap from widening and stays within budget on the smoothed dev loss."""
    run, _ = debias_run
    result = debias(run, "gender", budget=0.2, max_candidates=4, progress=False, log=lambda _: None,
                    sweep_points=POINTS, bootstrap=50)  # fmt: skip
    fairness = {"leakage_auc", "history_leakage_auc", "ndcg_gap", "group_ndcg@10", "rest_ndcg@10"}
    assert set(result["original"]) >= fairness
    assert 0.0 <= result["original"]["leakage_auc"] <= 1.0 and result["original"]["history_leakage_auc"] > 0.5
    assert result["bias_metrics"] == ["leakage_distance", "ndcg_gap"]
    methods = result["methods"]
    assert list(methods) == list(FAIRNESS)
    assert [methods[m]["role"] for m in FAIRNESS] == ["steering", "steering", "steering", "baseline", "baseline"]
    fits = {"erase": ("leace", "pooled"), "erase-midpoint": ("leace", "midpoint"), "inlp": ("inlp", "pooled"),
            "mean-difference": ("mean-difference", "pooled")}  # fmt: skip
    for name, (method, anchor) in fits.items():
        assert methods[name]["points"] == POINTS and methods[name]["kind"] in ("erase", None)
        assert (methods[name]["fit"]["method"], methods[name]["fit"]["anchor"]) == (method, anchor)
    assert methods["inlp"]["fit"]["rank"] == 4
    # The pin family keeps, in screen order, exactly the latents whose pin alone did not widen the dev gap.
    safe = [c["latent"] for c in result["latents"]["candidates"] if c["gap_change"] <= 0]
    assert methods["pin"]["points"] == min(POINTS, len(safe))
    if safe:
        assert methods["pin"]["fit"]["latents"] == safe[:POINTS]
    _check_operating_points(result, 0.2)
    chosen = result["chosen"]
    if chosen["policy"] is not None:
        assert chosen["dev_metrics"]["ndcg_gap"] <= result["original_dev"]["ndcg_gap"] + 1e-12
        assert chosen["smoothed_dev_ndcg_rel_loss"] <= 0.2 and chosen["kind"] in ("erase", "pin")
        verdict = result["verdict"]
        assert {"leakage_distance_change", "ndcg_gap", "group_ndcg", "ndcg_rel_loss", "met"} <= set(verdict)
        assert verdict["ndcg_gap"]["steered"]["value"] == pytest.approx(chosen["metrics"]["ndcg_gap"], abs=2e-6)
        policy = json.loads((run / "policies" / "gender.json").read_text())
        assert policy["kind"] == chosen["kind"] and policy["made_for"] == made_for(load_run(run))
        if policy["kind"] == "erase":
            assert policy["fit"]["method"] == "leace" and policy["fit"]["directions"]  # what the direction loads on
            fitted = Catalog(_fake_bundle(run, {"gender": policy}), *_sae_parts(run)).policy("gender").fitted
            assert fitted is not None and fitted.kind == "erase"
            assert fitted.strength == pytest.approx(chosen["strength"], abs=1e-8)  # the report rounds to 8 places
    # Each group's NDCG is reported; the files keep the target's name.
    original = result["original"]
    assert original["ndcg_gap"] == pytest.approx(abs(original["group_ndcg@10"] - original["rest_ndcg@10"]), abs=2e-6)
    assert result["groups"]["group"] == "F" and result["groups"]["rest"] == "M"
    assert (run / "debias" / "gender.json").is_file()
    if result["chosen"]["policy"] is not None:
        assert result["chosen"]["policy"] == "gender" and (run / "policies" / "gender.json").is_file()


def _sae_parts(run: Path) -> tuple:
    """What Catalog needs besides the bundle: the SAE's statistics, width and the edit bounds."""
    sae = TopKSAE.load(run / "sae")
    return load_stats(run / "sae" / STATS_FILE, sae.cfg.n_latents), sae.cfg.n_latents, EditBounds()


def _fake_bundle(run: Path, policies: dict[str, dict]) -> SimpleNamespace:
    """What Catalog reads from a bundle: manifest (as write_bundle makes it from this run), catalog, policies."""
    ctx = load_run(run)
    manifest = {
        "dataset": ctx.config["dataset"],
        "model_type": ctx.model.name,
        "d": int(ctx.model.item_embeddings().shape[1]),
        "files": {"sae/sae_weights.safetensors": sha256_file(run / "sae" / "sae_weights.safetensors")},
        "provenance": {},
    }
    return SimpleNamespace(manifest=manifest, catalog=None, policies=policies)


def test_policy_round_trip_and_refusal(debias_run: tuple[Path, dict]) -> None:
    run, result = debias_run
    if result["steering"] is None:
        pytest.skip("no steering family fits the budget on this run")
    policy = json.loads((run / "policies" / "popularity.json").read_text())
    other_sae = copy.deepcopy(policy)
    other_sae["made_for"]["sae_sha256"] = "0" * 64
    other_model = copy.deepcopy(policy)
    other_model["made_for"]["model_type"] = "lightgcn"
    bundle = _fake_bundle(run, {"popularity": policy, "other-sae": other_sae, "other-model": other_model})
    catalog = Catalog(bundle, *_sae_parts(run))
    loaded = catalog.policy("popularity")
    assert loaded.kind == policy["kind"]
    if policy["kind"] in FITTED_KINDS:
        assert loaded.fitted is not None and loaded.fitted.strength == policy["strength"]
        for name, array in loaded.fitted.arrays.items():
            assert array.ravel().tolist() == pytest.approx(policy["arrays"][name]["data"])
    else:
        assert [Edit(**e) for e in policy["edits"]] == loaded.edits
        hand_written = {"description": "no provenance", "edits": policy["edits"]}
        assert Catalog(_fake_bundle(run, {"hand": hand_written}), *_sae_parts(run)).policy("hand").edits == loaded.edits
    for name, needle in (("other-sae", "made for sae 0000000000000000"), ("other-model", "made for model type")):
        with pytest.raises(RequestError) as err:
            catalog.policy(name)
        assert err.value.status == 422 and needle in err.value.message


@pytest.mark.slow
def test_policy_by_name_over_http(debias_run: tuple[Path, dict], tmp_path: Path) -> None:
    """recsae bundle takes RUN_DIR/policies; the service applies the policy by name (GET ?policy= and POST
    steering.policy) and refuses a policy made for another SAE."""
    import httpx

    from recsae_core.pipeline.steps import bundle_step
    from service.local import free_port, start_local

    run, _ = debias_run
    work = tmp_path / "run"
    shutil.copytree(run, work, ignore=shutil.ignore_patterns("bundle", "debias"))
    foreign = json.loads((work / "policies" / "popularity.json").read_text())
    foreign["made_for"]["sae_sha256"] = "f" * 64
    (work / "policies" / "foreign.json").write_text(json.dumps(foreign))
    bundle = Path(bundle_step(work)["bundle"])
    service = start_local(bundle, free_port(), free_port(), num_cpus=0.5)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            policies = {p["name"]: p for p in client.get("/v1/policies").json()["policies"]}
            assert policies["popularity"]["usable"] and not policies["foreign"]["usable"]
            assert "made for sae" in policies["foreign"]["error"]
            users = json.loads((bundle / "users.json").read_text())["ids"][:40]
            items = json.loads((bundle / "items.json").read_text())
            popularity = dict(zip(items["ids"], items["popularity"], strict=True))
            plain, steered = [], []
            for user in users:
                base = client.get("/v1/recommend", params={"user_id": user, "k": 10}).json()
                body = client.get("/v1/recommend", params={"user_id": user, "k": 10, "policy": "popularity"}).json()
                post = client.post("/v1/recommend", json={"user_id": user, "k": 10,
                                                          "steering": {"policy": "popularity"}}).json()  # fmt: skip
                assert body["policy"] == "popularity" and body["steering_applied"]
                assert [i["item_id"] for i in post["items"]] == [i["item_id"] for i in body["items"]]
                plain += [popularity[i["item_id"]] for i in base["items"]]
                steered += [popularity[i["item_id"]] for i in body["items"]]
            assert np.mean(steered) < np.mean(plain)
            refused = client.get("/v1/recommend", params={"user_id": users[0], "policy": "foreign"})
            assert refused.status_code == 422 and "made for sae" in refused.json()["detail"]
    finally:
        service.stop()


def test_target_syntax_and_refusals(ml100k) -> None:
    """Targets parse to their files' names; a user attribute split names its groups, and a column or value the
    user table lacks is refused in one line naming the known ones."""
    assert parse_target("popularity") == Target("popularity", "popularity")
    assert parse_target("gender").name == "gender" and parse_target("gender").fairness
    target = parse_target("attribute:occupation=student")
    assert (target.column, target.value, target.name) == ("occupation", "student", "attribute-occupation-student")
    assert parse_target("attribute: K-12 = Writer/Poet ").name == "attribute-k-12-writer-poet"
    assert parse_target("attribute:x=日本").name.startswith("attribute-x-")  # still a usable, distinct file name
    assert parse_target("attribute:x=日本").name != parse_target("attribute:x=中国").name
    for bad, needle in (("pop", "unknown target 'pop': expected popularity, gender or attribute:COLUMN=VALUE"),
                        ("attribute:occupation", "expected attribute:COLUMN=VALUE"),
                        ("attribute:=student", "expected attribute:COLUMN=VALUE")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(needle)):
            parse_target(bad)

    students = user_groups(ml100k, target)
    occupations = np.asarray(ml100k.user_meta.occupation)
    np.testing.assert_array_equal(students.member, occupations == "student")
    assert students.known.all() and students.label == "occupation = student"
    gender = user_groups(ml100k, parse_target("gender"))
    np.testing.assert_array_equal(gender.member, np.asarray(ml100k.user_meta.gender) == "F")
    # Numbers match numerically: ML-100K ages are given as whole numbers.
    np.testing.assert_array_equal(user_groups(ml100k, parse_target("attribute:age=25.0")).member,
                                  np.asarray(ml100k.user_meta.age) == "25")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        user_groups(ml100k, parse_target("attribute:income=high"))
    assert str(err.value) == ("target 'attribute:income=high': the user table of dataset 'ml-100k' has no column "
                              "'income'; its columns: age, gender, occupation, zip_code")  # fmt: skip
    with pytest.raises(ConfigError, match=r"no user has occupation 'astronaut'; known values: administrator, artist"):
        user_groups(ml100k, parse_target("attribute:occupation=astronaut"))
    with pytest.raises(ConfigError, match=r"known values: 00000, .* \.\.\. \(\d+ in all\)"):
        user_groups(ml100k, parse_target("attribute:zip_code=none"))
    no_users = copy.copy(ml100k)
    no_users.user_meta = None
    with pytest.raises(ConfigError, match="dataset 'ml-100k' has no user table, so no attribute 'gender'"):
        user_groups(no_users, parse_target("gender"))


def test_attribute_target_end_to_end(debias_run: tuple[Path, dict]) -> None:
    """attribute:occupation=student on the short ML-100K run: students against every other occupation, with
    leakage, each group's NDCG and the gap; files and policy under the target's slug; the policy loads into the
    service catalog by that name."""
    run, _ = debias_run
    spec = "attribute:occupation=student"
    result = debias(run, spec, budget=0.2, max_candidates=4, progress=False, log=lambda _: None)
    assert result["target"] == spec and result["name"] == "attribute-occupation-student"
    saved = json.loads((run / "debias" / "attribute-occupation-student.json").read_text())
    assert saved["target"] == spec and saved["bias_metrics"] == ["leakage_distance", "ndcg_gap"]
    original = result["original"]
    assert {"leakage_auc", "history_leakage_auc", "ndcg_gap", "group_ndcg@10", "rest_ndcg@10"} <= set(original)
    assert 0 < original["leakage_auc"] < 1 and 0 < original["history_leakage_auc"] < 1
    assert original["ndcg_gap"] == pytest.approx(abs(original["group_ndcg@10"] - original["rest_ndcg@10"]), abs=2e-6)
    ctx = load_run(run)
    students = np.asarray(ctx.dataset.user_meta.occupation) == "student"
    test_users = np.flatnonzero(ctx.split.targets("test").lengths > 0)
    assert result["groups"]["users"]["test"] == {"group": int(students[test_users].sum()),
                                                 "rest": int((~students[test_users]).sum())}  # fmt: skip
    assert result["groups"]["group"] == "occupation = student"
    # The fairness methods only (the re-ranking baselines are popularity methods).
    assert list(result["methods"]) == list(FAIRNESS) and {p["method"] for p in result["sweep"]} <= set(FAIRNESS)
    assert result["latents"]["n_significant"] >= len(result["latents"]["candidates"])
    assert "attribute:occupation=student" in (run / "debias" / "report.html").read_text()
    chosen = result["chosen"]
    if chosen["policy"] is not None:
        assert chosen["policy"] == "attribute-occupation-student"
        assert chosen["dev_metrics"]["ndcg_gap"] <= result["original_dev"]["ndcg_gap"] + 1e-12
        policy = json.loads((run / "policies" / "attribute-occupation-student.json").read_text())
        assert policy["name"] == "attribute-occupation-student" and policy["target"] == spec
        loaded = Catalog(_fake_bundle(run, {policy["name"]: policy}), *_sae_parts(run)).policy(policy["name"])
        if policy["kind"] in FITTED_KINDS:
            assert loaded.fitted is not None and loaded.fitted.kind == policy["kind"]
        else:
            assert loaded.edits == [Edit(**e) for e in policy["edits"]]


def test_cli_refuses_an_unknown_attribute_in_one_line(debias_run: tuple[Path, dict], capsys) -> None:
    from recsae_core.pipeline.cli import main

    run, _ = debias_run
    assert main(["debias", "--run", str(run), "--target", "attribute:income=high", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("recsae: error: target 'attribute:income=high': the user table of dataset 'ml-100k' has no column "
                   "'income'; its columns: age, gender, occupation, zip_code")  # fmt: skip
    assert main(["debias", "--run", str(run), "--target", "fairness", "--quiet"]) == 2
    assert "unknown target 'fairness'" in capsys.readouterr().err
    # One 73-year-old user: too few to cross-validate a leakage AUC, refused before any sweep.
    assert main(["debias", "--run", str(run), "--target", "attribute:age=73", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"recsae: error: target 'attribute:age=73': too few valid users to measure it \(1 with age = "
                        r"73, \d+ with age != 73\); each group needs at least 5", err), err  # fmt: skip
    assert not (run / "debias" / "attribute-age-73.json").exists()
