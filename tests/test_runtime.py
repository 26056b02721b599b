"""The numpy SAE runtime against the torch TopKSAE it serves: encoding, reconstruction and FVU, activation levels,
loading from an SAE folder. Steering is tested in test_intervention.py, and on a real bundle's h in
test_service_engine.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import STATS_FILE
from recsae_core.sae.model import SAEConfig, TopKSAE
from recsae_core.sae.runtime import SAERuntime, SparseCodes, activation_levels, total_variance
from recsae_core.sae.stats import latent_statistics, save_stats

torch.set_num_threads(1)


def trained(seed: int = 0) -> tuple[TopKSAE, torch.Tensor]:
    """A TopK SAE started from the data, on correlated activations (a real h's scale, not unit noise)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=gen)
    h = torch.randn(300, 16, generator=gen) @ mix + 0.5
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=96, k=6), seed=seed)
    sae.init_from_data(h)
    return sae.eval(), h


def test_encode_equals_the_torch_sae():
    sae, h = trained()
    codes = SAERuntime.from_model(sae).encode(h.numpy())
    with torch.no_grad():
        dense = sae.encode(h).numpy()
    assert codes.indices.shape == codes.values.shape == (300, 6)
    assert codes.indices.dtype == np.int64 and codes.values.dtype == np.float32
    np.testing.assert_allclose(codes.dense(96), dense, rtol=1e-5, atol=1e-5)
    for row in range(len(h)):
        latents, values = codes.active(row)
        firing = np.flatnonzero(dense[row] > 0)
        assert sorted(latents.tolist()) == firing.tolist()  # the same latents fire ...
        assert np.all(np.diff(values) <= 0)  # ... listed strongest first
        np.testing.assert_allclose(values, dense[row, latents], rtol=1e-5, atol=1e-6)


def test_rows_with_fewer_than_k_positive_latents_end_in_zeros():
    sae, h = trained(1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-8.0, 0.5, 96))  # most pre-activations are negative
    codes = SAERuntime.from_model(sae).encode(h.numpy())
    with torch.no_grad():
        dense = sae.encode(h).numpy()
    short = [row for row in range(len(h)) if (dense[row] > 0).sum() < 6]
    assert short, "the constructed biases should leave some rows short of k firing latents"
    for row in short:
        n = int((dense[row] > 0).sum())
        assert np.all(codes.values[row, :n] > 0) and np.all(codes.values[row, n:] == 0)
        assert len(set(codes.indices[row].tolist())) == 6  # distinct ids, so scattering the zeros is harmless
        assert len(codes.active(row)[0]) == n
    np.testing.assert_allclose(codes.dense(96), dense, rtol=1e-5, atol=1e-5)


def test_reconstruction_and_per_row_fvu_match_the_torch_sae():
    sae, h = trained(2)
    runtime = SAERuntime.from_model(sae)
    variance = total_variance(h.numpy())
    assert variance == pytest.approx(float((h - h.mean(0)).pow(2).sum(1).mean()), rel=1e-6)
    seen = runtime.monitor(h.numpy(), variance)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(h))
        fvu = ((x_hat - h).pow(2).sum(1) / variance).numpy()
    np.testing.assert_allclose(seen.fvu, fvu, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(runtime.reconstruct(*seen.codes), x_hat.numpy(), rtol=1e-5, atol=1e-5)
    # The mean of the per-row FVUs is the batch FVU of the torch SAE (same denominator).
    assert float(seen.fvu.mean()) == pytest.approx(float((x_hat - h).pow(2).sum() / (h - h.mean(0)).pow(2).sum()))
    assert np.array_equal(seen.codes.indices, runtime.encode(h.numpy()).indices)
    assert total_variance(np.ones((4, 3), dtype=np.float32)) == 1e-12  # no spread: a floor, not a division by 0


def test_levels_bin_by_the_global_deciles():
    sae, h = trained(3)
    stats = latent_statistics(sae, h)
    runtime = SAERuntime.from_model(sae, stats)
    cuts = stats.global_deciles.numpy()
    values = np.concatenate([[0.0, -1.0], cuts, cuts + 1e-3, [cuts[-1] * 10]]).astype(np.float32)
    expected = [0, 0, *range(2, 11), *range(2, 11), 10]  # on a cut point: the level above it
    assert runtime.levels(values).tolist() == expected
    assert activation_levels(values, cuts.astype(np.float64)).tolist() == expected
    with pytest.raises(ValueError, match="latent statistics"):
        SAERuntime.from_model(sae).levels(values)


def test_load_from_an_sae_folder(tmp_path):
    sae, h = trained(4)
    stats = latent_statistics(sae, h)
    sae.save(tmp_path / "sae")
    save_stats(stats, tmp_path / "sae" / STATS_FILE)
    loaded = SAERuntime.load(tmp_path / "sae")
    direct = SAERuntime.from_model(sae, stats)
    for name in ("w_enc", "b_enc", "w_dec", "b_dec", "unit_scale", "deciles"):
        assert np.array_equal(getattr(loaded, name), getattr(direct, name)), name
    assert (loaded.k, loaded.n_latents, loaded.d_in) == (6, 96, 16)
    codes = loaded.encode(h.numpy())
    assert isinstance(codes, SparseCodes)
    assert np.array_equal(codes.indices, direct.encode(h.numpy()).indices)
    (tmp_path / "sae" / STATS_FILE).unlink()
    with pytest.raises(ArtifactError, match="file not found"):
        SAERuntime.load(tmp_path / "sae")
