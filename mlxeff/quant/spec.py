"""The registry of weight formats and the one path that builds compressed modules from a spec.

A spec is a small dict stored in ``config.json`` under ``mlxeff.quantization`` and keyed by module
path (``transformer.layers.0.attn.qkv_proj``), e.g. ``{"method": "affine", "bits": 4,
"group_size": 64}``. Each method registers a builder (``register_method``) that turns an
unquantized module into its compressed leaf module of the right shapes; loading fills the arrays
afterwards, and quantizing from float weights (affine, SeedLM) applies the same spec and then fills
them from the encoder. This module imports no method: ``mlxeff.quant`` imports them, so that a
method module can import the registry without an import cycle.
"""

from __future__ import annotations

from typing import Callable, Dict

import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..errors import MlxeffError

# method name -> fn(module, spec) -> replacement module (empty, to be filled by load_weights)
SPEC_BUILDERS: Dict[str, Callable[[nn.Module, dict], nn.Module]] = {}


def register_method(name: str):
    def wrap(fn):
        SPEC_BUILDERS[name] = fn
        return fn

    return wrap


def apply_quantization_spec(model: nn.Module, specs: Dict[str, dict], source: str = "config.json"):
    """Replace each module named in ``specs`` by its compressed form (shapes only)."""
    if not specs:
        return model
    modules = dict(model.named_modules())
    replacements = []
    for path, spec in specs.items():
        method = spec.get("method") if isinstance(spec, dict) else None
        if method not in SPEC_BUILDERS:
            raise MlxeffError(f"unknown quantization method {method!r} for {path}", source)
        if path not in modules:
            raise MlxeffError(f"quantization spec names {path!r}, which the model does not have", source)
        try:
            replacements.append((path, SPEC_BUILDERS[method](modules[path], spec)))
        except (MlxeffError, ValueError, KeyError, TypeError) as e:
            text = e.args[0] if isinstance(e, MlxeffError) and e.path is None else str(e)
            raise MlxeffError(f"{path}: {text}", source) from None
    # [('a.b.0.c', m)] -> {'a': {'b': [{'c': m}]}}, as ``update_modules`` expects
    model.update_modules(tree_unflatten(replacements))
    return model


def validate_quantized(model: nn.Module, source) -> None:
    """Let each compressed module check its loaded packed arrays (``validate_packed(name, source)``)
    so out-of-range values fail at load time with the file and tensor named."""
    for name, module in model.named_modules():
        check = getattr(module, "validate_packed", None)
        if check is not None:
            check(name, source)
