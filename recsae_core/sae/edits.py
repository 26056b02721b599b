"""Latent edits: the op table (each op's algebra and what its value means), the units, and the one validation.

An edit changes one latent of the TopK code z; the runtime (recsae_core.sae.runtime) adds only that change to h,
h' = h + (z' - z) W_dec, so the SAE's reconstruction error stays in h' and a row without edits comes back
bit-identical (the recommender's output is exactly the original one).

Edits act on the TopK code z, not on the raw pre-activations: a latent outside the row's top-k has z = 0, so
`nudge` by v turns it on at v, `pin` sets it to v, while `scale` and `ablate` leave it at 0. This matches what
the decoder would see had the latent fired, and keeps "no edit" and "edit that changes nothing" identical.
Values are not clamped at 0: a negative nudge beyond the current activation pushes h against the latent's
direction, which is how PopSteer-style steering lowers a concept.

A new op is one entry in OP_TABLE: the runtime applies its algebra, `validate_edits` its rules, and the HTTP schema
takes its name from OPS.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

from recsae_core.common.errors import ConfigError
from recsae_core.sae.stats import LatentStats

Operand = Literal["none", "activation", "factor"]


@dataclass(frozen=True)
class OpSpec:
    """One edit op: how it changes a latent's activation, and what kind of value it takes."""

    apply: Callable[[np.ndarray, np.ndarray], np.ndarray]
    """z_j' from the current z_j and the value in raw units, elementwise over float32 arrays."""
    operand: Operand
    """none: takes no value (it must be 0); activation: an activation, given in any of UNITS and bounded in std
    units; factor: a plain multiplier (raw unit only), bounded by EditBounds.max_scale."""


OP_TABLE: dict[str, OpSpec] = {
    "ablate": OpSpec(lambda z, v: np.zeros_like(z), "none"),  # z_j = 0
    "pin": OpSpec(lambda z, v: v, "activation"),  # z_j = v
    "nudge": OpSpec(lambda z, v: z + v, "activation"),  # z_j += v
    "scale": OpSpec(lambda z, v: z * v, "factor"),  # z_j *= v
}
OPS = tuple(OP_TABLE)
"""The op names, in the order error messages list them."""
UNITS = ("raw", "std", "max")
"""raw: v as given; std: v x the latent's std_activation; max: v x its max_activation."""
_WITH_UNITS = " and ".join(op for op, spec in OP_TABLE.items() if spec.operand == "activation")


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


def op_problem(op: str, value: float, unit: str, bounds: EditBounds) -> str | None:
    """What is wrong with a known op's value and unit before its latent is known (None when nothing is). The HTTP
    schema asks this of every edit as it parses a request, so these answers come before any id is resolved."""
    spec = OP_TABLE[op]
    if spec.operand == "none" and value != 0:
        return f"{op} takes no value (got {value})"
    if spec.operand != "activation" and unit != "raw":
        return f"unit '{unit}' does not apply to {op}; units apply to {_WITH_UNITS} only"
    if spec.operand == "factor" and abs(value) > bounds.max_scale:
        return f"{op} factor {value} outside [-{bounds.max_scale}, {bounds.max_scale}]"
    if spec.operand == "activation" and unit == "std" and abs(value) > bounds.max_abs_std:
        return f"|value| {abs(value)} std exceeds the bound of {bounds.max_abs_std} std"
    return None


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
        if problem := op_problem(op, value, unit, bounds):
            raise _fail(i, edit, problem)
        if OP_TABLE[op].operand == "activation":
            _check_against_stats(i, edit, bounds, stats)
    return edits


def _check_against_stats(i: int, edit: Edit, bounds: EditBounds, stats: LatentStats | None) -> None:
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


def apply_ops(ops: np.ndarray, current: np.ndarray, operand: np.ndarray) -> np.ndarray:
    """The edited activations: entry e is OP_TABLE[ops[e]] applied to current[e] and operand[e] (raw units)."""
    edited = np.empty_like(current)
    done = np.zeros(len(current), dtype=bool)
    for name, spec in OP_TABLE.items():
        mask = ops == name
        if mask.any():
            edited[mask] = spec.apply(current[mask], operand[mask])
            done |= mask
    if not done.all():
        raise ValueError(f"unknown ops {sorted(set(ops[~done].tolist()))}; validate edits first (validate_edits)")
    return edited


def unit_scale(stats: LatentStats) -> np.ndarray:
    """(len(UNITS), n_latents) float32 multipliers that turn an edit value into raw units: raw -> 1, std -> std_j,
    max -> max_j; row i is UNITS[i]."""
    ones = np.ones(stats.n_latents, dtype=np.float32)
    columns = {"raw": ones, "std": stats.std_activation.detach().cpu(), "max": stats.max_activation.detach().cpu()}
    return np.stack([np.asarray(columns[unit], dtype=np.float32) for unit in UNITS])
