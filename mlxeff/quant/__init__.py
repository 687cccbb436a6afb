"""Weight formats: per-layer quantization specs and the registry that applies them.

A spec is a small dict stored in ``config.json`` under ``mlxeff.quantization`` and keyed by module
path (``transformer.layers.0.attn.qkv_proj``), e.g. ``{"method": "affine", "bits": 4,
"group_size": 64}``. Each method registers a function that turns an unquantized module into its
compressed leaf module of the right shapes (weights are loaded afterwards).
"""

from typing import Callable, Dict

import mlx.nn as nn

from ..errors import MlxeffError

# method name -> fn(module, spec) -> replacement module (empty, to be filled by load_weights)
SPEC_BUILDERS: Dict[str, Callable[[nn.Module, dict], nn.Module]] = {}


def register_method(name: str):
    def wrap(fn):
        SPEC_BUILDERS[name] = fn
        return fn

    return wrap


@register_method("affine")
def _affine(module: nn.Module, spec: dict) -> nn.Module:
    bits, group_size = int(spec["bits"]), int(spec["group_size"])
    if not hasattr(module, "to_quantized"):
        raise MlxeffError(f"affine quantization does not apply to {type(module).__name__}")
    return module.to_quantized(group_size=group_size, bits=bits)


def _ensure_methods_loaded():
    # Methods defined in submodules register themselves on import.
    import importlib

    for name in ("seedlm",):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            pass


def apply_quantization_spec(model: nn.Module, specs: Dict[str, dict], source: str = "config.json"):
    """Replace each module named in ``specs`` by its compressed form (shapes only)."""
    if not specs:
        return model
    _ensure_methods_loaded()
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
    model.update_modules(_nest(replacements))
    return model


def validate_quantized(model: nn.Module, source) -> None:
    """Let each compressed module check its loaded packed arrays (``validate_packed(name, source)``)
    so out-of-range values fail at load time with the file and tensor named."""
    for name, module in model.named_modules():
        check = getattr(module, "validate_packed", None)
        if check is not None:
            check(name, source)


def _nest(pairs):
    """[('a.b.0.c', m)] -> {'a': {'b': [{'c': m}]}} as ``update_modules`` expects (via tree_unflatten)."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(pairs)
