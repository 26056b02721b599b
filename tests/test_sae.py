"""TopK SAE, its training and latent statistics, on real torch with small synthetic data."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from recsae_core.common.errors import ArtifactError, ConfigError
from recsae_core.common.layout import STATS_FILE
from recsae_core.sae.config import SAETrainConfig
from recsae_core.sae.model import CFG, WEIGHTS, SAEConfig, TopKSAE, fvu
from recsae_core.sae.runtime import activation_levels
from recsae_core.sae.stats import latent_statistics, load_stats, save_stats
from recsae_core.sae.train import evaluate_reconstruction, random_sae, train_sae

torch.set_num_threads(1)


def sparse_data(n: int, n_atoms: int = 24, active: int = 2, d: int = 16, seed: int = 0) -> torch.Tensor:
    """x = sparse non-negative codes @ a fixed random unit dictionary + a little noise (dictionary fixed by seed 0,
    samples by `seed`)."""
    dictionary = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(0))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(1000 + seed)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n, n_atoms).scatter_(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ dictionary + 0.01 * torch.randn(n, d, generator=g)


def small_sae(**overrides) -> TopKSAE:
    return TopKSAE(SAEConfig(**{"d_in": 16, "n_latents": 64, "k": 4, **overrides}), seed=0)


def run_config(**overrides) -> SAETrainConfig:
    """A 64-latent, k=4 run with what train_sae did before it took the pipeline's defaults (lr 1e-4, every epoch
    scored, no tolerance, no plateau drops, no time limit, no dead-latent rule), so each test states what it varies."""
    former = {"n_latents": 64, "k": 4, "lr": 1e-4, "select_every": 1, "select_tolerance": 0.0, "lr_drops": 0,
              "max_minutes": 0, "max_dead": 1.0, "progress": False}  # fmt: skip
    return SAETrainConfig(**{**former, **overrides})


def row_norms(sae: TopKSAE) -> torch.Tensor:
    return sae.W_dec.detach().norm(dim=1)


# ------------------------------------------------------------------ model


def test_config_defaults_and_refusals():
    cfg = SAEConfig(d_in=64)
    assert (cfg.n_latents, cfg.k, cfg.k_aux, cfg.aux_coef) == (1024, 8, 32, 1 / 32)
    with pytest.raises(ConfigError, match="k must be in"):
        SAEConfig(d_in=4, n_latents=8, k=9)
    with pytest.raises(ConfigError, match="d_in"):
        SAEConfig(d_in=0)
    with pytest.raises(ConfigError, match="aux_coef"):
        SAEConfig(d_in=4, aux_coef=float("nan"))


def test_shapes_and_init():
    sae = small_sae()
    assert sae.W_enc.shape == (16, 64) and sae.b_enc.shape == (64,)
    assert sae.W_dec.shape == (64, 16) and sae.b_dec.shape == (16,)
    torch.testing.assert_close(row_norms(sae), torch.ones(64))
    # The decoder starts as the (row-normalised) transpose of the encoder.
    enc_cols = sae.W_enc.detach().T / sae.W_enc.detach().T.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.detach(), enc_cols)
    x = sparse_data(32)
    out = sae(x)
    assert out.x_hat.shape == x.shape and out.z.shape == out.pre.shape == (32, 64)
    assert out.fvu.shape == out.aux_loss.shape == ()


def test_init_from_data_puts_b_dec_at_the_median():
    x = torch.randn(2001, 16) + 3.0
    x[:5] += 1000.0  # outliers move the mean, not the geometric median
    sae = small_sae()
    sae.init_from_data(x)
    assert (sae.b_dec - 3.0).abs().max() < 0.2


def test_topk_keeps_exactly_the_k_largest():
    sae = small_sae()
    x = torch.randn(50, 16) * 3
    pre = sae.pre_activations(x)
    z = sae.encode(x)
    assert torch.equal(pre, torch.relu(pre))
    assert ((z != 0).sum(1) == 4).all()  # random data: at least 4 positive pre-activations per row
    top = pre.topk(4, dim=1)
    torch.testing.assert_close(z.topk(4, dim=1).values, top.values)
    kept = torch.zeros_like(z, dtype=torch.bool).scatter_(1, top.indices, True)
    assert torch.equal(z[kept], pre[kept]) and (z[~kept] == 0).all()


def test_forward_algebra_and_fvu():
    sae = small_sae()
    x = sparse_data(64)
    out = sae(x)
    torch.testing.assert_close(out.x_hat, out.z @ sae.W_dec + sae.b_dec)
    expected = ((out.x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.fvu, expected)
    assert float(fvu(x, x)) == 0.0


def test_aux_loss_uses_only_dead_latents():
    sae = small_sae(k_aux=8)
    x = sparse_data(64)
    assert float(sae(x).aux_loss) == 0.0
    assert float(sae(x, torch.zeros(64, dtype=torch.bool)).aux_loss) == 0.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:4] = True
    out = sae(x, dead)
    # By hand: top-4 (n_dead < k_aux) dead pre-activations reconstruct the residual, scaled by 4/8.
    residual = x - out.x_hat
    recon = torch.zeros_like(out.pre)
    recon[:, :4] = out.pre[:, :4]
    recon = recon @ sae.W_dec
    expected = 0.5 * ((recon - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.aux_loss, expected)
    out.aux_loss.backward()
    assert sae.W_enc.grad[:, 4:].abs().max() == 0  # live latents get nothing from AuxK
    assert sae.W_enc.grad[:, :4].abs().max() > 0


# ------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path):
    sae = small_sae()
    sae.init_from_data(sparse_data(128))
    folder = tmp_path / "sae"
    sae.save(folder, hook_name="sasrec.h")
    cfg = json.loads((folder / CFG).read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["architecture"] == "topk"
    assert cfg["activation_fn_kwargs"] == {"k": 4} and cfg["apply_b_dec_to_input"] is True
    assert cfg["hook_name"] == "sasrec.h" and cfg["recsae"]["aux_coef"] == 1 / 32
    loaded = TopKSAE.load(folder)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    assert loaded.cfg == sae.cfg
    sae.save(folder)  # replacing an SAE folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not an SAE folder"):
        small_sae().save(tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "sae"
    small_sae().save(folder)
    return folder


def test_load_refuses_missing_files(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match=f"{WEIGHTS}: file not found"):
        TopKSAE.load(saved)
    (saved / CFG).unlink()
    with pytest.raises(ArtifactError, match=f"{CFG}: file not found"):
        TopKSAE.load(saved)


def test_load_refuses_corrupt_safetensors(saved):
    (saved / WEIGHTS).write_bytes(b"\x00\x01not safetensors at all")
    with pytest.raises(ArtifactError, match=f"{WEIGHTS}: cannot read weights"):
        TopKSAE.load(saved)


def test_load_refuses_bad_json_and_shape_mismatch(saved):
    cfg = json.loads((saved / CFG).read_text())
    cfg["recsae"]["n_latents"] = 32
    cfg["d_sae"] = 32
    (saved / CFG).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=rf"{WEIGHTS}: W_enc has shape \(16, 64\), but .*{CFG} implies \(16, 32\)"):
        TopKSAE.load(saved)
    cfg["d_sae"] = 64
    (saved / CFG).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=f"{CFG}: d_sae=64 disagrees"):
        TopKSAE.load(saved)
    cfg["recsae"]["k"] = 0
    (saved / CFG).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=f"{CFG}: bad SAE config"):
        TopKSAE.load(saved)
    (saved / CFG).write_text("{not json")
    with pytest.raises(ArtifactError, match=f"{CFG}: not valid JSON"):
        TopKSAE.load(saved)


def test_load_refuses_nan_weights(saved):
    sae = small_sae()
    state = {n: getattr(sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    state["b_dec"][3] = math.nan
    save_file(state, str(saved / WEIGHTS))
    with pytest.raises(ArtifactError, match=f"{WEIGHTS}: b_dec contains NaN"):
        TopKSAE.load(saved)
    del state["b_dec"]
    save_file(state, str(saved / WEIGHTS))
    with pytest.raises(ArtifactError, match=rf"{WEIGHTS}: missing tensors \['b_dec'\]"):
        TopKSAE.load(saved)


# ------------------------------------------------------------------ training


def test_training_reaches_low_fvu_and_keeps_decoder_unit_norm():
    x, valid = sparse_data(4096), sparse_data(1024, seed=1)
    result = train_sae(x, run_config(lr=1e-2, batch_size=256, epochs=6, patience=6), valid=valid)
    assert result.epochs_trained == 6 and len(result.history) == 6
    assert result.history[-1]["valid_fvu"] < 0.1
    assert result.history[0]["valid_fvu"] > result.history[-1]["valid_fvu"]
    assert {"epoch", "fvu", "aux_loss", "dead_fraction", "valid_fvu", "score"} <= set(result.history[0])
    assert result.best_score == -min(h["valid_fvu"] for h in result.history)
    assert result.samples_per_second > 0 and not result.sae.training
    torch.testing.assert_close(row_norms(result.sae), torch.ones(64))
    metrics = evaluate_reconstruction(result.sae, valid, batch_size=300)
    assert metrics["fvu"] == pytest.approx(result.history[result.best_epoch - 1]["valid_fvu"], rel=1e-4)
    assert 0 < metrics["mean_l0"] <= 4


def test_auxk_revives_dead_latents():
    x = sparse_data(4096)
    dead_fractions = {}
    for coef in (0.0, 1 / 32):
        cfg = SAEConfig(d_in=16, n_latents=64, k=4, aux_coef=coef, dead_after=512)
        start = random_sae(cfg, x, seed=0)
        with torch.no_grad():  # latents 16.. are dwarfed by 0..15 and never reach the top-k
            start.W_enc[:, 16:] *= 0.01
            start.b_enc[:16] += 0.5
        assert evaluate_reconstruction(start, x)["dead_fraction"] == 0.75
        result = train_sae(x, run_config(lr=1e-2, batch_size=256, epochs=3, patience=3, dead_after=512), init=start)
        dead_fractions[coef] = result.history[-1]["dead_fraction"]
    assert dead_fractions[0.0] == 0.75  # no gradient ever reaches a latent outside the top-k
    assert dead_fractions[1 / 32] < 0.5


def test_early_stopping_keeps_the_best_selected_epoch():
    x = sparse_data(1024)
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.95])
    snapshots = []

    def select(sae: TopKSAE, row: dict[str, float]) -> float:
        snapshots.append(sae.W_enc.detach().clone())
        return next(scores)

    result = train_sae(x, run_config(lr=1e-2, batch_size=256, epochs=10, patience=2), select=select)
    assert (result.best_epoch, result.epochs_trained, result.best_score) == (2, 4, 0.9)
    assert result.stopped_by == "patience"
    assert torch.equal(result.sae.W_enc, snapshots[1])


def test_selection_tolerance_prefers_the_better_reconstruction_among_tied_scores():
    from recsae_core.sae.selection import _keep

    tol = SAETrainConfig(select_tolerance=0.01, min_fvu_gain=0.005)
    strict = SAETrainConfig(select_tolerance=0.0)
    # Kept: score 0.200 at FVU 0.20. A later epoch at 0.199 (within 1%) with FVU 0.15 replaces it...
    assert _keep(0.199, 0.15, top_score=0.200, kept_score=0.200, kept_fvu=0.20, tc=tol)
    # ...but not without a clear reconstruction gain, nor outside the tolerance, nor without a tolerance.
    assert not _keep(0.199, 0.1995, top_score=0.200, kept_score=0.200, kept_fvu=0.20, tc=tol)
    assert not _keep(0.190, 0.10, top_score=0.200, kept_score=0.200, kept_fvu=0.20, tc=tol)
    assert not _keep(0.199, 0.10, top_score=0.200, kept_score=0.200, kept_fvu=0.20, tc=strict)
    # A new best that pushes the kept checkpoint out of the band replaces it even with a worse FVU.
    assert _keep(0.220, 0.25, top_score=0.200, kept_score=0.200, kept_fvu=0.20, tc=tol)


def test_select_every_scores_only_every_nth_epoch_and_the_last():
    x = sparse_data(512)
    calls = []
    result = train_sae(
        x, run_config(batch_size=256, epochs=7, patience=10, select_every=3),
        select=lambda sae, row: calls.append(1) or float(len(calls)),
    )  # fmt: skip
    assert [row["epoch"] for row in result.history if "score" in row] == [3, 6, 7]
    assert (result.best_epoch, result.epochs_trained, result.stopped_by) == (7, 7, "epochs")


def test_plateau_lowers_the_learning_rate_before_stopping():
    x = sparse_data(512)
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1])
    result = train_sae(
        x, run_config(lr=1e-2, batch_size=256, epochs=20, patience=2, lr_drops=1), select=lambda sae, row: next(scores)
    )
    # Epoch 1 is kept; epochs 2-3 exhaust the patience once (lr x0.3), epochs 4-5 a second time (stop).
    assert (result.best_epoch, result.epochs_trained, result.stopped_by) == (1, 5, "patience")
    assert [row.get("lr") for row in result.history] == [None, None, pytest.approx(3e-3), None, None]


def test_wall_clock_safety_stop_ends_training_and_says_so(capsys):
    x = sparse_data(1024)
    result = train_sae(x, run_config(batch_size=256, epochs=50, patience=50, max_minutes=1e-8))
    assert (result.epochs_trained, result.stopped_by) == (1, "wall_clock_safety")
    assert "wall-clock safety stop" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="max_minutes"):
        SAETrainConfig(max_minutes=-1)
    with pytest.raises(ConfigError, match="select_tolerance"):
        SAETrainConfig(select_tolerance=1.5)


def test_wall_clock_safety_stop_is_checked_on_epochs_that_are_not_scored():
    x = sparse_data(1024)
    result = train_sae(x, run_config(batch_size=256, epochs=50, patience=50, select_every=10, max_minutes=1e-8))
    # The epoch that ran out of time is scored and can be kept, like a last epoch.
    assert (result.epochs_trained, result.stopped_by, result.best_epoch) == (1, "wall_clock_safety", 1)
    assert "score" in result.history[0]


def test_sample_budget_ends_training_after_the_epoch_that_reaches_it():
    x = sparse_data(1024)
    result = train_sae(x, run_config(batch_size=256, epochs=50, patience=50, select_every=10, max_samples=2500))
    # 1024 samples per epoch: the third epoch reaches 2500; it is scored, like a last epoch.
    assert (result.epochs_trained, result.stopped_by, result.samples_seen) == (3, "samples", 3072)
    assert "score" in result.history[2]
    unbounded = train_sae(x, run_config(batch_size=256, epochs=4, patience=50, max_samples=0))
    assert (unbounded.epochs_trained, unbounded.stopped_by) == (4, "epochs")


def test_checkpoints_with_too_many_dead_latents_lose_whatever_their_score():
    x = sparse_data(512)
    # (score, dead share) per epoch; select writes the dead share into the row train_sae then reads.
    script = iter([(0.9, 0.5), (0.95, 0.4), (0.1, 0.0), (0.99, 0.3), (0.2, 0.01), (0.15, 0.0), (0.14, 0.0)])

    def select(sae: TopKSAE, row: dict[str, float]) -> float:
        score, row["valid_dead_fraction"] = next(script)
        return score

    result = train_sae(x, run_config(batch_size=256, epochs=7, patience=3, max_dead=0.05), select=select, valid=x)
    # Epoch 3 (0.1) is the first within max_dead and beats 0.9 and 0.95; epoch 4 (0.99, too dead) does not; epoch 5
    # (0.2) beats epoch 3 among the ones within max_dead.
    assert (result.best_epoch, result.best_score, result.epochs_trained) == (5, 0.2, 7)
    scripted = iter([(0.9, 0.5), (0.95, 0.4), (0.1, 0.0), (0.99, 0.3), (0.2, 0.01), (0.15, 0.0), (0.14, 0.0)])

    def without_rule(sae: TopKSAE, row: dict[str, float]) -> float:
        score, row["valid_dead_fraction"] = next(scripted)
        return score

    result = train_sae(x, run_config(batch_size=256, epochs=7, patience=3, max_dead=1.0), select=without_rule, valid=x)
    assert (result.best_epoch, result.best_score) == (4, 0.99)


def test_same_seed_and_budget_give_the_same_sae_on_a_slow_machine(monkeypatch, tmp_path):
    """Issue 17: the SAE must not depend on how busy the machine is. A run slowed down (every batch sleeps, and its
    clock says each epoch took 40 s, as on a machine shared with many jobs) trains, bit for bit, the SAE a quiet run
    does with the same seed and sample budget; under the former 5-minute budget it would have stopped after 8
    epochs, and the default safety stop (60 min) does not fire."""
    import recsae_core.sae.train as train_module

    x = sparse_data(2048)
    config = run_config(lr=1e-2, batch_size=256, epochs=200, patience=50, select_every=2, max_samples=30_000,
                        max_minutes=SAETrainConfig.max_minutes)  # fmt: skip
    quiet = train_sae(x, config)
    quiet.sae.save(tmp_path / "quiet")

    batches, ticks = train_module.iter_batches, iter(range(10**6))

    def slow_batches(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            time.sleep(0.002)
            yield batch

    monkeypatch.setattr(train_module, "iter_batches", slow_batches)
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: 40.0 * next(ticks)))
    slow = train_sae(x, config)
    slow.sae.save(tmp_path / "slow")

    assert (quiet.stopped_by, quiet.epochs_trained, quiet.samples_seen) == ("samples", 15, 30_720)
    assert (slow.stopped_by, slow.epochs_trained, slow.best_epoch) == ("samples", 15, quiet.best_epoch)
    assert slow.seconds > 8 * 40 > quiet.seconds  # the slow run's clock really did read past the former budget
    assert slow.history == quiet.history
    for name in (WEIGHTS, CFG):
        assert (tmp_path / "slow" / name).read_bytes() == (tmp_path / "quiet" / name).read_bytes(), name


def test_run_config_resolves_derived_values_in_one_place():
    config = SAETrainConfig(n_latents=64, k=4, dead_after=80_000)
    small = config.resolve(1000)
    assert (small.batch_size, small.select_every, small.dead_after) == (64, 50, 1000)
    large = config.resolve(1_000_000)
    assert (large.batch_size, large.select_every, large.dead_after) == (4096, 1, 80_000)
    assert large.resolve(1_000_000) == large  # resolving twice changes nothing
    explicit = SAETrainConfig(batch_size=300, select_every=2).resolve(1000)
    assert (explicit.batch_size, explicit.select_every) == (300, 2)
    assert small.sae_config(16) == SAEConfig(d_in=16, n_latents=64, k=4, dead_after=1000)
    assert (SAETrainConfig().max_seconds, SAETrainConfig(max_minutes=0).max_seconds) == (3600.0, None)


def test_run_config_refuses_bad_values_by_field():
    cases = {
        "SAETrainConfig.k 9 exceeds SAETrainConfig.n_latents 8": {"n_latents": 8, "k": 9},
        "SAETrainConfig.n_latents: expected a positive integer, got 0": {"n_latents": 0},
        "SAETrainConfig.lr: expected a positive finite number, got nan": {"lr": float("nan")},
        "SAETrainConfig.epochs: expected a positive integer, got '2.5'": {"epochs": 2.5},
        "SAETrainConfig.max_dead: expected a number in [0, 1], got 1.5": {"max_dead": 1.5},
        "SAETrainConfig.lr_drop_factor must be below 1": {"lr_drop_factor": 1.0},
    }
    for message, values in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            SAETrainConfig(**values)


def test_training_from_an_init_sae_of_another_shape_is_refused():
    x = sparse_data(256)
    with pytest.raises(ConfigError, match="init SAE has n_latents=64, k=4; the config asks for 32, 4"):
        train_sae(x, run_config(n_latents=32, epochs=1), init=small_sae())


def test_every_run_config_field_has_a_one_line_docstring():
    from recsae_core.common.cli_config import field_docs

    source = inspect.getsource(SAETrainConfig)
    docs = field_docs(SAETrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(SAETrainConfig)}
    for name, doc in docs.items():
        assert f'"""{doc}"""' in source, f"{name}: docstring is not one line"


def test_training_from_shards_and_refusing_one_shot_iterators():
    x = sparse_data(1000)
    shards = [x[:300], x[300:700], x[700:]]
    train = run_config(batch_size=128, epochs=1, patience=1)
    result = train_sae(shards, train)
    assert result.epochs_trained == 1
    with pytest.raises(ConfigError, match="one-shot iterator"):
        train_sae(iter(shards), train)
    with pytest.raises(ConfigError, match="batch_size"):
        SAETrainConfig(batch_size=1)


def test_random_sae_is_deterministic():
    x = sparse_data(256)
    a, b = random_sae(SAEConfig(d_in=16), x, seed=3), random_sae(SAEConfig(d_in=16), x, seed=3)
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.b_dec, b.b_dec)
    assert not torch.equal(a.W_enc, random_sae(SAEConfig(d_in=16), x, seed=4).W_enc)


# ------------------------------------------------------------------ statistics


def axis_sae() -> TopKSAE:
    """d=2, latents = +e1, +e2, -e1, -e2, k=1, no biases: z is the largest signed coordinate."""
    sae = TopKSAE(SAEConfig(d_in=2, n_latents=4, k=1), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, -1, 0], [0, 1, 0, -1]]))
        sae.W_dec.copy_(sae.W_enc.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_latent_statistics_by_hand(tmp_path):
    x = torch.tensor([[3.0, 1], [1, 2], [-1, 0], [5, 0], [0, 0]])
    # z: latent 0 -> 3, 5; latent 1 -> 2; latent 2 -> 1; latent 3 never; the zero row fires nothing.
    stats = latent_statistics(axis_sae(), x, batch_size=2)
    assert stats.n_samples == 5 and stats.dead_fraction == 0.25
    torch.testing.assert_close(stats.frequency, torch.tensor([0.4, 0.2, 0.2, 0.0]))
    torch.testing.assert_close(stats.mean_activation, torch.tensor([4.0, 2, 1, 0]))
    torch.testing.assert_close(stats.max_activation, torch.tensor([5.0, 2, 1, 0]))
    expected_std = torch.tensor([[3.0, 0, 0, 5, 0], [0, 2, 0, 0, 0], [0, 0, 1, 0, 0], [0] * 5]).std(1, correction=0)
    torch.testing.assert_close(stats.std_activation, expected_std)
    q = torch.arange(1, 10) / 10
    torch.testing.assert_close(stats.deciles[0], torch.quantile(torch.tensor([3.0, 5]), q))
    torch.testing.assert_close(stats.deciles[1], torch.full((9,), 2.0))
    assert torch.equal(stats.deciles[3], torch.zeros(9))
    torch.testing.assert_close(stats.global_deciles, torch.quantile(torch.tensor([1.0, 2, 3, 5]), q))
    values = np.array([0.0, 1.0, 1.05, 2.5, 5.0, 9.0], dtype=np.float32)
    levels = activation_levels(values, stats.global_deciles.numpy())
    assert levels.tolist() == [0, 1, 1, 6, 10, 10]

    path = tmp_path / STATS_FILE
    save_stats(stats, path)
    back = load_stats(path, n_latents=4)
    assert back.n_samples == 5
    for name in ("frequency", "mean_activation", "max_activation", "std_activation", "deciles", "global_deciles"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    with pytest.raises(ArtifactError, match=f"{STATS_FILE}: statistics cover 4 latents, but the SAE has 8"):
        load_stats(path, n_latents=8)


def test_load_stats_refusals(tmp_path):
    path = tmp_path / STATS_FILE
    with pytest.raises(ArtifactError, match="file not found"):
        load_stats(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=f"{STATS_FILE}: cannot read"):
        load_stats(path)
    stats = latent_statistics(axis_sae(), torch.tensor([[3.0, 1], [1, 2]]))
    stats.deciles = stats.deciles[:, :5]
    save_stats(stats, path)
    with pytest.raises(ArtifactError, match=r"deciles has shape \(4, 5\), expected \(4, 9\)"):
        load_stats(path)
    stats.deciles = torch.full((4, 9), math.nan)
    save_stats(stats, path)
    with pytest.raises(ArtifactError, match="deciles contains NaN"):
        load_stats(path)


def test_select_receives_the_epochs_reconstruction_metrics_on_valid():
    x = sparse_data(512)
    rows: list[dict[str, float]] = []
    train_sae(
        x, run_config(batch_size=256, epochs=3, patience=5),
        select=lambda sae, row: rows.append(dict(row)) or -row["valid_fvu"], valid=x[:200],
    )  # fmt: skip
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert 0 <= row["valid_dead_fraction"] <= 1 and 0 < row["valid_fvu"] < 2
