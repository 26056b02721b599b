"""The input recipe: how a user's inputs to a recommender's ONNX model are built, in the model's own id space.

With the ONNX model `inputs -> h` and the item matrix `E` (scores = h E^T + b), the recipe completes the contract
recsae wraps any recommender by. It is a small JSON file, with paths relative to the file itself:

    {"kind": "sequence", "inputs": {"items": "item_seq", "length": "item_seq_len"}, "max_len": 50,
     "pad_index": 0, "padding": "left", "item_index": "item_map.csv"}
    {"kind": "user_index", "inputs": {"user": "user_idx"}, "user_index": "user_map.csv",
     "item_index": "item_map.csv"}
    {"kind": "custom", "user_inputs": "user_inputs.safetensors", "item_index": "item_map.csv"}

`item_map.csv` has the columns `item_id,index` (row `index` of E is that item), `user_map.csv` has `user_id,index`.
For `sequence`, a history is ordered oldest first and its newest `max_len` items are kept; `length` (optional) is
fed the number of real items. `custom` rows are precomputed inputs keyed by the file's `user_id` tensor order and
`user_map.csv`-style ids in `user_index` (optional; row order otherwise).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recsae_core.common.artifacts import write_json
from recsae_core.common.errors import DataError
from recsae_core.common.layout import ITEM_MAP, RECIPE, USER_INPUTS, USER_MAP

RecipeKind = Literal["sequence", "user_index", "custom"]
KINDS: tuple[str, ...] = ("sequence", "user_index", "custom")
ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sequence": (("items",), ("length",)),
    "user_index": (("user",), ()),
    "custom": ((), ()),
}
"""Per kind: the input roles that must name an ONNX input, and those that may (or be null)."""
KEYS: dict[str, set[str]] = {
    "sequence": {"kind", "inputs", "max_len", "pad_index", "padding", "item_index"},
    "user_index": {"kind", "inputs", "user_index", "item_index"},
    "custom": {"kind", "user_inputs", "user_index", "item_index"},
}
"""The keys each kind accepts; anything else is refused (a typo would otherwise be silently ignored)."""


@dataclass(frozen=True)
class IdMap:
    """An id map from one of the model's own files: raw id <-> the model's index."""

    path: Path
    """The CSV it was read from."""
    ids: list[str]
    """Raw ids, in file order."""
    index: np.ndarray
    """(n,) int64 the model's index of each id."""
    position: dict[str, int] = field(repr=False, compare=False)
    """Raw id -> its row in `ids`."""

    def lookup(self, raw: str) -> int | None:
        """The model's index of `raw`, or None when the model does not know it."""
        row = self.position.get(raw)
        return None if row is None else int(self.index[row])


def read_id_map(path: Path, id_column: str, limit: int | None = None, rows_of: str = "the item matrix") -> IdMap:
    """Read `id_column,index` rows; refuse a missing column, a malformed or negative index, an index at or past
    `limit` (the rows of `rows_of`), and a duplicate id or index, naming the file and the line."""
    if not path.is_file():
        raise DataError(f"{path}: id map not found")
    ids: list[str] = []
    indices: list[int] = []
    position: dict[str, int] = {}
    owner: dict[int, int] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for column in (id_column, "index"):
            if column not in header:
                raise DataError(f"{path}: line 1: no '{column}' column (header: {','.join(header) or 'empty'})")
        for line, row in enumerate(reader, start=2):
            raw, text = (row.get(id_column) or "").strip(), (row.get("index") or "").strip()
            if not raw:
                raise DataError(f"{path}: line {line}: empty {id_column}")
            try:
                index = int(text)
            except ValueError:
                raise DataError(f"{path}: line {line}: index {text!r} is not an integer") from None
            if index < 0 or (limit is not None and index >= limit):
                bound = f"{rows_of}'s rows 0..{limit - 1}" if limit is not None else "the indices >= 0"
                raise DataError(f"{path}: line {line}: index {index} is outside {bound}")
            if raw in position:
                first = position[raw] + 2
                raise DataError(f"{path}: line {line}: duplicate {id_column} '{raw}' (first on line {first})")
            if index in owner:
                raise DataError(f"{path}: line {line}: index {index} already belongs to line {owner[index]}")
            position[raw], owner[index] = len(ids), line
            ids.append(raw)
            indices.append(index)
    if not ids:
        raise DataError(f"{path}: no rows")
    return IdMap(path, ids, np.asarray(indices, dtype=np.int64), position)


def pack_histories(
    histories: list[np.ndarray], max_len: int, pad_index: int, padding: str
) -> tuple[np.ndarray, np.ndarray]:
    """(B, max_len) int64 histories, each its newest max_len items padded with pad_index on the `padding` side, and
    (B,) int64 real item counts: the one rule by which a sequence model is fed, offline and served."""
    batch = np.full((len(histories), max_len), pad_index, dtype=np.int64)
    lengths = np.zeros(len(histories), dtype=np.int64)
    for row, history in enumerate(histories):
        tail = np.asarray(history, dtype=np.int64)[-max_len:]
        lengths[row] = len(tail)
        if padding == "left":
            batch[row, max_len - len(tail) :] = tail
        else:
            batch[row, : len(tail)] = tail
    return batch, lengths


@dataclass(frozen=True)
class Recipe:
    """A validated input recipe with its id maps read."""

    path: Path
    """The recipe file (relative paths in it are resolved against its folder)."""
    kind: RecipeKind
    """sequence, user_index or custom."""
    inputs: dict[str, str | None]
    """Role -> ONNX input name: sequence: items, length (None when the model takes no length); user_index: user."""
    items: IdMap
    """The model's item id map (index = row of E)."""
    users: IdMap | None = None
    """The model's user id map (user_index; optional for custom)."""
    max_len: int = 0
    """Most history items fed (sequence)."""
    pad_index: int = 0
    """Index fed where there is no item (sequence)."""
    padding: Literal["left", "right"] = "left"
    """Which side the padding goes (sequence)."""
    user_inputs: Path | None = None
    """Precomputed per-user inputs (custom)."""

    @property
    def input_names(self) -> list[str]:
        """The ONNX inputs the recipe feeds."""
        return [name for name in self.inputs.values() if name is not None]

    def sequence_inputs(self, histories: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Model inputs for histories of model item indices, oldest first: the newest max_len kept, padded on the
        recipe's side with pad_index; the length input (if any) gets the real item count."""
        if self.kind != "sequence":
            raise ValueError(f"a {self.kind} recipe takes no histories")
        batch, lengths = pack_histories(histories, self.max_len, self.pad_index, self.padding)
        feed = {self.inputs["items"]: batch}
        if self.inputs.get("length"):
            feed[self.inputs["length"]] = lengths
        return feed

    def user_index_inputs(self, model_users: np.ndarray) -> dict[str, np.ndarray]:
        """Model inputs for users given by their model user index."""
        if self.kind != "user_index":
            raise ValueError(f"a {self.kind} recipe takes no user indices")
        return {self.inputs["user"]: np.asarray(model_users, dtype=np.int64)}

    def to_json(self) -> dict[str, Any]:
        """The recipe as written in a run or bundle folder (maps beside it, under their own file names)."""
        out: dict[str, Any] = {"kind": self.kind, "item_index": ITEM_MAP}
        if self.kind == "sequence":
            out.update(inputs=dict(self.inputs), max_len=self.max_len, pad_index=self.pad_index, padding=self.padding)
        elif self.kind == "user_index":
            out.update(inputs=dict(self.inputs), user_index=USER_MAP)
        else:
            out["user_inputs"] = USER_INPUTS
            if self.users is not None:
                out["user_index"] = USER_MAP
        return out

    def save(self, folder: Path) -> list[str]:
        """Write the recipe, its maps and (custom) its user inputs into `folder`, under the names `to_json` gives;
        returns the file names written. `load_recipe(folder / RECIPE)` reads them back."""
        write_json(folder / RECIPE, self.to_json())
        written = [RECIPE, ITEM_MAP]
        write_id_map(self.items, "item_id", folder / ITEM_MAP)
        if self.users is not None:
            write_id_map(self.users, "user_id", folder / USER_MAP)
            written.append(USER_MAP)
        if self.user_inputs is not None:
            shutil.copyfile(self.user_inputs, folder / USER_INPUTS)
            written.append(USER_INPUTS)
        return written


def write_id_map(ids: IdMap, id_column: str, path: Path) -> None:
    """An id map as `read_id_map` reads it: `id_column,index`, in the map's order."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([id_column, "index"])
        writer.writerows(zip(ids.ids, ids.index.tolist(), strict=True))


def _int(path: Path, body: dict[str, Any], key: str, minimum: int) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{path}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _file(path: Path, body: dict[str, Any], key: str) -> Path:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: '{key}' must name a file (relative to the recipe), got {value!r}")
    target = (path.parent / value).resolve()
    if not target.is_file():
        raise DataError(f"{path}: '{key}' names {value}, which does not exist ({target})")
    return target


def load_recipe(path: Path, n_items: int | None = None) -> Recipe:
    """Read and validate a recipe and its id maps; `n_items` (rows of E) bounds the item indices and the pad index.
    Every problem raises DataError naming the file (and line, for the maps)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: recipe not found")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise DataError(f"{path}: a recipe is a JSON object")
    kind = body.get("kind")
    if kind not in KINDS:
        raise DataError(f"{path}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    if unknown := sorted(set(body) - KEYS[kind]):
        raise DataError(f"{path}: unknown key(s) {unknown} for a {kind} recipe; allowed: {sorted(KEYS[kind])}")
    required, optional = ROLES[kind]
    inputs: dict[str, str | None] = {}
    if required or optional:
        given = body.get("inputs")
        if not isinstance(given, dict):
            raise DataError(f"{path}: 'inputs' must be an object mapping {', '.join(required)} to ONNX input names")
        if unknown := sorted(set(given) - set(required) - set(optional)):
            raise DataError(f"{path}: unknown input role(s) {unknown}; a {kind} recipe has {[*required, *optional]}")
        for role in (*required, *optional):
            name = given.get(role)
            if name is None and role in optional:
                inputs[role] = None
                continue
            if not isinstance(name, str) or not name:
                raise DataError(f"{path}: inputs.{role} must name an ONNX input, got {name!r}")
            inputs[role] = name
        if len(set(inputs.values()) - {None}) != len([v for v in inputs.values() if v is not None]):
            raise DataError(f"{path}: two input roles name the same ONNX input ({inputs})")
    items = read_id_map(_file(path, body, "item_index"), "item_id", limit=n_items)
    fields: dict[str, Any] = {}
    if kind == "sequence":
        fields["max_len"] = _int(path, body, "max_len", 1)
        fields["pad_index"] = _int(path, body, "pad_index", 0)
        if n_items is not None and fields["pad_index"] > n_items:
            raise DataError(f"{path}: pad_index {fields['pad_index']} is past the item matrix's {n_items} rows")
        if fields["pad_index"] in set(items.index.tolist()):
            raise DataError(f"{path}: pad_index {fields['pad_index']} is also an item's index in {items.path.name}")
        padding = body.get("padding", "left")
        if padding not in ("left", "right"):
            raise DataError(f"{path}: 'padding' must be 'left' or 'right', got {padding!r}")
        fields["padding"] = padding
    users = None
    if kind == "user_index" or (kind == "custom" and "user_index" in body):
        users = read_id_map(_file(path, body, "user_index"), "user_id")
    if kind == "custom":
        fields["user_inputs"] = _file(path, body, "user_inputs")
    return Recipe(path=path, kind=kind, inputs=inputs, items=items, users=users, **fields)
