"""Helpers shared by the CLI commands."""

from __future__ import annotations

import json
import sys

import typer


def fail(message: str, code: int = 1):
    """Print one line to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_default) + "\n")


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
