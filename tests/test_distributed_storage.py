"""Offline steps on a Ray cluster with the probe's shards at a pyarrow filesystem URI (issue 19, `--activations`):
the probe on Ray Data writes them to a `file://` URI outside the run folder, byte for byte the one-process probe's;
`recsae train-sae --ray-address ... --activations file://...` trains the SAE from there on Ray Train (the workers
read the shards with Ray Data through the URI's filesystem) and computes its statistics on Ray Data; and the
pipeline's catalog takes its top samples on Ray Data from there too, and gives a bundle the service loads. (S3 is
tested without Ray, against moto, in test_probe_storage.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _ray_cluster import copy_recommender, in_a_fresh_process

from recsae_core.bundle.format import load_bundle
from recsae_core.common.layout import PROBE_META, STATS_FILE, RunLayout

pytestmark = pytest.mark.slow

PROBE_ON_RAY = """
import sys
from pathlib import Path
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.common.storage import open_store
from recsae_core.probe.on_ray import collect_on_ray
from recsae_core.recommenders.run import load_run
run, address, uri = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
collect_on_ray(load_run(run), RayConfig(address=address, workers=2), batch_size=64, rows_per_shard=500, progress=False,
               activations=open_store(uri))
"""


def recsae(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("recsae")), *args]


def test_probe_on_ray_writes_the_one_process_shards_to_a_uri(trained_run, tmp_path, cluster):
    from recsae_core.probe.collect import collect
    from recsae_core.recommenders.run import load_run

    alone = copy_recommender(trained_run("bprmf"), tmp_path / "alone")
    on_ray = copy_recommender(trained_run("bprmf"), tmp_path / "on-ray")
    acts = tmp_path / "shared" / "acts"
    expected = collect(load_run(alone), batch_size=64, rows_per_shard=500, progress=False)
    in_a_fresh_process([sys.executable, "-c", PROBE_ON_RAY, str(on_ray), cluster, acts.as_uri()])
    meta = RunLayout(on_ray).verify_probe(acts.as_uri())
    assert meta["shards"] == expected.shards == sorted(p.name for p in acts.iterdir()) and len(expected.shards) == 2
    for name in expected.shards:
        assert (acts / name).read_bytes() == (RunLayout(alone).probe / name).read_bytes(), name
    assert sorted(p.name for p in RunLayout(on_ray).probe.iterdir()) == ["complete.json", PROBE_META]


@pytest.fixture(scope="module")
def trained_from_uri(trained_run, tmp_path_factory, cluster) -> tuple[Path, str]:
    """(run, URI): `recsae train-sae` on the cluster, its probe's shards at a file:// URI."""
    run = copy_recommender(trained_run("bprmf"), tmp_path_factory.mktemp("run"))
    uri = (tmp_path_factory.mktemp("shared") / "acts").as_uri()
    done = in_a_fresh_process(recsae("train-sae", "--run", str(run), "--ray-address", cluster, "--ray-workers", "2",
                                     "--activations", uri, "--latents", "64", "--k", "4",
                                     "--sae-epochs", "2"))  # fmt: skip
    # The driver shows the Ray Train run's epochs as they end (rank 0 -> a Ray queue -> the driver's bar).
    assert "sae (Ray Train): 100%" in done.stderr and "2/2" in done.stderr, done.stderr[-2000:]
    return run, uri


def test_train_sae_on_ray_trains_from_the_uri_and_computes_its_statistics_there(trained_from_uri):
    """The statistics on Ray Data read the shards at the URI: equal to one process's over the same activations
    (bit-identical, but for the float64 sums of mean and std: stats_on_ray's docstring)."""
    from recsae_core.probe.collect import load_activations
    from recsae_core.sae.model import TopKSAE
    from recsae_core.sae.stats import latent_statistics, load_stats

    run, uri = trained_from_uri
    layout = RunLayout(run)
    layout.verify_sae()  # and its probe, at the URI
    meta = layout.verify_probe(uri)
    metrics = json.loads((layout.sae / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["n_samples"] == meta["n_samples"]
    sae = TopKSAE.load(layout.sae)
    expected, on_ray = latent_statistics(sae, load_activations(layout.probe)[0]), load_stats(layout.sae / STATS_FILE)
    assert on_ray.n_samples == expected.n_samples
    for name in ("frequency", "max_activation", "deciles", "global_deciles"):
        torch.testing.assert_close(getattr(on_ray, name), getattr(expected, name), rtol=0, atol=0)
    for name in ("mean_activation", "std_activation"):
        torch.testing.assert_close(getattr(on_ray, name), getattr(expected, name), rtol=1e-5, atol=1e-7)


def test_the_pipeline_on_ray_takes_the_catalogs_top_samples_from_the_uri(trained_from_uri, cluster):
    run, uri = trained_from_uri
    done = in_a_fresh_process(recsae("pipeline", "--run", str(run), "--ray-address", cluster, "--ray-workers", "2",
                                     "--activations", uri, "--latents", "64", "--k", "4", "--sae-epochs", "2",
                                     "--quiet"))  # fmt: skip
    assert "probe: up to date, skipped" in done.stdout and "sae: up to date, skipped" in done.stdout, done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == ["probe", "sae", "concepts", "bundle"]
    RunLayout(run).verify_bundle()  # and the catalog, SAE and probe (at the URI) it was made from
    assert load_bundle(RunLayout(run).bundle).manifest["versions"]["bundle"]  # as the service loads it
