"""Crash safety of the offline jobs (issue 17): a SIGKILL at any point leaves the previous complete state or one the
rerun finds unfinished, and one flipped byte in any file of a run or a bundle is refused with the file's name.

What a flipped byte does, by folder (the pipeline's `run_steps` and the loaders):
- recommender/: refused, naming the file; it is never retrained or re-imported silently (`--force` retrains a run
  trained here).
- probe/, sae/, concepts/, bundle/: recomputable; `recsae pipeline` redoes that step and every later one, with a line
  naming the file; every other reader (train-sae, interpret, sae-sweep, bundle --run, debias, load_bundle) refuses.
- policies/: a policy `debias` wrote is refused by `recsae bundle`, naming it; a hand-written one is taken as it is.
- each folder's completion record (complete.json) and the bundle's manifest are covered too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recsae_core.bundle.format import load_bundle
from recsae_core.common.artifacts import RECORD, UMASK, atomic_folder, check_record, folder_files, write_json_recorded
from recsae_core.common.errors import ArtifactError, IncompleteError
from recsae_core.common.layout import MANIFEST, RunLayout
from recsae_core.pipeline.steps import pipeline_on_run, run_steps
from recsae_core.sae.config import SAETrainConfig

ROOT = Path(__file__).resolve().parents[1]
STEP_FOLDERS = ("probe", "sae", "concepts", "bundle")
"""The recomputable steps after the recommender, in pipeline order."""


def flip(path: Path, at: float = 0.5) -> None:
    """Flip every bit of one byte (at this fraction of the file)."""
    data = bytearray(path.read_bytes())
    data[min(int(len(data) * at), len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, trained_run) -> Path:
    """A run through every step (BPR-MF on ML-100K, tiny SAE), with a policy `debias` would have written."""
    run = tmp_path_factory.mktemp("crash") / "run"
    shutil.copytree(trained_run("bprmf") / "recommender", run / "recommender")
    config = SAETrainConfig(n_latents=64, k=4, epochs=1, progress=False)
    pipeline_on_run(run, config, log=lambda line: None)
    policy = {"name": "popularity", "description": "test", "edits": [{"latent": 0, "op": "nudge", "value": -1.0,
              "unit": "std"}]}  # fmt: skip
    write_json_recorded(RunLayout(run).policy("popularity"), policy)
    lines: list[str] = []
    pipeline_on_run(run, config, log=lines.append)  # the new policy makes the bundle stale: only it is redone
    assert lines[-2:-1] == ["[4/4] bundle: running"] and lines[0] == "[1/4] probe: up to date, skipped"
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def files_of(run: Path, folder: str) -> list[str]:
    return [f"{folder}/{name}" for name in folder_files(run / folder)] + (
        [f"{folder}/{RECORD}"] if (run / folder / RECORD).is_file() else []
    )


def test_every_file_of_a_run_is_covered(finished_run):
    """Each file is listed by its folder's completion record (or the bundle's manifest, which has its own digest), or
    is that record; nothing else lies in the run."""
    run, covered = finished_run, set()
    for folder in ("recommender", "probe", "sae", "concepts", "policies"):
        covered |= {f"{folder}/{name}" for name in check_record(run / folder, exhaustive=False)}
        covered.add(f"{folder}/{RECORD}")
    manifest = RunLayout(run).verify_bundle()
    covered |= {f"bundle/{name}" for name in manifest["files"]} | {f"bundle/{MANIFEST}"}
    on_disk = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    assert on_disk == covered
    assert {"recommender/model.onnx", "probe/shard-00000.safetensors", "sae/sae_weights.safetensors",
            "concepts/catalog.json", "policies/popularity.json", "bundle/policies/popularity.json"} <= on_disk


def test_artifacts_have_the_usual_modes(finished_run):
    """Written through temp files and folders, every file and folder of a run and its bundle still gets the mode a
    plain write would (0644 / 0755 under umask 022), not tempfile's private 0600 / 0700: a service running as
    another user must be able to read a bundle a job wrote."""
    wrong = {}
    for path in [finished_run, *finished_run.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~UMASK
        if path.stat().st_mode & 0o777 != expected:
            wrong[path.relative_to(finished_run).as_posix()] = oct(path.stat().st_mode & 0o777)
    assert not wrong, f"expected {oct(0o666 & ~UMASK)} / {oct(0o777 & ~UMASK)}: {wrong}"


def stub_steps(run: Path, calls: list[str]) -> list:
    """The pipeline's steps with their real checks, and runs that only note that they were asked to run."""
    layout = RunLayout(run)
    checks = (layout.verify_probe, layout.verify_sae, layout.verify_catalog, layout.verify_bundle)
    return [(name, check, lambda name=name: calls.append(name) or {}) for name, check in zip(STEP_FOLDERS, checks,
                                                                                              strict=True)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["recommender", "probe", "sae", "concepts", "policies", "bundle"])
def test_one_flipped_byte_in_any_file_is_refused_by_name(finished_run, tmp_path, folder):
    names = files_of(finished_run, folder)
    assert names
    for name in names:
        for at in (0.0, 0.5, 1.0):
            run = tmp_path / f"{name.replace('/', '_')}-{at}"
            shutil.copytree(finished_run, run)
            flip(run / name, at)
            layout = RunLayout(run)
            if folder == "recommender":  # not recomputed: refused before any step runs
                with pytest.raises(ArtifactError) as info:
                    pipeline_on_run(run, SAETrainConfig(progress=False), log=lambda line: None)
            elif folder == "policies":  # `recsae bundle` reads them through policy_files
                with pytest.raises(ArtifactError) as info:
                    layout.policy_files()
            else:
                verify = {"probe": layout.verify_probe, "sae": layout.verify_sae, "concepts": layout.verify_catalog,
                          "bundle": lambda bundle=layout.bundle: load_bundle(bundle)}[folder]  # fmt: skip
                with pytest.raises(ArtifactError) as info:
                    verify()
            assert not isinstance(info.value, IncompleteError), (name, str(info.value))
            assert str(run / name) in str(info.value), (name, str(info.value))
            if folder in STEP_FOLDERS:  # the pipeline redoes the step and the ones after it, saying why
                calls, lines = [], []
                run_steps(stub_steps(run, calls), log=lines.append)
                assert calls == list(STEP_FOLDERS[STEP_FOLDERS.index(folder) :]), name
                assert any(str(run / name) in line and line.endswith("redoing the step") for line in lines), lines


def test_a_file_added_to_a_finished_folder_or_bundle_is_refused(run_copy):
    layout = RunLayout(run_copy)
    (layout.sae / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"extra\.safetensors: not covered"):
        layout.verify_sae()
    (layout.bundle / "policies" / "sneaked.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"sneaked\.json: not listed"):
        load_bundle(layout.bundle)


def test_a_hand_written_policy_is_bundled_as_it_is(run_copy):
    layout = RunLayout(run_copy)
    (layout.policies / "mine.json").write_text(json.dumps({"name": "mine", "edits": []}))
    assert [p.name for p in layout.policy_files()] == ["mine.json", "popularity.json"]
    with pytest.raises(IncompleteError, match="other policies"):  # and the bundle is out of date until rebuilt
        layout.verify_bundle()


def test_a_redone_step_makes_the_later_ones_stale(run_copy):
    """A run killed after `--force` redid the probe, before it redid the SAE: the old SAE (intact, but trained on
    another probe) must not be taken as finished."""
    layout = RunLayout(run_copy)
    meta = json.loads((layout.probe / "meta.json").read_text())
    meta["n_samples_note"] = "a different probe"
    write_json_recorded(layout.probe / "meta.json", meta)
    with pytest.raises(IncompleteError, match="made from another probe/"):
        layout.verify_sae()
    calls: list[str] = []
    run_steps(stub_steps(run_copy, calls), log=lambda line: None)
    assert calls == ["sae", "concepts", "bundle"]


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
import recsae_core.common.artifacts as artifacts
calls, kill_at = [0], int(sys.argv[2])
real = os.replace
def replace(src, dst):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
artifacts.os.replace = replace
with artifacts.atomic_folder(Path(sys.argv[1])) as tmp:
    (tmp / "a.bin").write_bytes(b"new" * 1000)
"""


@pytest.mark.parametrize("kill_at", [2, 3])
def test_sigkill_inside_an_atomic_write_leaves_old_state_or_an_unfinished_one(tmp_path, kill_at):
    """The writer is SIGKILLed before its n-th rename: of the old folder aside (2: the new one is complete beside
    it), of the new one into place (3: the old one is aside). The target is the old folder or absent (its step
    reruns), never a mix; and the next writer sweeps what the killed one left."""
    target = tmp_path / "step"
    with atomic_folder(target) as tmp:
        (tmp / "a.bin").write_bytes(b"old")
    script = textwrap.dedent(KILLED_WRITER)
    code = subprocess.run([sys.executable, "-c", script, str(target), str(kill_at)], cwd=ROOT).returncode
    assert code == -9
    try:
        content = (target / "a.bin").read_bytes() if check_record(target) else None
    except IncompleteError:
        content = None
    assert content == {2: b"old", 3: None}[kill_at]
    assert len(list(tmp_path.iterdir())) == {2: 2, 3: 2}[kill_at]  # + the new folder (2), or the old one aside (3)
    with atomic_folder(target) as tmp:
        (tmp / "a.bin").write_bytes(b"again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step"]
    assert check_record(target) and (target / "a.bin").read_bytes() == b"again"


@pytest.mark.slow
def test_pipeline_killed_at_random_points_always_reruns_to_verified_artifacts(tmp_path):
    """scripts/kill_rerun.py: SIGKILL at seeded random points inside every step, at least 10 times, each followed by a
    rerun; then kills of `--force` reruns. Every launch that finished left artifacts that verify and a bundle that
    loads, and no kill left a step that reads as corrupt."""
    out = tmp_path / "kills"
    argv = [sys.executable, str(ROOT / "scripts" / "kill_rerun.py"), "--out", str(out), "--kills", "10",
            "--force-kills", "1", "--epochs", "1", "--sae-epochs", "1"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "kill_rerun.json").read_text())
    assert result["kills"] >= 10 and result["corrupt_after_a_kill"] == 0
    assert {hit.removeprefix("after:") for hit in result["steps_hit"]} == {"recommender", *STEP_FOLDERS}
    assert result["reruns_completed"] >= 3 and result["finished_runs_verified"] == result["reruns_completed"] + 1
    assert result["stray_temp_files"] == []
