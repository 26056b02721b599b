"""How a bundle's representation model is fed: the `inputs` of its manifest, and the checks that the per-user inputs
and the items' model indices agree with it.

Three kinds. 'user': one input takes the user's index in the model (recsae's own BPR-MF and LightGCN, imported
user-index models). 'history': one input takes a padded sequence of item indices and an optional second one its
length (SASRec, imported sequence models); a request's history is turned into these inputs by the service. 'custom':
any precomputed inputs per user, nothing to build from a history.

Item indices fed to a history model are the model's own: `model_index` (items.safetensors) maps each bundle item
to it, and its absence means the bundle's dense item index, as in every bundle written before it existed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from recsae_core.common.errors import ArtifactError

INPUT_KINDS = ("user", "history", "custom")
PADDING = ("left", "right")
ADDED_FIELDS = {"padding": "left", "length_input": None}
"""Fields added within format version 1, with the defaults that mean what bundles without them always meant."""


@dataclass(frozen=True)
class InputSpec:
    """How the representation model is fed."""

    kind: str
    """'user' (one int64 user index), 'history' (padded item indices), or 'custom' (any named inputs)."""
    names: list[str]
    """ONNX input names, in order."""
    history_input: str | None = None
    """Name of the input that takes a padded item history (kind 'history')."""
    max_len: int = 0
    """History length the model was exported with (kind 'history')."""
    pad_id: int = -1
    """Index fed where there is no item (kind 'history'); never an item's model index."""
    padding: str = "left"
    """Side the pad ids go: 'left' (recsae's own models) or 'right' (kind 'history')."""
    length_input: str | None = None
    """Name of the input fed each history's real item count, or None (kind 'history')."""

    @property
    def feeds_histories(self) -> bool:
        """A history alone makes the model's inputs: kind 'history' with no input but the items and their count."""
        return self.kind == "history" and set(self.names) <= {self.history_input, self.length_input}

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `inputs`. Added fields are written only when they differ from their defaults, so a bundle
        that does not use them has exactly the manifest readers from before them expect."""
        out = asdict(self)
        for key, default in ADDED_FIELDS.items():
            if out[key] == default:
                del out[key]
        return out

    @classmethod
    def from_manifest(cls, value: Any, path: Path) -> InputSpec:
        """Parse and check the manifest's `inputs`; every problem raises ArtifactError naming `path`."""
        if not isinstance(value, dict):
            raise ArtifactError(f"{path}: 'inputs' must be an object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(value) - known):
            raise ArtifactError(f"{path}: inputs has unknown field(s) {unknown}; known: {sorted(known)}")
        kind = value.get("kind")
        if kind not in INPUT_KINDS:
            raise ArtifactError(f"{path}: inputs.kind {kind!r} is not one of {INPUT_KINDS}")
        names = value.get("names")
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise ArtifactError(f"{path}: inputs.names must be a non-empty list of distinct input names, got {names!r}")
        spec = cls(**value)
        if kind == "history":
            spec._check_history(path)
        else:
            for key, default in ADDED_FIELDS.items():
                if getattr(spec, key) != default:
                    raise ArtifactError(f"{path}: inputs.{key} applies to kind 'history' only, not {kind!r}")
        return spec

    def _check_history(self, path: Path) -> None:
        if self.history_input not in self.names:
            raise ArtifactError(f"{path}: inputs.history_input {self.history_input!r} is not one of {self.names}")
        for key, minimum in (("max_len", 1), ("pad_id", 0)):
            number = getattr(self, key)
            if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
                raise ArtifactError(f"{path}: inputs.{key} must be an integer >= {minimum}, got {number!r}")
        if self.padding not in PADDING:
            raise ArtifactError(f"{path}: inputs.padding must be one of {PADDING}, got {self.padding!r}")
        if self.length_input is not None and (
            self.length_input not in self.names or self.length_input == self.history_input
        ):
            raise ArtifactError(
                f"{path}: inputs.length_input {self.length_input!r} must be one of {self.names} other than the "
                f"history input {self.history_input!r}"
            )


def check_model_index(model_index: np.ndarray, n_items: int, spec: InputSpec, where: str) -> np.ndarray:
    """`model_index` as int64 after checking it: one non-negative, distinct index per item, none of them the pad id.
    Whether an index is inside the model's vocabulary cannot be told from the ONNX file, so it is not checked."""
    if model_index.shape != (n_items,) or model_index.dtype.kind not in "iu":
        raise ArtifactError(
            f"{where}: model_index has shape {model_index.shape} and dtype {model_index.dtype}; expected "
            f"({n_items},) integers"
        )
    index = model_index.astype(np.int64)
    if (negative := np.flatnonzero(index < 0)).size:
        raise ArtifactError(f"{where}: model_index of item {negative[0]} is negative ({index[negative[0]]})")
    order = np.argsort(index, kind="stable")
    if (same := np.flatnonzero(index[order][1:] == index[order][:-1])).size:
        first, second = sorted(order[same[0] : same[0] + 2].tolist())
        raise ArtifactError(f"{where}: model_index {index[first]} is given to both item {first} and item {second}")
    if spec.kind == "history" and (hit := np.flatnonzero(index == spec.pad_id)).size:
        raise ArtifactError(f"{where}: the pad id {spec.pad_id} is also the model_index of item {hit[0]}")
    return index


def check_history_inputs(
    spec: InputSpec, user_inputs: dict[str, np.ndarray], model_index: np.ndarray | None, n_items: int, where: str
) -> None:
    """The stored per-user histories are what the service would build for the same items: (n_users, max_len)
    integers, model indices of items or the pad id, padded on the spec's side without gaps, and a length input
    (if any) holding each row's item count. A history request is then fed exactly like a known user."""
    name = spec.history_input
    seqs = user_inputs[name]
    if seqs.ndim != 2 or seqs.shape[1] != spec.max_len or seqs.dtype.kind not in "iu":
        raise ArtifactError(
            f"{where}: '{name}' has shape {seqs.shape} and dtype {seqs.dtype}; expected (users, {spec.max_len}) "
            "integers"
        )
    real = seqs != spec.pad_id
    items = np.arange(n_items) if model_index is None else model_index
    if not np.isin(seqs[real], items).all():
        row = int(np.flatnonzero((~np.isin(seqs, items) & real).any(1))[0])
        raise ArtifactError(f"{where}: '{name}' row {row} holds an index that is neither an item's nor the pad id")
    counts = real.sum(1)
    first_real = spec.max_len - counts if spec.padding == "left" else np.zeros_like(counts)
    positions = np.arange(spec.max_len)[None, :]
    expected = (positions >= first_real[:, None]) & (positions < (first_real + counts)[:, None])
    if (wrong := np.flatnonzero((real != expected).any(1))).size:
        raise ArtifactError(
            f"{where}: '{name}' row {wrong[0]} is not {spec.padding}-padded with the pad id {spec.pad_id}"
        )
    if spec.length_input is not None:
        lengths = user_inputs[spec.length_input]
        if lengths.shape not in ((len(seqs),), (len(seqs), 1)) or lengths.dtype.kind not in "iu":
            raise ArtifactError(
                f"{where}: '{spec.length_input}' has shape {lengths.shape} and dtype {lengths.dtype}; expected "
                f"({len(seqs)},) or ({len(seqs)}, 1) integers"
            )
        lengths = lengths.reshape(len(seqs))
        if (wrong := np.flatnonzero(lengths != counts)).size:
            raise ArtifactError(
                f"{where}: '{spec.length_input}' of row {wrong[0]} is {lengths[wrong[0]]}, but '{name}' holds "
                f"{counts[wrong[0]]} items"
            )
