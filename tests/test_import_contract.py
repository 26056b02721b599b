"""`recsae import` and `recsae pipeline --run` on recommenders trained outside recsae (tests/foreign_models.py):
a sequential model with 1-based, right-padded, shuffled item indices and its own input names, and a two-tower model
with its own user ids; real ML-100K, real ONNX Runtime. The wrapped model scores every user exactly as the model
itself does, the probe sees what the model computes on every prefix, the later steps run on the run folder alone,
and bad contract files are refused with one line naming the file and the problem, before anything is written."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import cli_refusal
from foreign_models import (
    UNKNOWN_ITEM,
    ForeignFiles,
    build_sequence_model,
    build_two_tower_model,
)
from safetensors.numpy import load_file, save_file

from recsae_core.common.artifacts import RECORD
from recsae_core.common.layout import (
    CONFIG,
    CONTRACT_ITEMS,
    CONTRACT_ONNX,
    ITEM_MAP,
    METRICS,
    RECIPE,
    USER_MAP,
    RunLayout,
)
from recsae_core.pipeline.cli import main
from recsae_core.probe.collect import collect, load_activations
from recsae_core.recommenders.batching import make_batch
from recsae_core.recommenders.onnx_model import OnnxRecommender, read_contract
from recsae_core.recommenders.run import RunContext, load_run

pytestmark = pytest.mark.slow


def run_cli(args: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(args)
    return code, stdout.getvalue(), stderr.getvalue()


def import_args(files: ForeignFiles, out: Path, **overrides: Path | None) -> list[str]:
    """`recsae import ...` for `files`; an override replaces a flag's file, None leaves the flag out."""
    flags: dict[str, Path | None] = {"onnx": files.onnx, "item_embeddings": files.item_embeddings,
                                     "recipe": files.recipe, "interactions": files.interactions,
                                     "items": files.items, "users": files.users, "out": out}  # fmt: skip
    flags.update(overrides)
    args = ["import"]
    for name, value in flags.items():
        if value is not None:
            args += ["--" + name.replace("_", "-"), str(value)]
    return args


@pytest.fixture(scope="module")
def seq(ml100k, tmp_path_factory) -> ForeignFiles:
    return build_sequence_model(ml100k, tmp_path_factory.mktemp("foreign-seq"))


@pytest.fixture(scope="module")
def two_tower(ml100k, tmp_path_factory) -> ForeignFiles:
    return build_two_tower_model(ml100k, tmp_path_factory.mktemp("foreign-two-tower"))


def imported(files: ForeignFiles, out: Path) -> dict:
    code, stdout, stderr = run_cli(import_args(files, out))
    assert code == 0, stderr
    return {"run": out, "summary": json.loads(stdout), "ctx": load_run(out)}


@pytest.fixture(scope="module")
def seq_run(seq, tmp_path_factory) -> dict:
    return imported(seq, tmp_path_factory.mktemp("run-seq") / "run")


@pytest.fixture(scope="module")
def two_tower_run(two_tower, tmp_path_factory) -> dict:
    return imported(two_tower, tmp_path_factory.mktemp("run-two-tower") / "run")


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the import


def test_sequence_import_writes_a_self_contained_run(seq_run, seq, ml100k):
    run, summary, ctx = seq_run["run"], seq_run["summary"], seq_run["ctx"]
    layout = RunLayout(run)
    assert layout.recommender_complete()
    data = ["data/interactions.csv", "data/items.item", "data/users.user"]
    assert tree(layout.recommender) == sorted([CONFIG, METRICS, CONTRACT_ONNX, CONTRACT_ITEMS, RECIPE, ITEM_MAP, RECORD,
                                               *data])  # fmt: skip
    config = json.loads((layout.recommender / CONFIG).read_text())
    assert (config["source"], config["dataset"], config["protocol"], config["seed"]) == ("import", "log", "recbole",
                                                                                          2020)  # fmt: skip
    assert config["recommender"] == {"model": "onnx", "n_users": ml100k.n_users, "n_items": ml100k.n_items,
                                     "dim": 32, "max_len": 20, "kind": "sequence"}  # fmt: skip
    # The log's rows naming an item the model does not know are skipped and counted.
    report = summary["import"]
    assert report["rows_read"] == ml100k.n_interactions + seq.extra_rows
    assert (report["rows_kept"], report["skipped_unknown_item"]) == (ml100k.n_interactions, seq.extra_rows)
    assert report["unknown_items"] == [UNKNOWN_ITEM]
    assert report["item_rows_matched"] == ml100k.n_items and report["item_rows_skipped"] > 0  # ml-100k.item is all
    metrics = json.loads((layout.recommender / METRICS).read_text())
    assert metrics["import"] == report and metrics["split"] == "leave-one-out by time"
    assert metrics["test"]["ndcg@10"] == summary["test"]["ndcg@10"] > 0
    # The run's Dataset is the model's: dense item i is the item map's row i, histories as the log has them.
    assert ctx.model.sequential and ctx.split.sequential
    map_ids = [row["item_id"] for row in csv.DictReader((layout.recommender / ITEM_MAP).open())]
    assert ctx.dataset.item_tokens == map_ids
    np.testing.assert_array_equal(ctx.model.model_items, [seq.item_index[t] for t in map_ids])
    assert ctx.model.model_users is None


def test_the_imports_evaluation_by_batches_is_evaluate(seq_run):
    """`import` ranks its batches through an item map (on Ray: an actor pool); here, in this process, it is the
    plain evaluation, and it is what metrics.json records."""
    from recsae_core.recommenders.evaluate import evaluate, evaluate_stages

    ctx = seq_run["ctx"]
    by_batches = evaluate_stages(ctx, ("valid", "test"))
    assert by_batches == {stage: evaluate(ctx.model, ctx.split, stage) for stage in ("valid", "test")}
    recorded = json.loads((RunLayout(seq_run["run"]).recommender / METRICS).read_text())
    assert (recorded["valid"], recorded["test"]) == (by_batches["valid"], by_batches["test"])
    assert recorded["ray_workers"] == 0


def test_two_tower_import_keeps_the_models_user_ids(two_tower_run, two_tower, ml100k):
    layout = RunLayout(two_tower_run["run"])
    assert (layout.recommender / USER_MAP).is_file()
    assert (layout.recommender / "data" / "interactions.inter").is_file()
    report, ctx = two_tower_run["summary"]["import"], two_tower_run["ctx"]
    assert (report["skipped_unknown_user"], report["unknown_users"]) == (1, ["u-new"])
    assert report["rows_kept"] == ml100k.n_interactions
    assert not ctx.model.sequential and not ctx.split.sequential
    assert set(ctx.dataset.user_tokens) == set(two_tower.user_index)
    np.testing.assert_array_equal(ctx.model.model_users, [two_tower.user_index[u] for u in ctx.dataset.user_tokens])
    assert ctx.dataset.user_meta is not None


# ---------------------------------------------------------------- the wrapped model is the model


def all_users_scores(ctx: RunContext, stage: str = "test") -> tuple[np.ndarray, np.ndarray]:
    seen = ctx.split.seen(stage)
    users = np.arange(ctx.split.n_users)
    with torch.no_grad():
        h = ctx.model.represent(make_batch(ctx.model, users, seen, "cpu"))
        return h.numpy(), ctx.model.score(h).numpy()


def test_sequence_scores_are_the_models_own_for_every_user(seq_run, seq):
    ctx = seq_run["ctx"]
    h, scores = all_users_scores(ctx)
    seen = ctx.split.seen("test")
    histories = [[ctx.dataset.item_tokens[i] for i in seen.row(u)] for u in range(ctx.split.n_users)]
    own = seq.model.own_scores(histories, seq.item_index)
    np.testing.assert_allclose(h, seq.model.own_h(histories, seq.item_index), atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores, own[:, ctx.model.model_items], atol=1e-5, rtol=0)
    assert (scores.argmax(1) == own[:, ctx.model.model_items].argmax(1)).all()
    assert max(len(h) for h in histories) > 20  # histories longer than max_len keep their newest items


def test_two_tower_scores_are_the_models_own_for_every_user(two_tower_run, two_tower):
    ctx = two_tower_run["ctx"]
    _, scores = all_users_scores(ctx)
    own = two_tower.model.own_scores(ctx.dataset.user_tokens, two_tower.user_index)
    np.testing.assert_allclose(scores, own[:, ctx.model.model_items], atol=1e-5, rtol=0)
    assert ctx.model.item_bias() is not None


def test_custom_recipe_feeds_precomputed_rows(two_tower, two_tower_run, tmp_path):
    """The same user tower fed from a user_inputs file (rows in another order than the model's user index) through
    a custom recipe gives the same scores."""
    ctx = two_tower_run["ctx"]
    folder = tmp_path / "custom"
    shutil.copytree(two_tower.folder, folder)
    users = list(two_tower.user_index)[::-1]
    save_file({"user_idx": np.array([two_tower.user_index[u] for u in users], np.int64)},
              str(folder / "rows.safetensors"))  # fmt: skip
    with (folder / "rows.csv").open("w") as handle:
        handle.write("user_id,index\n" + "".join(f"{u},{row}\n" for row, u in enumerate(users)))
    recipe = {"kind": "custom", "user_inputs": "rows.safetensors", "user_index": "rows.csv",
              "item_index": "item_map.csv"}  # fmt: skip
    (folder / "recipe.json").write_text(json.dumps(recipe))
    contract = read_contract(folder / "two_tower.onnx", folder / "E.safetensors", folder / "recipe.json")
    model = OnnxRecommender(contract, ctx.dataset)
    users_dense = np.arange(ctx.dataset.n_users)
    with torch.no_grad():
        scores = model.score(model.represent(make_batch(model, users_dense, ctx.split.train, "cpu"))).numpy()
    own = two_tower.model.own_scores(ctx.dataset.user_tokens, two_tower.user_index)
    np.testing.assert_allclose(scores, own[:, model.model_items], atol=1e-5, rtol=0)


def test_probe_sees_the_models_h_on_every_prefix(seq_run, seq, tmp_path):
    ctx = seq_run["ctx"]
    result = collect(dataclasses.replace(ctx, root=tmp_path), progress=False)
    h, users, positions = load_activations(result.folder)
    train = ctx.split.train
    assert result.n_samples == int(train.lengths.sum()) == len(h) and result.d == 32
    rows = np.random.default_rng(0).choice(len(h), 300, replace=False)
    rows = np.concatenate([rows, np.flatnonzero(positions >= 20)[:100]])  # prefixes past max_len too
    tokens = ctx.dataset.item_tokens
    prefixes = [[tokens[i] for i in train.row(u)[: p + 1]] for u, p in zip(users[rows], positions[rows], strict=True)]
    np.testing.assert_allclose(h.numpy()[rows], seq.model.own_h(prefixes, seq.item_index), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the pipeline on the run


@pytest.fixture(scope="module")
def piped(seq_run, tmp_path_factory) -> dict:
    """`recsae pipeline --run` on a copy of the imported sequence run (small SAE)."""
    run = tmp_path_factory.mktemp("piped") / "run"
    shutil.copytree(RunLayout(seq_run["run"]).recommender, RunLayout(run).recommender)
    args = ["pipeline", "--run", str(run), "--latents", "128", "--k", "4", "--sae-epochs", "2", "--quiet"]
    code, stdout, stderr = run_cli(args)
    return {"run": run, "args": args, "code": code, "stdout": stdout, "stderr": stderr}


def test_pipeline_on_an_imported_run(piped, seq_run):
    run, layout, stderr = piped["run"], RunLayout(piped["run"]), piped["stderr"]
    assert layout.probe_complete() and layout.sae_complete(), stderr
    sae = json.loads((layout.sae / METRICS).read_text())
    assert sae["n_samples"] == int(seq_run["ctx"].split.train.lengths.sum())
    assert (sae["n_latents"], sae["k"], sae["epochs_trained"]) == (128, 4, 2)
    assert sae["ndcg@10"]["original"] == pytest.approx(seq_run["summary"]["test"]["ndcg@10"], abs=1e-6)
    assert layout.catalog_complete(), stderr
    assert piped["code"] == 0, stderr
    steps = ["probe", "sae", "concepts", "bundle"]
    assert json.loads(piped["stdout"].splitlines()[-1]) == {"run": str(run), "steps": steps}
    assert layout.bundle_complete()
    code, stdout, stderr = run_cli(piped["args"])  # everything is up to date
    assert code == 0, stderr
    assert stdout.splitlines()[:-1] == [f"[{i}/4] {step}: up to date, skipped" for i, step in enumerate(steps, 1)]


def test_debias_popularity_on_an_imported_run(piped):
    assert piped["code"] == 0, piped["stderr"]
    code, stdout, stderr = run_cli(["debias", "--run", str(piped["run"]), "--target", "popularity",
                                    "--candidates", "4", "--quiet"])  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["target"] == "popularity"
    assert RunLayout(piped["run"]).policy("popularity").is_file()


def test_probe_of_a_two_tower_model_is_its_h_per_user(two_tower_run, two_tower, tmp_path):
    ctx = two_tower_run["ctx"]
    result = collect(dataclasses.replace(ctx, root=tmp_path), progress=False)
    h, users, _ = load_activations(result.folder)
    np.testing.assert_array_equal(users, np.arange(ctx.split.n_users))
    own = two_tower.model.own_h([ctx.dataset.user_tokens[u] for u in users], two_tower.user_index)
    np.testing.assert_allclose(h.numpy(), own, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- refusals


def refused(capsys, args: list[str], out: Path) -> str:
    line = cli_refusal(capsys, args)
    assert not out.exists()
    return line


@pytest.fixture
def seq_copy(seq, tmp_path) -> ForeignFiles:
    """The sequence model's files in a private folder, to spoil one of them."""
    folder = tmp_path / "files"
    shutil.copytree(seq.folder, folder)
    return dataclasses.replace(seq, folder=folder, **{f: folder / getattr(seq, f).name for f in (
        "onnx", "item_embeddings", "recipe", "interactions", "items", "users")})  # fmt: skip


def edit_recipe(files: ForeignFiles, **changes) -> None:
    recipe = json.loads(files.recipe.read_text())
    recipe.update(changes)
    files.recipe.write_text(json.dumps(recipe))


def test_refuses_recipe_with_unknown_key(capsys, seq_copy, tmp_path):
    edit_recipe(seq_copy, pad_idx=0)
    line = refused(capsys, import_args(seq_copy, tmp_path / "run"), tmp_path / "run")
    assert str(seq_copy.recipe) in line and "unknown key" in line and "pad_idx" in line


def test_refuses_duplicate_id_in_item_map(capsys, seq_copy, tmp_path):
    path = seq_copy.folder / "item_map.csv"
    lines = path.read_text().splitlines()
    first_id = lines[1].split(",")[0]
    path.write_text("\n".join([*lines, f"{first_id},1"]) + "\n")
    line = refused(capsys, import_args(seq_copy, tmp_path / "run"), tmp_path / "run")
    assert str(path) in line and "duplicate item_id" in line and first_id in line


def test_refuses_index_outside_the_item_matrix(capsys, seq_copy, tmp_path):
    path = seq_copy.folder / "item_map.csv"
    lines = path.read_text().splitlines()
    item_id = lines[3].split(",")[0]
    lines[3] = f"{item_id},5000"
    path.write_text("\n".join(lines) + "\n")
    line = refused(capsys, import_args(seq_copy, tmp_path / "run"), tmp_path / "run")
    assert f"{path}: line 4: index 5000 is outside the item matrix's rows 0..1016" in line


def test_refuses_input_name_the_model_does_not_take(capsys, seq_copy, tmp_path):
    edit_recipe(seq_copy, inputs={"items": "item_sequence", "length": "item_seq_len"})
    line = refused(capsys, import_args(seq_copy, tmp_path / "run"), tmp_path / "run")
    assert str(seq_copy.recipe) in line and "'item_sequence'" in line and "item_seq, item_seq_len" in line


def test_refuses_model_input_the_recipe_does_not_feed(capsys, seq_copy, tmp_path):
    edit_recipe(seq_copy, inputs={"items": "item_seq", "length": None})
    line = refused(capsys, import_args(seq_copy, tmp_path / "run"), tmp_path / "run")
    assert str(seq_copy.recipe) in line and "item_seq_len" in line


def test_refuses_h_wider_than_the_item_matrix(capsys, seq_copy, tmp_path):
    emb = load_file(str(seq_copy.item_embeddings))["item_embeddings"]
    save_file({"item_embeddings": emb[:, :16].copy()}, str(seq_copy.item_embeddings))
    line = refused(capsys, import_args(seq_copy, tmp_path / "run"), tmp_path / "run")
    assert str(seq_copy.onnx) in line and "width 32" in line and "16 columns" in line


def test_refuses_misnamed_item_tensor(capsys, seq_copy, tmp_path):
    emb = load_file(str(seq_copy.item_embeddings))["item_embeddings"]
    save_file({"item_embeddings": emb, "item_biases": np.zeros(len(emb), np.float32)}, str(seq_copy.item_embeddings))
    line = refused(capsys, import_args(seq_copy, tmp_path / "run"), tmp_path / "run")
    assert str(seq_copy.item_embeddings) in line and "item_biases" in line


def test_refuses_interactions_with_no_matching_row(capsys, seq_copy, tmp_path):
    seq_copy.interactions.write_text("user_id,item_id,timestamp\n1,nope,1\n2,never,2\n")
    line = refused(capsys, import_args(seq_copy, tmp_path / "run"), tmp_path / "run")
    assert str(seq_copy.interactions) in line and "no row" in line


def test_refuses_missing_data_file(capsys, seq_copy, tmp_path):
    line = refused(capsys, import_args(seq_copy, tmp_path / "run", users=tmp_path / "nope.csv"), tmp_path / "run")
    assert str(tmp_path / "nope.csv") in line and "not found" in line


def test_refuses_a_run_that_already_has_a_recommender(capsys, seq_run, seq):
    before = tree(seq_run["run"])
    line = cli_refusal(capsys, import_args(seq, seq_run["run"]))
    assert str(seq_run["run"]) in line and "already holds recommender/" in line
    assert tree(seq_run["run"]) == before


def test_refuses_a_folder_with_another_runs_steps(capsys, seq, tmp_path):
    (tmp_path / "run" / "probe").mkdir(parents=True)
    line = cli_refusal(capsys, import_args(seq, tmp_path / "run"))
    assert "already holds probe/" in line
    assert tree(tmp_path / "run") == []


def test_pipeline_refusals(capsys, tmp_path):
    run = str(tmp_path / "run")
    line = cli_refusal(capsys, ["pipeline", "--run", run, "--epochs", "3", "--protocol", "loo"])
    assert "--protocol" in line and "--epochs" in line and "--run" in line
    line = cli_refusal(capsys, ["pipeline", "--run", run, "--dataset", "ml-100k"])
    assert "--dataset" in line
    line = cli_refusal(capsys, ["pipeline", "--dataset", "ml-100k", "--model", "bprmf"])
    assert "--run" in line and "--out" in line
    line = cli_refusal(capsys, ["pipeline", "--run", run, "--quiet"])
    assert f"{run}/recommender" in line and "recsae import" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- served over HTTP


@pytest.fixture(scope="module")
def served(piped, tmp_path_factory):
    """The imported run's bundle, with its popularity policy, served by Ray Serve on loopback."""
    from recsae_core.pipeline.steps import bundle_step
    from service.local import free_port, start_local

    run = piped["run"]
    if not RunLayout(run).policy("popularity").is_file():
        code, _, stderr = run_cli(["debias", "--run", str(run), "--target", "popularity", "--candidates", "4",
                                   "--quiet"])  # fmt: skip
        assert code == 0, stderr
    bundle = tmp_path_factory.mktemp("served") / "bundle"
    bundle_step(run, bundle)
    service = start_local(bundle, port=free_port(), metrics_port=free_port())
    try:
        yield service.url, load_run(run)
    finally:
        service.stop()


def test_served_rankings_are_the_models_own_and_its_policy_applies_by_name(served, seq):
    import httpx

    url, ctx = served
    data = ctx.dataset
    model_to_item = {index: item for item, index in seq.item_index.items()}
    for user in range(0, data.n_users, max(1, data.n_users // 25)):
        token = data.user_tokens[user]
        history = [data.item_tokens[i] for i in data.items[data.users == user]]  # the log, oldest first
        own = seq.model.own_scores([history], seq.item_index)[0]
        own[0] = -np.inf  # the pad row is no item
        for item in history:
            own[seq.item_index[item]] = -np.inf
        expected = [model_to_item[int(j)] for j in np.argsort(-own, kind="stable")[:10]]
        answer = httpx.post(f"{url}/v1/recommend", json={"user_id": token, "k": 10}, timeout=30)
        assert answer.status_code == 200, answer.text
        served_items = answer.json()["items"]
        assert [entry["item_id"] for entry in served_items] == expected
        np.testing.assert_allclose([e["score"] for e in served_items], np.sort(own)[::-1][:10], atol=1e-5, rtol=0)
        # a history request is the model called on that history; exclude_seen masks the history's items
        recent = history[-20:]  # what the model reads, and within the service's max_history
        own = seq.model.own_scores([recent], seq.item_index)[0]
        own[0] = -np.inf
        for item in recent:
            own[seq.item_index[item]] = -np.inf
        expected = [model_to_item[int(j)] for j in np.argsort(-own, kind="stable")[:10]]
        by_history = httpx.post(f"{url}/v1/recommend", json={"history": recent, "k": 10}, timeout=30)
        assert by_history.status_code == 200, by_history.text
        assert [entry["item_id"] for entry in by_history.json()["items"]] == expected
    steered = httpx.post(f"{url}/v1/recommend", json={"user_id": data.user_tokens[0], "k": 10,
                                                      "steering": {"policy": "popularity"}}, timeout=30)  # fmt: skip
    assert steered.status_code == 200, steered.text
    assert steered.json()["steering_applied"] is True and steered.json()["policy"] == "popularity"
    unknown = httpx.post(f"{url}/v1/recommend", json={"history": ["no-such-item", "nor-this"]}, timeout=30)
    assert unknown.status_code == 422
    assert "'no-such-item'" in unknown.json()["detail"] and "'nor-this'" in unknown.json()["detail"]
