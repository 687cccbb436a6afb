"""The precision a loaded model computes in: one rule for every command and benchmark.

``auto`` is float32 on the CPU -- MLX's CPU backend runs float16/bfloat16 matmuls slowly, and its
4-bit matmul is a loop of one-row products, so affine 4-bit layers compute from their
dequantized weights there, whatever the dtype asked for (``mlxeff.quant.affine.dequantize_affine``;
on the CPU box a 1280 x 320 4-bit product took 8.5x as long for 9 rows as for one, and the default
model's prefill of a 1,016-token prompt took 12.7 s quantized against 3.7 s dequantized) -- and
the stored precision on a GPU. SeedLM layers keep their own kernels in every case.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .errors import MlxeffError

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def apply_compute_dtype(model: nn.Module, dtype: Optional[str] = "auto") -> Optional[str]:
    """Cast ``model``'s floating-point parameters for computing, in place; the dtype applied
    (None: the stored one, ``auto`` on a GPU). ``None`` means ``auto``."""
    dtype = dtype or "auto"
    if dtype != "auto" and dtype not in DTYPES:
        raise MlxeffError(f"--dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    on_cpu = dequantize_on_cpu(model)  # an explicit dtype too: the 4-bit CPU matmul is the slow one
    if dtype == "auto":
        if not on_cpu:
            return None
        dtype = "float32"
    model.set_dtype(DTYPES[dtype])
    return dtype


def dequantize_on_cpu(model: nn.Module) -> bool:
    """On the CPU, replace ``model``'s affine 4/8-bit layers by their dequantized weights, in place
    (the module docstring says why); elsewhere leave it. Returns whether the device is the CPU.
    (Trainers dequantize the frozen base they adapt on every device:
    ``techniques.artifacts.load_frozen_base``.)"""
    from .quant.affine import dequantize_affine

    if mx.default_device() != mx.cpu:
        return False
    dequantize_affine(model)
    return True
