"""The CUDA path: every offline stage that accepts ``--device cuda`` gives what the CPU gives.

CI has no GPU, so these tests skip there; they run wherever torch sees a CUDA device (see docs/benchmarks.md,
"CUDA path", for the run on an H200). Nothing here is mocked: real ML-100K, real models, real kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import MODELS, untrained

from recsae_core.recommenders.config import TrainConfig
from recsae_core.recommenders.evaluate import evaluate, make_batch
from recsae_core.recommenders.lightgcn import LightGCN
from recsae_core.recommenders.train import train_recommender
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.edits import Edit, EditBounds, validate_edits
from recsae_core.sae.model import SAEConfig, TopKSAE
from recsae_core.sae.runtime import SAERuntime
from recsae_core.sae.stats import latent_statistics
from recsae_core.sae.train import evaluate_reconstruction, train_sae

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path is checked on GPU")

USERS = np.arange(0, 900, 7)


@pytest.mark.parametrize("name", MODELS)
def test_recommender_forward_matches_cpu(name, ml100k, split_for):
    split = split_for(name)
    model = untrained(name, ml100k, split)
    with torch.no_grad():
        h_cpu = model.represent(make_batch(model, USERS, split.seen("test"), "cpu"))
        s_cpu = model.score(h_cpu)
        model.cuda()
        if isinstance(model, LightGCN):
            model.freeze()  # propagation itself on the GPU
        h_gpu = model.represent(make_batch(model, USERS, split.seen("test"), "cuda"))
        s_gpu = model.score(h_gpu)
    assert h_gpu.is_cuda
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_training_on_cuda_learns_and_evaluates_like_cpu(name, ml100k, split_for):
    split = split_for(name)
    model = untrained(name, ml100k, split)
    before = evaluate(model, split, "valid")["ndcg@10"]
    result = train_recommender(model, split, TrainConfig(epochs=3, patience=3, device="cuda", progress=False))
    assert next(model.parameters()).is_cuda
    assert result.best_valid["ndcg@10"] > before
    on_gpu = evaluate(model, split, "valid", device="cuda")
    on_cpu = evaluate(model.cpu(), split, "valid", device="cpu")
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=2e-3), key


def gaussian_activations(n: int = 20_000, d: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=gen)
    codes = torch.rand(n, 64, generator=gen) * (torch.rand(n, 64, generator=gen) < 0.08)
    return codes @ basis + 0.05 * torch.randn(n, d, generator=gen)


def test_sae_forward_and_statistics_match_cpu():
    x = gaussian_activations()
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8), seed=1).eval()
    with torch.no_grad():
        z_cpu, z_gpu = sae.encode(x), sae.cuda().encode(x.cuda())
        torch.testing.assert_close(z_gpu.cpu(), z_cpu, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae.decode(z_gpu).cpu(), sae.cpu().decode(z_cpu), atol=1e-4, rtol=1e-4)
    stats_cpu = latent_statistics(sae, x)
    stats_gpu = latent_statistics(sae.cuda(), x)
    torch.testing.assert_close(stats_gpu.frequency.cpu(), stats_cpu.frequency, atol=1e-4, rtol=0)
    torch.testing.assert_close(stats_gpu.max_activation.cpu(), stats_cpu.max_activation, atol=1e-3, rtol=1e-4)


def test_sae_training_on_cuda_reconstructs_and_saves_for_cpu(tmp_path):
    x = gaussian_activations()
    result = train_sae(
        x,
        SAETrainConfig(n_latents=128, k=8, lr=3e-3, batch_size=512, epochs=15, patience=15, select_every=1,
                       select_tolerance=0.0, lr_drops=0, max_minutes=0, max_dead=1.0, device="cuda", progress=False),
    )  # fmt: skip
    sae = result.sae
    assert sae.device.type == "cuda"
    fvu = evaluate_reconstruction(sae, x)["fvu"]
    assert fvu < 0.2, fvu
    sae.save(tmp_path / "sae")
    back = TopKSAE.load(tmp_path / "sae", device="cpu")
    assert evaluate_reconstruction(back, x)["fvu"] == pytest.approx(fvu, abs=1e-4)


def test_interventions_on_cuda_match_the_served_runtime():
    """Steering is served by the numpy runtime on the CPU; the same algebra, h + (z' - z) W_dec, computed on CUDA
    from the torch SAE's own code, agrees with it."""
    x = gaussian_activations(n=256)
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8), seed=2).eval()
    stats = latent_statistics(sae, gaussian_activations())
    edits = validate_edits(
        [Edit(latent=3, op="ablate"), Edit(latent=7, op="nudge", value=1.5, unit="std"),
         Edit(latent=11, op="pin", value=0.5, unit="max"), Edit(latent=20, op="scale", value=2.0)],
        n_latents=128, bounds=EditBounds(), stats=stats,
    )  # fmt: skip
    per_row = [edits if i % 2 else [] for i in range(len(x))]
    out_cpu = SAERuntime.from_model(sae, stats).steer(x.numpy(), per_row)
    gpu = sae.cuda()
    with torch.no_grad():
        z = gpu.encode(x.cuda())
        z_new = z.clone()
        for row, row_edits in enumerate(per_row):
            for e in row_edits:
                v = e.value * {"raw": 1.0, "std": float(stats.std_activation[e.latent]),
                               "max": float(stats.max_activation[e.latent])}[e.unit]  # fmt: skip
                now = z[row, e.latent]
                z_new[row, e.latent] = {"ablate": 0.0, "pin": v, "nudge": now + v, "scale": now * v}[e.op]
        out_gpu = x.cuda() + (z_new - z) @ gpu.W_dec
    torch.testing.assert_close(out_gpu.cpu(), torch.from_numpy(out_cpu.h), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_new.cpu(), torch.from_numpy(out_cpu.z_new), atol=1e-4, rtol=1e-4)
    unchanged = torch.arange(len(x)) % 2 == 0
    assert torch.equal(out_gpu.cpu()[unchanged], x[unchanged])  # rows without edits pass through bit for bit
    assert torch.equal(torch.from_numpy(out_cpu.h)[unchanged], x[unchanged])
