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


def _parser(name: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], unparsed: str, outside: str) -> Parser:
    """A parser that converts text and refuses values for which `ok` is false, naming what it expected."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unparsed}, got {text!r}") from None
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {outside}, got {value if convert is int else text}")
        return value

    parse.__name__ = name
    return parse


positive_int = _parser("positive_int", int, lambda v: v > 0, "a positive integer", "a positive integer")
non_negative_int = _parser("non_negative_int", int, lambda v: v >= 0, "an integer >= 0", "an integer >= 0")
positive_float = _parser(
    "positive_float", float, lambda v: 0 < v < math.inf, "a positive number", "a positive finite number"
)
non_negative_float = _parser(
    "non_negative_float", float, lambda v: 0 <= v < math.inf, "a number >= 0", "a finite number >= 0"
)
fraction = _parser("fraction", float, lambda v: 0 <= v <= 1, "a number in [0, 1]", "a number in [0, 1]")


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
