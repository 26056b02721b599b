"""The served SAE, in numpy: sparse encoding, reconstruction error, error-preserving steering, activation levels.

The one implementation of each: the service runs it on every request, and the offline jobs (the de-biasing sweep,
concept sampling) use the same code, so what they measure is what is served. Torch (`model.TopKSAE`) is for
training. Numpy on the k active decoder rows, because at the batch sizes of live traffic torch's per-operator
dispatch cost more than the arithmetic.

    sae = SAERuntime.load(folder)               # or SAERuntime.from_model(topk_sae, stats)
    codes = sae.encode(h)                       # SparseCodes: (B, k) latent ids and activations, strongest first
    seen = sae.monitor(h, variance)             # the codes and each row's reconstruction FVU
    steered = sae.steer(h, edits_per_row)       # h' = h + (z' - z) W_dec; rows without edits come back as they were
    shifted = sae.shift_pre(h, shift, strength) # PopSteer: TopK(ReLU(pre + s * shift)) decoded, latents drop or enter
    sae.levels(seen.codes.values)               # RecSAE activation levels 1..10
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import STATS_FILE
from recsae_core.sae.edits import UNITS, Edit, apply_ops, unit_scale
from recsae_core.sae.model import PARAMS, TopKSAE
from recsae_core.sae.stats import LatentStats, load_stats


class SparseCodes(NamedTuple):
    """The TopK codes of a batch, k entries per row, strongest first (as sparsify's EncoderOutput)."""

    indices: np.ndarray
    """(B, k) int64 latent ids, ordered by activation, descending."""
    values: np.ndarray
    """(B, k) float32 activations at `indices`, all >= 0; a row with fewer than k positive pre-activations ends in
    zeros (latents that did not fire), which `active` drops."""

    def active(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """The row's firing latents and their activations, strongest first."""
        live = self.values[row] > 0
        return self.indices[row][live], self.values[row][live]

    def dense(self, n_latents: int) -> np.ndarray:
        """(B, n_latents) float32 codes, 0 where a latent did not fire."""
        z = np.zeros((len(self.indices), n_latents), dtype=np.float32)
        np.put_along_axis(z, self.indices, self.values, axis=1)
        return z


class Monitored(NamedTuple):
    """What the SAE sees in a batch, without changing it."""

    codes: SparseCodes
    """Each row's TopK code."""
    fvu: np.ndarray
    """(B,) each row's ||x_hat - h||^2 over the variance given to `monitor`."""


class Steered(NamedTuple):
    """Edited representations and the codes behind them."""

    h: np.ndarray
    """(B, d) h + (z' - z) W_dec, in h's dtype; rows without edits are h, bit for bit (a copy)."""
    z: np.ndarray
    """(B, n_latents) float32 TopK codes of h."""
    z_new: np.ndarray
    """(B, n_latents) float32 codes after the edits."""


def activation_levels(values: np.ndarray, deciles: np.ndarray) -> np.ndarray:
    """RecSAE activation levels: 0 where inactive (value <= 0), else 1..10 by the global deciles of the training
    activations (LatentStats.global_deciles); a value on a cut point belongs to the level above it."""
    values = np.asarray(values)
    level = 1 + np.searchsorted(np.asarray(deciles), values, side="right")
    return np.where(values > 0, level, 0)


def total_variance(h: np.ndarray) -> float:
    """Mean ||h - mean(h)||^2 over the rows (at least 1e-12): the denominator that makes each row's reconstruction
    error an FVU whose average over the rows is the FVU over them."""
    mean = h.mean(0)
    var = float(((h - mean) ** 2).sum(1).mean())
    return max(var, 1e-12)


def _by_activation(top: np.ndarray, values: np.ndarray) -> SparseCodes:
    order = np.argsort(-values, axis=1, kind="stable")
    return SparseCodes(np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1))


class SAERuntime:
    """A TopK SAE as float32 numpy arrays (SAELens names, lower-cased), with the latent statistics that steering
    units and activation levels need (optional for encoding alone)."""

    def __init__(
        self,
        w_enc: np.ndarray,
        b_enc: np.ndarray,
        w_dec: np.ndarray,
        b_dec: np.ndarray,
        k: int,
        stats: LatentStats | None = None,
    ) -> None:
        self.w_enc, self.b_enc, self.w_dec, self.b_dec = (
            np.asarray(a, dtype=np.float32) for a in (w_enc, b_enc, w_dec, b_dec)
        )
        self.k = k
        self.stats = stats
        if stats is not None and stats.n_latents != self.n_latents:
            raise ArtifactError(f"latent statistics cover {stats.n_latents} latents, but the SAE has {self.n_latents}")
        self.unit_scale = None if stats is None else unit_scale(stats)
        """(len(UNITS), n_latents) multipliers from an edit's unit to raw activations."""
        self.deciles = None if stats is None else stats.global_deciles.numpy().astype(np.float32)
        """(9,) cut points of the activation levels."""

    @classmethod
    def from_model(cls, sae: TopKSAE, stats: LatentStats | None = None) -> SAERuntime:
        w_enc, b_enc, w_dec, b_dec = (getattr(sae, name).detach().cpu().numpy().astype(np.float32) for name in PARAMS)
        return cls(w_enc, b_enc, w_dec, b_dec, sae.cfg.k, stats)

    @classmethod
    def load(cls, folder: str | Path) -> SAERuntime:
        """An SAE folder (TopKSAE.save's files plus STATS_FILE), refusing anything inconsistent."""
        sae = TopKSAE.load(Path(folder))
        return cls.from_model(sae, load_stats(Path(folder) / STATS_FILE, sae.cfg.n_latents))

    @property
    def d_in(self) -> int:
        return self.w_enc.shape[0]

    @property
    def n_latents(self) -> int:
        return self.w_enc.shape[1]

    # ---------------------------------------------------------------- encoding

    def _input(self, h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != self.d_in:
            raise ValueError(f"h must have shape (B, {self.d_in}), got {h.shape}")
        return h

    def pre_activations(self, h: np.ndarray) -> np.ndarray:
        """(B, n_latents) float32 dense encoder pre-activations (h - b_dec) W_enc + b_enc, before ReLU and TopK."""
        return (self._input(h) - self.b_dec) @ self.w_enc + self.b_enc

    def _top_k(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's k largest ReLU pre-activations and their latents, in argpartition's (unspecified) order."""
        return self._top_k_of(np.maximum(self.pre_activations(h), 0.0))

    def _top_k_of(self, pre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """_top_k of ReLU'd pre-activations."""
        k = min(self.k, pre.shape[1])
        top = np.argpartition(-pre, k - 1, axis=1)[:, :k]
        return top, np.take_along_axis(pre, top, axis=1)

    def encode(self, h: np.ndarray) -> SparseCodes:
        """TopK(ReLU((h - b_dec) W_enc + b_enc)), as k (latent, activation) pairs per row."""
        return _by_activation(*self._top_k(self._input(h)))

    def reconstruct(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        """x_hat = sum_j values_j W_dec[indices_j] + b_dec: the k decoder rows per row, never a dense code."""
        return np.einsum("bk,bkd->bd", values, self.w_dec[indices]) + self.b_dec

    def monitor(self, h: np.ndarray, variance: float) -> Monitored:
        """The codes of h and each row's reconstruction error over `variance` (see total_variance)."""
        h = self._input(h)
        top, values = self._top_k(h)
        # Reconstructed before sorting: the order of the k-term sum fixes the FVU's last bits, and the service has
        # always summed in argpartition's order.
        x_hat = self.reconstruct(top, values)
        fvu = ((x_hat - h) ** 2).sum(1) / variance
        return Monitored(_by_activation(top, values), fvu)

    def levels(self, values: np.ndarray) -> np.ndarray:
        """activation_levels against this SAE's global deciles."""
        if self.deciles is None:
            raise ValueError("activation levels need the SAE's latent statistics")
        return activation_levels(values, self.deciles)

    # ---------------------------------------------------------------- steering

    def steer(
        self,
        h: np.ndarray,
        edits_per_row: Sequence[Sequence[Edit]],
        codes: SparseCodes | None = None,
        weights_per_row: Sequence[Sequence[float] | None] | None = None,
    ) -> Steered:
        """Edit each row of h by its own list of edits (an empty list leaves the row as it was). The edits must have
        passed validate_edits, which allows one edit per latent per row: each (row, latent) pair is then written
        once, z' - z is non-zero only there, and the decoder delta is a sum over the edits rather than a dense
        (B, n_latents) product. `codes`: h's codes when the caller already has them (from monitor).
        `weights_per_row`: optional multipliers of each edit's change z' - z (a policy's per-request strength:
        w = 0 leaves the latent as it was, 1 is the edit itself); None, or a None row, means 1 for every edit."""
        h = np.asarray(h)
        x = self._input(h)
        if len(edits_per_row) != len(x):
            raise ValueError(f"{len(edits_per_row)} edit lists for {len(x)} rows")
        if self.unit_scale is None:
            raise ValueError("steering needs the SAE's latent statistics (edit units)")
        z = (codes if codes is not None else self.encode(x)).dense(self.n_latents)
        rows, latents, ops, raw, weights = [], [], [], [], []
        for i, row_edits in enumerate(edits_per_row):
            row_weights = None if weights_per_row is None else weights_per_row[i]
            if row_weights is not None and len(row_weights) != len(row_edits):
                raise ValueError(f"row {i}: {len(row_weights)} weights for {len(row_edits)} edits")
            for e, edit in enumerate(row_edits):
                rows.append(i)
                latents.append(edit.latent)
                ops.append(edit.op)
                raw.append(edit.value * self.unit_scale[UNITS.index(edit.unit), edit.latent])
                weights.append(1.0 if row_weights is None else float(row_weights[e]))
        if not rows:
            return Steered(h.copy(), z, z.copy())
        r, j = np.asarray(rows), np.asarray(latents)
        current = z[r, j]
        edited = apply_ops(np.asarray(ops), current, np.asarray(raw, dtype=np.float32))
        w = np.asarray(weights, dtype=np.float32)
        # Weight 1 keeps the op's own value bit for bit (current + (v - current) need not equal v in floats).
        edited = np.where(w == 1, edited, current + w * (edited - current)).astype(np.float32)
        z_new = z.copy()
        z_new[r, j] = edited
        h_new = h.copy()
        np.add.at(h_new, r, (edited - current)[:, None] * self.w_dec[j])
        return Steered(h_new, z, z_new)

    def shift_pre(
        self, h: np.ndarray, shift: np.ndarray, strength: float | np.ndarray = 1.0, keep_error: bool = False
    ) -> Steered:
        """PopSteer's edit: every latent's dense pre-activation moves by strength x shift before ReLU and TopK run
        again (so latents drop out of the top k or enter it), and the reconstruction of the new code is served:
        h' = x_hat(z'). With `keep_error`, h' = h + x_hat(z') - x_hat(z) keeps the SAE's error term instead, as
        `steer` does. `shift`: (n_latents,) or (B, n_latents); `strength`: a number or (B,) per row. Unlike `steer`,
        a row at strength 0 comes back as its reconstruction, not as h (unless keep_error)."""
        x = self._input(h)
        shift = np.asarray(shift, dtype=np.float32)
        if shift.shape not in ((self.n_latents,), (len(x), self.n_latents)):
            raise ValueError(f"shift must have shape ({self.n_latents},) or ({len(x)}, {self.n_latents}), got "
                             f"{shift.shape}")  # fmt: skip
        strength = np.broadcast_to(np.asarray(strength, dtype=np.float32), (len(x),))
        pre = self.pre_activations(x)
        top, values = self._top_k_of(np.maximum(pre, 0.0))
        new_top, new_values = self._top_k_of(np.maximum(pre + strength[:, None] * shift, 0.0))
        x_new = self.reconstruct(new_top, new_values)
        h_new = x + (x_new - self.reconstruct(top, values)) if keep_error else x_new
        z = SparseCodes(top, values).dense(self.n_latents)
        z_new = SparseCodes(new_top, new_values).dense(self.n_latents)
        return Steered(h_new.astype(np.asarray(h).dtype, copy=False), z, z_new)
