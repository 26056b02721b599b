"""Probing real ML-100K runs (BPR-MF: one sample per user; SASRec: one per training position), shard bounds, and
probing an ONNX model we did not train, with its refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.numpy import load_file, save_file
from torch import nn

from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import PROBE_META as META
from recsae_core.common.layout import RunLayout
from recsae_core.probe.collect import collect, collect_onnx, load_activations
from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.batching import pad_histories
from recsae_core.recommenders.checkpoint import load_recommender
from recsae_core.recommenders.evaluate import make_batch
from recsae_core.recommenders.onnx_model import OnnxRecommender
from recsae_core.recommenders.run import RunContext, load_run

pytestmark = pytest.mark.slow


def probe_into(ctx: RunContext, root: Path, **kwargs) -> tuple:
    """Probe `ctx`'s model into root/probe (never into the shared run folder) and load it back."""
    result = collect(dataclasses.replace(ctx, root=root), progress=False, **kwargs)
    return result, *load_activations(result.folder)


@pytest.fixture(scope="module")
def bprmf(tmp_path_factory, trained_run):
    ctx = load_run(trained_run("bprmf"))
    return ctx, *probe_into(ctx, tmp_path_factory.mktemp("probe-bprmf"))


@pytest.fixture(scope="module")
def sasrec(tmp_path_factory, trained_run):
    ctx = load_run(trained_run("sasrec"))
    return ctx, *probe_into(ctx, tmp_path_factory.mktemp("probe-sasrec"))


# ---------------------------------------------------------------- BPR-MF: one sample per user


def test_bprmf_one_sample_per_user(bprmf):
    ctx, result, h, users, positions = bprmf
    n_users = ctx.split.n_users
    assert (result.n_samples, result.d) == (n_users, 64)
    assert h.shape == (n_users, 64) and h.dtype == torch.float32
    np.testing.assert_array_equal(users, np.arange(n_users))
    np.testing.assert_array_equal(positions, ctx.split.train.lengths - 1)
    meta = json.loads((result.folder / META).read_text())
    assert (meta["n_samples"], meta["d"], meta["sample"], meta["source"]) == (n_users, 64, "user", "bprmf")
    assert RunLayout(result.folder.parent).probe_complete()


def pytorch_model(ctx: RunContext) -> Recommender:
    """The run's PyTorch checkpoint: the model as trained, which the probed contract must reproduce."""
    return load_recommender(RunLayout(ctx.root).recommender)[0]


def test_runs_are_read_as_their_contract(bprmf, sasrec):
    for ctx in (bprmf[0], sasrec[0]):
        assert isinstance(ctx.model, OnnxRecommender) and ctx.model.onnx_path.name == "model.onnx"
        assert ctx.model.name in ("bprmf", "sasrec") and ctx.model.sequential == (ctx.model.name == "sasrec")


def test_bprmf_h_is_the_trained_models(bprmf):
    ctx, _, h, users, _ = bprmf
    torch_model = pytorch_model(ctx)
    with torch.no_grad():
        expected = torch_model.represent(make_batch(torch_model, users, ctx.split.train, "cpu"))
    torch.testing.assert_close(h, expected, atol=1e-5, rtol=0)
    assert float(h.std()) > 0  # a real, non-constant representation


# ---------------------------------------------------------------- SASRec: one sample per training position


def reencode_prefixes(ctx: RunContext, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """h the model gives for 'this user, after these items': the training prefix up to `position`, left-padded
    to the model's length keeping the most recent items (what the service feeds the ONNX model)."""
    train, config, torch_model = ctx.split.train, ctx.model.config, pytorch_model(ctx)
    history = pad_histories([train.row(u)[: p + 1] for u, p in zip(users, positions, strict=True)],
                            config.max_len, config.n_items)  # fmt: skip
    with torch.no_grad():
        return torch_model.encode(torch.from_numpy(history))[:, -1].numpy()


def test_sasrec_one_sample_per_training_position(sasrec):
    ctx, result, h, users, positions = sasrec
    lengths = ctx.split.train.lengths
    n = int(lengths.sum())
    assert result.n_samples == n == len(h) == len(users) == len(positions)
    assert result.d == 64 and h.shape == (n, 64)
    assert json.loads((result.folder / META).read_text())["sample"] == "position"
    # Every (user, position) pair exactly once, positions spanning each user's whole training sequence.
    np.testing.assert_array_equal(np.bincount(users, minlength=ctx.split.n_users), lengths)
    assert (positions >= 0).all() and (positions < lengths[users]).all()
    assert len(set(zip(users.tolist(), positions.tolist(), strict=True))) == n


def test_sasrec_every_sample_equals_reencoded_prefix(sasrec):
    ctx, _, h, users, positions = sasrec
    rows = np.random.default_rng(1).choice(len(h), 400, replace=False)
    long = np.flatnonzero(positions >= ctx.model.config.max_len)  # prefixes longer than the model's window too
    rows = np.concatenate([rows, long[:100]])
    again = reencode_prefixes(ctx, users[rows], positions[rows])
    np.testing.assert_allclose(h.numpy()[rows], again, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- shards


def shard_rows(folder: Path, shards: list[str]) -> list[int]:
    return [len(load_file(str(folder / s))["h"]) for s in shards]


@pytest.mark.parametrize(("fixture", "rows_per_shard"), [("bprmf", 300), ("sasrec", 20000)])
def test_shards_are_bounded_and_reassemble_in_order(request, tmp_path, fixture, rows_per_shard):
    ctx, whole, h, users, positions = request.getfixturevalue(fixture)
    assert len(whole.shards) == 1  # the default shard size holds all of ML-100K
    result, h2, users2, positions2 = probe_into(ctx, tmp_path, rows_per_shard=rows_per_shard)
    n = whole.n_samples
    assert result.n_samples == n
    assert len(result.shards) == -(-n // rows_per_shard) >= 4
    assert result.shards == sorted(result.shards)
    assert sorted(p.name for p in result.folder.glob("*.safetensors")) == result.shards
    rows = shard_rows(result.folder, result.shards)
    assert rows[:-1] == [rows_per_shard] * (len(rows) - 1) and 0 < rows[-1] <= rows_per_shard
    assert sum(rows) == n
    assert json.loads((result.folder / META).read_text())["shards"] == result.shards
    # Reassembled in order, identical to the single-shard probe.
    torch.testing.assert_close(h2, h, atol=0, rtol=0)
    np.testing.assert_array_equal(users2, users)
    np.testing.assert_array_equal(positions2, positions)
    second = load_file(str(result.folder / result.shards[1]))
    np.testing.assert_array_equal(second["h"], h.numpy()[rows_per_shard : 2 * rows_per_shard])


def test_load_activations_refuses_missing_shard(bprmf, tmp_path):
    ctx = bprmf[0]
    result, *_ = probe_into(ctx, tmp_path, rows_per_shard=300)
    (result.folder / result.shards[2]).unlink()
    assert not RunLayout(tmp_path).probe_complete()
    with pytest.raises(ArtifactError, match=result.shards[2]):
        load_activations(result.folder)


# ---------------------------------------------------------------- probing an ONNX model we did not train


class TwoInputs(nn.Module):
    """features (B, 6) float32 and bucket (B,) int64 -> h (B, 16)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(6, 16)
        self.bucket = nn.Embedding(5, 16)

    def forward(self, features: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(features)) + self.bucket(bucket)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> tuple[nn.Module, Path]:
    module = TwoInputs().eval()
    path = tmp_path_factory.mktemp("onnx") / "two_inputs.onnx"
    torch.onnx.export(
        module, (torch.zeros(2, 6), torch.zeros(2, dtype=torch.long)), str(path),
        input_names=["features", "bucket"], output_names=["h"],
        dynamic_axes={"features": {0: "batch"}, "bucket": {0: "batch"}, "h": {0: "batch"}},
        opset_version=17, dynamo=False,
    )  # fmt: skip
    return module, path


def write_inputs(path: Path, n: int = 37, features_rows: int | None = None, nan_row: int | None = None) -> dict:
    rng = np.random.default_rng(0)
    tensors = {
        "features": rng.normal(size=(features_rows or n, 6)).astype(np.float32),
        "bucket": rng.integers(0, 5, n).astype(np.int64),
    }
    if nan_row is not None:
        tensors["features"][nan_row, 2] = np.nan
    save_file(tensors, str(path))
    return tensors


def test_collect_onnx(onnx_model, tmp_path):
    module, model_path = onnx_model
    inputs = write_inputs(tmp_path / "inputs.safetensors")
    result = collect_onnx(model_path, tmp_path / "inputs.safetensors", tmp_path / "probe",
                          batch_size=10, rows_per_shard=8, progress=False)  # fmt: skip
    assert (result.n_samples, result.d, len(result.shards)) == (37, 16, 5)
    h, users, positions = load_activations(tmp_path / "probe")
    with torch.no_grad():
        expected = module(torch.from_numpy(inputs["features"]), torch.from_numpy(inputs["bucket"]))
    torch.testing.assert_close(h, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(users, np.arange(37))
    np.testing.assert_array_equal(positions, np.zeros(37))
    meta = json.loads((tmp_path / "probe" / META).read_text())
    assert (meta["sample"], meta["source"]) == ("input-row", str(model_path))


def assert_refused(call, named: Path, out: Path) -> None:
    with pytest.raises(ArtifactError) as info:
        call()
    assert str(named) in str(info.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no stray temp folder


def test_collect_onnx_refuses_missing_input(onnx_model, tmp_path):
    _, model_path = onnx_model
    inputs = tmp_path / "inputs.safetensors"
    save_file({"features": np.zeros((4, 6), np.float32)}, str(inputs))
    assert_refused(lambda: collect_onnx(model_path, inputs, tmp_path / "probe", progress=False),
                   inputs, tmp_path / "probe")  # fmt: skip
    with pytest.raises(ArtifactError, match="bucket"):
        collect_onnx(model_path, inputs, tmp_path / "probe", progress=False)


def test_collect_onnx_refuses_mismatched_first_axes(onnx_model, tmp_path):
    _, model_path = onnx_model
    inputs = tmp_path / "inputs.safetensors"
    write_inputs(inputs, n=37, features_rows=36)
    assert_refused(lambda: collect_onnx(model_path, inputs, tmp_path / "probe", progress=False),
                   inputs, tmp_path / "probe")  # fmt: skip


def test_collect_onnx_refuses_nan_output(onnx_model, tmp_path):
    _, model_path = onnx_model
    inputs = tmp_path / "inputs.safetensors"
    write_inputs(inputs, n=37, nan_row=25)  # in the third batch of 10: earlier shards were already written
    assert_refused(lambda: collect_onnx(model_path, inputs, tmp_path / "probe", batch_size=10, rows_per_shard=8,
                                        progress=False),
                   model_path, tmp_path / "probe")  # fmt: skip


def test_collect_onnx_refuses_non_onnx_file(onnx_model, tmp_path):
    inputs = tmp_path / "inputs.safetensors"
    write_inputs(inputs)
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"this is not a protobuf\x00\xff" * 10)
    assert_refused(lambda: collect_onnx(bogus, inputs, tmp_path / "probe", progress=False), bogus, tmp_path / "probe")
    missing = tmp_path / "nowhere.onnx"
    assert_refused(lambda: collect_onnx(missing, inputs, tmp_path / "probe", progress=False),
                   missing, tmp_path / "probe")  # fmt: skip
    # An inputs file that is not safetensors is refused too, naming it.
    inputs.write_text("not safetensors")
    assert_refused(lambda: collect_onnx(onnx_model[1], inputs, tmp_path / "probe", progress=False),
                   inputs, tmp_path / "probe")  # fmt: skip


def test_collect_onnx_refuses_unsupported_input_type_naming_the_file(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT)], "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    model_path = tmp_path / "half.onnx"
    model_path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    inputs = tmp_path / "inputs.safetensors"
    save_file({"x": np.ones((3, 4), np.float16)}, str(inputs))
    with pytest.raises(ArtifactError) as info:
        collect_onnx(model_path, inputs, tmp_path / "probe", progress=False)
    assert "float16" in str(info.value)  # the refusal itself works ...
    assert str(inputs) in str(info.value) or str(model_path) in str(info.value)  # ... but names no file
