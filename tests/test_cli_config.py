"""Command-line options derived from a config dataclass (common.cli_config), on a small config made here."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import pytest

from recsae_core.common.cli_config import ConfigOptions, field_docs, help_text
from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import Fraction, PositiveFloat, PositiveInt, check_fields


@dataclass
class Toy:
    """A config with one field of each kind the command line handles."""

    width: PositiveInt = 16
    """Latent count of the toy."""
    rate: PositiveFloat | None = None
    """Step size (unset = the toy's own)."""
    share: Fraction = 0.5
    """Share of rows kept, e.g. 50% by default."""
    name: str = "toy"
    """SAE-style name."""
    plain: int = 3
    """Any integer."""
    progress: bool = True
    """Progress bars."""
    verbose: bool = False
    """Print every step."""
    hidden: int = 7
    """Not on the command line."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.width < self.plain:
            raise ConfigError(f"Toy.width {self.width} is below Toy.plain {self.plain}")


FLAGS = {"width": "--toy-width", "rate": "--rate", "share": "--share", "name": "--name", "plain": "--plain",
         "progress": "--quiet", "verbose": "--verbose"}  # fmt: skip


def parser() -> tuple[argparse.ArgumentParser, ConfigOptions]:
    options = ConfigOptions(Toy, FLAGS)
    p = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    options.add_to(p)
    return p, options


def test_docstrings_are_read_from_the_class_source():
    assert field_docs(Toy)["width"] == "Latent count of the toy."
    assert set(field_docs(Toy)) == {"width", "rate", "share", "name", "plain", "progress", "verbose", "hidden"}


def test_defaults_types_and_help_come_from_the_fields():
    p, _ = parser()
    actions = {a.dest: a for a in p._actions}
    assert {dest: actions[dest].default for dest in ("toy_width", "rate", "share", "name", "plain", "quiet")} == {
        "toy_width": 16, "rate": None, "share": 0.5, "name": "toy", "plain": 3, "quiet": True,
    }  # fmt: skip
    assert actions["toy_width"].help == "latent count of the toy (default: 16)"
    assert actions["rate"].help == "step size (unset = the toy's own)"
    assert actions["name"].help == "SAE-style name (default: toy)"  # an acronym keeps its case
    assert actions["quiet"].help == "no progress bars"  # a flag that turns a True field off
    assert actions["verbose"].help == "print every step"
    assert "50%" in p.format_help()  # '%' in a docstring is escaped for argparse
    assert "hidden" not in actions


def test_parsed_options_build_the_config_and_record_what_was_typed():
    p, options = parser()
    args = p.parse_args([])
    assert options.build(args) == Toy()
    assert options.typed(args) == []
    args = p.parse_args(["--toy-width", "32", "--rate", "0.5", "--quiet", "--verbose", "--plain", "3"])
    assert options.build(args, hidden=1) == Toy(width=32, rate=0.5, progress=False, verbose=True, plain=3, hidden=1)
    assert options.typed(args) == ["--toy-width", "--rate", "--plain", "--quiet", "--verbose"]  # a default, typed


def test_ranges_are_checked_by_argparse_and_by_the_config():
    p, options = parser()
    for argv, reason in ((["--toy-width", "0"], "expected a positive integer, got 0"),
                         (["--share", "2"], "expected a number in [0, 1], got 2"),
                         (["--plain", "x"], "expected int, got 'x'")):  # fmt: skip
        with pytest.raises(argparse.ArgumentError, match=re.escape(reason)):
            p.parse_args(argv)
    with pytest.raises(ConfigError, match=r"Toy.width: expected a positive integer, got 0"):
        Toy(width=0)
    # Errors across fields name the options the user typed, not the fields.
    with pytest.raises(ConfigError, match=r"^--toy-width 2 is below --plain 3$"):
        options.build(p.parse_args(["--toy-width", "2"]))


def test_misnamed_or_undocumented_fields_are_refused():
    with pytest.raises(ValueError, match="no fields"):
        ConfigOptions(Toy, {"colour": "--colour"})


def test_help_text():
    assert help_text("AuxK window.", 5) == "AuxK window (default: 5)"
    assert help_text("Progress bars on stderr.", negated=True) == "no progress bars on stderr"
