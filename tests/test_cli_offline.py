"""CLI refusals of the offline steps: exit code 2 and one `recsae: error: ...` line, no traceback, nothing written."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from _cli import cli_refusal

from recsae_core.common.cli_config import ConfigOptions, field_docs, help_text
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.pipeline.options import (
    PIPELINE_SAE_OPTIONS,
    RAY_OPTIONS,
    SAE_OPTIONS,
    SWEEP_SAE_OPTIONS,
    TRAIN_OPTIONS,
    build_parser,
)
from recsae_core.recommenders.config import TrainConfig
from recsae_core.sae.config import SAETrainConfig


def test_parser_builds():
    """Every subcommand's options coexist (commit ddbf29b shipped a duplicate --k that broke every command)."""
    parser = build_parser()
    assert parser.parse_args(["bundle", "--run", "x", "--k", "4"]).k == 4


def refused(capsys, args: list[str]) -> str:
    return cli_refusal(capsys, args)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def recommender_only(trained_run, tmp_path) -> Path:
    """A private run folder holding a trained recommender and nothing else."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run("bprmf") / "recommender", run_dir / "recommender")
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


# ---------------------------------------------------------------- options derived from the configs

PIPELINE = ["pipeline", "--dataset", "ml-100k", "--model", "bprmf", "--out", "run"]
COMMANDS: list[tuple[list[str], ConfigOptions]] = [
    (["train-sae", "--run", "run"], SAE_OPTIONS),
    (["bundle", "--import-onnx", "m.onnx"], SAE_OPTIONS),
    (["sae-sweep", "--run", "run", "--out", "s.json"], SWEEP_SAE_OPTIONS),
    (PIPELINE, PIPELINE_SAE_OPTIONS),
    (PIPELINE, TRAIN_OPTIONS),
    (["train-recommender", "--dataset", "ml-100k", "--model", "bprmf", "--out", "run"], TRAIN_OPTIONS),
]


def subparser(argv: list[str]):
    """The subcommand's parser, to look at its options."""
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[argv[0]]


@pytest.mark.parametrize(("argv", "options"), COMMANDS, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_option_defaults_and_help_are_the_config_fields(argv, options):
    """Each option's default is the field's default and its help the field's docstring: change the dataclass and
    the command line follows."""
    actions = {a.dest: a for a in subparser(argv)._actions}
    defaults = {f.name: f.default for f in dataclasses.fields(options.cls)}
    for field_name, flag in options.flags.items():
        action = actions[options.dest(flag)]
        assert flag in action.option_strings
        assert action.default == defaults[field_name], flag
        doc = field_docs(options.cls)[field_name]
        assert action.help == help_text(doc, defaults[field_name], negated=defaults[field_name] is True), flag


@pytest.mark.parametrize(("argv", "options"), COMMANDS, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_no_options_give_the_config_defaults(argv, options):
    args = build_parser().parse_args(argv)
    fixed = {} if "device" in options.flags else {"device": "cpu", "progress": True}
    assert options.build(args, **fixed) == options.cls(**fixed)
    assert options.build(args, **fixed) in (SAETrainConfig(), TrainConfig())


RAY_COMMANDS = [["train-sae", "--run", "run"], ["sae-sweep", "--run", "run", "--out", "s.json"],
                ["interpret", "--run", "run"], PIPELINE, ["debias", "--run", "run", "--target", "popularity"],
                ["concept-control", "--run", "run"]]  # fmt: skip
"""The offline commands with a step that runs on a Ray cluster when one is named."""


@pytest.mark.parametrize("argv", RAY_COMMANDS, ids=lambda argv: argv[0])
def test_offline_commands_with_a_distributed_step_take_the_ray_options(argv, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    actions = {a.dest: a for a in subparser(argv)._actions}
    for field_name, flag in RAY_OPTIONS.flags.items():
        assert actions[RAY_OPTIONS.dest(flag)].help == help_text(field_docs(RayConfig)[field_name],
                                                                   getattr(RayConfig(), field_name))  # fmt: skip
    assert RAY_OPTIONS.build(build_parser().parse_args(argv)) == RayConfig()
    args = build_parser().parse_args([*argv, "--ray-address", "auto", "--ray-workers", "2"])
    assert RAY_OPTIONS.build(args) == RayConfig(address="auto", workers=2)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # Ray's own variable, as `ray job submit` sets it
    assert RAY_OPTIONS.build(build_parser().parse_args(argv)).address == "10.0.0.5:6379"


def test_every_sae_flag_reaches_the_config():
    argv = ["train-sae", "--run", "r", "--latents", "64", "--k", "4", "--sae-lr", "0.01", "--sae-epochs", "7",
            "--sae-max-samples", "5000", "--sae-max-minutes", "0", "--dead-after", "500", "--device", "cuda",
            "--quiet"]  # fmt: skip
    config = SAE_OPTIONS.build(build_parser().parse_args(argv))
    assert config == SAETrainConfig(n_latents=64, k=4, lr=0.01, epochs=7, max_samples=5000, max_minutes=0,
                                    dead_after=500, device="cuda", progress=False)  # fmt: skip
    assert config.max_seconds is None  # 0 = no limit


def test_bundle_run_refuses_sae_options(capsys, tmp_path):
    """`bundle --run` packs the run's SAE: an SAE option there would be silently ignored."""
    line = refused(capsys, ["bundle", "--run", str(tmp_path / "run"), "--latents", "64"])
    assert "--latents" in line and "--import-onnx" in line
    line = refused(capsys, ["bundle", "--run", str(tmp_path / "run"), "--name", "x", "--dead-after", "80000"])
    assert "--name" in line and "--dead-after" in line  # typed at its default value is still typed
    assert list(tmp_path.iterdir()) == []


def test_bundle_refuses_run_and_import_together(capsys, tmp_path):
    line = refused(capsys, ["bundle", "--run", str(tmp_path), "--import-onnx", str(tmp_path / "m.onnx")])
    assert "--run" in line and "--import-onnx" in line
    assert list(tmp_path.iterdir()) == []


def test_sae_sweep_does_not_take_latents_or_k(capsys):
    """Its --ks and --widths set them (an earlier version accepted --latents and --k and overwrote them)."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["sae-sweep", "--run", "r", "--out", "s.json", "--latents", "64"])
    assert info.value.code == 2 and "unrecognized arguments: --latents" in capsys.readouterr().err


def test_sae_sweep_refuses_ks_above_every_width(capsys, tmp_path):
    line = refused(capsys, ["sae-sweep", "--run", str(tmp_path), "--out", str(tmp_path / "s.json"), "--ks", "64",
                            "--widths", "32"])  # fmt: skip
    assert "--ks 64" in line and "--widths 32" in line


def test_interpret_refuses_llm_options_without_the_llm_labeler(capsys, tmp_path):
    for option in (["--llm-latents", "5"], ["--llm-concurrency", "4"]):
        line = refused(capsys, ["interpret", "--run", str(tmp_path), *option])
        assert option[0] in line and "--labeler llm" in line
