"""Short real training runs on ML-100K: every model beats popularity, and the run folder keeps its contract."""

from __future__ import annotations

import json
import shutil

import pytest

from recsae_core.common.artifacts import RECORD, sha256_file
from recsae_core.common.errors import ConfigError, DataError
from recsae_core.common.layout import (
    CONTRACT_ITEMS,
    CONTRACT_ONNX,
    ITEM_MAP,
    MODEL_WEIGHTS,
    RECIPE,
    USER_MAP,
    RunLayout,
)
from recsae_core.pipeline.cli import main
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.evaluate import evaluate
from recsae_core.recommenders.onnx_model import read_contract
from recsae_core.recommenders.run import load_run, train_step

pytestmark = pytest.mark.slow

# Epochs and learning rate per model: measured to clear the popularity baseline with a wide margin
# (test NDCG@10 about 0.21 / 0.19 / 0.07 against 0.125 / 0.125 / 0.046) in a few seconds each.
SETTINGS = {"bprmf": (5, 5e-3), "lightgcn": (5, 5e-3), "sasrec": (3, 5e-3)}
KS = (5, 10, 20)
CONTRACT = ("dataset", "model", "protocol", "n_users", "n_items", "n_interactions", "epochs_trained", "train_seconds")


@pytest.fixture(scope="module", params=list(SETTINGS))
def trained(request, tmp_path_factory):
    name = request.param
    epochs, lr = SETTINGS[name]
    run_dir = tmp_path_factory.mktemp(f"run-{name}")
    metrics = train_step(run_dir, "ml-100k", name, "recbole", TrainConfig(epochs=epochs, lr=lr, progress=False))
    return name, run_dir, metrics


def test_beats_popularity(trained):
    name, _, metrics = trained
    model_ndcg = metrics["test"]["ndcg@10"]
    popularity = metrics["popularity_baseline_test"]["ndcg@10"]
    assert popularity > 0.02  # the baseline itself is sane
    assert model_ndcg > 1.2 * popularity, (name, model_ndcg, popularity)
    assert metrics["test"]["hit@10"] > metrics["popularity_baseline_test"]["hit@10"]


def test_metrics_contract(trained):
    name, run_dir, metrics = trained
    on_disk = json.loads((run_dir / "recommender" / "metrics.json").read_text())
    assert on_disk == metrics
    for key in CONTRACT:
        assert key in on_disk, key
    epochs, lr = SETTINGS[name]
    assert (on_disk["dataset"], on_disk["model"], on_disk["protocol"]) == ("ml-100k", name, "recbole")
    assert (on_disk["n_users"], on_disk["n_items"], on_disk["n_interactions"]) == (939, 1016, 80393)
    assert on_disk["epochs_trained"] == epochs  # patience 10 cannot stop a run this short
    assert 1 <= on_disk["best_epoch"] <= epochs
    assert on_disk["train_seconds"] > 0
    assert on_disk["hyperparameters"]["lr"] == lr
    assert on_disk["split"] == ("leave-one-out by time" if name == "sasrec" else "per-user random 8:1:1")
    assert [h["epoch"] for h in on_disk["history"]] == list(range(1, epochs + 1))
    for stage in ("valid", "test", "popularity_baseline_test"):
        for metric in ("ndcg", "recall", "hit", "mrr", "precision"):
            for k in KS:
                value = on_disk[stage][f"{metric}@{k}"]
                assert 0.0 <= value <= 1.0, (stage, metric, k)
        assert on_disk[stage]["recall@5"] <= on_disk[stage]["recall@10"] <= on_disk[stage]["recall@20"]
        assert on_disk[stage]["hit@5"] <= on_disk[stage]["hit@10"] <= on_disk[stage]["hit@20"]
    # The kept weights are those of the best validation epoch.
    best = max(on_disk["history"], key=lambda h: h["valid_ndcg@10"])
    assert on_disk["valid"]["ndcg@10"] == best["valid_ndcg@10"]


def test_run_reloads_to_the_same_test_metrics(trained):
    name, run_dir, metrics = trained
    assert RunLayout(run_dir).recommender_complete()
    run = load_run(run_dir)
    assert run.model.name == name and not run.model.training
    assert run.config["dataset"] == "ml-100k" and run.config["n_items"] == 1016
    reloaded = evaluate(run.model, run.split, "test")
    for key in ("ndcg@10", "recall@10", "hit@10", "mrr@10"):
        assert reloaded[key] == pytest.approx(metrics["test"][key], abs=1e-6), key


def test_run_carries_the_contract_every_recommender_is_read_by(trained):
    name, run_dir, metrics = trained
    folder = RunLayout(run_dir).recommender
    recipe = json.loads((folder / RECIPE).read_text())
    assert recipe["kind"] == ("sequence" if name == "sasrec" else "user_index")
    if name == "sasrec":  # recsae's own convention: left padding with the index past the last item
        assert (recipe["pad_index"], recipe["padding"], recipe["max_len"]) == (1016, "left", 50)
    parity = metrics["contract_parity"]
    assert parity["users_checked"] == 512 and parity["max_abs_score_diff"] <= 1e-5
    # Read by the same code as a model trained elsewhere: `read_contract` accepts the folder's files as they are.
    contract = read_contract(folder / CONTRACT_ONNX, folder / CONTRACT_ITEMS, folder / RECIPE)
    assert contract.dim == 64 and contract.items.embeddings.shape == (1016, 64)


def test_a_run_from_before_contracts_is_upgraded_without_retraining(trained, tmp_path):
    _, run_dir, metrics = trained
    copy = tmp_path / "old"
    shutil.copytree(run_dir, copy)
    folder = RunLayout(copy).recommender
    for file in (CONTRACT_ONNX, CONTRACT_ITEMS, RECIPE, ITEM_MAP, USER_MAP, RECORD):  # older than records, too
        (folder / file).unlink(missing_ok=True)
    weights = sha256_file(folder / MODEL_WEIGHTS)
    assert RunLayout(copy).needs_contract() and not RunLayout(copy).recommender_complete()
    run = load_run(copy)
    assert RunLayout(copy).recommender_complete() and not RunLayout(copy).needs_contract()
    assert sha256_file(folder / MODEL_WEIGHTS) == weights  # the checkpoint, not a new training
    assert json.loads((folder / "metrics.json").read_text())["contract_parity"]["max_abs_h_diff"] <= 1e-5
    reloaded = evaluate(run.model, run.split, "test")
    assert reloaded["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-6)


def test_bad_device_and_dataset_leave_no_run(tmp_path):
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        train_step(tmp_path / "a", "ml-100k", "bprmf", "recbole", TrainConfig(epochs=1, device="tpu"))
    with pytest.raises(DataError):
        train_step(tmp_path / "b", "ml-20m", "bprmf", "recbole", TrainConfig(epochs=1, progress=False))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "recommender").exists()


def test_cli_rejects_zero_epochs(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train-recommender", "--dataset", "ml-100k", "--model", "bprmf", "--epochs", "0", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse prints its usage lines first, then one error line
    assert last.startswith("recsae train-recommender: error: argument --epochs")
    assert "positive integer" in last
    assert not (tmp_path / "recommender").exists()


def test_cli_rejects_unknown_device(tmp_path, capsys):
    code = main(
        ["train-recommender", "--dataset", "ml-100k", "--model", "bprmf", "--device", "tpu", "--out", str(tmp_path)]
    )
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("recsae: error: unknown device 'tpu'")
    assert not (tmp_path / "recommender").exists()


def test_cli_train_prints_summary(tmp_path, capsys):
    argv = ["train-recommender", "--dataset", "ml-100k", "--model", "bprmf", "--epochs", "1", "--lr", "0.005"]
    assert main([*argv, "--quiet", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {k: summary[k] for k in ("dataset", "model", "protocol", "epochs_trained")} == {
        "dataset": "ml-100k",
        "model": "bprmf",
        "protocol": "recbole",
        "epochs_trained": 1,
    }
    assert set(summary["test"]) == {f"{m}@10" for m in ("hit", "recall", "precision", "mrr", "ndcg")}
    assert RunLayout(tmp_path).recommender_complete()
