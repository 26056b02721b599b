"""Statistics and concepts on Ray Data (issue 19): on a local cluster of two worker CPUs, joined by address from a
process of its own, the SAE's latent statistics equal the one-process ones (bit for bit, but for the float64 sums
behind mean and std, which are summed in another order: rtol 1e-5, atol 1e-7), each latent's top samples are the
one-process ones, and `recsae interpret --ray-address` writes the one-process catalog."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _ray_cluster import copy_recommender, in_a_fresh_process

from recsae_core.common.layout import RunLayout

pytestmark = pytest.mark.slow

ON_RAY = """
import sys
from pathlib import Path
import numpy as np
from recsae_core.common.ray_cluster import RayConfig
from recsae_core.concepts.on_ray import top_units_on_ray
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.runtime import SAERuntime
from recsae_core.sae.stats import save_stats
from recsae_core.sae.stats_on_ray import latent_statistics_on_ray
probe, sae, address, out = Path(sys.argv[1]), TopKSAE.load(Path(sys.argv[2])), sys.argv[3], Path(sys.argv[4])
config = RayConfig(address=address, workers=2)
save_stats(latent_statistics_on_ray(sae, probe, config, batch_size=100), out / "stats.safetensors")
users = np.load(out / "users.npy")
top = top_units_on_ray(SAERuntime.from_model(sae), probe, users, 10, config, batch_size=100)
np.savez(out / "top.npz", **{str(j): ids for j, ids in top.items()})
"""


@pytest.fixture(scope="module")
def probed(trained_run, tmp_path_factory) -> Path:
    """A BPR-MF run with a probe of 4 shards (300 rows each, the last shorter) and an SAE beside it."""
    from recsae_core.probe.collect import collect, load_activations
    from recsae_core.recommenders.run import load_run
    from recsae_core.sae.model import SAEConfig
    from recsae_core.sae.train import random_sae

    run = copy_recommender(trained_run("bprmf"), tmp_path_factory.mktemp("probed"))
    collect(load_run(run), batch_size=64, rows_per_shard=300, progress=False)
    h, _, _ = load_activations(RunLayout(run).probe)
    # An untrained SAE of the right shape, with 8 latents that can never fire (dead ones are zeros on both paths).
    sae = random_sae(SAEConfig(d_in=h.shape[1], n_latents=128, k=4), h, seed=0)
    with torch.no_grad():
        sae.W_enc[:, :8], sae.b_enc[:8] = 0.0, -1.0
    sae.save(run / "sae-weights")
    return run


@pytest.fixture(scope="module")
def on_ray(probed, tmp_path_factory, cluster) -> Path:
    """What a driver of its own wrote from the cluster: the statistics, and the top-10 samples per latent with users
    of 3 samples each (so that one sample per user is exercised). Batches of 100 rows over shards of 300: batches
    straddle shards, and 10 batches spread over the 2 actors."""
    out = tmp_path_factory.mktemp("on-ray")
    np.save(out / "users.npy", np.arange(count_rows(probed)) // 3)
    in_a_fresh_process([sys.executable, "-c", ON_RAY, str(RunLayout(probed).probe), str(probed / "sae-weights"),
                        cluster, str(out)])  # fmt: skip
    return out


def count_rows(run: Path) -> int:
    from recsae_core.probe.collect import load_activations

    return len(load_activations(RunLayout(run).probe)[0])


def test_latent_statistics_on_ray_equal_the_one_process_ones(probed, on_ray):
    from recsae_core.probe.collect import load_activations
    from recsae_core.sae.model import TopKSAE
    from recsae_core.sae.stats import latent_statistics, load_stats

    h, _, _ = load_activations(RunLayout(probed).probe)
    expected = latent_statistics(TopKSAE.load(probed / "sae-weights"), h, batch_size=100)
    got = load_stats(on_ray / "stats.safetensors", 128)
    assert got.n_samples == expected.n_samples == len(h) > 900
    assert got.dead_fraction == 8 / 128
    for exact in ("frequency", "max_activation", "deciles", "global_deciles"):
        assert torch.equal(getattr(got, exact), getattr(expected, exact)), exact
    for summed in ("mean_activation", "std_activation"):
        torch.testing.assert_close(getattr(got, summed), getattr(expected, summed), rtol=1e-5, atol=1e-7)


def test_top_samples_on_ray_equal_the_one_process_ones(probed, on_ray):
    from recsae_core.concepts.samples import column_top_units, encode_sparse
    from recsae_core.probe.collect import load_activations
    from recsae_core.sae.model import TopKSAE
    from recsae_core.sae.runtime import SAERuntime

    h, _, _ = load_activations(RunLayout(probed).probe)
    users = np.load(on_ray / "users.npy")
    codes = encode_sparse(SAERuntime.from_model(TopKSAE.load(probed / "sae-weights")), h, batch_size=100)
    live = np.flatnonzero(np.diff(codes.indptr) > 0)
    got = dict(np.load(on_ray / "top.npz"))
    assert sorted(got, key=int) == [str(j) for j in live]
    for j in live:
        expected = column_top_units(codes, users, j, 10)
        assert np.array_equal(got[str(j)], expected), j
        assert len(np.unique(users[expected])) == len(expected)
    assert any(len(ids) == 10 for ids in got.values())


def test_interpret_with_a_ray_address_writes_the_one_process_catalog(trained_run, tmp_path, cluster):
    import json
    import shutil

    from recsae_core.concepts.catalog import CatalogOptions, build_catalog
    from recsae_core.pipeline.steps import probe_step, sae_step
    from recsae_core.sae.config import SAETrainConfig

    alone = copy_recommender(trained_run("bprmf"), tmp_path / "alone")
    probe_step(alone, progress=False)
    sae_step(alone, SAETrainConfig(n_latents=128, k=4, epochs=2, progress=False))
    on_ray = tmp_path / "on-ray"
    shutil.copytree(alone, on_ray)
    expected = build_catalog(alone, "tfidf", options=CatalogOptions(progress=False))
    recsae = str(Path(sys.executable).with_name("recsae"))
    in_a_fresh_process([recsae, "interpret", "--run", str(on_ray), "--ray-address", cluster, "--ray-workers", "2",
                        "--quiet"])  # fmt: skip
    got = json.loads(RunLayout(on_ray).catalog.read_text())
    for catalog in (expected, got):
        del catalog["summary"]["seconds"]
    assert got == expected and got["summary"]["coherence"]["random_sae"] is not None
    RunLayout(on_ray).verify_catalog()
