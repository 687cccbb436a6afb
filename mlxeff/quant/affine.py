"""Affine (min-max, per group) weight quantization with MLX's own kernels.

Affine quantization maps reals to integers by a scale and an offset (Jacob et al., arXiv
1712.05877); applied per group of weights it is the round-to-nearest baseline that SeedLM
(arXiv 2410.10714) compares against. Each row of a weight is cut into groups of ``group_size``; a
group stores ``bits``-bit integers ``q`` with a scale ``s`` and a bias ``b`` (``w ≈ s·q + b``, the
group's min and max mapped to the ends of the code range), which is MLX's ``mx.quantize`` as
``nn.QuantizedLinear``/``nn.QuantizedEmbedding`` use it. This module only chooses what to quantize and records the
choice so that ``mlxeff.load`` rebuilds the same modules: ``model.mlxeff_meta["quantization"]``
maps module path -> ``{"method": "affine", "bits", "group_size"}``, and the modules are replaced
through the same registry that loading uses (``mlxeff.quant.apply_quantization_spec``, with the
builder ``build_from_spec`` registered here).

Choices: every ``Linear`` gets ``bits``; the vocabulary matrices (the token embedding, which is
also the output head when tied, and an untied ``lm_head``) get ``embedding_bits`` (default 8; None
keeps them in floating point), because the output head's error reaches every logit; a module
whose input width is not a multiple of ``group_size`` stays in floating point (MLX cannot group it).
"""

from __future__ import annotations

from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxeffError
from .spec import apply_quantization_spec, register_method

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
VOCAB_MODULES = ("transformer.token_embeddings", "lm_head")


@register_method("affine")
def build_from_spec(module: nn.Module, spec: dict) -> nn.Module:
    """The empty ``nn.QuantizedLinear``/``nn.QuantizedEmbedding`` a spec entry describes."""
    bits, group_size = int(spec["bits"]), int(spec["group_size"])
    if not hasattr(module, "to_quantized"):
        raise MlxeffError(f"affine quantization does not apply to {type(module).__name__}")
    return module.to_quantized(group_size=group_size, bits=bits)


def check_settings(bits: int, group_size: int, embedding_bits: Optional[int] = None) -> None:
    for name, b in (("bits", bits), ("embedding bits", embedding_bits)):
        if b is not None and b not in SUPPORTED_BITS:
            raise MlxeffError(f"affine quantization supports {name} in {SUPPORTED_BITS}, not {b}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise MlxeffError(f"affine quantization supports group sizes {SUPPORTED_GROUP_SIZES}, not {group_size}")


def affine_spec(model: nn.Module, bits: int, group_size: int, embedding_bits: Optional[int] = 8) -> Dict[str, dict]:
    """The per-module spec ``quantize_affine`` applies (module path -> spec)."""
    check_settings(bits, group_size, embedding_bits)
    spec = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            raise MlxeffError(f"{path} is already quantized")
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        b = embedding_bits if path in VOCAB_MODULES else bits
        if b is None or module.weight.shape[-1] % group_size:
            continue
        spec[path] = {"method": "affine", "bits": int(b), "group_size": int(group_size)}
    return spec


def quantize_affine(model: nn.Module, bits: int = 4, group_size: int = 64, embedding_bits: Optional[int] = 8):
    """Quantize ``model`` in place and record the spec in ``model.mlxeff_meta["quantization"]``."""
    spec = affine_spec(model, bits, group_size, embedding_bits)
    apply_quantization_spec(model, spec)
    mx.eval(model.parameters())
    meta = dict(getattr(model, "mlxeff_meta", None) or {})
    meta["quantization"] = {**(meta.get("quantization") or {}), **spec}
    model.mlxeff_meta = meta
    return model


def dequantize_affine(model: nn.Module, dtype=mx.float32) -> int:
    """Replace every affine-quantized module by its dequantized float form (``dtype``), in place;
    the number replaced. The weights are exactly ``mx.dequantize`` of the stored ones, so the
    model computes what it computed, only with dense matmuls. For the CPU: MLX's CPU backend runs
    4-bit matmuls about 5x slower than float32 matmuls through OpenBLAS (measured on the CPU box:
    a (4, 512) forward of a 22 M-parameter model took 33.3 s with its affine-4 layers, 6.7 s in
    float32), and a small model's float32 weights cost little memory."""
    replacements = []
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
            out_dims, in_dims = w.shape
            dense = nn.Linear(in_dims, out_dims, bias="bias" in module)
            dense.weight = w.astype(dtype)
            if "bias" in module:
                dense.bias = module.bias.astype(dtype)
        elif isinstance(module, nn.QuantizedEmbedding):
            w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
            dense = nn.Embedding(*w.shape)
            dense.weight = w.astype(dtype)
        else:
            continue
        replacements.append((path, dense))
    if replacements:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(replacements))
        mx.eval(model.parameters())
        # the recorded specs describe the model: the dequantized modules have none any more
        meta = dict(getattr(model, "mlxeff_meta", None) or {})
        if meta.get("quantization"):
            done = {path for path, _ in replacements}
            meta["quantization"] = {k: v for k, v in meta["quantization"].items() if k not in done}
            model.mlxeff_meta = meta
    return len(replacements)
