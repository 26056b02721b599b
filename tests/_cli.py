"""Shared check for the CLI's contract on bad input: exit 2, one `recsae: error:` line, no traceback, no stdout."""

from __future__ import annotations

from collections.abc import Callable

from recsae_core.pipeline.cli import main


def cli_refusal(capsys, args: list[str], entry: Callable[[list[str]], int] = main) -> str:
    """Run the CLI (`entry`: the core's, or service.cli.main for serve and bench) expecting a refusal; return its one
    error line."""
    capsys.readouterr()
    code = entry(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("recsae: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]
