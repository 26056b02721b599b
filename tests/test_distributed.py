"""Offline steps on a Ray cluster (issue 19): a local cluster of two worker CPUs, started by `ray start` in the test
and stopped at its end, joined by address as a user would join theirs. The probe on Ray Data writes exactly the
files of the one-process probe, and `recsae pipeline --ray-address` gives a bundle the service loads."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import cli_refusal

from recsae_core.bundle.format import load_bundle
from recsae_core.common.layout import PROBE_META, RunLayout
from service.local import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
CLUSTER_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
"""The cluster and every driver that joins it, each a process of its own, share one auth mode. Nothing here joins a
cluster from the pytest process itself: Ray keeps its auth mode per process once set, and the service tests after
this module start local Rays in token mode (ray.init sets RAY_AUTH_MODE=token in this process's environment)."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The address of a local Ray cluster with 2 CPUs (so 2 probe actors), for this module only."""
    import ray

    ray.shutdown()  # an in-process Ray an earlier test left behind is not this cluster
    port = free_port()
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats"], env=CLUSTER_ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def copy_recommender(run: Path, to: Path) -> Path:
    shutil.copytree(run / "recommender", to / "recommender")
    return to


def in_a_fresh_process(args: list[str]) -> subprocess.CompletedProcess:
    """Run as a user would: a process of its own that joins the cluster by address."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
                          env=CLUSTER_ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


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


def test_pipeline_with_a_ray_address_gives_a_bundle_the_service_loads(trained_run, tmp_path, cluster):
    run = copy_recommender(trained_run("bprmf"), tmp_path / "run")
    recsae = str(Path(sys.executable).with_name("recsae"))
    in_a_fresh_process([recsae, "pipeline", "--run", str(run), "--ray-address", cluster, "--ray-workers", "2",
                        "--latents", "64", "--k", "4", "--sae-epochs", "2", "--quiet"])  # fmt: skip
    bundle = load_bundle(RunLayout(run).bundle)
    assert bundle.manifest["versions"]["bundle"]
    RunLayout(run).verify_bundle()


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
