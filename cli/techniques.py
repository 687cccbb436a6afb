"""Command-line flags built from the technique registry, one help panel per technique.

``with_techniques(command)`` adds every registered technique's flags to a typer command
(``--NAME`` enables it, or ``--NAME VALUE`` for a technique that takes a value; ``--NAME-OPTION``
sets an option and implies the technique) and calls the command with ``techniques``: the specs
the Python API takes (``{"lazy": {"keep": (0.9, 0.5)}}``). Commands never name a technique.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Optional, Tuple

import typer

from mlxeff.techniques import registry

_PREFIX = "technique__"


def _ident(name: str) -> str:
    return name.replace("-", "_")


def _annotation(option: registry.Option):
    kind = option.type
    return Tuple[(kind,) * option.nargs] if option.nargs > 1 else kind  # type: ignore[misc]


def _default_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return f" (default: {' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value)})"
    return f" (default: {value})"


def technique_parameters() -> list:
    """One ``inspect.Parameter`` per technique flag, each in its technique's help panel."""
    params = []
    for t in registry.techniques():
        key = f"{_PREFIX}{_ident(t.name)}"
        if t.value is None:
            default = typer.Option(False, t.flag, help=t.summary, rich_help_panel=t.title)
            params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=bool))
        else:
            default = typer.Option(None, t.flag, help=t.summary, metavar=t.value.metavar,
                                   rich_help_panel=t.title)
            params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Optional[_annotation(t.value)]))
        for o in t.options:
            default = typer.Option(None, o.flag(t.name), help=o.help + _default_text(o.default),
                                   metavar=o.metavar, rich_help_panel=t.title)
            params.append(inspect.Parameter(f"{key}__{o.name}", inspect.Parameter.KEYWORD_ONLY,
                                            default=default, annotation=Optional[_annotation(o)]))
    return params


def collect(kwargs: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Pop the technique flags out of ``kwargs``; the specs of the techniques the user chose."""
    specs: Dict[str, Dict[str, Any]] = {}
    for t in registry.techniques():
        key = f"{_PREFIX}{_ident(t.name)}"
        enabled = kwargs.pop(key, None)
        opts = {}
        for o in t.options:
            value = kwargs.pop(f"{key}__{o.name}", None)
            if value is not None:
                opts[o.name] = tuple(value) if isinstance(value, (list, tuple)) else value
        if t.value is not None and enabled is not None:
            opts[t.value.name] = enabled
        if enabled or opts:
            specs[t.name] = opts
    return specs


def with_techniques(command):
    """Give a typer command every technique's flags; it receives them as ``techniques``."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "techniques"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        specs = collect(kwargs)  # pops the technique flags first
        return command(**kwargs, techniques=specs)

    wrapper.__signature__ = signature.replace(parameters=own + technique_parameters())
    return wrapper

