"""The technique registry: what each technique is called, its options, the hooks it occupies.

A technique module declares itself with ``register(Technique(...))``: a name (its command-line
flag ``--NAME``; options become ``--NAME-OPTION``), a one-line summary citing its paper, its
``Option``s (type, default, help, a check), the engine hooks it fills (``prefill``, ``decode``,
``drafter``, ``attention``) and a ``build`` function that turns validated options into hook
objects. The command line (``mlxeff generate``, ``eval``, ``serve``) builds its flags from here,
and the Python API takes the same specs: ``{"lazy": {"keep": (0.9, 0.5)}, "lookup": {}}``.

Composition is decided here, not by callers:

- weight formats (float, affine, SeedLM) are properties of the model and compose with everything;
- a drafter composes with any prefill and decode technique (it only proposes tokens);
- two techniques that fill the same hook refuse each other in one line, unless one of them
  declares (``wraps``) that it can take the other as its inner strategy.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import mlx.nn as nn

from ..errors import MlxeffError

HOOKS = ("prefill", "decode", "drafter", "attention")
# Modules that register techniques when imported (the registry imports them on first use).
TECHNIQUE_MODULES = ("lazyllm", "kv_prediction", "prompt_lookup", "superposition", "refreshkv",
                     "refreshkv_baselines", "early_exit", "draft_model", "m2r2")


class TechniqueError(MlxeffError, ValueError):
    """An unknown technique or option, a bad option value, or two techniques that do not compose."""


@dataclass(frozen=True)
class Option:
    """One option of a technique. ``type`` is int, float, str, Path or bool; ``nargs`` 2 makes a
    pair. ``check(value)`` returns an error text (without the option name) or None."""

    name: str
    type: type
    default: Any
    help: str
    nargs: int = 1
    metavar: Optional[str] = None
    check: Optional[Callable[[Any], Optional[str]]] = None

    def flag(self, technique: str) -> str:
        return f"--{technique}-{self.name.replace('_', '-')}"


@dataclass(frozen=True)
class Technique:
    name: str
    title: str  # "LazyLLM (arXiv 2407.14057)": the help panel's title
    summary: str  # what the enabling flag does
    hooks: Tuple[str, ...]
    build: Callable[["BuildContext", Dict[str, Any]], Dict[str, Any]]
    options: Tuple[Option, ...] = ()
    value: Optional[Option] = None  # the enabling flag takes this value (``--kv-prediction DIR``)
    wraps: Tuple[str, ...] = ()  # techniques whose hook this one can take as its inner strategy

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def option(self, name: str) -> Option:
        for o in self.options + ((self.value,) if self.value else ()):
            if o.name == name:
                return o
        known = ", ".join(o.name for o in self.options) or "none"
        raise TechniqueError(f"{self.flag} has no option {name!r} (options: {known})")


@dataclass
class BuildContext:
    """What a technique's ``build`` may use: the model, its directory, the prefill chunk length,
    and the hooks built so far (a wrapping technique finds its inner strategy there)."""

    model: nn.Module
    model_dir: Optional[Path] = None
    step_size: int = 512  # build_hooks passes the resolved length (``engine.prefill_step_size``)
    hooks: Dict[str, Any] = field(default_factory=dict)


_REGISTRY: Dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    bad = [h for h in technique.hooks if h not in HOOKS]
    if bad:
        raise ValueError(f"unknown hook(s) {bad} (hooks: {HOOKS})")
    _REGISTRY[technique.name] = technique
    return technique


def techniques() -> List[Technique]:
    """Every registered technique, in registration order."""
    for module in TECHNIQUE_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    order = {f"{__package__}.{m}": i for i, m in enumerate(TECHNIQUE_MODULES)}
    return sorted(_REGISTRY.values(), key=lambda t: order.get(t.build.__module__, len(order)))


def get(name: str) -> Technique:
    known = {t.name: t for t in techniques()}
    if name not in known:
        raise TechniqueError(f"unknown technique {name!r} (known: {', '.join(known)})")
    return known[name]


# ---- option values ------------------------------------------------------------------------------

def coerce(option: Option, value: Any, where: str) -> Any:
    """``value`` as the option's type (pairs as tuples), checked; errors name ``where``."""
    if option.nargs > 1:
        if not isinstance(value, (list, tuple)) or len(value) != option.nargs:
            raise TechniqueError(f"{where} takes {option.nargs} values, got {value!r}")
        out = tuple(_scalar(option.type, v, where) for v in value)
    else:
        out = _scalar(option.type, value, where)
    problem = option.check(out) if option.check else None
    if problem:
        raise TechniqueError(f"{where} {problem}")
    return out


def _scalar(kind: type, value: Any, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TechniqueError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TechniqueError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TechniqueError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if kind is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise TechniqueError(f"{where} must be a path, got {value!r}")
        return Path(value)
    if not isinstance(value, str):
        raise TechniqueError(f"{where} must be text, got {value!r}")
    return value


def resolve(specs: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Validated options for each named technique (defaults filled in); ``specs`` maps a name to
    a dict of options (``None`` or ``{}`` for the defaults; a technique with a ``value`` option may
    be given that value directly)."""
    out = {}
    for name, opts in specs.items():
        t = get(name)
        if opts is None:
            opts = {}
        elif t.value is not None and not isinstance(opts, dict):
            opts = {t.value.name: opts}
        if not isinstance(opts, dict):
            raise TechniqueError(f"{t.flag}: options must be a mapping of names to values, got {opts!r}")
        values = {o.name: o.default for o in t.options}
        if t.value is not None:
            values[t.value.name] = None
        for key, v in opts.items():
            o = t.option(key)
            where = t.flag if o is t.value else o.flag(t.name)
            values[key] = None if v is None and o.default is None else coerce(o, v, where)
        if t.value is not None and values[t.value.name] is None:
            raise TechniqueError(f"{t.flag} needs a value ({t.value.metavar or t.value.name})")
        out[name] = values
    check_composition(out)
    return out


def check_composition(names: Iterable[str]) -> None:
    """Refuse, in one line, two techniques that fill the same hook (unless one wraps the other)."""
    chosen = [get(n) for n in names]
    for i, a in enumerate(chosen):
        for b in chosen[i + 1:]:
            shared = [h for h in a.hooks if h in b.hooks]
            if shared and b.name not in a.wraps and a.name not in b.wraps:
                raise TechniqueError(f"{a.flag} and {b.flag} both replace the {shared[0]}; choose one")


def build_hooks(model: nn.Module, specs: Dict[str, Any], *, model_dir=None,
                step_size: Optional[int] = None) -> Dict[str, Any]:
    """The engine's hooks for ``specs``; techniques that wrap others are built after them.
    ``step_size``: the prompt chunk length (None: the device's default, ``engine.prefill_step_size``)."""
    from ..engine import prefill_step_size

    values = resolve(specs)
    ctx = BuildContext(model, Path(model_dir) if model_dir is not None else None,
                       prefill_step_size(step_size))
    order = sorted(values, key=lambda n: bool(get(n).wraps))
    for name in order:
        ctx.hooks.update(get(name).build(ctx, values[name]))
    return dict(ctx.hooks)
