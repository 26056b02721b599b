"""The offline steps that run on actor pools (issue 19): on a local cluster of two worker CPUs, joined by address from
a process of its own, `recsae debias --ray-address` (the causal screen and the sweep's points on an actor pool) writes
the one-process report and policy, `recsae concept-control --ray-address` (the concepts on an actor pool) the
one-process concepts.json, and `recsae import --ray-address` (the wrapped model's evaluation batches on an actor pool,
each actor loading the model from the import's own files) the one-process metrics, number for number. The actors run
single-threaded where the one-process runs here use torch's and numpy's default threads, so equality also says that
the thread count left no last bit changed.

The pool itself (`common.ray_map.map_on_ray`) gives results in the items' order, computed on both actors, never in
the driver; more workers than the cluster's CPUs, or --ray-workers without an address, are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import cli_refusal
from _ray_cluster import CLUSTER_ENV, copy_recommender, in_a_fresh_process
from foreign_models import build_two_tower_model

from recsae_core.common.layout import RunLayout

pytestmark = pytest.mark.slow
RECSAE = str(Path(sys.executable).with_name("recsae"))
DEBIAS = {"target": "popularity", "budget": 0.2, "fdr": 0.9, "max_candidates": 4, "sweep_points": 2, "bootstrap": 20}
"""One small sweep, asked of one process and of the cluster: 4 screened latents (FDR 0.9: this run's h, 2 epochs from
random, has few discoveries, at 0.5 none on some thread counts, and each actor should get one to screen), 2 strengths
per method, 20 resamples (the budget of test_debias: a tiny run's NDCG is noisy, and a policy must be written to
compare)."""
DEBIAS_FLAGS = ["--target", "popularity", "--budget", "0.2", "--fdr", "0.9", "--candidates", "4", "--sweep-points",
                "2", "--bootstrap", "20", "--quiet"]  # fmt: skip
MIN_USERS = 5
"""Concept control's affected users per concept (the default 10 leaves few concepts on a 943-user run)."""

POOL = """
import json, os, sys, time
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.common.ray_map import map_on_ray

def scaled(shared, item):
    time.sleep(0.05 * (item % 3))  # finish out of order
    return item * shared["factor"], os.getpid()

done = map_on_ray(scaled, {"factor": 3}, list(range(12)), RayConfig(address=sys.argv[1], workers=2))
print(json.dumps({"results": [r for r, _ in done], "pids": [p for _, p in done], "driver": os.getpid()}))
"""


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Path:
    """The shared BPR-MF run with a probe, a 128-latent SAE and a metadata catalog: the least both commands take."""
    from recsae_core.concepts.catalog import CatalogOptions, build_catalog
    from recsae_core.pipeline.steps import probe_step, sae_step
    from recsae_core.sae.config import SAETrainConfig

    run = copy_recommender(trained_run("bprmf"), tmp_path_factory.mktemp("debias-on-ray"))
    probe_step(run, progress=False)
    sae_step(run, SAETrainConfig(n_latents=128, k=4, epochs=2, progress=False))
    build_catalog(run, "tfidf", options=CatalogOptions(progress=False))
    return run


@pytest.mark.parametrize("argv", [["debias", "--run", ".", "--target", "popularity"], ["concept-control", "--run", "."],
                                  ["import", "--onnx", "m", "--item-embeddings", "e", "--recipe", "r",
                                   "--interactions", "i", "--out", "o"]], ids=lambda a: a[0])  # fmt: skip
def test_ray_workers_without_an_address_is_refused(argv, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    line = cli_refusal(capsys, [*argv, "--ray-workers", "2"])
    assert line == "recsae: error: --ray-workers only applies with --ray-address (or $RAY_ADDRESS)"


def test_the_actor_pool_keeps_the_order_and_runs_on_both_actors(cluster):
    done = json.loads(in_a_fresh_process([sys.executable, "-c", POOL, cluster]).stdout)
    assert done["results"] == [3 * i for i in range(12)]
    assert len(set(done["pids"])) == 2 and done["driver"] not in done["pids"]


def test_more_workers_than_the_cluster_has_are_refused(run, cluster):
    done = subprocess.run([RECSAE, "debias", "--run", str(run), "--ray-address", cluster, "--ray-workers", "3",
                           *DEBIAS_FLAGS], capture_output=True, text=True, timeout=600, env=CLUSTER_ENV)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1] == "recsae: error: --ray-workers 3: the cluster has 2 CPUs", done.stderr
    assert not RunLayout(run).debias.exists()  # refused before any work


def test_debias_on_ray_writes_the_one_process_report_and_policy(run, cluster):
    from recsae_core.debias.experiment import debias

    layout = RunLayout(run)
    report, policy = layout.debias / "popularity.json", layout.policy("popularity")
    debias(run, progress=False, log=lambda _: None, **DEBIAS)
    expected, expected_policy = canonical(report, "seconds"), canonical(policy, "created_at")
    policy.unlink()  # so that the second run writes version 1 again
    in_a_fresh_process([RECSAE, "debias", "--run", str(run), "--ray-address", cluster, "--ray-workers", "2",
                        *DEBIAS_FLAGS])  # fmt: skip
    assert canonical(report, "seconds") == expected
    assert canonical(policy, "created_at") == expected_policy
    # What the pools measured: every method's points, and a screen with discoveries for both actors.
    got = json.loads(expected)
    points = [method["points"] for method in got["methods"].values()]  # 0: a method this run gives nothing to fit
    assert set(points) <= {0, 2} and len(got["sweep"]) == sum(points) >= 2 * 6
    assert got["latents"]["n_significant"] >= 2 and got["chosen"]["policy"]


def test_concept_control_on_ray_writes_the_one_process_concepts(run, cluster):
    from recsae_core.concepts.control_config import ConceptControlConfig
    from recsae_core.concepts.control_run import concept_control

    concept_control(run, ConceptControlConfig(min_users=MIN_USERS, progress=False))
    expected = canonical(RunLayout(run).concept_control, "seconds")
    in_a_fresh_process([RECSAE, "concept-control", "--run", str(run), "--ray-address", cluster, "--ray-workers", "2",
                        "--min-users", str(MIN_USERS), "--quiet"])  # fmt: skip
    assert canonical(RunLayout(run).concept_control, "seconds") == expected
    assert len(json.loads(expected)["concepts"]) >= 2  # a concept for each actor


@pytest.fixture(scope="module")
def two_tower(ml100k, tmp_path_factory):
    return build_two_tower_model(ml100k, tmp_path_factory.mktemp("two-tower"))


def test_import_on_ray_evaluates_as_one_process(two_tower, cluster, tmp_path):
    from recsae_core.recommenders.imported import import_step

    files = two_tower
    given = {"onnx": files.onnx, "item_embeddings": files.item_embeddings, "recipe": files.recipe,
             "interactions": files.interactions, "items": files.items, "users": files.users}  # fmt: skip
    import_step(tmp_path / "here", **given)
    flags = [arg for name, path in given.items() for arg in ("--" + name.replace("_", "-"), str(path))]
    in_a_fresh_process([RECSAE, "import", *flags, "--out", str(tmp_path / "on-ray"), "--ray-address", cluster,
                        "--ray-workers", "2", "--quiet"])  # fmt: skip
    here, on_ray = (json.loads((RunLayout(tmp_path / run).recommender / "metrics.json").read_text())
                    for run in ("here", "on-ray"))  # fmt: skip
    assert (here.pop("ray_workers"), on_ray.pop("ray_workers")) == (0, 2)
    for varying in ("import_seconds", "finished_at"):
        del here[varying], on_ray[varying]
    assert on_ray == here  # every metric, valid and test, to the last digit written
    assert here["test"]["ndcg@10"] > here["popularity_baseline_test"]["ndcg@10"] / 4  # a model, not noise


def test_import_refuses_more_workers_than_the_cluster_has(two_tower, cluster, tmp_path):
    files = two_tower
    done = subprocess.run([RECSAE, "import", "--onnx", str(files.onnx), "--item-embeddings",
                           str(files.item_embeddings), "--recipe", str(files.recipe), "--interactions",
                           str(files.interactions), "--out", str(tmp_path / "run"), "--ray-address", cluster,
                           "--ray-workers", "3"],
                          capture_output=True, text=True, timeout=600, env=CLUSTER_ENV)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1] == "recsae: error: --ray-workers 3: the cluster has 2 CPUs", done.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


def canonical(path: Path, varying: str) -> str:
    """The JSON file without its one key that differs between runs (a duration, a time), as text: every number as
    written, and NaN equal to NaN."""
    document = json.loads(path.read_text())
    del document[varying]
    return json.dumps(document, sort_keys=True)
