"""Recommender training on Ray Train (`recsae pipeline --dataset ... --ray-address`, the RayJob's command, whose
first step is `train-recommender --ray-address`'s train_step): on a local cluster of two worker CPUs, joined by
address from a process of its own, two data-parallel workers train the model one process trains.

Every worker draws the one-process global batches and trains on its slice, with the gradients summed weighted by each
slice's share of the loss's terms (recommenders/train_on_ray.py), so the runs agree up to float rounding. Measured on
this machine: BPR-MF (8 epochs, early stopping at 6 with patience 1) and SASRec without dropout (2 epochs) give the
same history, kept epoch, valid and test NDCG@10 to the 6 decimals metrics.json records (BPR-MF's weights: 4e-6
apart). The tolerances allow the last bits of a step to move one user's top 10 (one user is 1/939 of a mean over
ML-100K's users): NDCG@10 within `NDCG_TOL`, mean epoch losses within `LOSS_TOL`. The loss check is what a wrong
weighting fails: SASRec's slices weighted by rows instead of target positions moved its epoch-2 loss by 2.9e-3 (and
test NDCG@10 by 1.2e-3).

SASRec is compared without dropout: its workers draw their dropout masks for their own slices, so with dropout the two
runs are the same training in distribution only (3 epochs at lr 5e-3: test NDCG@10 0.0721 alone, 0.0776 on two
workers), and nothing would be measured but that."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import cli_refusal
from _ray_cluster import CLUSTER_ENV, in_a_fresh_process

from recsae_core.common.layout import RunLayout

pytestmark = pytest.mark.slow
RECSAE = str(Path(sys.executable).with_name("recsae"))
NDCG_TOL = 1e-3
"""Valid and test NDCG@10, one process against two workers (measured: equal to 1e-6)."""
LOSS_TOL = 1e-4
"""Mean training loss of every evaluated epoch (measured: equal to 1e-6; a wrong weighting moves it 4e-4 to 3e-3)."""
BPRMF = {"epochs": 8, "lr": 0.02, "patience": 1}
"""Stops early (epoch 6, keeping epoch 5): the broadcast stop and the kept weights are checked too."""
SASREC = {"epochs": 2, "lr": 5e-3}
STEPS = ["recommender", "probe", "sae", "concepts", "bundle"]
"""The pipeline's steps from a dataset, each a folder of the run."""

SASREC_ON_RAY = """
import json, sys, torch
from pathlib import Path
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.evaluate import evaluate
from recsae_core.recommenders.run import prepare_data
from recsae_core.recommenders.train import build_model
from recsae_core.recommenders.train_on_ray import train_recommender_on_ray

address, folder, config = sys.argv[1], Path(sys.argv[2]), TrainConfig(**json.loads(sys.argv[3]))
data, split = prepare_data("ml-100k", "sasrec", "recbole", config.seed)
torch.manual_seed(config.seed)
model = build_model("sasrec", data.n_users, data.n_items, split, dropout=0.0)
result = train_recommender_on_ray(model, split, config, RayConfig(address=address, workers=2), folder)
print(json.dumps({"history": result.history, "best_epoch": result.best_epoch, "valid": result.best_valid,
                  "test": evaluate(model, split, "test"), "workers": result.ray_workers}))
"""


def flags(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def bprmf_runs(tmp_path_factory, cluster) -> tuple[dict, Path, subprocess.CompletedProcess]:
    """BPR-MF trained in this process, and the RayJob's command on two workers: `recsae pipeline --dataset ...
    --ray-address`, from the dataset to the bundle, with its progress bars (a small SAE: what it meets is
    test_distributed's). The one-process metrics, the Ray run's folder and the finished command."""
    from recsae_core.recommenders.config import TrainConfig
    from recsae_core.recommenders.run import train_step

    root = tmp_path_factory.mktemp("train-on-ray")
    one = train_step(root / "alone", "ml-100k", "bprmf", "recbole", TrainConfig(**BPRMF, progress=False))
    command = ["pipeline", "--dataset", "ml-100k", "--model", "bprmf", "--out", str(root / "ray"), "--latents", "64",
               "--k", "4", "--sae-epochs", "2"]  # fmt: skip
    done = in_a_fresh_process([RECSAE, *command, *flags(BPRMF), "--ray-address", cluster, "--ray-workers", "2"])
    return one, root / "ray", done


def assert_same_training(one: dict, two: dict) -> None:
    """The one-process run `one` and the two-worker run `two` (metrics.json's keys) trained the same model."""
    assert (two["best_epoch"], len(two["history"])) == (one["best_epoch"], len(one["history"]))
    for alone, ray in zip(one["history"], two["history"], strict=True):
        assert alone["epoch"] == ray["epoch"]
        assert ray["loss"] == pytest.approx(alone["loss"], abs=LOSS_TOL), (alone, ray)
        assert ray["valid_ndcg@10"] == pytest.approx(alone["valid_ndcg@10"], abs=NDCG_TOL), (alone, ray)
    for stage in ("valid", "test"):
        assert two[stage]["ndcg@10"] == pytest.approx(one[stage]["ndcg@10"], abs=NDCG_TOL), stage


def test_two_workers_train_the_one_process_bprmf(bprmf_runs):
    one, run, done = bprmf_runs
    two = json.loads((RunLayout(run).recommender / "metrics.json").read_text())
    assert (one["ray_workers"], two["ray_workers"]) == (0, 2) and set(one) == set(two)
    assert (one["epochs_trained"], one["best_epoch"]) == (6, 5)  # early stopping, so the stop was broadcast
    assert two["epochs_trained"] == one["epochs_trained"]
    assert_same_training(one, two)
    assert "train bprmf (Ray Train)" in done.stderr and "6/8" in done.stderr  # the driver's bar, stopped at 6


def test_the_run_trained_on_ray_loads_with_its_contract(bprmf_runs):
    from recsae_core.recommenders.evaluate import evaluate
    from recsae_core.recommenders.run import load_run

    _, run, _ = bprmf_runs
    RunLayout(run).verify_recommender()
    metrics = json.loads((RunLayout(run).recommender / "metrics.json").read_text())
    parity = metrics["contract_parity"]
    assert parity["users_checked"] == 512 and parity["max_abs_score_diff"] <= 1e-5
    ctx = load_run(run)
    assert evaluate(ctx.model, ctx.split, "test")["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-6)
    # Ray Train's checkpoint folders are gone: the run holds the pipeline's steps and nothing else.
    assert sorted(p.name for p in run.iterdir()) == sorted(STEPS)


def test_the_rayjob_command_goes_from_the_dataset_to_a_bundle_on_ray(bprmf_runs):
    """The chart's RayJob entrypoint (`recsae pipeline --dataset ... --ray-address auto`), here by address: every step
    ran, the SAE on Ray Train's two workers, and the bundle verifies as the service loads it."""
    from recsae_core.bundle.format import load_bundle

    _, run, done = bprmf_runs
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"run": str(run), "steps": STEPS}
    layout = RunLayout(run)
    assert json.loads((layout.sae / "metrics.json").read_text())["workers"] == 2
    assert "sae (Ray Train): 100%" in done.stderr, done.stderr[-2000:]
    layout.verify_bundle()  # and the catalog, SAE, probe and recommender it was made from
    assert load_bundle(layout.bundle).manifest["versions"]["bundle"]


def test_sasrec_slices_are_weighted_by_their_targets(tmp_path, cluster):
    """SASRec's loss is a mean over non-padded positions: two workers match one process only if each slice weighs
    its share of those (dropout off, see the module's docstring)."""
    import torch

    from recsae_core.recommenders.config import TrainConfig
    from recsae_core.recommenders.evaluate import evaluate
    from recsae_core.recommenders.run import prepare_data
    from recsae_core.recommenders.train import build_model, train_recommender

    config = TrainConfig(**SASREC, progress=False)
    data, split = prepare_data("ml-100k", "sasrec", "recbole", config.seed)
    torch.manual_seed(config.seed)
    model = build_model("sasrec", data.n_users, data.n_items, split, dropout=0.0)
    result = train_recommender(model, split, config)
    one = {"history": result.history, "best_epoch": result.best_epoch, "valid": result.best_valid,
           "test": evaluate(model, split, "test")}  # fmt: skip
    done = in_a_fresh_process([sys.executable, "-c", SASREC_ON_RAY, cluster, str(tmp_path),
                               json.dumps({**SASREC, "progress": False})])  # fmt: skip
    two = json.loads(done.stdout.strip().splitlines()[-1])
    assert two["workers"] == 2
    assert_same_training(one, two)


def test_ray_workers_without_an_address_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    line = cli_refusal(capsys, ["train-recommender", "--dataset", "ml-100k", "--model", "bprmf", "--out",
                                str(tmp_path / "run"), "--ray-workers", "2"])  # fmt: skip
    assert line == "recsae: error: --ray-workers only applies with --ray-address (or $RAY_ADDRESS)"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("command", "options", "error"),
    [
        ("train-recommender", ["--ray-workers", "3"], "--ray-workers 3: the cluster has 2 CPUs"),
        ("pipeline", ["--ray-workers", "3"], "--ray-workers 3: the cluster has 2 CPUs"),  # its training step
        ("train-recommender", ["--ray-workers", "2", "--batch-size", "3"],
         "batch size 3 leaves fewer than 2 rows per worker for 2 workers"),
    ],
    ids=["too-many-workers", "pipeline", "batch-too-small"],
)  # fmt: skip
def test_a_training_the_cluster_cannot_run_is_refused_before_writing(command, options, error, tmp_path, cluster):
    out = tmp_path / "run"
    done = subprocess.run([RECSAE, command, "--dataset", "ml-100k", "--model", "bprmf", "--out", str(out),
                           "--ray-address", cluster, *options, "--quiet"],
                          capture_output=True, text=True, timeout=600, env=CLUSTER_ENV)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1] == f"recsae: error: {error}", done.stderr
    assert not RunLayout(out).recommender.exists() and not any(out.glob(".recommender*"))
