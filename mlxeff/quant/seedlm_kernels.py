"""SeedLM kernels: a fused decode matvec and a dequantise-to-dense kernel (arXiv 2410.10714).

SeedLM (``mlxeff.quant.seedlm``; packed format in ``mlxeff.quant.seedlm_format``) stores a block
of C weights as a 16-bit LFSR seed, a 4-bit shared exponent e and P 4-bit coefficients:
``w[c] = 2^(e + exp_base) * sum_p U[c, p] c_p`` with U the next C*P register states, normalised.
At decode time the weight bytes, not the arithmetic, bound a matvec, so the kernels read the
packed 4 (or 3) bits per weight and regenerate U on the fly.

Three implementations of one algorithm (one kernel body for two backends, one plain-MLX reference):

- ``seedlm_format.reconstruct`` (the format's one reference reconstruction) and
  ``seedlm_matvec_reference`` (``x @ W.T`` with it): plain MLX ops on a table of every seed's
  basis (``seedlm_format.basis_table``, built from the register's cycle). The CPU path and the
  oracle of the tests. This module serves the "states" basis; ``seedlm_bits_kernels`` the "bits"
  basis.
- ``metal/seedlm_matvec.inc``: for 1..8 rows of x. A threadgroup owns a few output rows (all of
  their blocks, or a split of them when x is staged); a thread takes one block column at a time,
  reads its x values once (from device memory, or from a threadgroup-memory copy of the slice)
  and walks the rows. Per block the 32 stream bits after the seed come from two lookups in a
  512-entry jump table (the LFSR is linear over GF(2)); each state becomes a float with one AND/OR
  (16 state bits under a fixed exponent give exactly 2^(23-q) + s), so a block costs about
  C*P logic ops and C*P FMAs per x row, plus a dozen for the code field; the coefficients and the
  normalisation are applied once per block and once per output: with D_p = sum_c x_c (s_cp - 2^15),
  ``y += 2^e * sum_p c_p D_p`` and ``y *= SCALE * 2^exp_base`` at the end.
- ``metal/seedlm_dequant.inc``: a thread per (block, group of rows) writes the block's C weights,
  computed exactly as the reference does, with vector stores where alignment allows.

Both bodies compile for Metal (``mx.fast.metal_kernel``) and CUDA (``mx.fast.cuda_kernel``) through
``mlxeff.kernels``; ``metal/seedlm_common.inc`` (their header) adds the few backend helpers the
shared macros lack. Every constant of the register -- taps (through the jump table), the
normalisation offset and scale -- is passed in from ``mlxeff.quant.lfsr``, never written twice.

Generic over the layer shape (one build serves every layer): a new process used to build one
kernel per distinct layer shape before its first token (57-74 builds, 1.5 s each, on OpenELM).
Compiled in (``KernelSpec.defines``, the key of ``mlxeff.kernels.build``'s cache) is only what
takes few values per model: C, P and what follows from them (field width; whether a code field
can straddle two words: P = 1, 3, 7 never, whatever the layer), rows of x, the dtypes (x, output),
the launch shape (x staged or not, threads, output rows per threadgroup, dequantise rows per
thread) and the staged x slice's capacity (from rows and C). The layer shape goes in at run time
as ``dims``, a 6-entry int32 input made once per (layer shape, plan) and cached with the launch
(matvec: in_features, blocks per row, out_features, bits per codes row, words per codes row or 0,
blocks per split; dequantise: the same five, then the store width). Per layer, only the launch
(grid, fewer threads for a narrow layer, splits) changes. The run-time shape costs the matvec's
main loop ~2 integer ops per output row and block column (row-to-row steps of the seed and code
pointers, which a compile-time shape folded into load offsets: ~4 % more instructions in the
4-bit decode loop by nvcc's sm_90 SASS) and a few uniform branches per column (the codes row
layout; whether the tile has rows past the layer's end; a row's partial last block of x).
A model still needs one build per configuration it runs: for a float16 model with 4-bit
layers, the decode matvec (1 row), one per other row count used (2-8 rows: speculative
verification, short prompts; with x staged, layers wide enough to split add a float32-output
build) and the dequantise kernel (prefill). MLX 0.32 keeps a custom kernel's build for the process
only (CUDA: its in-memory module cache; custom kernels skip its on-disk PTX cache), so every new
process builds these few again.

Choices and limits:
- The kernels accumulate in float32 and sum in a different order than the reference: the matvec
  differs from ``x @ W.T`` by a few float32 rounding errors of the terms (|dy| <~ 1e-5 of the
  output scale, tested); the dequantised weights by at most an FMA rounding.
- Reading x: directly from device memory (the default for 1-2 rows of x: no copy, no barrier
  before the work, no split) or staged in threadgroup memory (the default for more rows, where a
  thread would hold too many x values in registers); the staged slice is allocated at its full
  capacity (28 KiB on Metal, 44 KiB on CUDA, whatever the layer), so longer rows are cut into
  splits whose float32 partial sums MLX adds. ``MATVEC_DEFAULTS`` (x staged or not, threads, rows
  per threadgroup) comes from the benchmark's ``--sweep`` on an H100 (benchmarks/RESULTS.md).
- Per call nothing is built or made: launch plans, compiled kernels and dims arrays are cached,
  the codes go to the kernel as the uint8 array itself (read as 32-bit words), exp_base as the
  module's int32 array (a Python int maps to one cached array).
- Kernel configurations: K = 16, 1 <= P <= 7, P <= C <= 32, x rows <= 8 (``MAX_ROWS``); anything
  else (and the CPU) takes the reference. Seeds must be nonzero and 2^(e + exp_base) a normal
  float32; ``seedlm_format.validate_packed`` checks both at load, the kernels do not. Index math is
  int32 (out * in < 2^31 weights, as before).
- ``codes`` are read as 32-bit words; a tensor whose byte count is not a multiple of 4 is padded,
  which copies it on every call.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from typing import Dict, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..kernels import KernelSpec, build, gpu_backend, metal_check_run, run_plan
from . import lfsr
from .seedlm_format import K_DEFAULT, check_packed, codes_width, num_blocks, reconstruct

MAX_ROWS = 8
MAX_C = 32
MAX_P = 7
# bytes of threadgroup memory for a matvec threadgroup's x slice (Metal has 32 KiB in all, CUDA
# 48 KiB of static shared memory; the jump table and the reduction scratch take the rest)
X_SLICE_BYTES = {"metal": 28 * 1024, "cuda": 44 * 1024}
HEADER = "seedlm_common.inc"
_FLOATS = (mx.float16, mx.bfloat16, mx.float32)


# ----------------------------------------------------------------------------------------------
# the register, as the kernels see it


@lru_cache(maxsize=None)
def jump_table_np(K: int = K_DEFAULT) -> np.ndarray:
    """(512,) uint32: entry b is the 32 stream bits after state b, entry 256 + b after state b << 8.

    The bits following a state (bit i of the result = the new top bit of the (i+1)-th next state)
    are linear over GF(2) in the state, so those after s are ``t[s & 255] ^ t[256 + (s >> 8)]``.
    Built by stepping ``lfsr.lfsr_next`` (its taps), K = 16 only.
    """
    if K != 16:
        raise ValueError(f"the SeedLM kernels support K=16 only, not K={K}")
    states = np.concatenate([np.arange(256), np.arange(256) << 8]).astype(np.int64)
    out = np.zeros(512, dtype=np.uint64)
    s = states.copy()
    for i in range(32):
        s = lfsr.lfsr_next(s, K)
        out |= ((s >> (K - 1)) & 1).astype(np.uint64) << np.uint64(i)
    return out.astype(np.uint32)


def tables_np(K: int = K_DEFAULT) -> np.ndarray:
    """(525,) uint32 input of both kernels: the jump table, then the register constants that
    ``seedlm_common.inc`` wants in registers: ``(150 - q) << 23`` for q = 0..7 (the exponent that
    makes 16 state bits at mantissa bit q the float 2^(23-q) + s) and ``0x4B000000 | (8 << 4n)``
    for n = 0..4 (the magic number that turns nibble n of a code field into an exact float)."""
    expo = [(150 - q) << 23 for q in range(8)]
    magic = [0x4B000000 | (8 << (4 * n)) for n in range(5)]
    return np.concatenate([jump_table_np(K), np.array(expo + magic, dtype=np.uint32)])


@lru_cache(maxsize=None)
def _tables(K: int = K_DEFAULT) -> mx.array:
    return mx.array(tables_np(K))


def _defines_lfsr() -> Tuple[Tuple[str, str], ...]:
    return tuple(sorted(lfsr.kernel_defines(K_DEFAULT).items()))


def config_supported(C: int, P: int) -> bool:
    return 1 <= P <= MAX_P and P <= C <= MAX_C


@lru_cache(maxsize=None)
def _gpu_kind() -> Optional[str]:
    # the GPU backend this process has: fixed for its lifetime, so asked once
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else None


def _backend() -> Optional[str]:
    """``mlxeff.kernels.gpu_backend()`` for the per-call path: the default device is asked every
    call, the backend once (a decode step calls the matvec once per linear layer, and the host
    time of a call adds to the step)."""
    return _gpu_kind() if mx.default_device() == mx.gpu else None


def kernel_available(C: Optional[int] = None, P: Optional[int] = None) -> bool:
    """True when the default device has a GPU backend with these kernels (and, if given, the
    kernels cover configuration (C, P)); False on the CPU."""
    if _backend() is None:
        return False
    return C is None or P is None or config_supported(int(C), int(P))


# ----------------------------------------------------------------------------------------------
# the packed arrays as the kernels read them


@lru_cache(maxsize=64)
def _exp_base_const(value: int) -> mx.array:
    a = mx.array([value], dtype=mx.int32)
    mx.eval(a)
    return a


def _exp_base(exp_base, backend: Optional[str] = "cuda") -> mx.array:
    """exp_base as the kernels read it (``exp_base[0]``), without new work per call on CUDA: an
    int32 array is passed as it is; a Python int maps to one cached array per value (a fresh host
    array per call would cost an allocation and a transfer every decode step). Metal declares a
    0-d input as a reference, so there it becomes shape (1,)."""
    if type(exp_base) is int:
        return _exp_base_const(exp_base)
    if isinstance(exp_base, mx.array):
        if exp_base.dtype == mx.int32 and exp_base.size == 1 and (backend == "cuda" or exp_base.ndim == 1):
            return exp_base
        return exp_base.astype(mx.int32).reshape(1)
    return _exp_base_const(int(exp_base))


def _code_words(codes: mx.array, backend: Optional[str] = "cuda") -> mx.array:
    """The packed code bytes as the kernels read them (32-bit words, ``SL_CODEW``). On CUDA the
    uint8 array itself when it holds whole words (no copy, no extra graph node; the kernel reads
    the bytes as words); otherwise (and always on Metal, which puts small inputs in the constant
    address space) flat uint32 words, zero-padded to a whole word if needed."""
    if backend == "cuda" and codes.size % 4 == 0:
        return codes
    flat = codes.reshape(-1)
    pad = -flat.size % 4
    if pad:
        flat = mx.concatenate([flat, mx.zeros((pad,), dtype=mx.uint8)])
    return flat.view(mx.uint32)


def packed_inputs(seeds: mx.array, codes: mx.array, exp_base, backend: Optional[str]) -> list:
    """A packed tensor as the kernels of both bases read it: seeds, code words, exp_base, tables."""
    return [seeds, _code_words(codes, backend), _exp_base(exp_base, backend), _tables()]


def _code_words_np(codes: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    flat = np.concatenate([flat, np.zeros(-flat.size % 4, np.uint8)])
    return flat.view("<u4")


def packed_inputs_np(seeds, codes, exp_base) -> list:
    """``packed_inputs`` for the Metal bodies under metal-check (numpy arrays)."""
    return [np.asarray(seeds, dtype=np.uint16), _code_words_np(codes), np.array([int(exp_base)], np.int32),
            tables_np()]


# ----------------------------------------------------------------------------------------------
# reference (plain MLX ops, on ``seedlm_format.reconstruct``): the CPU path and the test oracle


def seedlm_matvec_reference(x: mx.array, seeds: mx.array, codes: mx.array, exp_base, C: int, P: int,
                            in_features: int) -> mx.array:
    """``x @ W.T`` (any number of rows) with W the float32 reconstruction; the result in x's dtype."""
    W = reconstruct(seeds, codes, exp_base, C, P, in_features, dtype=mx.float32)
    dtype = x.dtype if x.dtype in _FLOATS else mx.float32
    return (x.astype(mx.float32) @ W.T).astype(dtype)


# ----------------------------------------------------------------------------------------------
# launch plans and kernel specs


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _row_layout(nb: int, P: int) -> Tuple[int, int]:
    """(bits per codes row, 32-bit words per codes row or 0 when a row is not a whole number)."""
    row_bytes = codes_width(nb, P)
    return 8 * row_bytes, (row_bytes // 4 if row_bytes % 4 == 0 else 0)


def _cp_defines(C: int, P: int) -> Dict[str, int]:
    """The compile-time constants of configuration (C, P). No code field straddles two 32-bit
    words when a field's width divides 32 (P = 1, 3, 7): rows then hold whole fields too, since
    a row of an odd P is nb * FB bits, so this is a property of P alone, not of the layer."""
    fb = 4 * (P + 1)
    return {"SL_C": C, "SL_P": P, "SL_FB": fb, "SL_NOCROSS": int(32 % fb == 0)}


@lru_cache(maxsize=1024)
def _dims(*values: int) -> mx.array:
    """The ``dims`` input: one int32 array per distinct layer shape and plan, made once."""
    a = mx.array(values, dtype=mx.int32)
    mx.eval(a)
    return a


def _spec(kind: str, source: str, inputs: Sequence[str], outputs: Sequence[str],
          ints: Dict[str, int], tag: str, shared_memory: int = 0) -> KernelSpec:
    defines = _defines_lfsr() + tuple((k, str(v)) for k, v in sorted(ints.items()))
    # A name per variant: MLX caches compiled kernels by name (and older CUDA builds by name only).
    digest = hashlib.sha1(repr((defines, tag, shared_memory)).encode()).hexdigest()[:12]
    return KernelSpec(name=f"seedlm_{kind}_{digest}", source_file=source, input_names=tuple(inputs),
                      output_names=tuple(outputs), header_file=HEADER, defines=defines,
                      shared_memory=shared_memory)


@lru_cache(maxsize=None)
def _matvec_spec(C: int, P: int, rows: int, stage: bool, threads: int, tile_rows: int, cb_max: int,
                 x_dtype, out_dtype, backend: str) -> KernelSpec:
    """The matvec build: nothing of the layer shape is in it (see the module docstring)."""
    ints = dict(_cp_defines(C, P), SL_ROWS=rows, SL_STAGE=int(stage), SL_T=threads, SL_TR=tile_rows,
                SL_CBMAX=cb_max)
    return _spec("matvec", "seedlm_matvec.inc", ("x", "seeds", "codes", "exp_base", "tables", "dims"),
                 ("y",), ints, f"{backend}:{x_dtype}:{out_dtype}")


@lru_cache(maxsize=None)
def _dequant_spec(C: int, P: int, dtype, rows_per_thread: int, backend: str) -> KernelSpec:
    esize = mx.finfo(dtype).bits // 8
    vecmax = next((v for v in (16, 8, 4) if (C * esize) % v == 0), 0)
    ints = dict(_cp_defines(C, P), SL_DR=rows_per_thread, SL_TY=4, SL_ESIZE=esize, SL_VECMAX=vecmax)
    return _spec("dequant", "seedlm_dequant.inc", ("seeds", "codes", "exp_base", "tables", "dims"),
                 ("out",), ints, f"{backend}:{dtype}")


# Launch shape of the fused matvec when the caller names none: (stage_x, threads, tile_rows) by rows
# of x. Chosen from `python benchmarks/seedlm_kernels.py --sweep` (benchmarks/RESULTS.md, "Kernels"),
# which times these against the alternatives on the GPU and prints the fastest.
MATVEC_DEFAULTS = {1: (False, 64, 16), 2: (False, 64, 16), 4: (True, 128, 4), 8: (True, 128, 2)}


def matvec_defaults(rows: int) -> Tuple[bool, int, int]:
    return MATVEC_DEFAULTS[next(k for k in sorted(MATVEC_DEFAULTS) if rows <= k)]


@lru_cache(maxsize=256)  # a decode step asks for the same few plans once per layer
def matvec_plan(rows: int, out_features: int, in_features: int, C: int, P: int, x_dtype=mx.float16,
                backend: Optional[str] = None, threads: Optional[int] = None,
                tile_rows: Optional[int] = None, stage_x: Optional[bool] = None) -> dict:
    """Launch configuration of the fused matvec: spec, grid, threadgroup, template, outputs, dims
    (cached: treat the returned dict as read-only). ``stage_x``: copy each threadgroup's x slice
    to threadgroup memory first (rows wider than it holds are split into partial sums) rather than
    read x from device memory; ``threads``/``tile_rows``: threads per threadgroup and output rows
    per threadgroup. Unnamed ones come from ``MATVEC_DEFAULTS``. ``ints``: every number the kernel
    works with, compile-time (``spec.defines``) or run-time (``dims``), as it applies to this layer
    (threads and tile rows as launched and as used)."""
    backend = backend or gpu_backend() or "cuda"
    d_stage, d_threads, d_tr = matvec_defaults(rows)
    stage = d_stage if stage_x is None else bool(stage_x)
    nb = num_blocks(in_features, C)
    cb_max = max(1, X_SLICE_BYTES[backend] // (4 * rows * C)) if stage else 1
    split = -(-nb // cb_max) if stage else 1
    cb = -(-nb // split)
    # the build's threads (a bound); a small layer launches fewer: never more than its block
    # columns, rounded up to whole SIMD groups (the body reads the count at run time)
    T_max = int(threads or d_threads)
    if T_max % 32 or not 32 <= T_max <= 1024:
        raise ValueError(f"threads must be a multiple of 32 in [32, 1024], got {T_max}")
    T = T_max if threads else min(T_max, max(32, _pow2_at_least(cb)))
    TR = max(1, int(tile_rows or d_tr))
    tiles = -(-out_features // TR)
    out_dtype = x_dtype if split == 1 else mx.float32
    rowbits, roww = _row_layout(nb, P)
    dims = (in_features, nb, out_features, rowbits, roww, cb)
    ints = dict(_cp_defines(C, P), SL_IN=in_features, SL_NB=nb, SL_OUT=out_features, SL_ROWS=rows,
                SL_TR=min(TR, out_features), SL_T=T, SL_CB=cb, SL_SPLIT=split, SL_STAGE=int(stage),
                SL_FULL=int(in_features % C == 0), SL_ROWBITS=rowbits, SL_ROWW=roww, SL_CBMAX=cb_max)
    spec = _matvec_spec(C, P, rows, stage, T_max, TR, cb_max, x_dtype, out_dtype, backend)
    return dict(spec=spec, grid=(T * split, tiles, 1), threadgroup=(T, 1, 1),
                template=[("OT", out_dtype)], out_dtype=out_dtype,
                out_shape=(rows, out_features) if split == 1 else (split, rows, out_features),
                dims=dims, ints=ints)


@lru_cache(maxsize=256)
def dequant_plan(out_features: int, in_features: int, C: int, P: int, dtype=mx.float16,
                 backend: Optional[str] = None, rows_per_thread: int = 8) -> dict:
    """Launch configuration of the dequantise kernel (as ``matvec_plan``)."""
    backend = backend or gpu_backend() or "cuda"
    nb = num_blocks(in_features, C)
    esize = mx.finfo(dtype).bits // 8 if dtype in _FLOATS else 0
    if esize not in (2, 4):
        raise ValueError(f"dequantise writes float16, bfloat16 or float32, not {dtype}")
    vec = next((v for v in (16, 8, 4) if (C * esize) % v == 0 and (in_features * esize) % v == 0), 0)
    TX = 64 if nb > 32 else 32  # launch only: the body reads it at run time
    TY = 4
    DR = max(1, int(rows_per_thread))
    gy = -(-out_features // DR)
    rowbits, roww = _row_layout(nb, P)
    spec = _dequant_spec(C, P, dtype, DR, backend)
    ints = dict(_cp_defines(C, P), SL_IN=in_features, SL_NB=nb, SL_OUT=out_features,
                SL_DR=min(DR, out_features), SL_TX=TX, SL_TY=TY, SL_VEC=vec, SL_ESIZE=esize,
                SL_ROWBITS=rowbits, SL_ROWW=roww)
    return dict(spec=spec, grid=(-(-nb // TX) * TX, -(-gy // TY) * TY, 1), threadgroup=(TX, TY, 1),
                template=[("OT", dtype)], out_dtype=dtype, out_shape=(out_features, in_features),
                dims=(in_features, nb, out_features, rowbits, roww, vec), ints=ints)


# ----------------------------------------------------------------------------------------------
# the kernels


def matvec_kernel(x: mx.array, seeds: mx.array, codes: mx.array, exp_base, C: int, P: int,
                  in_features: int, *, threads: Optional[int] = None,
                  tile_rows: Optional[int] = None, stage_x: Optional[bool] = None) -> mx.array:
    """The fused matvec kernel on 2-D ``x`` (rows <= 8); raises ``KernelUnavailable`` on the CPU."""
    out, _ = check_packed(seeds, codes, C, P, in_features)
    return _matvec_launch(x, seeds, codes, exp_base, C, P, in_features, out, _backend(), threads,
                          tile_rows, stage_x)


_LAUNCH: Dict[tuple, tuple] = {}


def _matvec_launch(x, seeds, codes, exp_base, C, P, in_features, out, backend, threads=None,
                   tile_rows=None, stage_x=None) -> mx.array:
    key = (x.shape[0], out, in_features, C, P, x.dtype, backend, threads, tile_rows, stage_x)
    hit = _LAUNCH.get(key)
    if hit is None:
        plan = matvec_plan(*key[:7], threads=threads, tile_rows=tile_rows, stage_x=stage_x)
        hit = _LAUNCH[key] = (plan, build(plan["spec"], backend), _dims(*plan["dims"]))
    plan, kernel, dims = hit
    y = run_plan(kernel, plan, [x, *packed_inputs(seeds, codes, exp_base, backend), dims])
    if len(plan["out_shape"]) == 3:
        y = y.sum(axis=0).astype(x.dtype)
    return y


def seedlm_matvec(x: mx.array, seeds: mx.array, codes: mx.array, exp_base, C: int, P: int,
                  in_features: int) -> mx.array:
    """``x @ W.T`` for x of shape (..., in_features) with W packed; y has shape (..., out).

    The fused kernel when the backend has it and x has at most ``MAX_ROWS`` rows of a float dtype;
    otherwise the reference."""
    out, _ = check_packed(seeds, codes, C, P, in_features)
    shape = x.shape
    if shape[-1] != in_features:
        raise ValueError(f"x has {shape[-1]} features, the weight {in_features}")
    rows = shape[0] if len(shape) == 2 else math.prod(shape[:-1])
    backend = _backend()
    if not (backend is not None and config_supported(C, P) and 1 <= rows <= MAX_ROWS
            and x.dtype in _FLOATS):
        return seedlm_matvec_reference(x, seeds, codes, exp_base, C, P, in_features)
    if len(shape) == 2:
        return _matvec_launch(x, seeds, codes, exp_base, C, P, in_features, out, backend)
    y = _matvec_launch(x.reshape(rows, in_features), seeds, codes, exp_base, C, P, in_features, out,
                       backend)
    return y.reshape(*shape[:-1], out)


def seedlm_dequantize(seeds: mx.array, codes: mx.array, exp_base, C: int, P: int, in_features: int,
                      dtype=mx.float16) -> mx.array:
    """The dense weight (out, in_features) in ``dtype``: the kernel on a GPU, else the reference."""
    out, _ = check_packed(seeds, codes, C, P, in_features)
    if not (kernel_available(C, P) and dtype in _FLOATS):
        return reconstruct(seeds, codes, exp_base, C, P, in_features, dtype)
    backend = _backend()
    plan = dequant_plan(out, in_features, C, P, dtype, backend)
    kernel = build(plan["spec"], backend)
    return run_plan(kernel, plan, [*packed_inputs(seeds, codes, exp_base, backend), _dims(*plan["dims"])])


# ----------------------------------------------------------------------------------------------
# the Metal bodies on the CPU (tests; needs the metal-check emulator importable as metal_check)

_NP = {mx.float16: np.float16, mx.float32: np.float32}


def matvec_metal_check(x, seeds, codes, exp_base, C: int, P: int, in_features: int,
                       **plan_kw) -> np.ndarray:
    """The Metal matvec body run by metal-check; numpy in, numpy out (float16/float32 x)."""
    x = np.asarray(x)
    xd = mx.float16 if x.dtype == np.float16 else mx.float32
    seeds = np.asarray(seeds, dtype=np.uint16)
    out = seeds.shape[0]
    plan = matvec_plan(x.shape[0], out, in_features, C, P, xd, backend="metal", **plan_kw)
    y = metal_check_run(
        plan["spec"],
        [x.astype(_NP[xd]), *packed_inputs_np(seeds, codes, exp_base), np.array(plan["dims"], np.int32)],
        output_shapes=[plan["out_shape"]], output_dtypes=[_NP[plan["out_dtype"]]],
        grid=plan["grid"], threadgroup=plan["threadgroup"],
        template=[("OT", _NP[plan["out_dtype"]])])[0]
    if y.ndim == 3:
        y = y.sum(axis=0, dtype=np.float32).astype(_NP[xd])
    return y


def dequantize_metal_check(seeds, codes, exp_base, C: int, P: int, in_features: int,
                           dtype=mx.float32, **plan_kw) -> np.ndarray:
    """The Metal dequantise body run by metal-check; numpy in, numpy out."""
    seeds = np.asarray(seeds, dtype=np.uint16)
    plan = dequant_plan(seeds.shape[0], in_features, C, P, dtype, backend="metal", **plan_kw)
    return metal_check_run(
        plan["spec"],
        [*packed_inputs_np(seeds, codes, exp_base), np.array(plan["dims"], np.int32)],
        output_shapes=[plan["out_shape"]], output_dtypes=[_NP[dtype]],
        grid=plan["grid"], threadgroup=plan["threadgroup"], template=[("OT", _NP[dtype])])[0]
