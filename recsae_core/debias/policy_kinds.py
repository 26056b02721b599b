"""Policy kinds: what a policy file holds, how it is checked when loaded, and how each kind changes h.

A policy file (RUN/policies/<name>.json, bundled as policies/<name>.json) is either
- an **edit policy**: `edits` on SAE latents; its `kind` is absent (every file written before kinds existed),
  'edits', or an op name ('nudge', 'pin', ...) when all its edits are that op. The service resolves and validates
  its edits (service/steering.py, sae/edits.py);
- a **fitted policy**, one entry of KIND_TABLE: 'erase' and 'spectral' (the affine edit h - t ((h - m) B^T) A),
  'calibrated' (h - t g_u p, g_u from the user's unsteered list and history), 'popsteer' (every latent's
  pre-activation shifted, reconstruction served). It carries `strength` t, `options`, a `fit` report (method,
  anchor, the SAE latents and concepts its directions load on; shown, never used to compute), `made_for` (the
  model and SAE it was fit for; required), and its `arrays` inline as {"dtype": "float32", "shape": [...],
  "data": [flat, row-major]}: a few thousand floats at most (one per latent for PopSteer), so a policy stays one
  self-contained JSON file, hashed by the bundle manifest like the rest, with no bundle-format change.

The offline sweep and the service call the same `apply_policy`: a batch of h, a strength multiplier per row (the
request's `strength`; 1 = as fitted), and what the kind needs (the SAE; the unsteered lists and histories).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from recsae_core.common.errors import ConfigError
from recsae_core.debias import transforms as tf
from recsae_core.recommenders.ranking import best_of_scores
from recsae_core.sae.edits import OPS
from recsae_core.sae.runtime import SAERuntime

EDIT_KINDS = ("edits", *OPS)
"""Kinds of the policies made of latent edits: 'edits' (any ops), or one op name (every edit is that op)."""


class Applied(NamedTuple):
    """A fitted policy applied to a batch."""

    h: np.ndarray
    """(B, d) float32 steered h."""
    z_new: np.ndarray | None
    """(B, n_latents) the code behind the steered h where the kind computes it (popsteer), else None."""
    detail: dict[str, list]
    """Per-row numbers that explain the move (each value is a list over the rows)."""


class Inputs(NamedTuple):
    """What a kind may need besides h, for one batch."""

    strength: np.ndarray
    """(B,) float32 effective strength: the policy's strength x the request's multiplier."""
    sae: SAERuntime | None
    """The served SAE (popsteer)."""
    lists: np.ndarray | None
    """(B, list_k) each row's unsteered top items, its own history masked (calibrated)."""
    histories: Sequence[np.ndarray] | None
    """Each row's history, item indices (calibrated)."""
    popularity: np.ndarray | None
    """(n_items,) training interactions per item (calibrated)."""


@dataclass(frozen=True)
class FittedPolicy:
    """A policy fit offline: its kind, strength, arrays and options."""

    kind: str
    """One of FITTED_KINDS."""
    strength: float
    """t (erase, spectral, calibrated) or PopSteer's alpha; a request's strength multiplies it."""
    arrays: dict[str, np.ndarray]
    """The fitted float32 arrays, named and shaped as KIND_TABLE[kind].arrays says."""
    options: dict[str, Any] = field(default_factory=dict)
    """The kind's options (list_k, keep_error), defaults filled in."""
    fit: dict[str, Any] = field(default_factory=dict)
    """How it was fit and what it loads on (method, anchor, latents, concepts): reported, never computed with."""

    @property
    def spec(self) -> KindSpec:
        return KIND_TABLE[self.kind]

    @property
    def list_k(self) -> int | None:
        """Length of the unsteered list the kind reads per user (None: it reads none)."""
        return int(self.options["list_k"]) if self.spec.needs_lists else None

    def with_strength(self, strength: float) -> FittedPolicy:
        return replace(self, strength=float(strength))

    def affine(self) -> tf.Affine:
        return tf.Affine(self.arrays["a"], self.arrays["b"], self.arrays["anchor"])


def _apply_affine(policy: FittedPolicy, h: np.ndarray, inputs: Inputs) -> Applied:
    affine = policy.affine()
    coefficients = affine.coefficients(h)
    steered = h - (inputs.strength[:, None] * coefficients) @ affine.a
    return Applied(steered, None, {"coefficients": coefficients.tolist()})


def _apply_calibrated(policy: FittedPolicy, h: np.ndarray, inputs: Inputs) -> Applied:
    if inputs.lists is None or inputs.histories is None or inputs.popularity is None:
        raise ValueError("a calibrated policy needs each row's unsteered list, history and the item popularity")
    gap = tf.calibration_gap(inputs.lists, inputs.histories, inputs.popularity)
    move = inputs.strength * gap
    steered = h - move[:, None] * policy.arrays["direction"]
    return Applied(steered, None, {"popularity_gap": gap.tolist(), "shift": move.tolist()})


def _apply_popsteer(policy: FittedPolicy, h: np.ndarray, inputs: Inputs) -> Applied:
    if inputs.sae is None:
        raise ValueError("a popsteer policy needs the SAE")
    out = inputs.sae.shift_pre(h, policy.arrays["shift"], inputs.strength, bool(policy.options["keep_error"]))
    entered = (out.z_new > 0) & (out.z <= 0)
    dropped = (out.z > 0) & (out.z_new <= 0)
    detail = {"entered": [np.flatnonzero(r).tolist() for r in entered],
              "dropped": [np.flatnonzero(r).tolist() for r in dropped]}  # fmt: skip
    return Applied(out.h, out.z_new, detail)


@dataclass(frozen=True)
class KindSpec:
    """One fitted kind: its arrays, options and algebra."""

    arrays: dict[str, tuple[str, ...]]
    """Each array's shape in symbols: r (the policy's rank), d (width of h), L (SAE latents)."""
    options: dict[str, tuple[type, Any]]
    """Option name -> (type, default)."""
    strength: str
    """What the strength means, for listings."""
    apply: Callable[[FittedPolicy, np.ndarray, Inputs], Applied]
    """h' (and per-row detail) for a batch."""
    needs_lists: bool = False
    """It reads each user's unsteered list and history."""


_AFFINE = {"a": ("r", "d"), "b": ("r", "d"), "anchor": ("d",)}
KIND_TABLE: dict[str, KindSpec] = {
    "erase": KindSpec(
        arrays=_AFFINE, options={}, strength="t in h - t ((h - m) . b) a; 1 removes the read-out", apply=_apply_affine
    ),
    "spectral": KindSpec(
        arrays=_AFFINE,
        options={},
        strength="each user's loading on the top singular direction(s) is scaled by 1 - t",
        apply=_apply_affine,
    ),
    "calibrated": KindSpec(
        arrays={"direction": ("d",)},
        options={"list_k": (int, 10)},
        strength="t in h - t g_u p, g_u = the list's minus the history's mean log-popularity",
        apply=_apply_calibrated,
        needs_lists=True,
    ),
    "popsteer": KindSpec(
        arrays={"shift": ("L",)},
        options={"keep_error": (bool, False)},
        strength="PopSteer's alpha: every pre-activation + alpha x shift",
        apply=_apply_popsteer,
    ),
}
FITTED_KINDS = tuple(KIND_TABLE)
KINDS = (*EDIT_KINDS, *FITTED_KINDS)


def apply_policy(
    policy: FittedPolicy, h: np.ndarray, multiplier: float | np.ndarray = 1.0, *, sae: SAERuntime | None = None,
    lists: np.ndarray | None = None, histories: Sequence[np.ndarray] | None = None,
    popularity: np.ndarray | None = None,
) -> Applied:  # fmt: skip
    """The policy on a batch of h (rows may carry their own `multiplier`)."""
    h = np.asarray(h, dtype=np.float32)
    strength = (policy.strength * np.broadcast_to(np.asarray(multiplier, dtype=np.float64), (len(h),))).astype(
        np.float32
    )
    return policy.spec.apply(policy, h, Inputs(strength, sae, lists, histories, popularity))


def unsteered_lists(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, k) each row's k best items of `scores` (its own history already at -inf), in no particular order; the
    same set the service's blocked `top_k` picks without a (B, n_items) matrix."""
    return best_of_scores(scores, k)


def offline_transform(
    policy: FittedPolicy, multiplier: float = 1.0, *, sae: SAERuntime | None = None,
    unsteered_scores: np.ndarray | None = None, histories: Sequence[np.ndarray] | None = None,
    popularity: np.ndarray | None = None,
) -> Callable[[np.ndarray], np.ndarray]:  # fmt: skip
    """h -> h' for a fixed set of users (a sweep's stage): `unsteered_scores` (B, n_items) with each user's history
    at -inf and `histories` in the same row order (calibrated only)."""
    lists = None
    if policy.spec.needs_lists:
        if unsteered_scores is None or histories is None or popularity is None:
            raise ValueError("a calibrated policy needs unsteered_scores, histories and popularity")
        lists = unsteered_lists(np.asarray(unsteered_scores), policy.list_k)

    def transform(h: np.ndarray) -> np.ndarray:
        return apply_policy(policy, h, multiplier, sae=sae, lists=lists, histories=histories,
                            popularity=popularity).h  # fmt: skip

    return transform


# ---------------------------------------------------------------- fitting


def fit_erase(
    h: np.ndarray, group: np.ndarray, method: str = "leace", rank: int = 1, anchor: tf.Anchor = "pooled",
    strength: float = 1.0,
) -> FittedPolicy:  # fmt: skip
    """An 'erase' policy fit on (h, binary group): method 'leace', 'inlp' (rank rounds) or 'mean-difference'
    (rank 1)."""
    if method == "leace":
        affine = tf.fit_leace(h, group, rank, anchor)
    elif method == "inlp":
        affine = tf.fit_inlp(h, group, rank, anchor)
    elif method == "mean-difference":
        if rank != 1:
            raise ConfigError(f"the mean-difference projection has rank 1, not {rank}")
        affine = tf.fit_mean_difference(h, group, anchor)
    else:
        raise ConfigError(f"unknown eraser {method!r}; expected leace, inlp or mean-difference")
    fit = {"method": method, "anchor": anchor, "rank": affine.rank}
    return FittedPolicy("erase", float(strength), dict(zip(("a", "b", "anchor"), affine, strict=True)), {}, fit)


def fit_spectral_policy(
    h: np.ndarray, item_embeddings: np.ndarray, strength: float = 0.5, rank: int = 1
) -> FittedPolicy:
    """A 'spectral' policy: shrink each user's loading on the top `rank` singular direction(s) of H E^T."""
    affine = tf.fit_spectral(h, item_embeddings, rank)
    fit = {"method": "top singular directions of H E^T", "anchor": "zero", "rank": affine.rank}
    return FittedPolicy("spectral", float(strength), dict(zip(("a", "b", "anchor"), affine, strict=True)), {}, fit)


def fit_calibrated(
    h: np.ndarray, item_embeddings: np.ndarray, popularity: np.ndarray, strength: float = 1.0, list_k: int = 10
) -> FittedPolicy:
    """A 'calibrated' policy: the popularity direction fit on (E, popularity, h), the gap read on top-`list_k`."""
    direction = tf.popularity_direction(item_embeddings, popularity, h)
    fit = {"method": "least-squares popularity direction in h-space", "list_k": list_k}
    return FittedPolicy("calibrated", float(strength), {"direction": direction}, {"list_k": int(list_k)}, fit)


def fit_popsteer_policy(
    sae: SAERuntime, h_head: np.ndarray, h_tail: np.ndarray, alpha: float = 1.5, keep_error: bool = False,
    n_latents: int | None = None, top: int = 10,
) -> FittedPolicy:  # fmt: skip
    """A 'popsteer' policy from the h of head-only and deep-tail-only profiles (see tf.synthetic_profiles)."""
    fitted = tf.fit_popsteer(sae, h_head, h_tail, n_latents)
    strongest = np.argsort(-np.abs(fitted.d), kind="stable")[:top]
    fit = {"method": "PopSteer: Cohen's d on dense pre-activations, head-only vs deep-tail-only profiles",
           "n_steered": int((fitted.shift != 0).sum()),
           "latents": [{"latent": int(j), "cohens_d": round(float(fitted.d[j]), 6)} for j in strongest]}  # fmt: skip
    return FittedPolicy("popsteer", float(alpha), {"shift": fitted.shift}, {"keep_error": bool(keep_error)}, fit)


def with_report(policy: FittedPolicy, w_dec: np.ndarray, names: Mapping[int, str] | None = None) -> FittedPolicy:
    """The policy with its `fit` report naming the SAE latents (and catalog concepts) its directions load on: the
    rows of A (erase, spectral: what h moves along) or p (calibrated); PopSteer's strongest latents get names."""
    names = names or {}
    fit = dict(policy.fit)
    if policy.kind == "popsteer":
        fit["latents"] = [{**entry, "concept": names.get(entry["latent"])} for entry in fit.get("latents", [])]
    else:
        directions = policy.arrays["a"] if "a" in policy.arrays else policy.arrays["direction"]
        fit["directions"] = [
            {"loads_on": [lo._asdict() for lo in r.loads_on], "span_share": r.span_share, "span_rows": r.span_rows}
            for r in tf.direction_loadings(directions, w_dec, names)
        ]
    return replace(policy, fit=fit)


# ---------------------------------------------------------------- the file


def encode_array(values: np.ndarray) -> dict[str, Any]:
    """A float32 array as JSON: dtype, shape and flat row-major data (floats that read back bit for bit)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return {"dtype": "float32", "shape": list(values.shape), "data": [float(v) for v in values.ravel()]}


def policy_document(
    policy: FittedPolicy, name: str, target: str, description: str, made_for: Mapping[str, Any], version: int = 1,
    **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """The JSON of a fitted policy, as `parse_policy` reads it back."""
    return {"name": name, "version": version, "kind": policy.kind, "description": description, "target": target,
            "strength": policy.strength, "options": dict(policy.options), "fit": policy.fit, **extra,
            "arrays": {key: encode_array(value) for key, value in policy.arrays.items()},
            "made_for": dict(made_for), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


def _array(name: str, obj: Any, shape: tuple[str, ...], sizes: dict[str, int]) -> np.ndarray:
    if not isinstance(obj, Mapping) or set(obj) != {"dtype", "shape", "data"}:
        raise ConfigError(f"array '{name}' must be an object with exactly 'dtype', 'shape' and 'data'")
    if obj["dtype"] != "float32":
        raise ConfigError(f"array '{name}' has dtype {obj['dtype']!r}; policies store float32")
    given = obj["shape"]
    if (
        not isinstance(given, list)
        or len(given) != len(shape)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in given)
    ):
        raise ConfigError(f"array '{name}' has shape {given!r}; expected ({', '.join(shape)})")
    for symbol, n in zip(shape, given, strict=True):
        want = sizes.setdefault(symbol, n)
        if n != want:
            raise ConfigError(f"array '{name}' has shape {tuple(given)}, but {symbol} is {want} "
                              f"(expected ({', '.join(str(sizes.get(s, s)) for s in shape)}))")  # fmt: skip
    data = obj["data"]
    if not isinstance(data, list) or len(data) != math.prod(given):
        raise ConfigError(f"array '{name}' must list {math.prod(given)} numbers for shape {tuple(given)}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in data):
        raise ConfigError(f"array '{name}' holds something other than numbers")
    values = np.asarray(data, dtype=np.float64)
    if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > np.finfo(np.float32).max:
        raise ConfigError(f"array '{name}' holds values that are not finite float32 numbers")
    return values.astype(np.float32).reshape(given)


def parse_policy(body: Mapping[str, Any], d: int, n_latents: int) -> FittedPolicy:
    """A fitted policy's JSON, checked for a model with h of width `d` and an SAE of `n_latents`: kind, strength,
    options, every array's dtype, shape and finiteness, and that it records `made_for` (whether that matches the
    bundle is the service's check). Raises ConfigError naming the first problem."""
    kind = body.get("kind")
    if kind not in KIND_TABLE:
        raise ConfigError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    spec = KIND_TABLE[kind]
    if body.get("made_for") is None:
        raise ConfigError(f"a fitted ({kind}) policy must record 'made_for': the model and SAE it was fit for")
    strength = body.get("strength")
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
        raise ConfigError(f"'strength' must be a finite number, got {strength!r}")
    arrays = body.get("arrays")
    if not isinstance(arrays, Mapping) or set(arrays) != set(spec.arrays):
        got = sorted(arrays) if isinstance(arrays, Mapping) else arrays
        raise ConfigError(f"a {kind} policy needs 'arrays' {sorted(spec.arrays)}, got {got!r}")
    sizes = {"d": d, "L": n_latents}
    parsed = {name: _array(name, arrays[name], shape, sizes) for name, shape in spec.arrays.items()}
    given = body.get("options", {})
    if not isinstance(given, Mapping) or (unknown := sorted(set(given) - set(spec.options))):
        raise ConfigError(f"'options' of a {kind} policy may hold {sorted(spec.options) or 'nothing'}; "
                          f"got {given if not isinstance(given, Mapping) else unknown}")  # fmt: skip
    options = {}
    for option, (wanted, default) in spec.options.items():
        value = given.get(option, default)
        if type(value) is not wanted or (wanted is int and not 1 <= value <= 1000):
            what = "an integer in [1, 1000]" if wanted is int else f"a {wanted.__name__}"
            raise ConfigError(f"option '{option}' must be {what}, got {value!r}")
        options[option] = value
    fit = body.get("fit") if isinstance(body.get("fit"), Mapping) else {}
    return FittedPolicy(kind, float(strength), parsed, options, dict(fit))
