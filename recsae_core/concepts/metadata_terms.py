"""Metadata terms from a run's item and user tables, whatever their columns are named.

Item columns give item terms, one 0/1 column per term:
- categorical (genres, a category, tags): one term per token, '<column>:<token>' (tokens held by a single item say
  no more than the item itself, so they are dropped; a column keeps its `MAX_VALUES` most frequent tokens);
- numeric: release decades for year-like columns ('<column>:1990s'), the values themselves where a column has at
  most `MAX_LEVELS` of them ('<column>:4'), else tertile bands ('<column>:low' / 'mid' / 'high');
- text (titles, descriptions): no terms, titles name the items and free text is for display;
- popularity from the log: 'pop:popular' / 'pop:mid-popular' / 'pop:niche'.

Every user attribute column gives '<column>:<value>' terms the same way (numeric ones banded).

The known MovieLens columns keep the vocabulary the catalog has always had (`MOVIELENS_ITEM`, `MOVIELENS_USER`):
genre / class / genres -> 'genre:Horror', release_year / year -> 'decade:1980s', gender -> 'gender:female', age ->
the ML-1M age bands ('age:25-34'), occupation codes -> names ('occupation:writer'); titles and zip codes give no
terms. Any other column takes the generic path. A dataset whose tables fill only the older fixed fields
(`ItemMeta.genres` / `years`, `UserMeta.gender` / `age` / `occupation`) is read through those same names.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal, NamedTuple

import numpy as np
import scipy.sparse as sp

from recsae_core.data.datasets import GENRE_COLUMNS, TITLE_COLUMNS, YEAR_COLUMNS, Column, Dataset, ItemMeta, UserMeta

POP_BANDS = ("popular", "mid-popular", "niche")
AGE_BANDS = ((18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)  # fmt: skip
BAND_WORDS = ("low", "mid", "high")
MIN_ROWS = 2
"""A generic categorical token must be held by at least this many rows to be a term."""
MAX_VALUES = 500
"""At most this many terms per generic categorical column (its most frequent tokens)."""
MAX_LEVELS = 5
"""A generic numeric column with at most this many distinct values gives one term per value, not bands."""
KEY_COLUMNS = ("item_id", "user_id")
"""Table keys, never terms."""
MOVIELENS_ITEM: dict[str, str] = {
    **{name: "genre" for name in GENRE_COLUMNS},
    **{name: "decade" for name in YEAR_COLUMNS},
    **{name: "" for name in TITLE_COLUMNS},
}
"""Known MovieLens item columns -> their term kind ('' = no terms). Only the first genre / year column present maps."""
MOVIELENS_USER: dict[str, str] = {"gender": "gender", "age": "age", "occupation": "occupation", "zip_code": ""}
"""Known MovieLens user columns -> their term kind ('' = no terms: zip codes are near-unique per user)."""
RESERVED_KINDS = ("pop", "item", "history")
"""Term kinds the term space itself uses; a column of that name gets its side as a prefix ('item_pop')."""

Role = Literal["category", "era", "measure", "pop", "user"]
"""What a kind of term says, for descriptions: an item category ('Horror'), an era ('1980s'), a measure band
('high price'), popularity, or a user attribute."""


class TermGroup(NamedTuple):
    """The terms of one column (or of popularity): keys and a 0/1 matrix over the table's rows."""

    kind: str
    """Key prefix ('genre', 'decade', 'pop', 'price', 'gender')."""
    role: Role
    """What the terms say (see `Role`)."""
    keys: list[str]
    """Term keys ('genre:Horror'), in column order of `matrix`."""
    matrix: sp.csr_matrix
    """(rows, len(keys)) 0/1."""


def age_band(age: str) -> str:
    """ML-1M age codes and ML-100K raw ages -> the ML-1M bands ('25-34')."""
    try:
        value = float(age)
    except ValueError:
        return age.strip()
    return next((label for bound, label in AGE_BANDS if value < bound), "56+")


def occupation_name(code: str) -> str:
    """ML-1M numeric occupation codes -> names; names pass through."""
    try:
        index = int(float(code))
    except ValueError:
        return code.strip()
    return ML1M_OCCUPATIONS[index] if 0 <= index < len(ML1M_OCCUPATIONS) else code


def gender_name(value: str) -> str:
    """'F' / 'M' -> 'female' / 'male'; other values lower-cased."""
    return {"F": "female", "M": "male"}.get(value.upper(), value.lower())


def popularity_bands(popularity: np.ndarray) -> np.ndarray:
    """0 popular / 1 mid-popular / 2 niche: items holding the first, second and last third of interactions."""
    order = np.lexsort((np.arange(len(popularity)), -popularity))
    counts = popularity[order].astype(np.float64)
    start = (np.cumsum(counts) - counts) / max(counts.sum(), 1)  # share of interactions held by more popular items
    bands = np.empty(len(popularity), dtype=np.int64)
    bands[order] = np.minimum((start * 3).astype(np.int64), 2)
    return bands


def format_number(value: float) -> str:
    """25.0 -> '25', 2.5 -> '2.5': how a numeric value reads in a term key."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def column_values(column: Column) -> list[list[str]]:
    """Each row's values as strings, whatever the column's kind (empty where unknown)."""
    if column.kind == "categorical":
        return [[t for t in row if t] for row in column.tokens or []]
    if column.kind == "numeric":
        return [[format_number(v)] if np.isfinite(v) else [] for v in np.asarray(column.numbers, dtype=np.float64)]
    return [[t] if t else [] for t in column.texts or []]


def column_numbers(column: Column) -> np.ndarray:
    """A column as float64 per row (a categorical or text row's first value parsed; NaN where none parses)."""
    if column.kind == "numeric":
        return np.asarray(column.numbers, dtype=np.float64)
    out = []
    for row in column_values(column):
        try:
            out.append(float(row[0]) if row else np.nan)
        except ValueError:
            out.append(np.nan)
    return np.asarray(out, dtype=np.float64)


def multi_hot(rows: list[list[str]], kind: str, role: Role, names: list[str] | None = None) -> TermGroup:
    """One term per distinct value (sorted), or per value of `names` only."""
    names = sorted({v for row in rows for v in row if v}) if names is None else names
    index = {v: i for i, v in enumerate(names)}
    pairs = sorted({(r, index[v]) for r, row in enumerate(rows) for v in row if v in index})
    r, c = (np.asarray(x, dtype=np.int64) for x in zip(*pairs, strict=True)) if pairs else ([], [])
    matrix = sp.csr_matrix((np.ones(len(pairs)), (r, c)), shape=(len(rows), len(names)))
    return TermGroup(kind, role, [f"{kind}:{v}" for v in names], matrix)


def legacy_item_columns(meta: ItemMeta) -> dict[str, Column]:
    """The fixed item fields as columns, for tables that do not fill `ItemMeta.columns`."""
    out: dict[str, Column] = {}
    if any(meta.genres):
        out["genre"] = Column("categorical", tokens=[list(g) for g in meta.genres])
    years = np.asarray(meta.years, dtype=np.float64)
    if (years > 0).any():
        out["release_year"] = Column("numeric", numbers=np.where(years > 0, years, np.nan))
    return out


def legacy_user_columns(meta: UserMeta) -> dict[str, Column]:
    """The fixed user fields as columns, for tables that do not fill `UserMeta.columns`."""
    fields = {"gender": meta.gender, "age": meta.age, "occupation": meta.occupation}
    return {name: Column("categorical", tokens=[[v] if v else [] for v in values])
            for name, values in fields.items() if any(values)}  # fmt: skip


def item_columns(data: Dataset) -> dict[str, Column]:
    return data.item_meta.columns or legacy_item_columns(data.item_meta)


def user_columns(data: Dataset) -> dict[str, Column]:
    if data.user_meta is None:
        return {}
    return data.user_meta.columns or legacy_user_columns(data.user_meta)


def item_term_groups(data: Dataset, popularity: np.ndarray) -> list[TermGroup]:
    """Item terms: the MovieLens genre and decade columns first, then every other column in table order, then
    popularity bands (the order the catalog has always had, so ties between equal terms break the same way)."""
    mapped, generic = _split_known(item_columns(data), MOVIELENS_ITEM)
    groups: list[TermGroup] = []
    if "genre" in mapped:
        groups.append(multi_hot(column_values(mapped["genre"]), "genre", "category"))
    if "decade" in mapped:
        years = column_numbers(mapped["decade"])
        groups.append(multi_hot([[_decade(y)] if y >= 1 else [] for y in np.nan_to_num(years, nan=-1)], "decade",
                                "era"))  # fmt: skip
    # The user kinds are taken too, so that a description never reads an item column as a user attribute.
    used = {"genre", "decade", *RESERVED_KINDS, *MOVIELENS_USER.values()} - {""}
    for name, column in generic.items():
        group = generic_group(name, column, _kind(name, "item", used), side="item")
        if group is not None:
            groups.append(group)
    groups.append(multi_hot([[POP_BANDS[b]] for b in popularity_bands(popularity)], "pop", "pop"))
    return groups


def user_term_groups(data: Dataset, taken: set[str] | None = None) -> list[TermGroup]:
    """User terms: gender, age band and occupation (MovieLens names) first, then every other attribute column.
    `taken`: kinds the item terms already use (a user column of that name gets a 'user_' prefix)."""
    mapped, generic = _split_known(user_columns(data), MOVIELENS_USER)
    groups: list[TermGroup] = []
    for kind, convert in (("gender", gender_name), ("age", age_band), ("occupation", occupation_name)):
        if kind in mapped:
            rows = [[convert(v) for v in row] for row in column_values(mapped[kind])]
            groups.append(multi_hot(rows, kind, "user"))
    used = {"gender", "age", "occupation", *RESERVED_KINDS, *(taken or ())}
    for name, column in generic.items():
        group = generic_group(name, column, _kind(name, "user", used), side="user")
        if group is not None:
            groups.append(group)
    return groups


def generic_group(name: str, column: Column, kind: str, side: Literal["item", "user"]) -> TermGroup | None:
    """The terms of a column no mapping knows (None for text columns and columns without usable values)."""
    role: Role = "user" if side == "user" else "category"
    if column.kind == "text":
        return None
    if column.kind == "categorical":
        rows = column_values(column)
        counts = Counter(v for row in rows for v in set(row))
        kept = sorted(v for v, n in counts.items() if n >= MIN_ROWS)
        if len(kept) > MAX_VALUES:
            kept = sorted(sorted(kept, key=lambda v: -counts[v])[:MAX_VALUES])
        return multi_hot(rows, kind, role, kept) if kept else None
    values = column_numbers(column)
    known = values[np.isfinite(values)]
    if len(known) == 0:
        return None
    if _year_like(name, known):
        rows = [[_decade(v)] if np.isfinite(v) else [] for v in values]
        return multi_hot(rows, kind, "user" if side == "user" else "era")
    role = "user" if side == "user" else "measure"
    if len(np.unique(known)) <= MAX_LEVELS:
        return multi_hot([[format_number(v)] if np.isfinite(v) else [] for v in values], kind, role)
    low, high = np.quantile(known, [1 / 3, 2 / 3])
    rows = [[_band(v, low, high)] if np.isfinite(v) else [] for v in values]
    return multi_hot(rows, kind, role, [b for b in BAND_WORDS if any(b in r for r in rows)])


def _band(value: float, low: float, high: float) -> str:
    """Tertile band; on ties a cut point belongs to the band below it."""
    return BAND_WORDS[0] if value <= low else BAND_WORDS[2] if value > high else BAND_WORDS[1]


def _split_known(columns: dict[str, Column], known: dict[str, str]) -> tuple[dict[str, Column], dict[str, Column]]:
    """(term kind -> the column mapped to it, the other columns by name). A kind takes the first of its names in
    `known` order (as the MovieLens reader picks 'genre' before 'class'); table keys and no-term columns are in
    neither."""
    mapped: dict[str, Column] = {}
    taken: set[str] = set()
    for name, kind in known.items():
        if kind and name in columns and kind not in mapped:
            mapped[kind] = columns[name]
            taken.add(name)
    generic = {name: column for name, column in columns.items()
               if name not in taken and name not in KEY_COLUMNS and known.get(name) != ""}  # fmt: skip
    return mapped, generic


def _kind(name: str, side: str, used: set[str]) -> str:
    """A column's key prefix: its name without ':' or spaces (which term keys use), unique among `used`."""
    base = re.sub(r"[\s:]+", "_", name.strip()) or "column"
    kind = base if base not in used else f"{side}_{base}"
    n = 1
    while kind in used:
        n += 1
        kind = f"{side}_{base}_{n}"
    used.add(kind)
    return kind


def _decade(year: float) -> str:
    return f"{int(year) // 10 * 10}s"


def _year_like(name: str, values: np.ndarray) -> bool:
    """A year column: named so, with whole numbers that read as years."""
    whole = bool(np.all(values == np.round(values)))
    return "year" in name.lower() and whole and bool(np.all((values >= 1000) & (values < 3000)))
