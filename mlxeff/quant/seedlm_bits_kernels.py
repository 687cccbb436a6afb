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
- One row of x (``MAX_ROWS``; a decode step at batch 1). More rows take the dequantise kernel and
  a matmul (prefill), as the layer does for the states basis beyond 8 rows. The tables are per row
  of x; a batched kernel would hold one set per row.
- Generic over layer shape: the shape goes in as a small int32 array (``dims``, one cached array per
  shape), so a model builds one matvec per (C, P, x dtype) and one dequantise per (C, P, dtype):
  two builds before a SeedLM model's first token, whatever its layer shapes.
- Table size: 2^C patterns per block would be 32 KiB per threadgroup at C=8; where that does not fit
  the backend's threadgroup memory (Metal: 32 KiB in all, for two buffers and the 2 KiB jump
  table) the C-bit field is cut into ``G`` fields of C/G bits with one table each (S is then the
  sum of G lookups). CUDA takes G=1 at C=8 (two 32 KiB buffers in dynamic shared memory where the
  GPU lets a block have 66 KiB, one static buffer otherwise), Metal G=2 (4 KiB a buffer); C=12
  takes G=2 on CUDA (16 KiB) and G=3 on Metal (6 KiB).
- Rows: a threadgroup owns ``ROWS_PER_WARP`` whole rows per warp, ``WARPS`` warps (64 rows: 128
  threadgroups for 8192 rows, about one per H100 SM). Rows are never split over threadgroups: the
  float32 partial sums of a split and their reduction were two more graph nodes per call, which
  cost more than the kernel at 8192x8192 on an H100 (RESULTS.md, "Kernels v2"). Two table
  buffers: one barrier per 32-block chunk instead of two. The next chunk's packed words and x are
  loaded while a chunk is computed.
- Timed on an H100 (RESULTS.md, "Whole-row bits matvec on the H100"): 59.5 us at 8192x8192 with
  the defaults, against 80.1 us for the split kernel's whole call before; still 0.84x float16.
  The launch defaults are the fastest of that sweep (ties within 1 us); the per-lane jump table
  was 20-26 us slower in both pairs measured (where it brought a threadgroup to 128 KiB of shared
  memory, which every slow launch of the sweep needed) and stays off. The sweep found the time set
  per threadgroup and 32-block chunk rather than per row, so ``lane_blocks`` (blocks of a row per
  lane per chunk, default 1) makes chunks longer: fewer barriers, loads issued together. A second
  sweep on an H100 (two blocks per lane, more warps per SM, more rows per group) found no launch
  faster than the default beyond the trials' spread, so the defaults stay; per launch, the
  instruction counts and the issue and shared-memory bounds they imply are in RESULTS.md
  (``benchmarks/seedlm_sass.py``). ``benchmarks/seedlm_kernels.py --sweep-bits``
  (``--bits-launches`` for other launches) times the options on a GPU.
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

from ..kernels import build, cuda_shared_memory_limit, metal_check_run, run_plan
from .seedlm_format import check_packed, num_blocks, reconstruct
from .seedlm_kernels import _FLOATS, _backend, _dims, _row_layout, _spec, packed_inputs, packed_inputs_np

MAX_ROWS = 1
# threadgroup memory for one buffer of tables (the jump table takes 2 KiB more). Metal has 32 KiB
# in all, for two buffers; CUDA puts more than 46 KiB in dynamic shared memory, up to what the
# GPU lets a thread block opt into (``kernels.cuda_shared_memory_limit``).
TABLE_BYTES = {"metal": 15 * 1024, "cuda": 40 * 1024}
CUDA_STATIC_SHARED = 46 * 1024
JUMP_BYTES = 512 * 4
WARPS = 8
ROWS_PER_WARP = 8
# The jump table once per lane (64 KiB more shared memory) stays an option: on an H100 it made the
# 8192x8192 matvec 20-26 us slower in both launches it was paired in (RESULTS.md).
JUMP_PER_LANE = False


def config_supported(C: int, P: int) -> bool:
    return 1 <= P <= 7 and P <= C <= 16


def kernel_available(C: Optional[int] = None, P: Optional[int] = None) -> bool:
    """True when the default device has a GPU backend with these kernels (and they cover (C, P))."""
    if _backend() is None:
        return False
    return C is None or P is None or config_supported(C, P)


def buffer_bytes(C: int, G: int, lane_blocks: int = 1) -> int:
    """Bytes of one table buffer: G float32 tables of 2^(C/G) patterns for each of a chunk's
    32 * lane_blocks blocks."""
    return 4 * 32 * lane_blocks * G * (1 << (C // G))


def table_groups(C: int, backend: str) -> int:
    """G, the number of tables per C-bit field: the smallest divisor of C whose tables fit."""
    for G in range(1, C + 1):
        if C % G == 0 and C // G <= 8 and buffer_bytes(C, G) <= TABLE_BYTES[backend]:
            return G
    raise ValueError(f"no table split fits C={C}")


@lru_cache(maxsize=256)
def matvec_plan(out_features: int, in_features: int, C: int, P: int, x_dtype=mx.float16,
                backend: Optional[str] = None, warps: int = WARPS, rows: int = ROWS_PER_WARP,
                groups: Optional[int] = None, buffers: Optional[int] = None,
                jump_per_lane: Optional[bool] = None, lane_blocks: int = 1) -> dict:
    """Launch configuration of the matvec (cached; read-only): spec, grid, threadgroup, template,
    output shape and dtype, and ``dims`` (in_features, blocks per row, out_features, bits per codes
    row, 0). A threadgroup owns ``warps * rows`` output rows whole (no split, one build per
    configuration whatever the layer shape); ``groups``: tables per C-bit field (default
    ``table_groups``); ``buffers``: 1 or 2 table buffers (default 2 where they fit the device's
    shared memory); ``jump_per_lane`` (default ``JUMP_PER_LANE`` where it fits, on CUDA): the jump
    table held once per lane, so that its lookups meet no bank conflicts (64 KiB more);
    ``lane_blocks``: blocks of a row each lane takes per chunk (a chunk is 32 * lane_blocks blocks
    between barriers; a buffer's tables grow as much)."""
    backend = backend or _backend() or "cuda"
    if buffers not in (None, 1, 2) or warps < 1 or rows < 1 or lane_blocks < 1:
        raise ValueError(f"bad launch: warps={warps}, rows={rows}, buffers={buffers}, lane_blocks={lane_blocks}")
    nb = num_blocks(in_features, C)
    G = int(groups or table_groups(C, backend))
    if C % G or C // G > 8:
        raise ValueError(f"{G} tables per field do not divide C={C} into fields of at most 8 bits")
    one = buffer_bytes(C, G, lane_blocks)
    # what a threadgroup may hold (Metal: 32 KiB; the CPU emulator of the tests has no limit)
    limit = 32 * 1024 if backend == "metal" else cuda_shared_memory_limit()
    if buffers is None:
        buffers = 2 if 2 * one + JUMP_BYTES <= limit else 1
    if jump_per_lane is None:
        jump_per_lane = backend == "cuda" and JUMP_PER_LANE and buffers * one + 32 * JUMP_BYTES <= limit
    table_bytes = buffers * one
    shared = table_bytes + (32 if jump_per_lane else 1) * JUMP_BYTES
    if backend == "cuda" and shared > limit:
        raise ValueError(f"{buffers} x {G} tables of {C // G} bits need {shared} bytes of shared memory; "
                         f"this GPU allows {limit}")
    dynamic = backend == "cuda" and (jump_per_lane or table_bytes > CUDA_STATIC_SHARED)
    ints = dict(SLB_C=C, SLB_P=P, SLB_G=G, SLB_W=warps, SLB_R=rows, SLB_NBUF=buffers, SLB_DYN=int(dynamic),
                SLB_JREP=int(jump_per_lane), SLB_LB=lane_blocks)
    dyn_bytes = table_bytes + (32 * JUMP_BYTES if jump_per_lane else 0)
    spec = _spec("bits_matvec", "seedlm_bits_matvec.inc", ("x", "seeds", "codes", "exp_base", "tables", "dims"),
                 ("y",), ints, f"{backend}:{x_dtype}", shared_memory=dyn_bytes if dynamic else 0)
    groups_n = -(-out_features // (warps * rows))
    return dict(spec=spec, grid=(32 * warps * groups_n, 1, 1), threadgroup=(32 * warps, 1, 1),
                template=[("OT", x_dtype)], out_dtype=x_dtype, out_shape=(out_features,),
                dims=(in_features, nb, out_features, _row_layout(nb, P)[0], 0))


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
    return y.reshape(*shape[:-1], out)


def _launch(x, seeds, codes, exp_base, backend, plan, kernel, dims) -> mx.array:
    return run_plan(kernel, plan, [x, *packed_inputs(seeds, codes, exp_base, backend), dims])


def matvec_kernel(x: mx.array, seeds: mx.array, codes: mx.array, exp_base, C: int, P: int, in_features: int,
                  **plan_kw) -> mx.array:
    """The matvec kernel with a chosen launch (any of ``matvec_plan``'s launch options: ``warps``,
    ``rows``, ``groups``, ``buffers``, ``jump_per_lane``, ``lane_blocks``) on one row of x: the
    (out,) output (benchmarks, tests)."""
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
    return y


def dequantize_metal_check(seeds, codes, exp_base, C: int, P: int, in_features: int,
                           dtype=mx.float32) -> np.ndarray:
    """The Metal dequantise body run by metal-check (numpy in and out)."""
    plan = dequant_plan(np.shape(seeds)[0], in_features, C, P, dtype, backend="metal")
    return metal_check_run(
        plan["spec"],
        [*packed_inputs_np(seeds, codes, exp_base), np.array(plan["dims"], np.int32)],
        output_shapes=[plan["out_shape"]], output_dtypes=[_NP[dtype]],
        grid=plan["grid"], threadgroup=plan["threadgroup"], template=[("OT", _NP[dtype])])[0]
