"""The outside-recommender path end to end: a two-tower model built here, its user tower exported to ONNX, wrapped by
`recsae bundle --import-onnx` into a bundle the service accepts; and the refusals of bad inputs."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _cli import cli_refusal
from safetensors.numpy import save_file
from torch import nn

from recsae_core.bundle.format import load_bundle
from recsae_core.pipeline.cli import main
from recsae_core.sae.model import TopKSAE

pytestmark = pytest.mark.slow

N_USERS, N_ITEMS, N_FEATURES, D = 300, 50, 8, 32
GENRES = ["Action", "Comedy", "Drama", "Sci-Fi"]


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.user_tower = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, D))
        self.item_features = nn.Embedding(N_ITEMS, 16)
        self.item_tower = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, D))

    def item_embeddings(self) -> torch.Tensor:
        return self.item_tower(self.item_features.weight)


def export_tower(module: nn.Module, path: Path, outputs: tuple[str, ...] = ("h",)) -> None:
    torch.onnx.export(
        module.eval(), (torch.zeros(2, N_FEATURES),), str(path), input_names=["features"], output_names=list(outputs),
        dynamic_axes={"features": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}, opset_version=17, dynamo=False,
    )  # fmt: skip


def write_items(path: Path, n: int = N_ITEMS) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "title", "genres"])
        for i in range(n):
            writer.writerow([f"it{i}", f"Item {i}, the sequel", f"{GENRES[i % 4]}|{GENRES[(i + 1) % 4]}"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return outside_model(tmp_path_factory.mktemp("outside"))


def outside_model(folder: Path) -> dict:
    """The outside recommender's files in `folder`: ONNX user tower, item matrix, items CSV, per-user inputs."""
    model = TwoTower().eval()
    export_tower(model.user_tower, folder / "user_tower.onnx")
    with torch.no_grad():
        item_embeddings = model.item_embeddings().numpy()
    save_file({"item_embeddings": item_embeddings}, str(folder / "items.safetensors"))
    write_items(folder / "items.csv")
    features = np.random.default_rng(0).normal(size=(N_USERS, N_FEATURES)).astype(np.float32)
    save_file({"features": features}, str(folder / "users.safetensors"))
    return {"folder": folder, "model": model, "item_embeddings": item_embeddings, "features": features,
            "onnx": folder / "user_tower.onnx", "emb": folder / "items.safetensors", "items": folder / "items.csv",
            "users": folder / "users.safetensors"}  # fmt: skip


def argv(inputs: dict, out_path: Path, **overrides: Path | None) -> list[str]:
    """`recsae bundle --import-onnx ...`; an override of None leaves that flag out."""
    flags = {"--import-onnx": inputs["onnx"], "--item-embeddings": inputs["emb"], "--items": inputs["items"],
             "--user-inputs": inputs["users"], "--out": out_path}  # fmt: skip
    flags.update({"--" + k.replace("_", "-"): v for k, v in overrides.items()})
    args = ["bundle"]
    for flag, value in flags.items():
        if value is not None:
            args += [flag, str(value)]
    return [*args, "--name", "two-tower", "--latents", "64", "--k", "4", "--sae-epochs", "3", "--quiet"]


@pytest.fixture(scope="module")
def imported(inputs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("imported") / "bundle"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv(inputs, out))
    return {"code": code, "out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_import_succeeds(imported):
    assert imported["code"] == 0, imported["stderr"]
    result = json.loads(imported["stdout"])
    assert result["bundle"] == str(imported["out"])
    assert result["sae"]["n_samples"] == N_USERS and result["sae"]["selected_on"] == "held-out FVU"
    assert 0 <= result["sae"]["fvu"] < 1.5
    # --sae-epochs 3 is the cap: on 270 training rows only the last epoch is scored, so nothing stops it sooner.
    assert (result["sae"]["epochs_trained"], result["sae"]["stopped_by"]) == (3, "epochs")
    assert (result["sae"]["n_latents"], result["sae"]["k"]) == (64, 4)


def test_import_honours_every_sae_option(inputs, tmp_path, capsys):
    """`bundle --import-onnx` once ignored --sae-max-minutes and --dead-after (a 1-minute budget ran 264 s)."""
    out, work = tmp_path / "bundle", tmp_path / "work"
    args = [*argv(inputs, out, work=work), "--sae-epochs", "50", "--sae-max-minutes", "1e-9", "--dead-after", "100",
            "--sae-lr", "0.005"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)["sae"]
    # A budget no epoch fits in stops training after the first epoch, and the metrics say so.
    assert (result["stopped_by"], result["epochs_trained"], result["max_minutes"]) == ("wall_clock_safety", 1, 1e-9)
    assert (result["dead_after"], result["lr"]) == (100, 0.005)
    on_disk = json.loads((work / "sae" / "metrics.json").read_text())
    assert on_disk["stopped_by"] == "wall_clock_safety" and len(on_disk["history"]) == 1
    assert TopKSAE.load(load_bundle(out).sae_folder).cfg.dead_after == 100


def test_bundle_is_accepted(imported, inputs):
    bundle = load_bundle(imported["out"])
    assert bundle.inputs.kind == "custom" and bundle.inputs.names == ["features"]
    assert (bundle.d, bundle.n_items, bundle.manifest["n_users"]) == (D, N_ITEMS, N_USERS)
    assert (bundle.manifest["dataset"], bundle.manifest["model_type"]) == ("two-tower", "imported-onnx")
    np.testing.assert_array_equal(bundle.item_embeddings, inputs["item_embeddings"])
    assert bundle.item_bias is None and bundle.foldin is None
    np.testing.assert_array_equal(bundle.user_inputs["features"], inputs["features"])
    assert bundle.items["ids"] == [f"it{i}" for i in range(N_ITEMS)]
    assert bundle.items["titles"][3] == "Item 3, the sequel"
    assert bundle.items["genres"][3] == ["Sci-Fi", "Action"]
    assert bundle.items["popularity"] == [0] * N_ITEMS
    assert bundle.user_ids == [str(i) for i in range(N_USERS)]
    assert all(len(bundle.seen(u)) == 0 for u in range(N_USERS))


def test_bundled_onnx_reproduces_user_tower(imported, inputs):
    bundle = load_bundle(imported["out"])
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    h = session.run(["h"], {"features": bundle.user_inputs["features"]})[0]
    with torch.no_grad():
        expected = inputs["model"].user_tower(torch.from_numpy(inputs["features"])).numpy()
    assert h.shape == (N_USERS, D)
    np.testing.assert_allclose(h, expected, atol=1e-5, rtol=0)
    scores = h @ bundle.item_embeddings.T
    with torch.no_grad():
        expected_scores = expected @ inputs["model"].item_embeddings().numpy().T
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5, rtol=0)


def test_bundle_has_the_sae(imported):
    bundle = load_bundle(imported["out"])
    sae = TopKSAE.load(bundle.sae_folder)
    assert (sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.k) == (D, 64, 4)
    assert bundle.manifest["sae"]["d_in"] == D
    assert (bundle.sae_folder / "latent_stats.safetensors").is_file()
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    h = torch.from_numpy(session.run(["h"], {"features": bundle.user_inputs["features"]})[0])
    with torch.no_grad():
        out = sae(h)
    assert ((out.z > 0).sum(1) <= 4).all()
    assert float(out.fvu) < 1.0  # trained on these very activations: better than predicting the mean


# ---------------------------------------------------------------- bad inputs


def refused(capsys, args: list[str], out: Path) -> str:
    line = cli_refusal(capsys, args)
    assert not out.exists()
    return line


def test_refuses_items_csv_with_wrong_row_count(inputs, tmp_path, capsys):
    items = tmp_path / "items.csv"
    write_items(items, N_ITEMS - 1)
    line = refused(capsys, argv(inputs, tmp_path / "bundle", items=items), tmp_path / "bundle")
    assert str(items) in line and "49" in line


def test_refuses_embeddings_without_the_key(inputs, tmp_path, capsys):
    emb = tmp_path / "emb.safetensors"
    save_file({"embeddings": inputs["item_embeddings"]}, str(emb))
    line = refused(capsys, argv(inputs, tmp_path / "bundle", item_embeddings=emb), tmp_path / "bundle")
    assert str(emb) in line and "item_embeddings" in line


def test_refuses_embeddings_of_the_wrong_width(inputs, tmp_path, capsys):
    emb = tmp_path / "emb.safetensors"
    save_file({"item_embeddings": np.zeros((N_ITEMS, D + 1), np.float32)}, str(emb))
    line = refused(capsys, argv(inputs, tmp_path / "bundle", item_embeddings=emb), tmp_path / "bundle")
    assert str(inputs["onnx"]) in line


@pytest.mark.parametrize("missing", ["items", "item_embeddings", "user_inputs", "out"])
def test_refuses_missing_flags(inputs, tmp_path, capsys, missing):
    out = tmp_path / "bundle"
    args = argv(inputs, out, **{missing: None})
    line = refused(capsys, args, out)
    assert "--" + missing.replace("_", "-") in line
    assert list(tmp_path.iterdir()) == []  # refused before any work: no work folder either


def test_refuses_user_inputs_without_the_model_input(inputs, tmp_path, capsys):
    users = tmp_path / "users.safetensors"
    save_file({"feats": inputs["features"]}, str(users))
    line = refused(capsys, argv(inputs, tmp_path / "bundle", user_inputs=users), tmp_path / "bundle")
    assert str(users) in line and "features" in line


def test_refuses_user_inputs_of_the_wrong_width(inputs, tmp_path, capsys):
    users = tmp_path / "users.safetensors"
    save_file({"features": inputs["features"][:, :7].copy()}, str(users))
    line = refused(capsys, argv(inputs, tmp_path / "bundle", user_inputs=users), tmp_path / "bundle")
    assert str(users) in line


def test_imports_model_with_h_as_second_output(inputs, tmp_path, capsys):
    class ScoresAndH(nn.Module):
        def __init__(self, model: TwoTower) -> None:
            super().__init__()
            self.model = model

        def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.model.user_tower(features)
            return h @ self.model.item_embeddings().T, h

    onnx_path = tmp_path / "scores_and_h.onnx"
    export_tower(ScoresAndH(inputs["model"]), onnx_path, outputs=("scores", "h"))
    out = tmp_path / "bundle"
    assert main(argv(inputs, out, import_onnx=onnx_path)) == 0, capsys.readouterr().err
    bundle = load_bundle(out)
    assert bundle.d == D
