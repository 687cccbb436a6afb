"""The options every training command shares, defined once.

``@training_options(...)`` replaces a command's ``run: TrainingRun`` parameter with one option per
``TrainConfig`` field (``--steps``, ``--lr``, ``--batch-size``, ...; ``compile`` as ``--no-compile``)
plus the run options ``--eval-tokens``, ``--cache-dir`` and ``--resume``, and calls the command with
the ``TrainingRun`` they make. Defaults come from ``TrainConfig``; a command overrides a default
(``defaults=``) or a help text (``helps=``), leaves a field out (``omit=``; the field keeps its
``TrainConfig`` default or its ``fixed=`` value) and names its working folder in the help
(``folder=``).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import typer

from mlxeff.train.config import TrainConfig

HELP = {
    "steps": "Optimizer steps.",
    "batch_size": "Sequences per micro-batch.",
    "seq_len": "Tokens per training sequence.",
    "accum": "Micro-batches per optimizer step.",
    "lr": "Peak learning rate.",
    "min_lr": "Learning rate at the last step.",
    "warmup": "Linear warm-up steps.",
    "weight_decay": "AdamW decoupled weight decay.",
    "clip": "Gradient clipping by global norm (0 = off).",
    "z_loss": "z-loss coefficient (OpenELM).",
    "dtype": "Compute precision: float32 or bfloat16 (bf16 keeps fp32 master weights; use float32 "
             "on CPU).",
    "seed": "Seed for initialisation and data order.",
    "eval_every": "Validate every N steps (0 = at the end).",
    "save_every": "Checkpoint every N steps (0 = at the end). Default: automatic, after every 10 "
                  "minutes of training (later when a checkpoint takes longer than 2% of that, so "
                  "checkpoints cost under 2% of the time). Ctrl-C always writes one.",
    "log_every": "Progress every N steps.",
    "compile": "Do not mx.compile the step.",
    "eval_tokens": "Validation tokens per evaluation.",
    "cache_dir": "Token cache directory (default {folder}/cache).",
    "resume": "Continue from {folder}'s newest checkpoint.",
}
# Settings of TrainConfig that are not command-line options.
INTERNAL = ("beta1", "beta2", "eps", "keep_checkpoints")


@dataclass
class TrainingRun:
    """What the shared options produce."""

    cfg: TrainConfig
    eval_tokens: int
    cache_dir: Optional[Path]
    resume: bool


RUN_OPTIONS = (("eval_tokens", int, 262_144), ("cache_dir", Optional[Path], None),
               ("resume", bool, False))


def _parameter(field: str, kind, default, help_text: str) -> inspect.Parameter:
    """The typer parameter of one setting; ``compile`` becomes the switch ``--no-compile``."""
    name, flag = field, "--" + field.replace("_", "-")
    if field == "compile":
        name, flag, default = "no_compile", "--no-compile", not default
    option = typer.Option(default, flag, help=help_text)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


def _shared_parameters(defaults: dict, helps: dict, omit, folder: str):
    hints = typing.get_type_hints(TrainConfig)
    specs = [(f.name, hints[f.name], f.default) for f in fields(TrainConfig)
             if f.name not in INTERNAL and f.name not in omit] + list(RUN_OPTIONS)
    return [_parameter(name, kind, defaults.get(name, default),
                       helps.get(name, HELP[name]).format(folder=folder))
            for name, kind, default in specs]


def training_options(*, defaults: Optional[dict] = None, helps: Optional[dict] = None, omit=(),
                     fixed: Optional[dict] = None, folder: str = "OUT"):
    """Decorate a typer command that takes ``run: TrainingRun`` (see the module docstring)."""
    defaults, helps, fixed = dict(defaults or {}), dict(helps or {}), dict(fixed or {})
    run_names = [name for name, _, _ in RUN_OPTIONS]

    def decorate(command):
        hints = typing.get_type_hints(command)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
               for p in inspect.signature(command).parameters.values()]
        at = next(i for i, p in enumerate(own) if p.name == "run")
        shared = _shared_parameters(defaults, helps, omit, folder)
        names = [p.name for p in shared]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            run = {name: values.pop(name) for name in run_names}
            if "no_compile" in values:
                values["compile"] = not values.pop("no_compile")
            cfg = TrainConfig(**{**fixed, **values})  # validates: bad values fail here, first
            return command(run=TrainingRun(cfg, **run), **kwargs)

        params = own[:at] + shared + own[at + 1:]
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
