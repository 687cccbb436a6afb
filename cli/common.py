"""Helpers shared by the CLI commands."""

from __future__ import annotations

import json
import sys

import typer


def fail(message: str, code: int = 1):
    """Print one line to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def choices(values) -> str:
    """``a, b or c`` for an error message."""
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def check_at_least(option: str, value, minimum) -> None:
    """Fail with one line naming ``option`` unless ``value`` is None or at least ``minimum``."""
    if value is not None and value < minimum:
        fail(f"{option} must be at least {minimum}, not {value}")


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_default) + "\n")


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


DTYPE_HELP = ("Compute precision: auto (float32 on the CPU, where float16/bfloat16 matmuls are slow; "
              "the stored precision on a GPU), float32, float16 or bfloat16. On the CPU, affine "
              "4-bit layers always compute from their dequantized weights.")


PREFILL_STEP_HELP = "Prompt chunk length (default: 2048 on a GPU, 512 on the CPU)."


def check_prefill_step_size(value) -> None:
    """``--prefill-step-size``: None (the device's default, ``engine.prefill_step_size``) or at
    least 1; otherwise one line and exit 2."""
    if value is not None and value < 1:
        fail(f"--prefill-step-size must be at least 1, got {value}", code=2)


def apply_compute_dtype(net, dtype: str) -> None:
    """Cast the model's floating-point parameters for computing (``mlxeff.precision``: ``auto``
    is float32 on the CPU; affine 4-bit layers are dequantized there whatever the dtype)."""
    from mlxeff.errors import MlxeffError
    from mlxeff.precision import apply_compute_dtype as apply

    try:
        apply(net, dtype)
    except MlxeffError as e:
        fail(str(e))


def load_for_generation(model, dtype: str):
    """(path, model, tokenizer) for a command that generates or scores text: the directory
    resolved (None: the embedded default), loaded, a tokenizer required, the compute dtype
    applied."""
    import mlxeff
    from mlxeff.io import resolve_model_dir

    path = resolve_model_dir(model)
    net, tokenizer = mlxeff.load(path)
    if tokenizer is None:
        fail(f"{path}: no tokenizer files (tokenizer.json or tokenizer.model); convert with --tokenizer")
    apply_compute_dtype(net, dtype)
    return path, net, tokenizer
