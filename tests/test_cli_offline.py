"""CLI refusals of the offline steps: exit code 2 and one `recsae: error: ...` line, no traceback, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _cli import cli_refusal
from _shared_runs import trained_run

from recsae_core.pipeline.cli import build_parser


def test_parser_builds():
    """Every subcommand's options coexist (commit ddbf29b shipped a duplicate --k that broke every command)."""
    parser = build_parser()
    assert parser.parse_args(["bundle", "--run", "x", "--k", "4"]).k == 4


def refused(capsys, args: list[str]) -> str:
    return cli_refusal(capsys, args)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def recommender_only(tmp_path_factory, tmp_path) -> Path:
    """A private run folder holding a trained recommender and nothing else."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run(tmp_path_factory, "bprmf") / "recommender", run_dir / "recommender")
    return run_dir


def test_train_sae_on_empty_folder(capsys, tmp_path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    line = refused(capsys, ["train-sae", "--run", str(run_dir), "--latents", "16", "--k", "4", "--quiet"])
    assert str(run_dir / "recommender") in line and "no trained recommender" in line
    assert tree(run_dir) == []


def test_train_sae_on_missing_folder(capsys, tmp_path):
    line = refused(capsys, ["train-sae", "--run", str(tmp_path / "nowhere"), "--quiet"])
    assert str(tmp_path / "nowhere") in line
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_bundle_without_sae(capsys, recommender_only):
    before = tree(recommender_only)
    line = refused(capsys, ["bundle", "--run", str(recommender_only)])
    assert str(recommender_only / "sae") in line and "no trained SAE" in line
    assert tree(recommender_only) == before  # no bundle folder, no temp folder


def test_bundle_without_run_or_import(capsys, tmp_path):
    line = refused(capsys, ["bundle", "--out", str(tmp_path / "bundle")])
    assert "--run" in line and "--import-onnx" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_sae_k_above_latents(capsys, recommender_only):
    before = tree(recommender_only)
    line = refused(capsys, ["train-sae", "--run", str(recommender_only), "--latents", "4", "--k", "8", "--quiet"])
    assert "--k 8" in line and "--latents 4" in line
    assert tree(recommender_only) == before  # refused before probing


def test_pipeline_k_above_latents(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["pipeline", "--dataset", "ml-100k", "--model", "bprmf", "--out", str(out), "--latents", "16",
            "--k", "32", "--quiet"]  # fmt: skip
    line = refused(capsys, args)
    assert "--k 32" in line and "--latents 16" in line
    assert not out.exists()  # refused before training


def test_bundle_import_k_above_latents(capsys, tmp_path):
    files = {name: tmp_path / name for name in ("m.onnx", "e.safetensors", "i.csv", "u.safetensors")}
    args = ["bundle", "--import-onnx", str(files["m.onnx"]), "--item-embeddings", str(files["e.safetensors"]),
            "--items", str(files["i.csv"]), "--user-inputs", str(files["u.safetensors"]),
            "--out", str(tmp_path / "bundle"), "--latents", "4", "--k", "5", "--quiet"]  # fmt: skip
    line = refused(capsys, args)
    assert "--k 5" in line
    assert list(tmp_path.iterdir()) == []
