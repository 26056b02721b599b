"""Error-preserving interventions (the SAE runtime's steer): hand-checked algebra for every op and unit, exact
pass-through, batching, the offline transform built on it, the op table, and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsae_core.common.errors import ArtifactError, ConfigError
from recsae_core.debias.screen import policy_transform
from recsae_core.sae.edits import OP_TABLE, OPS, Edit, EditBounds, apply_ops, validate_edits
from recsae_core.sae.model import SAEConfig, TopKSAE
from recsae_core.sae.runtime import SAERuntime
from recsae_core.sae.stats import LatentStats, latent_statistics

torch.set_num_threads(1)


def axis_sae() -> TopKSAE:
    """d=2, latents = +e1, +e2, -e1, -e2, k=1, no biases: z keeps the largest signed coordinate only, so the
    reconstruction of [3, 1] is [3, 0] and its error is [0, 1]."""
    sae = TopKSAE(SAEConfig(d_in=2, n_latents=4, k=1), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, -1, 0], [0, 1, 0, -1]]))
        sae.W_dec.copy_(sae.W_enc.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def hand_stats(std: float = 0.5, peak: float = 4.0, n_latents: int = 4) -> LatentStats:
    full = torch.full((n_latents,), 1.0)
    return LatentStats(
        frequency=full * 0.5,
        mean_activation=full,
        max_activation=full * peak,
        std_activation=full * std,
        deciles=torch.ones(n_latents, 9),
        global_deciles=torch.ones(9),
        n_samples=10,
    )


H = np.array([[3.0, 1.0]], dtype=np.float32)


def axis_runtime() -> SAERuntime:
    return SAERuntime.from_model(axis_sae(), hand_stats())


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (Edit(0, "ablate"), [0.0, 1.0]),  # z0: 3 -> 0; the error [0, 1] stays
        (Edit(1, "pin", 4.0), [3.0, 5.0]),  # inactive latent set to 4 along +e2
        (Edit(0, "pin", 1.0), [1.0, 1.0]),
        (Edit(0, "nudge", -1.0), [2.0, 1.0]),
        (Edit(2, "nudge", 1.0), [2.0, 1.0]),  # nudging an inactive latent turns it on (-e1)
        (Edit(0, "scale", 0.5), [1.5, 1.0]),
        (Edit(1, "scale", 3.0), [3.0, 1.0]),  # scaling an inactive latent changes nothing
        (Edit(0, "nudge", 2.0, "std"), [4.0, 1.0]),  # 2 std x 0.5 = +1
        (Edit(3, "pin", 2.0, "std"), [3.0, 0.0]),  # 2 std = 1 along -e2
        (Edit(0, "pin", 0.5, "max"), [2.0, 1.0]),  # 0.5 x max 4 = 2
        (Edit(1, "nudge", -0.25, "max"), [3.0, 0.0]),  # -1 along +e2
    ],
)
def test_each_op_and_unit_by_hand(edit, expected):
    result = axis_runtime().steer(H, [[edit]])
    np.testing.assert_allclose(result.z, [[3.0, 0, 0, 0]], rtol=1.3e-6, atol=1e-5)
    np.testing.assert_allclose(result.h, [expected], rtol=1.3e-6, atol=1e-5)
    # h' - h is exactly the decoded change of the code.
    np.testing.assert_allclose(result.h - H, (result.z_new - result.z) @ axis_runtime().w_dec, rtol=1.3e-6, atol=1e-5)


def test_several_edits_on_one_row_combine():
    edits = [Edit(0, "scale", 2.0), Edit(1, "pin", 1.0), Edit(2, "nudge", 1.0, "std")]
    result = axis_runtime().steer(H, [edits])
    # z' = [6, 1, 0.5, 0]: h' = [3, 1] + [3, 0] + [0, 1] + [-0.5, 0]
    np.testing.assert_allclose(result.z_new, [[6.0, 1.0, 0.5, 0.0]], rtol=1.3e-6, atol=1e-5)
    np.testing.assert_allclose(result.h, [[5.5, 2.0]], rtol=1.3e-6, atol=1e-5)


def test_op_table_algebra():
    """Every op of the table, applied elementwise as the runtime applies it, in float32."""
    current = np.array([3.0, 3.0, 3.0, 3.0], dtype=np.float32)
    operand = np.array([0.0, 2.0, 2.0, 2.0], dtype=np.float32)
    edited = apply_ops(np.asarray(OPS), current, operand)
    assert OPS == ("ablate", "pin", "nudge", "scale") and tuple(OP_TABLE) == OPS
    assert edited.dtype == np.float32 and edited.tolist() == [0.0, 2.0, 5.0, 6.0]
    with pytest.raises(ValueError, match=r"unknown ops \['boost'\]"):
        apply_ops(np.asarray(["pin", "boost"]), current[:2], operand[:2])


def trained_like() -> tuple[TopKSAE, LatentStats, torch.Tensor]:
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4), seed=0)
    h = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)) * 2
    sae.init_from_data(h)
    return sae, latent_statistics(sae, h), h


def test_no_edits_returns_h_bit_identical():
    sae, stats, h = trained_like()
    runtime, h = SAERuntime.from_model(sae, stats), h.numpy()
    result = runtime.steer(h, [[] for _ in h])
    assert np.array_equal(result.h, h) and np.array_equal(result.z_new, result.z)
    assert not np.shares_memory(result.h, h)  # a copy: callers may modify it
    h64 = h.astype(np.float64)
    steered64 = runtime.steer(h64, [[] for _ in h64]).h
    assert steered64.dtype == np.float64 and np.array_equal(steered64, h64)
    assert policy_transform(runtime, []) is None  # the offline transform of no edits leaves h alone


def test_per_row_edits_match_single_row_results():
    sae, stats, h = trained_like()
    runtime, h = SAERuntime.from_model(sae, stats), h[:3].numpy()
    active = int(runtime.steer(h[:1], [[]]).z[0].argmax())
    per_row = [[Edit(active, "ablate")], [], [Edit(5, "nudge", 1.5, "std"), Edit(active, "scale", 2.0)]]
    batch = runtime.steer(h, per_row)
    assert np.array_equal(batch.h[1], h[1])
    for row, edits in enumerate(per_row):
        single = runtime.steer(h[row : row + 1], [edits])
        np.testing.assert_allclose(batch.h[row], single.h[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(batch.z_new[row], single.z_new[0], rtol=0, atol=1e-6)
    assert not np.allclose(batch.h[0], h[0]) and not np.allclose(batch.h[2], h[2])
    assert batch.z_new[0, active] == 0


def test_policy_transform_applies_the_same_edits_to_every_row():
    sae, stats, h = trained_like()
    runtime = SAERuntime.from_model(sae, stats)
    edits = [Edit(7, "nudge", 1.0, "std")]
    steered = policy_transform(runtime, edits)(h)
    assert isinstance(steered, torch.Tensor)
    np.testing.assert_array_equal(steered.numpy(), runtime.steer(h.numpy(), [edits] * len(h)).h)
    delta = steered - h
    expected = (stats.std_activation[7] * sae.W_dec[7]).detach().expand_as(delta)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-5)


def test_runtime_checks_inputs():
    sae, stats, h = trained_like()
    with pytest.raises(ArtifactError, match="cover 8 latents, but the SAE has 64"):
        SAERuntime.from_model(sae, hand_stats(n_latents=8))
    runtime, h = SAERuntime.from_model(sae, stats), h.numpy()
    with pytest.raises(ValueError, match=r"shape \(B, 16\)"):
        runtime.steer(h[:, :8], [[]] * len(h))
    with pytest.raises(ValueError, match="2 edit lists for 40 rows"):
        runtime.steer(h, [[], []])
    with pytest.raises(ValueError, match="needs the SAE's latent statistics"):
        SAERuntime.from_model(sae).steer(h, [[]] * len(h))
    # Edits reach the runtime validated: the offline transform validates as the service does.
    with pytest.raises(ConfigError, match="edit 0"):
        policy_transform(runtime, [Edit(99, "ablate")])


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ([Edit(0, "boost", 1.0)], r"edit 0 .*unknown op 'boost'; expected one of ablate, pin, nudge, scale"),
        ([Edit(0, "pin", 1.0, "sigma")], r"unknown unit 'sigma'; expected one of raw, std, max"),
        ([Edit(4, "ablate")], r"latent 4 out of range \[0, 4\)"),
        ([Edit(-1, "ablate")], r"latent -1 out of range"),
        ([Edit(1.0, "ablate")], r"latent must be an integer, got 1.0"),
        ([Edit(True, "ablate")], r"latent must be an integer, got True"),
        ([Edit(0, "pin", math.nan)], r"value must be finite, got nan"),
        ([Edit(0, "nudge", math.inf, "std")], r"value must be finite, got inf"),
        ([Edit(0, "pin", "2")], r"value must be a number, got '2'"),
        ([Edit(0, "nudge", 10.5, "std")], r"\|value\| 10.5 std exceeds the bound of 10.0 std"),
        ([Edit(0, "pin", -6.0)], r"\|value\| is 12 std of latent 0, beyond the bound of 10.0 std"),
        ([Edit(0, "nudge", 2.0, "max")], r"\|value\| is 16 std of latent 0"),
        ([Edit(0, "scale", 11.0)], r"scale factor 11.0 outside \[-10.0, 10.0\]"),
        ([Edit(0, "scale", 2.0, "std")], r"unit 'std' does not apply to scale; units apply to pin and nudge only"),
        ([Edit(0, "ablate", 1.0)], r"ablate takes no value \(got 1.0\)"),
        ([Edit(0, "ablate", unit="max")], r"unit 'max' does not apply to ablate"),
        ([Edit(2, "pin", 1.0), Edit(2, "nudge", 1.0)], r"edit 1 .*conflicts with edit 0 on the same latent 2"),
        ([Edit(3, "ablate"), Edit(1, "pin", 1.0), Edit(3, "pin", 1.0)], r"edit 2 .*conflicts with edit 0"),
        ([Edit(i % 4, "ablate") for i in range(5)], r"5 edits on one row; at most 4 are allowed"),
    ],
)
def test_validation_errors(edits, message):
    bounds = EditBounds(max_edits=4)
    with pytest.raises(ConfigError, match=message):
        validate_edits(edits, n_latents=4, bounds=bounds, stats=hand_stats())


def test_validation_without_stats_and_for_latents_that_never_fired():
    # Without statistics only std-unit magnitudes can be bounded.
    assert validate_edits([Edit(0, "pin", 1e3)], n_latents=4) == [Edit(0, "pin", 1e3)]
    with pytest.raises(ConfigError, match="exceeds the bound"):
        validate_edits([Edit(0, "pin", 11.0, "std")], n_latents=4)
    dead = hand_stats()
    dead.std_activation[1] = 0.0
    with pytest.raises(ConfigError, match="latent 1 never fired in the statistics"):
        validate_edits([Edit(1, "nudge", 1.0)], n_latents=4, stats=dead)
    # Zero-valued pins, ablations and scales of a dead latent are harmless and allowed.
    ok = [Edit(1, "pin", 0.0)], [Edit(1, "ablate")], [Edit(1, "scale", 3.0)]
    for edits in ok:
        assert validate_edits(edits, n_latents=4, stats=dead) == edits


def test_edit_from_dict():
    assert Edit.from_dict({"latent": 3, "op": "nudge", "value": 2, "unit": "std"}) == Edit(3, "nudge", 2, "std")
    with pytest.raises(ConfigError, match=r"unknown keys \['weight'\]"):
        Edit.from_dict({"latent": 3, "op": "pin", "weight": 1})
    with pytest.raises(ConfigError, match=r"missing keys \['op'\]"):
        Edit.from_dict({"latent": 3})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        Edit.from_dict([3, "pin"])
