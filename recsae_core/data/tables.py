"""Tables as users have them: a RecBole atomic file or a CSV with a header row, read into one `Table`.

The format follows the suffix. RecBole atomic files (``.inter``, ``.item``, ``.user``) are tab-separated with a
typed header (``user_id:token``, ``genre:token_seq``, ``rating:float``); a ``*_seq`` value holds several values
separated by spaces. A ``.csv`` file has a plain header row, and a multi-valued cell separates its values with ``|``.
Every refusal is one line naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from recsae_core.common.errors import DataError

TableFormat = Literal["atomic", "csv"]
ColumnKind = Literal["categorical", "numeric", "text"]
FIELD_TYPES = {"token", "token_seq", "float", "float_seq"}
ATOMIC_SUFFIXES = (".inter", ".item", ".user")
CSV_SUFFIX = ".csv"
CSV_MULTI_SEPARATOR = "|"
TEXT_MIN_DISTINCT = 0.8
"""Share of distinct values a column needs to count as free text: a column that repeats its values groups rows,
which is what a category is for, however long its values are."""
TEXT_MIN_MEAN_LENGTH = 30
"""Mean characters above which mostly-distinct values count as free text even when they are single words."""


@dataclass(frozen=True)
class Table:
    """One parsed table file: raw string columns keyed by column name, with the file lines they came from."""

    path: Path
    """The file the table was read from."""
    line_numbers: list[int]
    """1-based file line of each row (blank lines are skipped, so rows and lines can differ)."""
    columns: dict[str, list[str]]
    """Column name (without an atomic ``:type`` suffix) -> one raw, stripped string per row."""
    types: dict[str, str]
    """Column name -> declared RecBole field type; empty for CSV, whose header declares none."""
    format: TableFormat = "atomic"
    """'atomic' (RecBole, tab-separated, typed header) or 'csv'."""

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def require(self, *names: str) -> None:
        """Refuse, naming the file, when any of `names` is not a column of the table."""
        missing = [name for name in names if name not in self.columns]
        if missing:
            raise DataError(
                f"{self.path}: line 1: header lacks required column(s) {missing}; it has {list(self.columns)}"
            )

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

    def numbers(self, name: str, strict: bool = True) -> np.ndarray:
        """A metadata column as float64 with NaN where empty; a value that is not a number is refused when `strict`
        and NaN otherwise (a year column may say 'unknown')."""
        out = np.full(len(self), np.nan)
        for row, value in enumerate(self.columns[name]):
            if not value:
                continue
            try:
                out[row] = float(value)
            except ValueError:
                if strict:
                    line = self.line_numbers[row]
                    raise DataError(f"{self.path}: line {line}: field '{name}' is not a number: {value!r}") from None
        return out

    def multi_separator(self) -> str | None:
        """What separates the values of a multi-valued cell: ``|`` in CSV, whitespace (None) in atomic files."""
        return CSV_MULTI_SEPARATOR if self.format == "csv" else None

    def tokens(self, name: str, split: bool | None = None) -> list[list[str]]:
        """Each row's values of a categorical column; `split` None splits where the format marks a cell as
        multi-valued (atomic ``*_seq`` types, any CSV cell with ``|``), True always splits, False never does."""
        if split is None:
            split = self.format == "csv" or self.types.get(name, "").endswith("_seq")
        if not split:
            return [[value] if value else [] for value in self.columns[name]]
        sep = self.multi_separator()
        return [[part.strip() for part in value.split(sep) if part.strip()] for value in self.columns[name]]

    def infer_kind(self, name: str) -> ColumnKind:
        """The column's kind: a declared RecBole float is numeric and a ``float_seq`` categorical; CSV cells with
        ``|`` are categorical and all-numeric CSV columns numeric; then mostly distinct values are free text when
        they are long or (in CSV) mostly several words, and anything else is categorical."""
        declared = self.types.get(name)
        if declared == "float":
            return "numeric"
        if declared == "float_seq":
            return "categorical"
        values = [value for value in self.columns[name] if value]
        if self.format == "csv" and values:
            if any(CSV_MULTI_SEPARATOR in value for value in values):
                return "categorical"
            if all(_is_number(value) for value in values):
                return "numeric"
        # In an atomic token_seq a space separates values, so several words alone do not make it text there.
        return "text" if looks_like_text(values, words=self.format == "csv") else "categorical"


def looks_like_text(values: list[str], words: bool = True) -> bool:
    """Whether non-empty `values` read as free text (titles, descriptions) rather than as categories: mostly
    distinct, and long or (when `words`) mostly several words."""
    if not values:
        return False
    if len(set(values)) < TEXT_MIN_DISTINCT * len(values):
        return False
    mean_length = sum(len(value) for value in values) / len(values)
    multi_word = sum(1 for value in values if " " in value)
    return mean_length > TEXT_MIN_MEAN_LENGTH or (words and multi_word * 2 >= len(values))


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def read_table(path: Path, required: tuple[str, ...] = ()) -> Table:
    """Read an atomic file (``.inter``, ``.item``, ``.user``) or a ``.csv`` file, by its suffix."""
    suffix = path.suffix.lower()
    if suffix in ATOMIC_SUFFIXES:
        return read_atomic(path, required)
    if suffix == CSV_SUFFIX:
        return read_csv(path, required)
    raise DataError(
        f"{path}: unknown table format {path.suffix or '(no suffix)'!r}: expected a RecBole atomic file "
        f"({', '.join(ATOMIC_SUFFIXES)}) or a CSV file with a header row (.csv)"
    )


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        # utf-8-sig drops the byte-order mark spreadsheet programs put in front of CSV exports.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_atomic(path: Path, required: tuple[str, ...] = ()) -> Table:
    """Read a RecBole atomic file, checking the header and that every row has every field."""
    lines = _read_text(path).splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty file (expected a header like 'user_id:token\\titem_id:token')")
    names: list[str] = []
    types: dict[str, str] = {}
    for raw in lines[0].split("\t"):
        name, sep, kind = raw.strip().partition(":")
        if not sep or kind not in FIELD_TYPES or not name:
            raise DataError(
                f"{path}: line 1: header field {raw!r} is not 'name:type' with type in {sorted(FIELD_TYPES)}"
            )
        if name in types:
            raise DataError(f"{path}: line 1: header names field '{name}' twice")
        names.append(name)
        types[name] = kind
    columns: dict[str, list[str]] = {name: [] for name in names}
    line_numbers: list[int] = []
    table = Table(path=path, line_numbers=line_numbers, columns=columns, types=types, format="atomic")
    table.require(*required)
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
    if not line_numbers:
        raise DataError(f"{path}: header only, no rows")
    return table


def read_csv(path: Path, required: tuple[str, ...] = ()) -> Table:
    """Read a comma-separated file with a header row (quoted cells may hold commas and line breaks)."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    table: Table | None = None
    end = 0  # the last physical line read so far: a row starts on the line after it
    try:
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if table is None:
                names = _csv_header(path, cells, start)
                table = Table(path=path, line_numbers=[], columns={name: [] for name in names}, types={}, format="csv")
                table.require(*required)
                continue
            if len(cells) != len(table.columns):
                raise DataError(
                    f"{path}: line {start}: expected {len(table.columns)} comma-separated fields, found {len(cells)}"
                )
            for values, cell in zip(table.columns.values(), cells, strict=True):
                values.append(cell.strip())
            table.line_numbers.append(start)
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None
    if table is None:
        raise DataError(f"{path}: empty file (expected a header row like 'user_id,item_id')")
    if not table.line_numbers:
        raise DataError(f"{path}: header only, no rows")
    return table


def _csv_header(path: Path, cells: list[str], line: int) -> list[str]:
    names = [cell.strip() for cell in cells]
    seen: set[str] = set()
    for position, name in enumerate(names, start=1):
        if not name:
            raise DataError(f"{path}: line {line}: header column {position} has no name")
        if name in seen:
            raise DataError(f"{path}: line {line}: header names column '{name}' twice")
        seen.add(name)
    return names
