"""Command-line options derived from a config dataclass, so the command line cannot drift from the config.

For each chosen field the option's type comes from the field's annotation (its range parser, common.ranges), its
default from the field's default, and its help from the field's one-line docstring, read from the class source
(Python keeps no attribute docstrings). A bool field becomes a flag that flips its default: `progress: bool = True`
under the name `--quiet` sets progress to False, and its help is "no " + the docstring, so such docstrings are noun
phrases. Parsed options are read back into the config by the same field -> flag map, and the options a user actually
typed are recorded, so a command can refuse options that would not apply.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import field_kinds

TYPED = "typed_options"
"""Namespace attribute: the dests of the options typed on the command line (not left at their defaults)."""


class Typed(argparse.Action):
    """argparse's store (store_const with nargs=0) that also notes the option was typed: an option given its default
    value explicitly is still an option the user asked for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, TYPED, {*getattr(namespace, TYPED, ()), self.dest})


def typed(args: argparse.Namespace) -> set[str]:
    """Dests of the options typed on the command line (options added with action=Typed)."""
    return set(getattr(args, TYPED, ()))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring, the string literal right below its annotation in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):  # fmt: skip
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def help_text(doc: str, default: Any = None, negated: bool = False) -> str:
    """A field's docstring as argparse help: lower-case start (unless the first word is an acronym like SAE), no
    final full stop, the default appended, '%' escaped for argparse's formatting."""
    text = doc.rstrip(".")
    first = text.split(" ", 1)[0]
    if first[1:] == first[1:].lower():
        text = text[:1].lower() + text[1:]
    if negated:
        text = "no " + text
    elif default is not None and not isinstance(default, bool):
        text += f" (default: {default})"
    return text.replace("%", "%%")


@dataclass(frozen=True)
class ConfigOptions:
    """The command-line options of chosen fields of a config dataclass."""

    cls: type
    """The config dataclass."""
    flags: Mapping[str, str]
    """Field name -> option name, e.g. {"n_latents": "--latents"}."""

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(self.cls)}
        if unknown := sorted(set(self.flags) - known):
            raise ValueError(f"{self.cls.__name__} has no fields {unknown}")
        kinds, docs = field_kinds(self.cls), field_docs(self.cls)
        if missing := sorted(set(self.flags) - set(kinds)):
            raise ValueError(f"{self.cls.__name__}: no option type for fields {missing}")
        if undocumented := sorted(set(self.flags) - set(docs)):
            raise ValueError(f"{self.cls.__name__}: fields {undocumented} have no docstring to use as help")

    def without(self, *names: str) -> ConfigOptions:
        """The same options less those of fields `names`."""
        return ConfigOptions(self.cls, {k: v for k, v in self.flags.items() if k not in names})

    @staticmethod
    def dest(flag: str) -> str:
        return flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add one option per chosen field."""
        kinds, docs = field_kinds(self.cls), field_docs(self.cls)
        defaults = {f.name: f.default for f in dataclasses.fields(self.cls)}
        for name, flag in self.flags.items():
            kind, default = kinds[name], defaults[name]
            if default is dataclasses.MISSING:
                raise ValueError(f"{self.cls.__name__}.{name} has no default for {flag}")
            if kind.parse is None:  # a bool flag flips the field's default
                parser.add_argument(flag, dest=self.dest(flag), action=Typed, nargs=0, const=not default,
                                    default=default, help=help_text(docs[name], negated=default))  # fmt: skip
            else:
                parser.add_argument(flag, dest=self.dest(flag), action=Typed, type=kind.parse, default=default,
                                    help=help_text(docs[name], default))  # fmt: skip

    def build(self, args: argparse.Namespace, **fixed: Any) -> Any:
        """The config from the parsed options, with `fixed` fields set by the caller (e.g. shared with another
        config). The config's own checks run; their messages name the options, not the fields."""
        values = {name: getattr(args, self.dest(flag)) for name, flag in self.flags.items()}
        try:
            return self.cls(**values, **fixed)
        except ConfigError as err:
            raise ConfigError(self.in_option_terms(str(err))) from None

    def typed(self, args: argparse.Namespace) -> list[str]:
        """The options among these that were typed on the command line."""
        given = typed(args)
        return [flag for flag in self.flags.values() if self.dest(flag) in given]

    def in_option_terms(self, message: str) -> str:
        """Replace `Class.field` in a config's error message with the field's option name."""
        pattern = rf"\b{re.escape(self.cls.__name__)}\.(\w+)"
        return re.sub(pattern, lambda m: self.flags.get(m.group(1), m.group(0)), message)
