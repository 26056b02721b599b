"""De-biasing: the FDR procedure, latent association, and on a small real run (SASRec on ML-100K, 128-latent SAE)
the debias sweep, the policy's effect, its round trip through the service catalog, refusal of a mismatched policy,
and (slow) the policy applied by name over HTTP.

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
from recsae_core.debias.bias_metrics import popularity_metrics
from recsae_core.debias.experiment import debias
from recsae_core.debias.screen import associate, benjamini_hochberg, made_for
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
    result = debias(run, "popularity", budget=0.2, max_candidates=6, progress=False, strengths=(0.5, 1.0, 2.0),
                    log=lambda _: None)  # fmt: skip
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


def test_report_layout(debias_run: tuple[Path, dict]) -> None:
    run, _ = debias_run
    saved = json.loads((run / "debias" / "popularity.json").read_text())
    assert {"original", "sweep", "chosen", "baselines_at_budget"} <= set(saved)
    assert {"ndcg@10", "arp@10", "tail_share@10", "gini@10", "coverage@10"} <= set(saved["original"])
    methods = {p["method"] for p in saved["sweep"]}
    assert methods == {"recsae-policy", "popularity-penalty", "xquad", "popsteer"}
    assert all({"method", "strength", "metrics"} <= set(p) for p in saved["sweep"])
    assert set(saved["baselines_at_budget"]) == {"popularity-penalty", "xquad", "popsteer"}
    chosen = saved["chosen"]
    assert chosen["policy"] == "popularity" and chosen["dev_ndcg_rel_loss"] <= 0.2
    assert {"policy", "strength", "metrics", "ndcg_rel_loss"} <= set(chosen)
    assert "data:image/png;base64" in (run / "debias" / "report.html").read_text()


def test_policy_lowers_popularity_as_served(debias_run: tuple[Path, dict]) -> None:
    """The saved policy, applied through the SAE runtime's steer (as the service does), lowers ARP and raises the
    tail share of the test lists."""
    run, result = debias_run
    policy = json.loads((run / "policies" / "popularity.json").read_text())
    assert policy["version"] >= 1 and policy["target"] == "popularity" and policy["made_for"] == made_for(load_run(run))
    ctx = load_run(run)
    sae = TopKSAE.load(run / "sae")
    runtime = SAERuntime.from_model(sae, load_stats(run / "sae" / STATS_FILE, sae.cfg.n_latents))
    edits = validate_edits([Edit(**e) for e in policy["edits"]], sae.cfg.n_latents, EditBounds(), runtime.stats)
    from recsae_core.recommenders.evaluate import make_batch, mask_seen

    seen = ctx.split.seen("test")
    users = np.flatnonzero(ctx.split.targets("test").lengths > 0)
    with torch.no_grad():
        h = ctx.model.represent(make_batch(ctx.model, users, seen, "cpu"))
        before = mask_seen(ctx.model.score(h), users, seen).topk(10, dim=1).indices.numpy()
        steered = torch.from_numpy(runtime.steer(h.numpy(), [edits] * len(h)).h)
        after = mask_seen(ctx.model.score(steered), users, seen).topk(10, dim=1).indices.numpy()
    popularity = ctx.split.item_popularity()
    m0, m1 = popularity_metrics(before, popularity), popularity_metrics(after, popularity)
    assert m1["arp@10"] < m0["arp@10"] and m1["tail_share@10"] > m0["tail_share@10"]
    assert m1["arp@10"] == pytest.approx(result["chosen"]["metrics"]["arp@10"], rel=1e-4)


def test_gender_report_keys_and_constraint(debias_run: tuple[Path, dict]) -> None:
    """The gender target reports leakage of lists and of histories and the NDCG gap; any chosen policy keeps the
    dev gap from widening and stays within budget on dev."""
    run, _ = debias_run
    result = debias(run, "gender", budget=0.2, max_candidates=4, progress=False, log=lambda _: None)
    assert {"leakage_auc", "history_leakage_auc", "ndcg_gap"} <= set(result["original"])
    assert 0.0 <= result["original"]["leakage_auc"] <= 1.0 and result["original"]["history_leakage_auc"] > 0.5
    assert set(result["pareto"]) == {"leakage_distance", "ndcg_gap"}
    # The gap-safe family keeps, in screen order, exactly the latents whose pin alone did not widen the dev gap.
    safe = [c["latent"] for c in result["latents"]["candidates"] if c["gap_change"] <= 0]
    sizes = [p["n_latents"] for p in result["sweep"] if p["weighting"] == "gap-safe"]
    assert max(sizes, default=0) == len(safe)
    chosen = result["chosen"]
    if chosen["policy"] is not None and chosen["weighting"] == "gap-safe":
        assert [e["latent"] for e in chosen["edits"]] == safe[: chosen["n_latents"]]
    if result["chosen"]["policy"] is not None:
        assert result["chosen"]["dev_metrics"]["ndcg_gap"] <= result["original_dev"]["ndcg_gap"] + 1e-12
        assert result["chosen"]["dev_ndcg_rel_loss"] <= 0.2
    # Each group's NDCG is reported; the files keep the target's name.
    original = result["original"]
    assert original["ndcg_gap"] == pytest.approx(abs(original["group_ndcg@10"] - original["rest_ndcg@10"]), abs=2e-6)
    assert result["groups"]["group"] == "F" and result["groups"]["rest"] == "M"
    assert (run / "debias" / "gender.json").is_file()
    if result["chosen"]["policy"] is not None:
        assert result["chosen"]["policy"] == "gender" and (run / "policies" / "gender.json").is_file()


def _fake_bundle(run: Path, policies: dict[str, dict]) -> SimpleNamespace:
    """What Catalog reads from a bundle: manifest (as write_bundle makes it from this run), catalog, policies."""
    ctx = load_run(run)
    manifest = {
        "dataset": ctx.config["dataset"],
        "model_type": ctx.model.name,
        "files": {"sae/sae_weights.safetensors": sha256_file(run / "sae" / "sae_weights.safetensors")},
        "provenance": {},
    }
    return SimpleNamespace(manifest=manifest, catalog=None, policies=policies)


def test_policy_round_trip_and_refusal(debias_run: tuple[Path, dict]) -> None:
    run, _ = debias_run
    policy = json.loads((run / "policies" / "popularity.json").read_text())
    sae = TopKSAE.load(run / "sae")
    stats = load_stats(run / "sae" / STATS_FILE, sae.cfg.n_latents)
    other_sae = copy.deepcopy(policy)
    other_sae["made_for"]["sae_sha256"] = "0" * 64
    other_model = copy.deepcopy(policy)
    other_model["made_for"]["model_type"] = "lightgcn"
    hand_written = {"description": "no provenance", "edits": policy["edits"]}
    bundle = _fake_bundle(run, {"popularity": policy, "other-sae": other_sae, "other-model": other_model,
                                "hand": hand_written})  # fmt: skip
    catalog = Catalog(bundle, stats, sae.cfg.n_latents, EditBounds())
    assert [Edit(**e) for e in policy["edits"]] == catalog.policy("popularity").edits
    assert catalog.policy("hand").edits == catalog.policy("popularity").edits
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
    assert saved["target"] == spec and set(saved["pareto"]) == {"leakage_distance", "ndcg_gap"}
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
    # Only steering policies are swept (the re-ranking baselines are popularity methods); a tiny run may find no
    # latent that lowers the leakage, and then sweeps nothing.
    assert {p["method"] for p in result["sweep"]} <= {"recsae-policy"} and result["baselines_at_budget"] == {}
    assert result["latents"]["n_significant"] >= len(result["latents"]["candidates"])
    assert "attribute:occupation=student" in (run / "debias" / "report.html").read_text()
    chosen = result["chosen"]
    if chosen["policy"] is not None:
        assert chosen["policy"] == "attribute-occupation-student"
        assert chosen["dev_metrics"]["ndcg_gap"] <= result["original_dev"]["ndcg_gap"] + 1e-12
        policy = json.loads((run / "policies" / "attribute-occupation-student.json").read_text())
        assert policy["name"] == "attribute-occupation-student" and policy["target"] == spec
        sae = TopKSAE.load(run / "sae")
        stats = load_stats(run / "sae" / STATS_FILE, sae.cfg.n_latents)
        catalog = Catalog(_fake_bundle(run, {policy["name"]: policy}), stats, sae.cfg.n_latents, EditBounds())
        assert catalog.policy("attribute-occupation-student").edits == [Edit(**e) for e in policy["edits"]]


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
