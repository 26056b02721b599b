"""Ranges of config fields, written once: an `Annotated` type whose parser reads command-line text and checks values.

A config dataclass annotates a field `PositiveInt`; the command line (common.cli_config) uses the parser as the
argparse type, and the dataclass's __post_init__ calls `check_fields`, which runs the same parser on the value.
"""

from __future__ import annotations

import argparse
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Annotated, Any, NamedTuple

from recsae_core.common.errors import ConfigError

Parser = Callable[[str], Any]
"""Text -> value; raises argparse.ArgumentTypeError with a one-line reason (argparse prints it as is)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


PositiveInt = Annotated[int, positive_int]
NonNegativeInt = Annotated[int, non_negative_int]
PositiveFloat = Annotated[float, positive_float]
NonNegativeFloat = Annotated[float, non_negative_float]
Fraction = Annotated[float, fraction]


def _text(value_type: type) -> Parser:
    def parse(text: str) -> Any:
        try:
            return value_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {value_type.__name__}, got {text!r}") from None

    return parse


class FieldKind(NamedTuple):
    """What a field holds, as far as text goes."""

    parse: Parser | None
    """The field's parser; None for bool fields (flags, not values)."""
    ranged: bool
    """Whether the annotation declares a range (checked by check_fields)."""
    optional: bool
    """Whether None is allowed (`X | None`)."""


@functools.cache
def field_kinds(cls: type) -> dict[str, FieldKind]:
    """Each field of dataclass `cls`: its parser (the Annotated range, else int/float/str), and whether it may be
    None. Fields of other types are left out."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, FieldKind] = {}
    for f in fields(cls):
        hint, optional = hints[f.name], False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(members) < len(typing.get_args(hint))
            if len(members) != 1:
                continue
            hint = members[0]
        if typing.get_origin(hint) is Annotated:
            out[f.name] = FieldKind(hint.__metadata__[0], True, optional)
        elif hint is bool:
            out[f.name] = FieldKind(None, False, optional)
        elif hint in (int, float, str):
            out[f.name] = FieldKind(_text(hint), False, optional)
    return out


def check_fields(config: Any) -> None:
    """Raise ConfigError naming the first field of `config` outside the range its annotation declares. Values are
    checked by parsing their text, so an int field holding 2.5 or True fails too."""
    name = type(config).__name__
    for field_name, kind in field_kinds(type(config)).items():
        value = getattr(config, field_name)
        if not kind.ranged or (value is None and kind.optional):
            continue
        try:
            kind.parse(str(value))
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"{name}.{field_name}: {err}") from None
