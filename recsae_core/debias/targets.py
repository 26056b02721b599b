"""De-biasing targets: what `recsae debias --target` accepts and, for fairness targets, the two user groups.

- `popularity`: exposure of popular items, from the split's training interactions (any run has it);
- `gender`: female against male users (the user table's `gender` column, F / M or female / male);
- `attribute:COLUMN=VALUE`: users whose COLUMN is VALUE against users with any other known value of it; users
  without a value are left out. VALUE matches a value exactly (else case-insensitively, else as a number: '25'
  matches 25.0).

A fairness target is measured by the leakage AUC of the top-10 lists, the NDCG gap and each group's NDCG. Its
files and policy are named after `Target.name`: 'gender', or a slug of the target for an attribute
('attribute-occupation-student').
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from recsae_core.common.errors import ConfigError
from recsae_core.data.datasets import Column, Dataset

TARGETS = ("popularity", "gender")
"""Targets named by a word; any user attribute is `ATTRIBUTE` + 'COLUMN=VALUE'."""
ATTRIBUTE = "attribute:"
SYNTAX = "popularity, gender or attribute:COLUMN=VALUE"
SHOWN_VALUES = 30
"""Known values listed in a refusal (the rest are counted)."""


@dataclass(frozen=True)
class Target:
    """A parsed `--target`."""

    spec: str
    """As given: 'popularity', 'gender', 'attribute:occupation=student'."""
    kind: Literal["popularity", "attribute"]
    """Popularity exposure, or a binary split of users by an attribute."""
    column: str | None = None
    """The user attribute column (attribute targets)."""
    value: str | None = None
    """The group's value; None for `gender` (female against male)."""

    @property
    def fairness(self) -> bool:
        """Whether the target splits users into two groups (gender, attribute)."""
        return self.kind == "attribute"

    @property
    def name(self) -> str:
        """The name of the target's files and policy: 'popularity', 'gender', 'attribute-occupation-student'."""
        if self.value is None:
            return self.spec
        column, value = _slug(self.column or ""), _slug(self.value)
        parts = ["attribute", column, value]
        if not column or not value:  # nothing readable is left: keep names of different targets apart
            parts.append(hashlib.sha256(self.spec.encode()).hexdigest()[:8])
        return "-".join(p for p in parts if p)


class Groups(NamedTuple):
    """A fairness target's two groups over all users."""

    member: np.ndarray
    """bool (n_users,): in the target's group (female users for gender)."""
    known: np.ndarray
    """bool (n_users,): has a known value, so is in one of the two groups."""
    label: str
    """The group as it reads: 'F', 'occupation = student'."""
    rest: str
    """The other group: 'M', 'occupation != student'."""


def parse_target(spec: str) -> Target:
    """A `--target` value -> Target; a malformed one is refused with the accepted syntax."""
    if spec == "popularity":
        return Target(spec, "popularity")
    if spec == "gender":
        return Target(spec, "attribute", "gender")
    if spec.startswith(ATTRIBUTE):
        column, sep, value = spec.removeprefix(ATTRIBUTE).partition("=")
        if sep and column.strip() and value.strip():
            return Target(spec, "attribute", column.strip(), value.strip())
        raise ConfigError(f"target '{spec}': expected attribute:COLUMN=VALUE, e.g. attribute:occupation=student")
    raise ConfigError(f"unknown target '{spec}': expected {SYNTAX}")


def user_groups(data: Dataset, target: Target) -> Groups:
    """The two groups of a fairness target over the dataset's users; refused, naming the column and the known
    columns or values, when the user table has no such column or no user has the value."""
    column = _column(data, target)
    values = _values(column)
    if target.value is None:  # gender: F against M, whatever the spelling
        sexes = [{_sex(v) for v in row} - {""} for row in values]
        member = np.array([s == {"F"} for s in sexes])
        known = member | np.array([s == {"M"} for s in sexes])
        if not member.any() or member.all() or not known.any():
            raise ConfigError(f"target 'gender': the user table's 'gender' column needs both F and M users; "
                              f"it has {_known_values(values)}")  # fmt: skip
        return Groups(member, known, "F", "M")
    member = _matches(column, values, target.value)
    known = np.array([bool(row) for row in values])
    what = f"{target.column} = {target.value}"
    if not member.any():
        raise ConfigError(f"target '{target.spec}': no user has {target.column} '{target.value}'; "
                          f"known values: {_known_values(values)}")  # fmt: skip
    if not (known & ~member).any():
        raise ConfigError(f"target '{target.spec}': every user with a known {target.column} has '{target.value}'; "
                          "a split needs users with another value")  # fmt: skip
    return Groups(member, known, what, f"{target.column} != {target.value}")


def _column(data: Dataset, target: Target) -> Column:
    name = target.column or ""
    meta = data.user_meta
    if meta is None:
        raise ConfigError(f"target '{target.spec}': dataset '{data.name}' has no user table, so no attribute "
                          f"'{name}'")  # fmt: skip
    columns = meta.columns or {
        field: Column("categorical", tokens=[[v] if v else [] for v in getattr(meta, field)])
        for field in ("gender", "age", "occupation") if any(getattr(meta, field))
    }  # fmt: skip
    if name not in columns:
        known = ", ".join(columns) or "none"
        raise ConfigError(f"target '{target.spec}': the user table of dataset '{data.name}' has no column '{name}'; "
                          f"its columns: {known}")  # fmt: skip
    return columns[name]


def _values(column: Column) -> list[list[str]]:
    if column.kind == "numeric":
        return [[_number(v)] if np.isfinite(v) else [] for v in np.asarray(column.numbers, dtype=np.float64)]
    if column.kind == "text":
        return [[t] if t else [] for t in column.texts or []]
    return [[t for t in row if t] for row in column.tokens or []]


def _matches(column: Column, values: list[list[str]], value: str) -> np.ndarray:
    """Rows holding `value`: numerically for a numeric column; else exactly, else ignoring case, else as a number
    (a token column of ages: '25.0' finds '25')."""
    wanted = _float(value)
    if column.kind == "numeric":
        return np.asarray(column.numbers, dtype=np.float64) == wanted
    exact = np.array([value in row for row in values], dtype=bool)
    if exact.any():
        return exact
    folded = value.casefold()
    loose = np.array([any(v.casefold() == folded for v in row) for row in values], dtype=bool)
    if loose.any() or np.isnan(wanted):
        return loose
    return np.array([any(_float(v) == wanted for v in row) for row in values], dtype=bool)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _known_values(values: list[list[str]]) -> str:
    distinct = sorted({v for row in values for v in row})
    if not distinct:
        return "none (no user has a value)"
    shown = ", ".join(distinct[:SHOWN_VALUES])
    return shown if len(distinct) <= SHOWN_VALUES else f"{shown} ... ({len(distinct)} in all)"


def _sex(value: str) -> str:
    return {"F": "F", "FEMALE": "F", "M": "M", "MALE": "M"}.get(value.strip().upper(), "")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
