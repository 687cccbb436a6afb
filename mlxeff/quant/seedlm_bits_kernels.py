"""SeedLM kernels for the two-bit basis: a table-lookup decode matvec and a dequantise kernel.

SeedLM (arXiv 2410.10714; format in ``mlxeff.quant.seedlm_format``) stores a block of C weights as
a 16-bit LFSR seed, a 4-bit exponent and P 4-bit coefficients. With the ``"bits"`` basis, column p
of a block's basis is ``2*hi + lo - 1.5`` for two C-bit fields of the register's bit stream, so

    sum_c x_c U[c, p] = S(hi_p) + S(lo_p) / 2,    S(m) = sum_c x_c * (bit c of m ? 1 : -1),

and the decode matvec never forms a basis entry: per threadgroup it tabulates S over every C-bit
pattern for 32 consecutive blocks of x, and per block it reads 2P table entries (at 4 bits: 6
lookups and 6 multiply-adds for 8 weights, against the 24 entries and 24 multiply-adds of the
states basis, ``mlxeff.quant.seedlm_kernels``). The tables are laid out [pattern][block] so that
the lane reading block l's table always reads bank l: no bank conflicts. Bodies:
``metal/seedlm_bits_matvec.inc`` (the algorithm and thread mapping are described there) and
``metal/seedlm_bits_dequant.inc``; one body for Metal and CUDA (``mlxeff.kernels``), checked
against the plain-MLX reference (``seedlm_format.reconstruct`` with ``basis="bits"``) on the CPU
through metal-check and on the GPU.

Choices and limits:
- Generic over layer shape: the shape goes in as a small int32 array (``dims``, one cached array per
  shape), so a model builds one matvec per (C, P, x dtype, launch shape) and one dequantise per
  (C, P, dtype) -- not one per layer shape.
- One row of x (``MAX_ROWS``; a decode step at batch 1). More rows take the dequantise kernel and
  a matmul (prefill), as the layer does for the states basis beyond 8 rows. The tables are per row
  of x; a batched kernel would hold one set per row.
- Table size: 2^C patterns per block would be 32 KiB per threadgroup at C=8; where that does not fit
  the backend's threadgroup memory (Metal: 32 KiB in all, with the 2 KiB jump table) the C-bit
  field is cut into ``G`` fields of C/G bits with one table each (S is then the sum of G lookups).
  CUDA takes G=1 at C=8 (32 KiB of its 48 KiB), Metal G=2 (4 KiB); C=12 takes G=2 (16 KiB).
- Rows of a threadgroup: 32 per warp, ``WARPS`` warps. Long rows are cut into ``split``s of whole
  32-block chunks (float32 partial sums, added by MLX) when there would otherwise be fewer
  threadgroups than ``TARGET_GROUPS``.
- Float32 accumulation; the sum runs in another order than the reference's float32 ``x @ W.T``,
  so the two differ by float32 rounding of the terms (tested). The dequantised weights equal the
  reference bit for bit (the same products, exact, summed in the same order).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from ..kernels import build, metal_check_run, run_plan
from .seedlm_format import check_packed, num_blocks, reconstruct
from .seedlm_kernels import _FLOATS, _backend, _dims, _row_layout, _spec, packed_inputs, packed_inputs_np

MAX_ROWS = 1
# threadgroup memory for the tables (the jump table takes 2 KiB more)
TABLE_BYTES = {"metal": 30 * 1024, "cuda": 40 * 1024}
WARPS = 8
# at least this many threadgroups per matvec before rows are split (an H100 has 132 SMs)
TARGET_GROUPS = 264


def config_supported(C: int, P: int) -> bool:
    return 1 <= P <= 7 and P <= C <= 16


def kernel_available(C: Optional[int] = None, P: Optional[int] = None) -> bool:
    """True when the default device has a GPU backend with these kernels (and they cover (C, P))."""
    if _backend() is None:
        return False
    return C is None or P is None or config_supported(C, P)


def table_groups(C: int, backend: str) -> int:
    """G, the number of tables per C-bit field: the smallest divisor of C whose tables fit."""
    for G in range(1, C + 1):
        if C % G == 0 and C // G <= 8 and 4 * 32 * G * (1 << (C // G)) <= TABLE_BYTES[backend]:
            return G
    raise ValueError(f"no table split fits C={C}")


@lru_cache(maxsize=256)
def matvec_plan(out_features: int, in_features: int, C: int, P: int, x_dtype=mx.float16,
                backend: Optional[str] = None, warps: int = WARPS, split: Optional[int] = None,
                groups: Optional[int] = None) -> dict:
    """Launch configuration of the matvec (cached; read-only): spec, grid, threadgroup, template,
    output shape and dtype, and ``dims`` (in_features, blocks per row, out_features, bits per codes
    row, 32-block chunks per split). ``split``: chunks of 32 blocks per row are shared
    among this many threadgroups (default: enough for ``TARGET_GROUPS``); ``groups``: tables per
    C-bit field (default ``table_groups``)."""
    backend = backend or _backend() or "cuda"
    nb = num_blocks(in_features, C)
    nchunk = -(-nb // 32)
    tiles = -(-out_features // (32 * warps))
    if split is None:
        split = max(1, min(nchunk, -(-TARGET_GROUPS // tiles)))
    cps = -(-nchunk // int(split))
    split = -(-nchunk // cps)
    partial = split > 1
    out_dtype = mx.float32 if partial else x_dtype
    G = int(groups or table_groups(C, backend))
    if C % G or 4 * 32 * G * (1 << (C // G)) > TABLE_BYTES[backend]:
        raise ValueError(f"{G} tables of {C // G} bits do not fit {backend} threadgroup memory at C={C}")
    ints = dict(SLB_C=C, SLB_P=P, SLB_G=G, SLB_W=warps, SLB_PARTIAL=int(partial))
    spec = _spec("bits_matvec", "seedlm_bits_matvec.inc", ("x", "seeds", "codes", "exp_base", "tables", "dims"),
                 ("y",), ints, f"{backend}:{x_dtype}:{out_dtype}")
    return dict(spec=spec, grid=(32 * warps * split, tiles, 1), threadgroup=(32 * warps, 1, 1),
                template=[("OT", out_dtype)], out_dtype=out_dtype, out_shape=(split, out_features),
                dims=(in_features, nb, out_features, _row_layout(nb, P)[0], cps))


@lru_cache(maxsize=256)
def dequant_plan(out_features: int, in_features: int, C: int, P: int, dtype=mx.float16,
                 backend: Optional[str] = None) -> dict:
    """Launch configuration of the dequantise kernel (cached; read-only)."""
    backend = backend or _backend() or "cuda"
    nb = num_blocks(in_features, C)
    spec = _spec("bits_dequant", "seedlm_bits_dequant.inc", ("seeds", "codes", "exp_base", "tables", "dims"),
                 ("out",), dict(SLB_C=C, SLB_P=P), f"{backend}:{dtype}")
    TX = 64
    return dict(spec=spec, grid=(-(-nb // TX) * TX, out_features, 1), threadgroup=(TX, 1, 1),
                template=[("OT", dtype)], out_dtype=dtype, out_shape=(out_features, in_features),
                dims=(in_features, nb, out_features, _row_layout(nb, P)[0], 0))


_LAUNCH: Dict[tuple, tuple] = {}


def seedlm_matvec(x: mx.array, seeds: mx.array, codes: mx.array, exp_base, C: int, P: int,
                  in_features: int) -> mx.array:
    """``x @ W.T`` for x of shape (..., in_features) with W packed in the bits basis: the kernel for
    one row of a float dtype on a GPU, else the reference."""
    out, _ = check_packed(seeds, codes, C, P, in_features)
    shape = x.shape
    if shape[-1] != in_features:
        raise ValueError(f"x has {shape[-1]} features, the weight {in_features}")
    rows = math.prod(shape[:-1])
    backend = _backend()
    if not (backend is not None and config_supported(C, P) and rows == 1 and x.dtype in _FLOATS):
        W = reconstruct(seeds, codes, exp_base, C, P, in_features, basis="bits")
        return (x.astype(mx.float32) @ W.T).astype(x.dtype if x.dtype in _FLOATS else mx.float32)
    key = (out, in_features, C, P, x.dtype, backend)
    hit = _LAUNCH.get(key)
    if hit is None:
        plan = matvec_plan(*key)
        hit = _LAUNCH[key] = (plan, build(plan["spec"], backend), _dims(*plan["dims"]))
    y = _launch(x.reshape(-1), seeds, codes, exp_base, backend, *hit)
    if y.shape[0] > 1:
        y = y.sum(axis=0).astype(x.dtype)
    return y.reshape(*shape[:-1], out)


def _launch(x, seeds, codes, exp_base, backend, plan, kernel, dims) -> mx.array:
    return run_plan(kernel, plan, [x, *packed_inputs(seeds, codes, exp_base, backend), dims])


def matvec_kernel(x: mx.array, seeds: mx.array, codes: mx.array, exp_base, C: int, P: int, in_features: int,
                  **plan_kw) -> mx.array:
    """The matvec kernel alone with a chosen launch (``matvec_plan``'s ``warps``, ``split``,
    ``groups``) on one row of x: the (splits, out) output, partial sums not added (benchmarks)."""
    backend = _backend()
    plan = matvec_plan(seeds.shape[0], in_features, C, P, x.dtype, backend, **plan_kw)
    return _launch(x.reshape(-1), seeds, codes, exp_base, backend, plan, build(plan["spec"], backend),
                   _dims(*plan["dims"]))


def seedlm_dequantize(seeds: mx.array, codes: mx.array, exp_base, C: int, P: int, in_features: int,
                      dtype=mx.float16) -> mx.array:
    """The dense weight (out, in_features) in ``dtype``: the kernel on a GPU, else the reference."""
    out, _ = check_packed(seeds, codes, C, P, in_features)
    backend = _backend()
    if not (backend is not None and config_supported(C, P) and dtype in _FLOATS):
        return reconstruct(seeds, codes, exp_base, C, P, in_features, dtype, basis="bits")
    plan = dequant_plan(out, in_features, C, P, dtype, backend)
    kernel = build(plan["spec"], backend)
    return run_plan(kernel, plan, [*packed_inputs(seeds, codes, exp_base, backend), _dims(*plan["dims"])])


# ----------------------------------------------------------------------------------------------
# the Metal bodies on the CPU (tests; needs the metal-check emulator importable as metal_check)

_NP = {mx.float16: np.float16, mx.float32: np.float32}


def matvec_metal_check(x, seeds, codes, exp_base, C: int, P: int, in_features: int, **plan_kw) -> np.ndarray:
    """The Metal matvec body run by metal-check on one row of x (numpy in and out)."""
    x = np.asarray(x).reshape(-1)
    xd = mx.float16 if x.dtype == np.float16 else mx.float32
    plan = matvec_plan(np.shape(seeds)[0], in_features, C, P, xd, backend="metal", **plan_kw)
    y = metal_check_run(
        plan["spec"],
        [x.astype(_NP[xd]), *packed_inputs_np(seeds, codes, exp_base), np.array(plan["dims"], np.int32)],
        output_shapes=[plan["out_shape"]], output_dtypes=[_NP[plan["out_dtype"]]],
        grid=plan["grid"], threadgroup=plan["threadgroup"], template=[("OT", _NP[plan["out_dtype"]])])[0]
    return y.sum(axis=0, dtype=np.float32).astype(_NP[xd]) if y.shape[0] > 1 else y[0]


def dequantize_metal_check(seeds, codes, exp_base, C: int, P: int, in_features: int,
                           dtype=mx.float32) -> np.ndarray:
    """The Metal dequantise body run by metal-check (numpy in and out)."""
    plan = dequant_plan(np.shape(seeds)[0], in_features, C, P, dtype, backend="metal")
    return metal_check_run(
        plan["spec"],
        [*packed_inputs_np(seeds, codes, exp_base), np.array(plan["dims"], np.int32)],
        output_shapes=[plan["out_shape"]], output_dtypes=[_NP[dtype]],
        grid=plan["grid"], threadgroup=plan["threadgroup"], template=[("OT", _NP[dtype])])[0]
