"""Offline steps on a Ray cluster (issue 19): a local cluster of two worker CPUs, started by `ray start` in the test
and stopped at its end, joined by address as a user would join theirs. The probe on Ray Data writes exactly the
files of the one-process probe, and `recsae pipeline --ray-address` gives a bundle the service loads."""

from __future__ import annotations

import filecmp
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli import cli_refusal
from _ray_cluster import CLUSTER_ENV, copy_recommender, in_a_fresh_process

from recsae_core.common.layout import PROBE_META, RunLayout
from service.local import free_port

pytestmark = pytest.mark.slow

PROBE_ON_RAY = """
import sys
from pathlib import Path
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.probe.on_ray import collect_on_ray
from recsae_core.recommenders.run import load_run
run, address = Path(sys.argv[1]), sys.argv[2]
collect_on_ray(load_run(run), RayConfig(address=address, workers=2), batch_size=64, rows_per_shard=500, progress=False)
"""


def test_probe_on_ray_writes_the_files_of_the_one_process_probe(trained_run, tmp_path, cluster):
    """Batches of 64 users: 15 batches over the 2 actors, so order across actors is exercised. (A sequential model's
    samples go through the same `probe_batch` as in one process, which test_probe checks against PyTorch; probing
    SASRec's 78k ML-100K positions twice would add minutes to the suite.)"""
    from recsae_core.probe.collect import collect
    from recsae_core.recommenders.run import load_run

    alone = copy_recommender(trained_run("bprmf"), tmp_path / "alone")
    on_ray = copy_recommender(trained_run("bprmf"), tmp_path / "on-ray")
    expected = collect(load_run(alone), batch_size=64, rows_per_shard=500, progress=False)
    in_a_fresh_process([sys.executable, "-c", PROBE_ON_RAY, str(on_ray), cluster])
    assert len(expected.shards) == 2 and expected.n_samples > 900  # ML-100K users (those with training items)
    names = sorted(p.name for p in RunLayout(alone).probe.iterdir())
    assert names == sorted(p.name for p in RunLayout(on_ray).probe.iterdir()) and PROBE_META in names
    # Byte for byte, the metadata and completion record included (they name the same recommender files).
    mismatch = filecmp.cmpfiles(RunLayout(alone).probe, RunLayout(on_ray).probe, names, shallow=False)[1:]
    assert mismatch == ([], []), mismatch
    RunLayout(on_ray).verify_probe()


SAE_ON_RAY = """
import sys
from pathlib import Path
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.pipeline.steps import sae_step
from recsae_core.sae.config import SAETrainConfig
run, address = Path(sys.argv[1]), sys.argv[2]
sae_step(run, SAETrainConfig(**eval(sys.argv[3])), RayConfig(address=address, workers=2))
"""
SAE_CONFIG = {"n_latents": 256, "k": 8, "batch_size": 256, "max_samples": 200_000, "progress": False}
"""One SAE asked of one process and of two DDP workers: the same config, so the same global batch and budget."""


@pytest.fixture(scope="module")
def probed_bprmf(tmp_path_factory) -> Path:
    """BPR-MF trained to convergence on ML-100K (the shared run's 2 epochs leave h near its random start, which no
    SAE of the project's size reconstructs to target), and probed."""
    from recsae_core.probe.collect import collect
    from recsae_core.recommenders.config import TrainConfig
    from recsae_core.recommenders.run import load_run, train_step

    run = tmp_path_factory.mktemp("bprmf-probed")
    train_step(run, "ml-100k", "bprmf", "recbole", TrainConfig(epochs=40, progress=False))
    collect(load_run(run), progress=False)
    return run


def test_ddp_training_meets_the_targets_of_one_process_and_saves_a_saelens_sae(probed_bprmf, tmp_path, cluster):
    """The SAE step on Ray Train with 2 DDP workers. Ray Data deals the rows to the workers in an order one process
    does not use, so the SAEs are not bit-identical; the tolerances: both meet the project's SAE targets (FVU <=
    0.10, dead <= 5%, NDCG ratio >= 0.95), the DDP FVU is within 20% of the one-process FVU and its NDCG ratio within
    0.03. The saved folder is SAELens's layout (cfg.json and sae_weights.safetensors with W_enc, b_enc, W_dec, b_dec),
    read back here as SAELens reads it: the package itself needs transformer-lens and a model hub, so it is not
    installed."""
    import json

    from safetensors.numpy import load_file

    from recsae_core.pipeline.steps import sae_step
    from recsae_core.sae.config import SAETrainConfig

    alone, ddp = (shutil.copytree(probed_bprmf, tmp_path / name) for name in ("alone", "ddp"))
    one = sae_step(alone, SAETrainConfig(**SAE_CONFIG))
    in_a_fresh_process([sys.executable, "-c", SAE_ON_RAY, str(ddp), cluster, repr(SAE_CONFIG)])
    RunLayout(ddp).verify_sae()
    two = json.loads((RunLayout(ddp).sae / "metrics.json").read_text())
    assert (one["workers"], two["workers"]) == (1, 2)
    assert two["samples_seen"] >= 200_000 and two["stopped_by"] == "samples"
    for metrics in (one, two):
        assert metrics["fvu"] <= 0.10 and metrics["dead_fraction"] <= 0.05 and metrics["substituted_ratio"] >= 0.95
    assert abs(two["fvu"] - one["fvu"]) <= 0.20 * one["fvu"], (two["fvu"], one["fvu"])
    assert abs(two["substituted_ratio"] - one["substituted_ratio"]) <= 0.03
    cfg = json.loads((RunLayout(ddp).sae / "cfg.json").read_text())
    weights = load_file(str(RunLayout(ddp).sae / "sae_weights.safetensors"))
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["activation_fn_kwargs"]) == ("topk", 64, 256, {"k": 8})
    assert {name: w.shape for name, w in weights.items()} == {
        "W_enc": (64, 256), "b_enc": (256,), "W_dec": (256, 64), "b_dec": (64,)}  # fmt: skip
    assert np.allclose(np.linalg.norm(weights["W_dec"], axis=1), 1.0, atol=1e-5)  # renormalised on every worker


@pytest.mark.parametrize("probed", [True, False], ids=["by-ray-train", "by-the-probe"])
def test_more_workers_than_the_cluster_has_are_refused(probed, probed_bprmf, trained_run, tmp_path, cluster):
    """Ray Train (a probed run) and the probe's actor pool (a run not yet probed) refuse 3 workers on 2 CPUs in
    one line, before any work: a worker that finds no CPU never starts, and its share would wait forever."""
    if probed:
        run = shutil.copytree(probed_bprmf, tmp_path / "run")
    else:
        run = copy_recommender(trained_run("bprmf"), tmp_path / "run")
    recsae = str(Path(sys.executable).with_name("recsae"))
    done = subprocess.run([recsae, "train-sae", "--run", str(run), "--ray-address", cluster, "--ray-workers", "3",
                           "--quiet"], capture_output=True, text=True, timeout=600, env=CLUSTER_ENV)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1] == "recsae: error: --ray-workers 3: the cluster has 2 CPUs", done.stderr
    assert not RunLayout(run).sae.exists() and RunLayout(run).probe_complete() == probed


def test_a_ray_address_without_a_cluster_is_one_line(trained_run, tmp_path, capsys):
    import ray

    ray.shutdown()  # the module's cluster may be joined already; this address has none
    run = copy_recommender(trained_run("bprmf"), tmp_path / "run")
    line = cli_refusal(capsys, ["train-sae", "--run", str(run), "--ray-address", f"127.0.0.1:{free_port()}",
                                "--quiet"])  # fmt: skip
    assert "--ray-address 127.0.0.1:" in line and "no Ray cluster to join" in line
    assert not RunLayout(run).probe.exists()  # nothing half-written


def test_a_process_joined_to_another_cluster_leaves_it_for_the_one_asked():
    """connect() compares the cluster this process is joined to with the one asked by GCS port ('auto': any), and
    leaves another one (a local Ray a service test started) for the one asked."""
    from recsae_core.common.ray_cluster import same_cluster

    assert same_cluster("127.0.0.1:6390", "192.0.2.2:6390") and same_cluster("ray://head:6390", "10.0.0.1:6390")
    assert not same_cluster("127.0.0.1:6390", "192.0.2.2:43193") and same_cluster("auto", "192.0.2.2:43193")


def test_a_cluster_start_that_exits_at_once_is_tried_again_on_another_port(monkeypatch):
    """A port free a moment ago can be taken by the time `ray start` binds it (in this suite, once, by Ray's own
    dashboard agent, whose default is 52365), and `ray start` exits at once. Here the first port handed out is held
    by a socket bound without listening; local_cluster starts again on another port."""
    from service import bench_cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # local_cluster sets it for this process; put back afterwards
    # A GCS that could not bind has exited, yet `ray start` waits for it ~40 s by default; shorter waits (for this
    # test's two starts only) let it give up in ~10 s, while a GCS that starts is still far within them.
    for name in ("RAY_py_gcs_connect_timeout_s", "RAY_gcs_rpc_server_connect_timeout_s",
                 "RAY_gcs_rpc_server_reconnect_timeout_s"):  # fmt: skip
        monkeypatch.setenv(name, "5")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        ports = iter([taken])
        monkeypatch.setattr(bench_cluster, "free_port", lambda: next(ports, None) or free_port())
        with bench_cluster.local_cluster(cpus=1) as address:
            host, port = address.split(":")
            assert int(port) != taken
            socket.create_connection((host, int(port)), timeout=5).close()


def test_bundle_import_onnx_on_ray_probes_the_same_shards_and_meets_the_one_process_sae(tmp_path, cluster):
    """`bundle --import-onnx --ray-address`: the outside model's probe on Ray Data writes the one-process shards
    byte for byte, and its SAE, trained on Ray Train with the same held-out rows left out and selected on their
    FVU, reconstructs them as well as one process's within the tolerance of training on Ray (the batch order
    differs)."""
    from test_import_onnx import argv, outside_model

    files = outside_model(tmp_path)
    alone, on_ray = tmp_path / "alone" / "bundle", tmp_path / "on-ray" / "bundle"
    recsae = str(Path(sys.executable).with_name("recsae"))
    here = json.loads(in_a_fresh_process([recsae, *argv(files, alone)[:-1]]).stdout)  # argv ends with --quiet
    there = json.loads(in_a_fresh_process([recsae, *argv(files, on_ray), "--ray-address", cluster, "--ray-workers",
                                           "2"]).stdout)  # fmt: skip
    probes = [bundle.with_name(bundle.name + ".work") / "probe" for bundle in (alone, on_ray)]
    names = sorted(p.name for p in probes[0].iterdir() if p.name.startswith("shard-"))
    assert names and filecmp.cmpfiles(*probes, names, shallow=False)[1:] == ([], [])
    assert (here["sae"]["workers"], there["sae"]["workers"]) == (1, 2)
    assert here["sae"]["n_samples"] == there["sae"]["n_samples"] and there["sae"]["selected_on"] == "held-out FVU"
    assert abs(there["sae"]["fvu"] - here["sae"]["fvu"]) <= 0.20 * here["sae"]["fvu"], (there["sae"], here["sae"])
    from recsae_core.bundle.format import load_bundle

    load_bundle(on_ray)  # verified, as the service loads it
