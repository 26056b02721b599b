"""Run -> probe -> SAE -> bundle through the Python API on ML-100K (SASRec and BPR-MF): SAE metrics, ONNX Runtime
parity with PyTorch, the bundle round trip, every refusal of a damaged bundle, atomic writes, and the pipeline's
skip-if-complete rerun."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file, save_file

from recsae_core.bundle.export import contents_from_run
from recsae_core.bundle.format import (
    FORMAT_VERSION,
    MANIFEST,
    load_bundle,
    verify_bundle,
    write_bundle,
    write_manifest,
)
from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import RunLayout
from recsae_core.pipeline import steps as pipeline
from recsae_core.recommenders.base import Batch
from recsae_core.recommenders.batching import pad_histories
from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.contract_export import parity_figures, past_tolerance
from recsae_core.recommenders.run import load_run
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.model import TopKSAE

pytestmark = pytest.mark.slow

SAE_CONFIG = SAETrainConfig(n_latents=128, k=4, epochs=2, progress=False)
NDCG_KEYS = {"original", "substituted", "error_preserving", "random_sae_substituted"}
_BUILT: dict[str, dict] = {}


def build(trained_run, model: str) -> dict:
    """The shared run taken through probe, SAE and bundle once per session."""
    if model not in _BUILT:
        run_dir = trained_run(model)
        probe = pipeline.probe_step(run_dir, progress=False)
        metrics = pipeline.sae_step(run_dir, SAE_CONFIG)
        result = pipeline.bundle_step(run_dir)
        _BUILT[model] = {"model": model, "run_dir": run_dir, "probe": probe, "metrics": metrics, "result": result,
                         "ctx": load_run(run_dir), "bundle": load_bundle(RunLayout(run_dir).bundle)}  # fmt: skip
    return _BUILT[model]


@pytest.fixture(scope="module", params=["sasrec", "bprmf"])
def built(request, trained_run) -> dict:
    return build(trained_run, request.param)


@pytest.fixture
def bundle_copy(trained_run, tmp_path) -> Path:
    """A private copy of the BPR-MF bundle to damage."""
    folder = tmp_path / "bundle"
    shutil.copytree(RunLayout(build(trained_run, "bprmf")["run_dir"]).bundle, folder)
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refit_sha(folder: Path, name: str) -> None:
    """Record `name`'s new hash in the manifest, so only the deeper checks can catch the edit."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = sha256(folder / name)
    write_manifest(folder, manifest)
    verify_bundle(folder)


def refused(folder: Path, named: Path, load=load_bundle) -> str:
    with pytest.raises(ArtifactError) as info:
        load(folder)
    message = str(info.value)
    assert str(named) in message, message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- SAE step


def test_probe_step(built):
    ctx = built["ctx"]
    expected = ctx.split.n_users if built["model"] == "bprmf" else int(ctx.split.train.lengths.sum())  # every position
    assert built["probe"] == {"n_samples": expected, "d": 64, "shards": 1}


def test_sae_metrics(built):
    metrics = built["metrics"]
    on_disk = json.loads((RunLayout(built["run_dir"]).sae / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("fvu", "dead_fraction", "seconds", "ndcg@10"):
        assert key in on_disk, key
    assert 0 <= on_disk["fvu"] < 1.5 and 0 <= on_disk["dead_fraction"] <= 1 and on_disk["seconds"] > 0
    assert set(on_disk["ndcg@10"]) == NDCG_KEYS
    assert all(0 <= v <= 1 for v in on_disk["ndcg@10"].values())
    # The error-preserving path changes nothing: same NDCG as the original model, same top-10 for everyone.
    assert on_disk["ndcg@10"]["error_preserving"] == pytest.approx(on_disk["ndcg@10"]["original"], abs=1e-6)
    assert on_disk["passthrough_identical_top10_fraction"] == 1.0
    assert on_disk["passthrough_max_abs_score_diff"] <= 1e-5
    assert (on_disk["n_latents"], on_disk["k"], on_disk["n_samples"]) == (128, 4, built["probe"]["n_samples"])
    # AuxK's dead window is the option's sample count, capped at one epoch of this small probe.
    assert on_disk["dead_after"] == min(SAE_CONFIG.dead_after, built["probe"]["n_samples"])
    assert 1 <= on_disk["epochs_trained"] <= 2
    assert RunLayout(built["run_dir"]).sae_complete()


# ---------------------------------------------------------------- the bundle


def test_onnx_runtime_matches_pytorch(built):
    ctx, bundle = built["ctx"], built["bundle"]
    model = ctx.model.eval()
    users = np.random.default_rng(0).choice(ctx.split.n_users, 64, replace=False)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    feed = {name: bundle.user_inputs[name][users] for name in bundle.inputs.names}
    h_onnx = session.run(["h"], feed)[0]
    if model.sequential:
        history = torch.from_numpy(bundle.user_inputs["history"][users])
        batch = Batch(torch.from_numpy(users), history)
    else:
        np.testing.assert_array_equal(bundle.user_inputs["user"][users], users)
        batch = Batch(torch.from_numpy(users), torch.zeros((len(users), 0), dtype=torch.long))
    with torch.no_grad():
        h_torch = model.represent(batch)
        s_torch = model.score(h_torch).numpy()
    np.testing.assert_allclose(h_onnx, h_torch.numpy(), atol=1e-5, rtol=0)
    s_onnx = h_onnx @ bundle.item_embeddings.T
    if bundle.item_bias is not None:
        s_onnx = s_onnx + bundle.item_bias
    np.testing.assert_allclose(s_onnx, s_torch, atol=1e-5, rtol=0)
    assert float(np.abs(h_onnx).max()) > 0
    parity = bundle.manifest["parity"]
    assert parity["users_checked"] == min(512, ctx.split.n_users)
    assert parity["max_abs_h_diff"] <= 1e-5 and parity["max_abs_score_diff"] <= 1e-5
    assert built["result"]["parity"] == parity


def test_parity_tolerance_is_relative_to_the_size_of_the_values():
    """A model trained elsewhere may emit h and scores in the thousands, where float32 rounding alone exceeds 1e-5
    absolute: the check scales with the values (and is absolute below 1, where relative noise would be no guide)."""
    rng = np.random.default_rng(0)
    h = (rng.normal(size=(16, 8)) * 1e4).astype(np.float32)
    items = rng.normal(size=(32, 8)).astype(np.float32)
    rounded = (h.astype(np.float64) * (1 + 3e-7)).astype(np.float32)  # float32 noise of a second computation
    figures = parity_figures(rounded, h, rounded @ items.T, h @ items.T)
    assert figures["max_abs_h_diff"] > 1e-5 and not past_tolerance(figures)
    off = h * np.float32(1.001)
    assert past_tolerance(parity_figures(off, h, off @ items.T, h @ items.T))
    small = h * np.float32(1e-7)  # |h| < 1: 1e-4 off is 1e-4 off, however small h is
    assert past_tolerance(parity_figures(small + np.float32(1e-4), small, small @ items.T, small @ items.T))


def test_load_bundle_round_trip(built):
    ctx, bundle, model = built["ctx"], built["bundle"], built["ctx"].model
    split, n_users, n_items = ctx.split, ctx.split.n_users, ctx.split.n_items
    manifest = bundle.manifest
    assert manifest["format_version"] == FORMAT_VERSION
    assert (manifest["dataset"], manifest["model_type"]) == ("ml-100k", built["model"])
    assert (bundle.d, bundle.n_items, manifest["n_users"]) == (64, n_items, n_users)
    assert built["result"]["versions"] == manifest["versions"]
    np.testing.assert_array_equal(bundle.item_embeddings, model.item_embeddings().detach().numpy())
    assert bundle.item_embeddings.dtype == np.float32
    assert bundle.items["ids"] == ctx.dataset.item_tokens
    assert bundle.items["titles"] == ctx.dataset.item_meta.titles
    assert bundle.items["popularity"] == split.item_popularity().tolist()
    assert bundle.user_ids == ctx.dataset.user_tokens
    # Seen items: every known item of the user, in time order (train, valid, test).
    for user in np.random.default_rng(1).choice(n_users, 50, replace=False):
        full = np.concatenate([split.train.row(user), split.valid.row(user), split.test.row(user)])
        np.testing.assert_array_equal(bundle.seen(user), full)
    assert bundle.seen_indptr[-1] == len(bundle.seen_items) == ctx.dataset.n_interactions
    if model.sequential:
        assert bundle.inputs.kind == "history" and bundle.inputs.names == ["history"]
        assert (bundle.inputs.max_len, bundle.inputs.pad_id) == (model.config.max_len, n_items)
        histories = pad_histories([bundle.seen(u) for u in range(n_users)], model.config.max_len, n_items)
        np.testing.assert_array_equal(bundle.user_inputs["history"], histories)
        assert bundle.foldin is None
    else:
        assert bundle.inputs.kind == "user" and bundle.inputs.names == ["user"]
        np.testing.assert_array_equal(bundle.user_inputs["user"], np.arange(n_users))
        assert bundle.foldin is not None and bundle.foldin.shape == (64, n_items)
    # In-house models feed dense item indices, left-padded: the fields added for imported models keep their defaults
    # and stay out of the manifest and items.safetensors, so readers from before them read this bundle as ever.
    assert set(manifest["inputs"]) == {"kind", "names", "history_input", "max_len", "pad_id"}
    assert (bundle.inputs.padding, bundle.inputs.length_input, bundle.model_index) == ("left", None, None)
    assert "model_index" not in load_file(str(bundle.folder / "items.safetensors"))
    sae = TopKSAE.load(bundle.sae_folder)
    assert (sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.k) == (64, 128, 4)
    trained = TopKSAE.load(RunLayout(built["run_dir"]).sae)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name), getattr(trained, name), atol=0, rtol=0)
    assert manifest["sae"]["d_in"] == 64 and manifest["sae"]["d_sae"] == 128
    assert (bundle.catalog, bundle.policies) == (None, {})


# ---------------------------------------------------------------- a damaged bundle is refused, naming the file


def test_refuses_flipped_byte(bundle_copy):
    path = bundle_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert "sha256" in refused(bundle_copy, path)
    refused(bundle_copy, path, load=verify_bundle)


@pytest.mark.parametrize("name", ["users.json", "model.onnx", "sae/latent_stats.safetensors"])
def test_refuses_partial_bundle(bundle_copy, name):
    (bundle_copy / name).unlink()
    assert "missing" in refused(bundle_copy, bundle_copy / name)


def test_refuses_unknown_format_version(bundle_copy):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["format_version"] = 99
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    assert "99" in refused(bundle_copy, bundle_copy / MANIFEST)


def test_refuses_manifest_not_json(bundle_copy):
    (bundle_copy / MANIFEST).write_text('{"format": "recsae-bundle", "format_version": 1,')
    assert "JSON" in refused(bundle_copy, bundle_copy / MANIFEST)


def test_refuses_missing_folder(tmp_path):
    refused(tmp_path / "nothing", tmp_path / "nothing")


def test_refuses_sae_width_mismatch(bundle_copy):
    cfg_path = bundle_copy / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["d_in"] = 32
    cfg_path.write_text(json.dumps(cfg))
    refit_sha(bundle_copy, "sae/cfg.json")
    assert "d_in=32" in refused(bundle_copy, cfg_path)


def test_refuses_item_embedding_shape_mismatch(bundle_copy):
    path = bundle_copy / "items.safetensors"
    tensors = load_file(str(path))
    tensors["item_embeddings"] = np.ascontiguousarray(tensors["item_embeddings"][:-1])
    save_file(tensors, str(path))
    refit_sha(bundle_copy, "items.safetensors")
    assert "item_embeddings" in refused(bundle_copy, path)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"length_input": "user"}, "inputs.length_input applies to kind 'history' only, not 'user'"),
        ({"padding": "right"}, "inputs.padding applies to kind 'history' only"),
        ({"pad_index": 0}, "inputs has unknown field(s) ['pad_index']"),
        ({"names": []}, "inputs.names must be a non-empty list"),
        ({"kind": "sequence"}, "inputs.kind 'sequence' is not one of"),
    ],
)
def test_refuses_bad_input_spec(bundle_copy, changes, needle):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["inputs"].update(changes)
    write_manifest(bundle_copy, manifest)  # a consistent manifest: only the input check can refuse it
    assert needle in refused(bundle_copy, bundle_copy / MANIFEST)
    refused(bundle_copy, bundle_copy / MANIFEST, load=verify_bundle)


def test_refuses_duplicate_model_index(bundle_copy):
    path = bundle_copy / "items.safetensors"
    tensors = load_file(str(path))
    n_items = len(tensors["item_embeddings"])
    tensors["model_index"] = np.minimum(np.arange(n_items, dtype=np.int64), n_items - 2)
    save_file(tensors, str(path))
    refit_sha(bundle_copy, "items.safetensors")
    assert f"model_index {n_items - 2} is given to both item {n_items - 2} and item {n_items - 1}" in refused(
        bundle_copy, path
    )


# ---------------------------------------------------------------- atomic writes


def strays(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.fixture
def broken_contents(trained_run, tmp_path):
    """Bundle contents whose SAE folder lacks latent_stats.safetensors: write_bundle fails after writing most files."""
    built = build(trained_run, "bprmf")
    sae = tmp_path / "broken-sae"
    shutil.copytree(RunLayout(built["run_dir"]).sae, sae)
    (sae / "latent_stats.safetensors").unlink()
    work = tmp_path / "work"
    work.mkdir()
    contents, _ = contents_from_run(built["ctx"], sae, work)
    return contents, sae


def test_crash_mid_write_leaves_no_bundle(broken_contents, tmp_path):
    contents, _ = broken_contents
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ArtifactError, match=r"latent_stats\.safetensors"):
        write_bundle(contents, out)
    assert not out.exists()
    assert strays(out) == []


def test_crash_mid_write_keeps_previous_bundle(broken_contents, bundle_copy):
    contents, _ = broken_contents
    before = {p.relative_to(bundle_copy): p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()}
    with pytest.raises(ArtifactError, match=r"latent_stats\.safetensors"):
        write_bundle(contents, bundle_copy)
    after = {p.relative_to(bundle_copy): p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()}
    assert after == before
    load_bundle(bundle_copy)
    assert strays(bundle_copy) == []


# ---------------------------------------------------------------- the pipeline


def test_pipeline_rerun_skips_and_refuses_other_runs(tmp_path):
    run_dir = tmp_path / "run"
    train, sae = TrainConfig(epochs=1, progress=False), SAETrainConfig(n_latents=64, k=4, epochs=1, progress=False)
    steps = ("recommender", "probe", "sae", "concepts", "bundle")
    first: list[str] = []
    summary = pipeline.run_pipeline(run_dir, "ml-100k", "bprmf", "recbole", train, sae, log=first.append)
    assert list(summary) == list(steps)
    for index, step in enumerate(steps, start=1):
        assert f"[{index}/5] {step}: running" in first
        assert any(line.startswith(f"[{index}/5] {step}: done in ") for line in first)
    load_bundle(RunLayout(run_dir).bundle)
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    second: list[str] = []
    summary = pipeline.run_pipeline(run_dir, "ml-100k", "bprmf", "recbole", train, sae, log=second.append)
    assert second == [f"[{i}/5] {step}: up to date, skipped" for i, step in enumerate(steps, start=1)]
    assert summary == dict.fromkeys(steps, "skipped")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == stamps

    for dataset, model in (("ml-100k", "sasrec"), ("ml-1m", "bprmf")):
        lines: list[str] = []
        with pytest.raises(ArtifactError) as info:
            pipeline.run_pipeline(run_dir, dataset, model, "recbole", train, sae, log=lines.append)
        assert str(run_dir) in str(info.value) and "bprmf" in str(info.value)
        assert lines == []
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == stamps
