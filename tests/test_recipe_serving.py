"""Serving a sequence model recsae did not train, through its input recipe: a tiny PyTorch model with conventions
unlike recsae's own (1-based item indices with pad 0, right padding, a length input, its own input and output
names) exported to ONNX, bundled with `model_index` and the recipe's padding, and served by the real engine, request
parser and response builder (the HTTP handlers add nothing but transport; test_service.py covers that).

Every reference is computed here, independently of the service: the model's inputs are built by hand from this
file's own id table and fed to the exported model with ONNX Runtime.

Then the same end to end from `recsae import`: two foreign models trained briefly on ML-100K (tests/foreign_models.py:
a sequence model with the conventions above, and a two-tower model with its own user ids and an item bias) are
imported, bundled by `contents_from_run` and served; every user's ranking is compared with the PyTorch model's own.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from foreign_models import (
    DIM,
    SEQ_MAX_LEN,
    UNKNOWN_ITEM,
    ForeignFiles,
    build_sequence_model,
    build_two_tower_model,
    two_tower_user,
)
from safetensors.numpy import load_file, save_file
from torch import nn

from recsae_core.bundle.export import contents_from_run, input_spec
from recsae_core.bundle.format import (
    MANIFEST,
    BundleContents,
    load_bundle,
    sha256_file,
    write_bundle,
    write_manifest,
)
from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import STATS_FILE
from recsae_core.recommenders.imported import import_step
from recsae_core.recommenders.recipe import load_recipe
from recsae_core.recommenders.run import RunContext, load_run
from recsae_core.sae.model import SAEConfig, TopKSAE
from recsae_core.sae.stats import latent_statistics, save_stats
from service.engine import Row
from service.errors import RequestError
from service.schemas import RecommendRequest, ServiceConfig
from service.served import Served

MAX_LEN, D, VOCAB = 5, 8, 20
"""History length, width of h, and the model's item indices 1..VOCAB (0 pads)."""
N_ITEMS = 15
"""Items in the interaction log: a subset of the model's, in another order."""
CONFIG = ServiceConfig(bundle="unused", max_k=N_ITEMS, max_history=30)
IMPORTED_CONFIG = ServiceConfig(bundle="unused", max_k=10, max_history=60)


class ForeignSequenceModel(nn.Module):
    """h = tanh(W e_last) + mean(e): the last real item (found from the length input, so right padding and the
    length matter) and the mean of the real items (masked by the length, not by the pad id)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.items = nn.Embedding(VOCAB + 1, D, padding_idx=0)
        self.mix = nn.Linear(D, D)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        x = self.items(item_seq)
        mask = (torch.arange(item_seq.shape[1])[None, :] < item_seq_len[:, None]).float()
        mean = (x * mask[..., None]).sum(1) / item_seq_len.clamp(min=1)[:, None].float()
        last = x[torch.arange(x.shape[0]), (item_seq_len - 1).clamp(min=0)]
        return torch.tanh(self.mix(last)) + mean


@dataclass
class Foreign:
    """The wrapped model, its own id table, the log, and the bundle served from them."""

    onnx: Path
    """The exported model (item_seq, item_seq_len -> seq_output)."""
    item_matrix: np.ndarray
    """(VOCAB + 1, D) the model's own E (row 0 is the pad)."""
    model_of: dict[str, int]
    """Raw item id -> the model's index: this test's own table, written to the recipe's item map."""
    item_ids: list[str]
    """The log's items (the bundle's dense order)."""
    user_ids: list[str]
    """The log's users, by their own ids."""
    histories: list[list[str]]
    """Each user's log, oldest first, as raw item ids."""
    bundle: Path
    """The bundle folder."""
    served: Served
    """The bundle as a replica serves it."""


def model_inputs(histories: list[list[str]], model_of: dict[str, int]) -> dict[str, np.ndarray]:
    """The model's inputs built by hand: newest MAX_LEN items, 1-based indices, right-padded with 0, and lengths."""
    seqs = np.zeros((len(histories), MAX_LEN), dtype=np.int64)
    lengths = np.zeros(len(histories), dtype=np.int64)
    for row, history in enumerate(histories):
        kept = history[-MAX_LEN:]
        seqs[row, : len(kept)] = [model_of[raw] for raw in kept]
        lengths[row] = len(kept)
    return {"item_seq": seqs, "item_seq_len": lengths}


def model_scores(foreign: Foreign, histories: list[list[str]]) -> np.ndarray:
    """(len(histories), N_ITEMS) the wrapped model's own scores of the log's items, by calling it."""
    session = ort.InferenceSession(str(foreign.onnx), providers=["CPUExecutionProvider"])
    h = session.run(["seq_output"], model_inputs(histories, foreign.model_of))[0]
    scores = h @ foreign.item_matrix.T
    return scores[:, [foreign.model_of[raw] for raw in foreign.item_ids]]


def export(module: nn.Module, path: Path) -> None:
    example = (torch.tensor([[1, 2, 0, 0, 0], [3, 4, 5, 6, 7]]), torch.tensor([2, 5]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=["item_seq", "item_seq_len"],
            output_names=["seq_output"],
            dynamic_axes={"item_seq": {0: "batch"}, "item_seq_len": {0: "batch"}, "seq_output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def write_sae(folder: Path, h: np.ndarray) -> None:
    """An untrained SAE for h (its quality does not matter here: without edits it only observes)."""
    sae = TopKSAE(SAEConfig(d_in=h.shape[1], n_latents=4 * h.shape[1], k=4), seed=0)
    sae.init_from_data(torch.from_numpy(h))
    sae.save(folder)
    save_stats(latent_statistics(sae, torch.from_numpy(h)), folder / STATS_FILE)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Foreign:
    root = tmp_path_factory.mktemp("foreign")
    rng = np.random.default_rng(7)
    model = ForeignSequenceModel()
    export(model, root / "model.onnx")
    item_matrix = model.items.weight.detach().numpy().copy()
    # The log's items are 15 of the model's 20, shuffled, with ids that are not their indices.
    item_ids = [f"movie-{k:03d}" for k in rng.permutation(100)[:N_ITEMS]]
    model_of = dict(zip(item_ids, (rng.permutation(VOCAB)[:N_ITEMS] + 1).tolist(), strict=True))
    (root / "item_map.csv").write_text("item_id,index\n" + "".join(f"{i},{j}\n" for i, j in model_of.items()))
    recipe_body = {"kind": "sequence", "inputs": {"items": "item_seq", "length": "item_seq_len"},
                   "max_len": MAX_LEN, "pad_index": 0, "padding": "right", "item_index": "item_map.csv"}  # fmt: skip
    (root / "recipe.json").write_text(json.dumps(recipe_body))
    recipe = load_recipe(root / "recipe.json", n_items=VOCAB + 1)
    # Users with their own ids; histories from 1 item to longer than the model's MAX_LEN.
    user_ids = [f"user-{k}" for k in (17, 3, 250, 42, 8, 99, 61)]
    dense = {raw: i for i, raw in enumerate(item_ids)}
    histories = [rng.choice(item_ids, n, replace=False).tolist() for n in (1, 2, 4, 5, 6, 9, 12)]
    # What the export does with an imported run: the recipe builds every user's inputs from the model's indices.
    model_index = np.asarray([recipe.items.lookup(raw) for raw in item_ids], dtype=np.int64)
    user_inputs = recipe.sequence_inputs([model_index[[dense[raw] for raw in h]] for h in histories])
    seen = [np.asarray([dense[raw] for raw in h], dtype=np.int64) for h in histories]
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in seen])]).astype(np.int64)
    session = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    write_sae(root / "sae", session.run(["seq_output"], user_inputs)[0])
    contents = BundleContents(
        onnx_path=root / "model.onnx",
        inputs=input_spec(recipe),
        item_embeddings=item_matrix[model_index],
        item_ids=item_ids,
        titles=[f"Title of {raw}" for raw in item_ids],
        genres=[["drama"] if i % 2 else ["comedy"] for i in range(N_ITEMS)],
        popularity=np.bincount(np.concatenate(seen), minlength=N_ITEMS),
        user_ids=user_ids,
        user_inputs=user_inputs,
        seen=(indptr, np.concatenate(seen)),
        sae_folder=root / "sae",
        meta={"dataset": "toy", "model": "foreign-seq"},
        model_index=model_index,
    )
    write_bundle(contents, root / "bundle")
    return Foreign(root / "model.onnx", item_matrix, model_of, item_ids, user_ids, histories, root / "bundle",
                   Served.load(root / "bundle"))  # fmt: skip


def answer(served: Served, body: dict) -> dict:
    """What POST /v1/recommend answers for `body`: the handler's parse -> engine -> response path, without HTTP."""
    row = served.requests.parse(RecommendRequest.model_validate(body, context={"config": CONFIG}))
    results, _ = served.engine.recommend([row])
    return served.responses.recommend(row, results[0])


def assert_ranking(served_items: list[dict], scores: np.ndarray, item_ids: list[str], masked: list[str]) -> None:
    """Served ids and scores are the reference's order (ties by dense index, as the engine breaks them)."""
    scores = scores.copy()
    scores[[item_ids.index(raw) for raw in masked]] = -np.inf
    order = [i for i in np.argsort(-scores, kind="stable") if np.isfinite(scores[i])][: len(served_items)]
    assert [item["item_id"] for item in served_items] == [item_ids[i] for i in order]
    np.testing.assert_allclose([item["score"] for item in served_items], scores[order], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the wrapped model's own rankings


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_every_user_gets_the_models_own_ranking(foreign: Foreign, exclude_seen: bool) -> None:
    reference = model_scores(foreign, foreign.histories)
    for user, raw_user in enumerate(foreign.user_ids):
        body = answer(foreign.served, {"user_id": raw_user, "k": N_ITEMS, "exclude_seen": exclude_seen})
        masked = foreign.histories[user] if exclude_seen else []
        assert len(body["items"]) == N_ITEMS - len(set(masked))
        assert_ranking(body["items"], reference[user], foreign.item_ids, masked)
        assert body["steering_applied"] is False


def test_history_requests_equal_calling_the_model(foreign: Foreign) -> None:
    ids = foreign.item_ids
    histories = [[ids[4]], [ids[0], ids[9], ids[2]], ids[:MAX_LEN], ids[3:11], foreign.histories[-1]]
    reference = model_scores(foreign, histories)
    for history, scores in zip(histories, reference, strict=True):
        for exclude_seen in (False, True):
            body = answer(foreign.served, {"history": history, "k": N_ITEMS, "exclude_seen": exclude_seen})
            assert_ranking(body["items"], scores, ids, history if exclude_seen else [])


def test_a_users_log_as_a_history_is_that_user(foreign: Foreign) -> None:
    """In one mixed batch, a known user and the same log sent as a history get the same h, bit for bit."""
    engine, parse = foreign.served.engine, foreign.served.requests.parse
    rows = []
    for user, raw_user in enumerate(foreign.user_ids):
        rows.append(parse(RecommendRequest.model_validate({"user_id": raw_user}, context={"config": CONFIG})))
        history = {"history": foreign.histories[user]}
        rows.append(parse(RecommendRequest.model_validate(history, context={"config": CONFIG})))
    h = engine.represent(rows)
    np.testing.assert_array_equal(h[0::2], h[1::2])
    session = ort.InferenceSession(str(foreign.onnx), providers=["CPUExecutionProvider"])
    expected = session.run(["seq_output"], model_inputs(foreign.histories, foreign.model_of))[0]
    np.testing.assert_allclose(h[0::2], expected, rtol=0, atol=1e-6)


def test_unknown_history_ids_are_refused_naming_each(foreign: Foreign) -> None:
    known = foreign.item_ids
    history = [known[0], "no-such", known[1], 12345, "no-such", "also\nmissing"]
    with pytest.raises(RequestError) as info:
        answer(foreign.served, {"history": history})
    assert info.value.status == 422
    assert info.value.message == "unknown item ids 'no-such', '12345', 'also\\nmissing' in history"
    with pytest.raises(RequestError) as info:
        answer(foreign.served, {"history": ["nope"]})
    assert (info.value.status, info.value.message) == (422, "unknown item id 'nope' in history")


def test_exclude_seen_masks_the_users_log(foreign: Foreign) -> None:
    for user, raw_user in enumerate(foreign.user_ids):
        served = {i["item_id"] for i in answer(foreign.served, {"user_id": raw_user, "k": N_ITEMS})["items"]}
        assert served == set(foreign.item_ids) - set(foreign.histories[user])


# ---------------------------------------------------------------- the bundle's new fields


def test_bundle_round_trip_with_recipe_fields(foreign: Foreign) -> None:
    bundle = load_bundle(foreign.bundle)
    spec = bundle.inputs
    assert (spec.kind, spec.names, spec.history_input) == ("history", ["item_seq", "item_seq_len"], "item_seq")
    assert (spec.max_len, spec.pad_id, spec.padding, spec.length_input) == (MAX_LEN, 0, "right", "item_seq_len")
    assert bundle.manifest["inputs"]["padding"] == "right"
    assert bundle.model_index.dtype == np.int64
    assert bundle.model_index.tolist() == [foreign.model_of[raw] for raw in foreign.item_ids]
    assert bundle.user_ids == foreign.user_ids and bundle.items["ids"] == foreign.item_ids
    expected = model_inputs(foreign.histories, foreign.model_of)
    for name, values in expected.items():
        np.testing.assert_array_equal(bundle.user_inputs[name], values)
    for user, history in enumerate(foreign.histories):
        assert [foreign.item_ids[i] for i in bundle.seen(user)] == history


@pytest.fixture
def damaged(foreign: Foreign, tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(foreign.bundle, folder)
    return folder


def rewrite_tensors(folder: Path, name: str, **changes: np.ndarray) -> Path:
    """Change tensors in one safetensors file and record its new hash, so only the deeper checks can catch it."""
    path = folder / name
    tensors = {**load_file(str(path)), **changes}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = sha256_file(path)
    write_manifest(folder, manifest)
    return path


def rewrite_inputs(folder: Path, **changes: object) -> Path:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["inputs"].update(changes)
    write_manifest(folder, manifest)
    return folder / MANIFEST


def refused(folder: Path, named: Path, needle: str) -> None:
    with pytest.raises(ArtifactError) as info:
        load_bundle(folder)
    message = str(info.value)
    assert str(named) in message and needle in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("index", "needle"),
    [
        (lambda m: m[:-1], "model_index has shape"),
        (lambda m: m.astype(np.float32), "dtype float32"),
        (lambda m: np.where(np.arange(len(m)) == 3, -2, m), "model_index of item 3 is negative"),
        (lambda m: np.where(np.arange(len(m)) == 9, m[2], m), "is given to both item 2 and item 9"),
        (lambda m: np.where(np.arange(len(m)) == 5, 0, m), "the pad id 0 is also the model_index of item 5"),
    ],
)
def test_corrupt_model_index_is_refused(foreign: Foreign, damaged: Path, index, needle: str) -> None:
    model_index = load_bundle(foreign.bundle).model_index
    path = rewrite_tensors(damaged, "items.safetensors", model_index=index(model_index))
    refused(damaged, path, needle)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"padding": "middle"}, "inputs.padding must be one of"),
        ({"length_input": "lengths"}, "inputs.length_input 'lengths' must be one of"),
        ({"length_input": "item_seq"}, "other than the history input"),
        ({"history_input": "seq"}, "inputs.history_input 'seq' is not one of"),
        ({"pad_id": -1}, "inputs.pad_id must be an integer >= 0"),
        ({"max_len": 0}, "inputs.max_len must be an integer >= 1"),
        ({"names": ["item_seq", "item_seq"]}, "inputs.names must be a non-empty list of distinct"),
        ({"kind": "custom"}, "inputs.padding applies to kind 'history' only"),
        ({"padded": "right"}, "inputs has unknown field(s) ['padded']"),
    ],
)
def test_corrupt_input_spec_is_refused(damaged: Path, changes: dict, needle: str) -> None:
    path = rewrite_inputs(damaged, **changes)
    refused(damaged, path, needle)


def test_user_inputs_that_disagree_with_the_spec_are_refused(foreign: Foreign, damaged: Path) -> None:
    stored = load_bundle(foreign.bundle).user_inputs
    seqs, lengths = stored["item_seq"], stored["item_seq_len"]
    left = np.zeros_like(seqs)
    for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        left[row, MAX_LEN - n :] = seq[:n]
    cases = [
        ({"item_seq": left}, "'item_seq' row 0 is not right-padded with the pad id 0"),
        ({"item_seq_len": lengths + (np.arange(len(lengths)) == 2)}, "'item_seq_len' of row 2 is"),
        ({"item_seq": np.where(seqs == seqs[1, 0], VOCAB + 5, seqs)}, "neither an item's nor the pad id"),
        ({"item_seq": seqs[:, :-1]}, "expected (users, 5) integers"),
    ]
    for changes, needle in cases:
        path = rewrite_tensors(damaged, "users.safetensors", **{**stored, **changes})
        refused(damaged, path, needle)


def test_write_bundle_refuses_a_pad_id_that_is_an_item(foreign: Foreign, tmp_path: Path) -> None:
    bundle = load_bundle(foreign.bundle)
    model_index = bundle.model_index.copy()
    model_index[4] = 0
    contents = BundleContents(
        onnx_path=bundle.model_path, inputs=bundle.inputs, item_embeddings=bundle.item_embeddings,
        item_ids=bundle.items["ids"], titles=bundle.items["titles"], genres=bundle.items["genres"],
        popularity=np.asarray(bundle.items["popularity"]), user_ids=bundle.user_ids, user_inputs=bundle.user_inputs,
        seen=(bundle.seen_indptr, bundle.seen_items), sae_folder=bundle.sae_folder, meta={}, model_index=model_index,
    )  # fmt: skip
    with pytest.raises(ArtifactError, match="the pad id 0 is also the model_index of item 4"):
        write_bundle(contents, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bundles exported from imported runs


@dataclass
class ImportedBundle:
    """A foreign model imported on ML-100K (`recsae import`), bundled by `contents_from_run` and served."""

    files: ForeignFiles
    """What the user handed over, and the trained model itself (the reference)."""
    ctx: RunContext
    """The imported run."""
    served: Served
    """Its bundle, as a replica serves it."""


def import_and_bundle(files: ForeignFiles, root: Path) -> ImportedBundle:
    run_dir = root / "run"
    import_step(run_dir, files.onnx, files.item_embeddings, files.recipe, files.interactions, files.items, files.users)
    ctx = load_run(run_dir)
    write_sae(root / "sae", torch.randn(256, DIM, generator=torch.Generator().manual_seed(0)).numpy())
    contents, parity = contents_from_run(ctx, root / "sae", root)
    write_bundle(contents, root / "bundle", parity=parity)
    return ImportedBundle(files, ctx, Served.load(root / "bundle"))


@pytest.fixture(scope="module")
def imported_seq(ml100k, tmp_path_factory: pytest.TempPathFactory) -> ImportedBundle:
    root = tmp_path_factory.mktemp("imported-seq")
    return import_and_bundle(build_sequence_model(ml100k, root / "files", epochs=1), root)


@pytest.fixture(scope="module")
def imported_two_tower(ml100k, tmp_path_factory: pytest.TempPathFactory) -> ImportedBundle:
    root = tmp_path_factory.mktemp("imported-two-tower")
    return import_and_bundle(build_two_tower_model(ml100k, root / "files", epochs=1), root)


def logs(imported: ImportedBundle) -> list[list[str]]:
    """Every user's log as raw item ids, oldest first (train, then held-out), from the run's own split."""
    split, tokens = imported.ctx.split, imported.ctx.dataset.item_tokens
    return [
        [tokens[i] for i in np.concatenate([split.train.row(u), split.valid.row(u), split.test.row(u)])]
        for u in range(split.n_users)
    ]


def assert_model_ranking(imported: ImportedBundle, rows: list[Row], own: np.ndarray, masked: list[list[str]]) -> None:
    """Each row's served top-k is the model's own ranking of the log's items (`own`: its scores over its whole
    vocabulary): the same scores to 1e-5, and at every rank the item the model ranks there (up to exact ties)."""
    tokens = imported.ctx.dataset.item_tokens
    columns = np.asarray([imported.files.item_index[t] for t in tokens])
    results, _ = imported.served.engine.recommend(rows)
    for row, result, scores, seen in zip(rows, results, own[:, columns], masked, strict=True):
        scores = scores.astype(np.float64)
        scores[[tokens.index(t) for t in set(seen)]] = -np.inf
        reference = np.argsort(-scores, kind="stable")[: row.k]
        assert len(result.items) == row.k and not np.isinf(scores[result.items]).any()
        np.testing.assert_allclose(result.scores, scores[result.items], rtol=0, atol=1e-5)
        np.testing.assert_allclose(scores[result.items], scores[reference], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_imported_sequence_model_serves_its_own_ranking_to_every_user(imported_seq: ImportedBundle) -> None:
    bundle, files = imported_seq.served.bundle, imported_seq.files
    assert bundle.user_ids == imported_seq.ctx.dataset.user_tokens
    assert bundle.items["ids"] == imported_seq.ctx.dataset.item_tokens
    assert bundle.model_index.tolist() == [files.item_index[t] for t in bundle.items["ids"]]
    spec = bundle.inputs
    assert (spec.kind, spec.history_input, spec.length_input, spec.padding, spec.pad_id, spec.max_len) == (
        "history", "item_seq", "item_seq_len", "right", 0, SEQ_MAX_LEN
    )  # fmt: skip
    assert bundle.manifest["parity"]["max_abs_h_diff"] <= 1e-5
    histories = logs(imported_seq)
    own = files.model.own_scores(histories, files.item_index)
    users = range(len(histories))
    assert_model_ranking(imported_seq, [Row(user=u, k=10, exclude_seen=False) for u in users], own, [[]] * len(own))
    assert_model_ranking(imported_seq, [Row(user=u, k=10) for u in users], own, histories)


@pytest.mark.slow
def test_imported_sequence_model_history_requests_equal_calling_it(imported_seq: ImportedBundle) -> None:
    files, tokens = imported_seq.files, imported_seq.ctx.dataset.item_tokens
    rng = np.random.default_rng(11)
    histories = [logs(imported_seq)[3][:7], [tokens[5]]]
    histories += [[tokens[i] for i in rng.choice(len(tokens), n, replace=False)] for n in (2, 19, 20, 21, 45)]
    own = files.model.own_scores(histories, files.item_index)
    rows = [imported_seq.served.requests.parse(RecommendRequest.model_validate(
        {"history": h, "k": 10, "exclude_seen": True}, context={"config": IMPORTED_CONFIG})) for h in histories
    ]  # fmt: skip
    assert_model_ranking(imported_seq, rows, own, histories)
    with pytest.raises(RequestError) as info:
        answer(imported_seq.served, {"history": [tokens[0], UNKNOWN_ITEM, "also-unknown"], "k": 5})
    assert (info.value.status, info.value.message) == (
        422, f"unknown item ids '{UNKNOWN_ITEM}', 'also-unknown' in history"
    )  # fmt: skip


@pytest.mark.slow
def test_imported_two_tower_model_serves_its_own_ranking_by_its_own_user_ids(imported_two_tower) -> None:
    bundle, files = imported_two_tower.served.bundle, imported_two_tower.files
    assert bundle.user_ids == imported_two_tower.ctx.dataset.user_tokens  # the log's ids, which are the model's own
    assert set(bundle.user_ids) <= set(files.user_index) and two_tower_user("196") in bundle.user_ids
    assert bundle.inputs.kind == "user" and bundle.inputs.names == ["user_idx"]
    np.testing.assert_array_equal(bundle.user_inputs["user_idx"], [files.user_index[u] for u in bundle.user_ids])
    own = files.model.own_scores(bundle.user_ids, files.user_index)
    histories = logs(imported_two_tower)
    users = range(len(bundle.user_ids))
    assert_model_ranking(imported_two_tower, [Row(user=u, k=10) for u in users], own, histories)
    body = answer(imported_two_tower.served, {"user_id": two_tower_user("196"), "k": 5})
    assert {i["item_id"] for i in body["items"]}.isdisjoint(histories[bundle.user_ids.index(two_tower_user("196"))])
    # A new user's history is folded in, as for recsae's own user-embedding models.
    assert len(answer(imported_two_tower.served, {"history": histories[0][:3], "k": 5})["items"]) == 5
