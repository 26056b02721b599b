"""The recommender interface on real ML-100K shapes: represent/score, determinism, SASRec padding, checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _models import MODELS, untrained

from recsae_core.common.errors import ArtifactError
from recsae_core.recommenders.base import Batch
from recsae_core.recommenders.batching import pad_histories
from recsae_core.recommenders.checkpoint import CONFIG, WEIGHTS, load_recommender, save_recommender
from recsae_core.recommenders.evaluate import make_batch
from recsae_core.recommenders.lightgcn import LightGCN
from recsae_core.recommenders.sasrec import SASRec
from recsae_core.recommenders.train import build_model

USERS = np.array([0, 5, 17, 300, 938])


@pytest.mark.parametrize("name", MODELS)
def test_represent_and_score_shapes(name, ml100k, split_for):
    split = split_for(name)
    model = untrained(name, ml100k, split)
    batch = make_batch(model, USERS, split.seen("test"), "cpu")
    with torch.no_grad():
        h = model.represent(batch)
        scores = model.score(h)
    assert h.shape == (len(USERS), 64) and h.dtype == torch.float32
    assert scores.shape == (len(USERS), ml100k.n_items)
    assert model.item_embeddings().shape == (ml100k.n_items, 64)
    assert torch.allclose(scores, h @ model.item_embeddings().T, atol=1e-6)
    assert torch.isfinite(scores).all()
    assert h.std(dim=0).mean() > 0  # users get different representations


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_model(name, ml100k, split_for):
    split = split_for(name)
    a, b, c = untrained(name, ml100k, split, 3), untrained(name, ml100k, split, 3), untrained(name, ml100k, split, 4)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    batch = make_batch(a, USERS, split.seen("test"), "cpu")
    with torch.no_grad():
        h_a, h_b = a.represent(batch), b.represent(batch)
        assert torch.equal(h_a, h_b)
        assert torch.equal(h_a, a.represent(batch))  # eval mode: repeatable
        assert torch.equal(a.score(h_a), b.score(h_b))


def test_sasrec_dropout_only_in_train_mode(ml100k, ml100k_seq_split):
    model = untrained("sasrec", ml100k, ml100k_seq_split)
    batch = make_batch(model, USERS, ml100k_seq_split.seen("test"), "cpu")
    with torch.no_grad():
        model.train()
        assert not torch.equal(model.represent(batch), model.represent(batch))
        model.eval()
        assert torch.equal(model.represent(batch), model.represent(batch))


def test_pad_histories_left_pads_and_keeps_most_recent():
    out = pad_histories([np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([], dtype=np.int64)], 3, pad=99)
    assert out.tolist() == [[3, 4, 5], [99, 99, 7], [99, 99, 99]]
    assert out.dtype == np.int64


@pytest.fixture
def sasrec(ml100k, ml100k_seq_split) -> SASRec:
    return untrained("sasrec", ml100k, ml100k_seq_split, seed=11)


def represent(model: SASRec, history: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.represent(Batch(torch.zeros(len(history), dtype=torch.long), history))


def test_sasrec_padding_content_is_ignored(sasrec, ml100k):
    pad = ml100k.n_items
    history = torch.full((1, 50), pad)
    history[0, -4:] = torch.tensor([10, 20, 30, 40])
    before = represent(sasrec, history)
    with torch.no_grad():
        sasrec.item_embedding.weight[pad] = torch.randn(64) * 5  # whatever the padding row holds ...
    assert torch.allclose(represent(sasrec, history), before, atol=1e-6)  # ... attention never reads it


def test_sasrec_batch_composition_and_truncation(sasrec, ml100k, ml100k_seq_split):
    seen = ml100k_seq_split.seen("test")
    lengths = seen.lengths
    long_user, short_user = int(np.argmax(lengths)), int(np.argmin(lengths))
    assert lengths[long_user] > 50 > lengths[short_user]
    users = np.array([long_user, short_user, 3])
    together = represent(sasrec, make_batch(sasrec, users, seen, "cpu").history)
    for row, u in enumerate(users):
        alone = represent(sasrec, make_batch(sasrec, np.array([u]), seen, "cpu").history)
        assert torch.allclose(alone[0], together[row], atol=1e-5), u
    # A long history is cut to its 50 most recent items: older items cannot change h.
    tail = seen.row(long_user)[-50:]
    assert torch.allclose(represent(sasrec, torch.as_tensor(tail)[None]), together[0], atol=1e-5)


def test_sasrec_is_causal_and_reads_the_last_item(sasrec, ml100k):
    pad = ml100k.n_items
    history = torch.full((1, 50), pad)
    history[0, -6:] = torch.tensor([1, 2, 3, 4, 5, 6])
    changed = history.clone()
    changed[0, -1] = 99
    with torch.no_grad():
        out, out_changed = sasrec.encode(history), sasrec.encode(changed)
    # Earlier item positions cannot see the future. (Padding positions are excluded: their queries have no
    # allowed key, so their softmax is uniform over everything; their outputs are never read.)
    assert torch.allclose(out[:, -6:-1], out_changed[:, -6:-1], atol=1e-6)
    assert not torch.allclose(out[:, -1], out_changed[:, -1], atol=1e-3)


def test_sasrec_padding_only_rows_are_finite(sasrec, ml100k):
    history = torch.full((3, 50), ml100k.n_items)
    history[1, -1] = 5
    h = represent(sasrec, history)
    assert torch.isfinite(h).all()
    assert torch.isfinite(sasrec.score(h)).all()
    assert torch.allclose(h[0], h[2])


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip(name, ml100k, split_for, tmp_path):
    split = split_for(name)
    model = untrained(name, ml100k, split, seed=5)
    context = {"dataset": "ml-100k", "protocol": "recbole", "seed": 5}
    save_recommender(model, tmp_path / "ckpt", context)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG, WEIGHTS]
    loaded, config = load_recommender(tmp_path / "ckpt")
    assert type(loaded) is type(model) and not loaded.training
    assert {k: config[k] for k in context} == context
    assert config["recommender"]["model"] == name
    assert config["recommender"]["n_items"] == ml100k.n_items
    batch = make_batch(model, np.arange(0, ml100k.n_users, 7), split.seen("test"), "cpu")
    with torch.no_grad():
        assert torch.equal(loaded.score(loaded.represent(batch)), model.score(model.represent(batch)))
    if isinstance(loaded, LightGCN):
        assert loaded.adjacency is None and loaded.frozen  # inference needs no graph


def test_lightgcn_checkpoint_without_explicit_freeze(ml100k, ml100k_split, tmp_path):
    torch.manual_seed(0)
    model = build_model("lightgcn", ml100k.n_users, ml100k.n_items, ml100k_split).eval()  # not frozen
    save_recommender(model, tmp_path / "ckpt", {})
    loaded, _ = load_recommender(tmp_path / "ckpt")
    batch = make_batch(model, USERS, ml100k_split.seen("test"), "cpu")
    with torch.no_grad():
        assert torch.allclose(loaded.represent(batch), model.represent(batch), atol=1e-6)


@pytest.fixture
def saved(ml100k, ml100k_split, tmp_path):
    model = untrained("bprmf", ml100k, ml100k_split)
    save_recommender(model, tmp_path / "ckpt", {"dataset": "ml-100k"})
    return tmp_path / "ckpt"


def one_line_artifact_error(folder, fragment: str, path_name: str) -> str:
    with pytest.raises(ArtifactError) as info:
        load_recommender(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder / path_name) in message and fragment in message, message
    return message


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: b"this is not a safetensors file",
        lambda data: b"",
        lambda data: data[:100],
        lambda data: data[:-16],
    ],
    ids=["garbage", "empty", "truncated-header", "truncated-body"],
)
def test_corrupt_weights(saved, corrupt):
    weights = saved / WEIGHTS
    weights.write_bytes(corrupt(weights.read_bytes()))
    one_line_artifact_error(saved, "cannot read weights", WEIGHTS)


def test_missing_weights(saved):
    (saved / WEIGHTS).unlink()
    one_line_artifact_error(saved, "cannot read weights", WEIGHTS)


def test_unknown_model_in_config(saved):
    config = json.loads((saved / CONFIG).read_text())
    config["recommender"]["model"] = "neumf"
    (saved / CONFIG).write_text(json.dumps(config))
    one_line_artifact_error(saved, "unknown model 'neumf'", CONFIG)


def test_config_disagreeing_with_weights(saved):
    config = json.loads((saved / CONFIG).read_text())
    config["recommender"]["n_items"] += 1
    (saved / CONFIG).write_text(json.dumps(config))
    one_line_artifact_error(saved, "do not match", WEIGHTS)


def test_config_with_unknown_field(saved):
    config = json.loads((saved / CONFIG).read_text())
    config["recommender"]["n_experts"] = 4
    (saved / CONFIG).write_text(json.dumps(config))
    one_line_artifact_error(saved, "bad recommender config", CONFIG)


def test_config_not_json_or_missing(saved, tmp_path):
    (saved / CONFIG).write_text("{not json")
    one_line_artifact_error(saved, "not valid JSON", CONFIG)
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    (other / CONFIG).unlink()
    one_line_artifact_error(other, "file not found", CONFIG)


def test_config_that_is_not_an_object(saved):
    (saved / CONFIG).write_text("[]")
    with pytest.raises(ArtifactError):
        load_recommender(saved)
