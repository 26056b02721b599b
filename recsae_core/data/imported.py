"""A recommender's own data, as its users have it, in the model's own id space: the interaction log and optional
item and user tables (RecBole atomic files or CSV, see `tables`), read into a `Dataset` whose dense item index i is
the model's i-th item id.

Nothing is filtered by rating or k-core: this is the data the model was trained and is served on. Rows naming an id
the model does not know (an item added after training, say) are skipped and counted in the `ImportReport`; a file in
which no row matches the model is refused.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from recsae_core.common.errors import DataError
from recsae_core.data.datasets import Dataset, item_meta_from_table, user_meta_from_table
from recsae_core.data.tables import Table, read_table

EXAMPLES = 5
"""How many unknown ids a report or a refusal quotes."""
NO_FILTERS = {"min_rating": -1, "core": 0}
"""`Dataset.filters` of an import: the same record as `load_dataset(min_rating=None, core=0)`."""


class ImportReport(NamedTuple):
    """What an import read from the user's files, and what it skipped because the model does not know it."""

    rows_read: int
    """Rows of the interaction log."""
    rows_kept: int
    """Rows in the Dataset (rows_read less the two skip counts)."""
    skipped_unknown_item: int
    """Rows naming an item the model does not know (whatever their user)."""
    skipped_unknown_user: int
    """Rows with a known item naming a user the model does not know (only with a user id map)."""
    unknown_items: tuple[str, ...]
    """The first few unknown item ids, in file order."""
    unknown_users: tuple[str, ...]
    """The first few unknown user ids, in file order."""
    items_without_interactions: int
    """Model items no kept row names (they stay in the Dataset)."""
    item_rows_matched: int
    """Item-table rows whose item the model knows (0 without an item table)."""
    item_rows_skipped: int
    """Item-table rows whose item the model does not know."""
    user_rows_matched: int
    """User-table rows whose user is in the Dataset (0 without a user table)."""
    user_rows_skipped: int
    """User-table rows whose user the model does not know or the log never names."""

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self._asdict().items()}


def load_imported_dataset(
    interactions: Path,
    item_ids: list[str],
    user_ids: list[str] | None = None,
    items: Path | None = None,
    users: Path | None = None,
    name: str = "imported",
) -> tuple[Dataset, ImportReport]:
    """The Dataset of a model's own data: dense item i is `item_ids[i]` (every model item, even without
    interactions); dense users are the log's users in order of first appearance, only those in `user_ids` when it
    is given; each user's rows sorted by (timestamp, file order), oldest first. Duplicate rows are kept as given."""
    item_position = _positions(item_ids, "item_ids")
    known_users = None if user_ids is None else _positions(user_ids, "user_ids")
    log = read_table(interactions, required=("user_id", "item_id"))
    raw_users, raw_items = log.columns["user_id"], log.columns["item_id"]
    item_index = np.asarray([item_position.get(item, -1) for item in raw_items], dtype=np.int64)
    item_known = item_index >= 0
    user_known = (
        np.ones(len(log), dtype=bool)
        if known_users is None
        else np.asarray([user in known_users for user in raw_users], dtype=bool)
    )
    kept = np.flatnonzero(item_known & user_known)
    unknown_items = _first_distinct(raw_items, np.flatnonzero(~item_known))
    unknown_users = _first_distinct(raw_users, np.flatnonzero(item_known & ~user_known))
    if len(kept) == 0:
        whom = "an item" if known_users is None else "a user and an item"
        examples = ", ".join(repr(x) for x in unknown_items or unknown_users)
        raise DataError(
            f"{log.path}: no row names {whom} the model knows ({len(log)} rows; unknown ids such as {examples})"
        )

    timestamps = _timestamps(log)[kept]
    # Dense users in order of first appearance, like load_dataset, so the ids do not depend on how tokens sort.
    user_position: dict[str, int] = {}
    user_index = np.asarray([user_position.setdefault(raw_users[row], len(user_position)) for row in kept], np.int64)
    order = np.lexsort((kept, timestamps, user_index))  # by user, then time, then file order: histories oldest first
    user_tokens = list(user_position)

    item_table = read_table(items, required=("item_id",)) if items is not None else None
    if item_table is not None:
        _refuse_duplicate_ids(item_table, "item_id")
    item_meta, item_rows = item_meta_from_table(item_table, list(item_ids))
    if item_table is not None:
        _refuse_no_match(item_table, "item_id", item_rows, "an item the model knows")
    user_meta, user_rows = None, np.zeros(0, dtype=np.int64)
    if users is not None:
        user_table = read_table(users, required=("user_id",))
        _refuse_duplicate_ids(user_table, "user_id")
        user_meta, user_rows = user_meta_from_table(user_table, user_tokens)
        _refuse_no_match(user_table, "user_id", user_rows, "a user of the interaction log the model knows")

    dataset = Dataset(
        name=name,
        user_tokens=user_tokens,
        item_tokens=list(item_ids),
        users=user_index[order],
        items=item_index[kept][order],
        timestamps=timestamps[order],
        item_meta=item_meta,
        user_meta=user_meta,
        filters=dict(NO_FILTERS),
    )
    report = ImportReport(
        rows_read=len(log),
        rows_kept=len(kept),
        skipped_unknown_item=int((~item_known).sum()),
        skipped_unknown_user=int((item_known & ~user_known).sum()),
        unknown_items=unknown_items,
        unknown_users=unknown_users,
        items_without_interactions=int((np.bincount(dataset.items, minlength=len(item_ids)) == 0).sum()),
        item_rows_matched=int((item_rows >= 0).sum()),
        item_rows_skipped=int((item_rows < 0).sum()),
        user_rows_matched=int((user_rows >= 0).sum()),
        user_rows_skipped=int((user_rows < 0).sum()),
    )
    return dataset, report


def _positions(ids: list[str], what: str) -> dict[str, int]:
    position = {raw: i for i, raw in enumerate(ids)}
    if len(position) != len(ids):
        raise ValueError(f"{what} repeats an id")  # the id map reader refuses duplicates, so this is a caller bug
    if not ids:
        raise ValueError(f"{what} is empty")
    return position


def _first_distinct(values: list[str], rows: np.ndarray) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(values[row])
        if len(seen) == EXAMPLES:
            break
    return tuple(seen)


def _timestamps(log: Table) -> np.ndarray:
    """The log's timestamps as float64 seconds: numbers, or ISO 8601 dates (UTC unless they say otherwise);
    file order without a timestamp column."""
    if "timestamp" not in log.columns:
        return np.arange(len(log), dtype=np.float64)
    values = log.columns["timestamp"]
    try:
        out = np.asarray(values, dtype=np.float64)
    except ValueError:  # dates, or a bad value: row by row, to name the line
        out = np.asarray([_seconds(log, row, value) for row, value in enumerate(values)], dtype=np.float64)
    if np.isnan(out).any():
        line = log.line_numbers[int(np.flatnonzero(np.isnan(out))[0])]
        raise DataError(f"{log.path}: line {line}: timestamp is NaN")
    return out


def _seconds(log: Table, row: int, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        line = log.line_numbers[row]
        raise DataError(
            f"{log.path}: line {line}: timestamp {value!r} is neither a number nor an ISO 8601 date"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _refuse_duplicate_ids(table: Table, id_column: str) -> None:
    """A metadata table names each id once: two rows for one item leave its metadata ambiguous."""
    first: dict[str, int] = {}
    for row, raw in enumerate(table.columns[id_column]):
        if raw in first:
            line, earlier = table.line_numbers[row], table.line_numbers[first[raw]]
            raise DataError(f"{table.path}: line {line}: duplicate {id_column} '{raw}' (first on line {earlier})")
        first[raw] = row


def _refuse_no_match(table: Table, id_column: str, rows: np.ndarray, what: str) -> None:
    if (rows >= 0).any():
        return
    examples = ", ".join(repr(raw) for raw in dict.fromkeys(table.columns[id_column][:EXAMPLES]))
    raise DataError(f"{table.path}: no row names {what} ({len(table)} rows; {id_column}s such as {examples})")
