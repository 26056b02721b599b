"""Error-preserving latent interventions: h' = h + (z' - z) W_dec.

Only the change an edit makes is added to h, so the SAE's reconstruction error stays in h' and a row without
edits comes back bit-identical (the recommender's output is exactly the original one).

Edits act on the TopK code z, not on the raw pre-activations: a latent outside the row's top-k has z = 0, so
`nudge` by v turns it on at v, `pin` sets it to v, while `scale` and `ablate` leave it at 0. This matches what
the decoder would see had the latent fired, and keeps "no edit" and "edit that changes nothing" identical.
Values are not clamped at 0: a negative nudge beyond the current activation pushes h against the latent's
direction, which is how PopSteer-style steering lowers a concept.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from recsae_core.common.errors import ArtifactError, ConfigError
from recsae_core.sae.model import TopKSAE
from recsae_core.sae.stats import LatentStats

OPS = ("ablate", "pin", "nudge", "scale")
"""ablate: z_j = 0; pin: z_j = v; nudge: z_j += v; scale: z_j *= v."""
UNITS = ("raw", "std", "max")
"""raw: v as given; std: v x the latent's std_activation; max: v x its max_activation."""


@dataclass(frozen=True)
class Edit:
    """One change to one latent."""

    latent: int
    """Latent index in [0, n_latents)."""
    op: str
    """One of OPS."""
    value: float = 0.0
    """Operand of pin/nudge/scale; must stay 0 for ablate."""
    unit: str = "raw"
    """One of UNITS; only pin and nudge take a unit other than raw."""

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Edit:
        """Build from a JSON object such as {"latent": 3, "op": "nudge", "value": 2, "unit": "std"}."""
        if not isinstance(obj, Mapping):
            raise ConfigError(f"an edit must be a JSON object, got {type(obj).__name__}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(obj) - known):
            raise ConfigError(f"edit {dict(obj)}: unknown keys {unknown}; allowed: {sorted(known)}")
        if missing := sorted({"latent", "op"} - set(obj)):
            raise ConfigError(f"edit {dict(obj)}: missing keys {missing}")
        return cls(**obj)


@dataclass
class EditBounds:
    """Limits on one request's edits, so a client cannot push h far outside what the recommender has seen."""

    max_abs_std: float = 10.0
    """Largest |pin/nudge value| in units of the latent's std (after converting raw/max values)."""
    max_scale: float = 10.0
    """Largest |scale factor|."""
    max_edits: int = 64
    """Most edits on one row."""


class InterventionResult(NamedTuple):
    """Edited representations and the codes behind them."""

    h_new: Tensor
    """(B, d) h + (z_new - z) W_dec; rows without edits are exactly h."""
    z: Tensor
    """(B, n_latents) TopK code of h."""
    z_new: Tensor
    """(B, n_latents) code after the edits."""


def _fail(index: int, edit: Any, problem: str) -> ConfigError:
    return ConfigError(f"edit {index} ({edit}): {problem}")


def validate_edits(
    edits: Sequence[Edit], n_latents: int, bounds: EditBounds | None = None, stats: LatentStats | None = None
) -> list[Edit]:
    """Check one row's edits; raise ConfigError naming the first bad edit and what is wrong with it.

    Without `stats`, only std-unit values can be bounded; with them, raw and max values are converted to std
    units first, and non-zero pins/nudges of latents that never fired (std 0) are refused.
    """
    bounds = bounds or EditBounds()
    edits = list(edits)
    if len(edits) > bounds.max_edits:
        raise ConfigError(f"{len(edits)} edits on one row; at most {bounds.max_edits} are allowed")
    seen: dict[int, int] = {}
    for i, edit in enumerate(edits):
        if not isinstance(edit, Edit):
            raise _fail(i, edit, f"expected an Edit, got {type(edit).__name__}")
        latent, op, value, unit = edit.latent, edit.op, edit.value, edit.unit
        if isinstance(latent, bool) or not isinstance(latent, numbers.Integral):
            raise _fail(i, edit, f"latent must be an integer, got {latent!r}")
        if not 0 <= latent < n_latents:
            raise _fail(i, edit, f"latent {latent} out of range [0, {n_latents})")
        if op not in OPS:
            raise _fail(i, edit, f"unknown op {op!r}; expected one of {', '.join(OPS)}")
        if unit not in UNITS:
            raise _fail(i, edit, f"unknown unit {unit!r}; expected one of {', '.join(UNITS)}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _fail(i, edit, f"value must be a number, got {value!r}")
        if not math.isfinite(value):
            raise _fail(i, edit, f"value must be finite, got {value}")
        if latent in seen:
            raise _fail(i, edit, f"conflicts with edit {seen[latent]} on the same latent {latent}; one edit per latent")
        seen[int(latent)] = i
        if op in ("ablate", "scale") and unit != "raw":
            raise _fail(i, edit, f"unit {unit!r} does not apply to {op}; units apply only to pin and nudge")
        if op == "ablate" and value != 0:
            raise _fail(i, edit, f"ablate takes no value, got {value}")
        if op == "scale" and abs(value) > bounds.max_scale:
            raise _fail(i, edit, f"scale factor {value} outside [-{bounds.max_scale}, {bounds.max_scale}]")
        if op in ("pin", "nudge"):
            _check_magnitude(i, edit, bounds, stats)
    return edits


def _check_magnitude(i: int, edit: Edit, bounds: EditBounds, stats: LatentStats | None) -> None:
    if edit.unit == "std" and abs(edit.value) > bounds.max_abs_std:
        raise _fail(i, edit, f"|value| {abs(edit.value)} std exceeds the bound of {bounds.max_abs_std} std")
    if stats is None or edit.value == 0:
        return
    std = float(stats.std_activation[edit.latent])
    if std == 0:
        raise _fail(
            i, edit, f"latent {edit.latent} never fired in the statistics (std 0), so a non-zero {edit.op} is unbounded"
        )
    raw = edit.value * (float(stats.max_activation[edit.latent]) if edit.unit == "max" else 1.0)
    if edit.unit != "std" and abs(raw) / std > bounds.max_abs_std:
        raise _fail(
            i,
            edit,
            f"|value| is {abs(raw) / std:.4g} std of latent {edit.latent}, beyond the bound of "
            f"{bounds.max_abs_std} std",
        )


_OP_CODE = {op: code for code, op in enumerate(OPS)}
_UNIT_CODE = {unit: code for code, unit in enumerate(UNITS)}


def unit_scale(stats: LatentStats) -> Tensor:
    """(len(UNITS), n_latents) multipliers that turn an edit value into raw units: raw -> 1, std -> std_j,
    max -> max_j; row i is UNITS[i]."""
    ones = torch.ones(stats.n_latents)
    return torch.stack([ones, stats.std_activation.float(), stats.max_activation.float()])


class Intervener:
    """Applies validated edits to batches of h through a trained SAE and its latent statistics."""

    def __init__(self, sae: TopKSAE, stats: LatentStats, bounds: EditBounds | None = None) -> None:
        if stats.n_latents != sae.cfg.n_latents:
            raise ArtifactError(
                f"latent statistics cover {stats.n_latents} latents, but the SAE has {sae.cfg.n_latents}"
            )
        self.sae, self.stats, self.bounds = sae.eval(), stats, bounds or EditBounds()
        self._unit_scale = unit_scale(stats).to(sae.device)

    @torch.no_grad()
    def apply(self, h: Tensor, edits_per_row: Sequence[Sequence[Edit]]) -> InterventionResult:
        """Edit each row of h by its own list of edits (an empty list leaves the row untouched)."""
        if h.ndim != 2 or h.shape[1] != self.sae.cfg.d_in:
            raise ValueError(f"h must have shape (B, {self.sae.cfg.d_in}), got {tuple(h.shape)}")
        if len(edits_per_row) != len(h):
            raise ValueError(f"{len(edits_per_row)} edit lists for {len(h)} rows")
        rows, latents, ops, values, units = [], [], [], [], []
        checked: dict[int, list[Edit]] = {}  # the same list object (as from steer_all) is validated once
        for row, row_edits in enumerate(edits_per_row):
            if id(row_edits) not in checked:
                checked[id(row_edits)] = validate_edits(row_edits, self.sae.cfg.n_latents, self.bounds, self.stats)
            for edit in checked[id(row_edits)]:
                rows.append(row)
                latents.append(int(edit.latent))
                ops.append(_OP_CODE[edit.op])
                values.append(float(edit.value))
                units.append(_UNIT_CODE[edit.unit])

        device = self.sae.device
        z = self.sae.encode(h.to(device, torch.float32))
        if not rows:
            return InterventionResult(h.clone(), z, z.clone())
        row_t = torch.tensor(rows, device=device)
        lat_t = torch.tensor(latents, device=device)
        op_t = torch.tensor(ops, device=device)
        raw = torch.tensor(values, device=device) * self._unit_scale[torch.tensor(units, device=device), lat_t]

        # One edit per latent per row (validated), so each (row, latent) pair is written once and z' - z is
        # non-zero only there: the decoder delta is a sum over the edits, not a dense (B, n_latents) product.
        current = z[row_t, lat_t]
        edited_value = torch.where(
            op_t == _OP_CODE["ablate"],
            torch.zeros_like(current),
            torch.where(
                op_t == _OP_CODE["pin"],
                raw,
                torch.where(op_t == _OP_CODE["scale"], current * raw, current + raw),
            ),
        )
        z_new = z.clone()
        z_new[row_t, lat_t] = edited_value
        # Rows without edits receive nothing, so they stay exactly h.
        delta = (edited_value - current)[:, None] * self.sae.W_dec[lat_t]
        h_new = h.clone()
        h_new.index_add_(0, row_t.to(h.device), delta.to(h.device, h.dtype))
        return InterventionResult(h_new, z, z_new)

    def steer_all(self, h: Tensor, edits: Sequence[Edit]) -> InterventionResult:
        """Apply the same edits to every row."""
        edits = list(edits)
        return self.apply(h, [edits] * len(h))
