"""The SeedLM packed format (Shafipour et al., arXiv 2410.10714): layout, checks, reconstruction.

SeedLM replaces each block of C weights by the seed of a 16-bit LFSR whose next C*P states form a
C x P basis U (``mlxeff.quant.lfsr``), a shared 4-bit exponent and P 4-bit coefficients. This
module is the one place that says how those are stored: the normative description below, the
packing helpers, the checks of packed arrays and spec entries, and ``reconstruct`` -- the one
reference reconstruction, used by the CPU path of ``SeedLMLinear``/``SeedLMEmbedding``
(``mlxeff.quant.seedlm``) and as the oracle of the GPU kernels (``mlxeff.quant.seedlm_kernels``).

Packed format (normative; shared with the kernels)
--------------------------------------------------
LFSR: K = 16 Fibonacci LFSR, maximal period 65535, state s in 1 .. 65535; next state =
``(s >> 1) | (fb << (K-1))`` with fb the XOR of the bits of s at the tap positions
``lfsr.TAPS[16]``. The C x P matrix of a seed is the NEXT C*P states after the seed (the seed itself
is not included), row-major (row c, column p = state number c*P + p + 1 after the seed), normalised
to [-1, 1] by ``lfsr.normalize``: ``(s - 2^(K-1)) * float32(1 / (2^(K-1) - 1))`` -- kernels take the
constants from ``lfsr.kernel_defines()``. Worked example: K=3, taps {0,1}, seed 4, C=4, P=2 gives
[[2,5],[6,7],[3,1],[4,2]].

Per weight matrix W of shape (out, in) (a Linear's weight), configuration (C, P):

- each row is split into nb = ceil(in / C) blocks of C consecutive weights; the last block of a row
  is zero-padded (declared overhead; blocks never span rows).
- ``seeds``: uint16, shape (out, nb): the LFSR state (1..65535; 0 is invalid, rejected on load).
- ``codes``: uint8, shape (out, ceil(nb * (P + 1) / 2)): per block P+1 nibbles in order
  [e, c_0, ..., c_{P-1}], blocks in row order; nibble n of a row lives in byte n // 2, low nibble
  first for even n. e is an unsigned 4-bit exponent code (0..15); c_p is 4-bit two's complement
  (-8..7). A trailing pad nibble (when nb*(P+1) is odd) is written as 0 and ignored on read.
- ``exp_base``: int32 array of shape (), per tensor -- declared per-tensor overhead. Valid range:
  -126 <= exp_base <= 112, so that 2^(e + exp_base) is a normal float32 for every code e in 0..15
  (checked on load).
- Reconstruction: ``w[c] = 2^(e + exp_base) * sum_p U[c, p] * c_p`` for the block's weights
  c = 0..C-1 (the padded tail of a row's last block is dropped).
- Bits per block: 16 + 4 + 4P = K + 4 + 4P exactly (32 at 4-bit C=8 P=3, 36 at 3-bit C=12 P=4);
  overhead per row: row padding only (at most 4 bits of nibble padding plus the padded weights of
  the last block); per tensor: exp_base.
- Configs: 4-bit = (C=8, P=3), 3-bit = (C=12, P=4); any other integers 1 <= P <= C are allowed.
- Spec entry in config.json (``mlxeff.quantization[module_path]``): ``{"method": "seedlm", "K": 16,
  "C": 8, "P": 3, "bits": 4, "in_features": in, "out_features": out}``; ``bits`` is
  (K + 4 + 4P) / C (a float for other configurations). An optional ``"bias": true`` marks a
  Linear with a bias, which is stored unquantised as ``bias``.

Reference arithmetic (``reconstruct``), float32 throughout: each block's basis is read from tables
``lfsr`` builds from the register's cycle (``basis_table``: all 65535 bases; ``reconstruct`` reads
the same values from one column per cycle position, ``_cycle_columns``); ``coef_p = c_p * 2^(e +
exp_base)`` (exact: a small integer times a power of two), and ``w[c] = sum_p u[c, p] * coef_p``
summed over p in order. The dequantise kernel computes the same products in the same order (a
backend may fuse a multiply-add), which is why this, not a matrix product with its
library-dependent summation order, is the reference. ``reconstruct`` runs these float32
operations in numpy on the host (one multiply and one add per term, never fused), so its result
is the same on every device.

Deviations and choices:
- Taps for K=16 are our maximal-length choice (``lfsr`` says why); any maximal tap set yields the
  same family of bases up to a relabelling of seeds.
- The exponent is shared per block as in the paper, but offset by a per-tensor ``exp_base`` so the
  4-bit code spans the tensor's actual range.
- A seed is stored as the register state itself (not its index in the LFSR cycle, which would let
  a kernel read the basis as a window of a 65535-entry table).

Two bases (spec key ``"basis"``; an entry without it is ``"states"``, the format as first written):

- ``"states"``: U as above, the normalised 16-bit register states (the paper's construction).
- ``"bits"`` (``quantize_model(..., basis="bits")``, ``mlxeff convert --seedlm-basis bits``):
  U[c, p] = 2*hi + lo - 1.5 from two bits of the register's output stream (``lfsr.bit_bases``: for
  column p the C low bits ``b[2Cp + c]``, then the C high bits ``b[2Cp + C + c]``, where ``b_0 ..
  b_15`` are the seed's own bits and each step adds one). Entries are -1.5, -0.5, 0.5 or 1.5, exact
  in every float format, so a half-precision kernel multiplies by exactly the matrix the encoder
  fitted. A deviation from the paper chosen for speed and measured for quality: on iid Gaussian
  blocks the relative error is 0.1142 against the states basis' 0.1195 at 4 bits (C=8 P=3) and
  0.2149 against 0.2187 at 3 bits (8192 / 4096 blocks, 16 candidates, ``benchmarks/seedlm.py
  quality``), and a column's C low or high bits are one C-bit index into a table of subset sums of
  x, which is how the decode kernel avoids forming the basis at all
  (``mlxeff.quant.seedlm_bits_kernels``). Reconstruction and bits per block are otherwise the same.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..errors import MlxeffError
from . import lfsr

K_DEFAULT = 16
BASES = lfsr.BASES
BASIS_LEGACY = "states"  # what a spec entry without "basis" means
# What new encodings use. "bits" fits better (benchmarks/RESULTS.md: +2.04 against +2.38 perplexity
# on the default model v1 at 4 bits) but its decode kernel measured 1.6x slower than the states
# kernel on an H100 (71 against 45 us for 8192x8192), so "states" stays the default for now;
# ``mlxeff convert --seedlm-basis bits`` (or ``quantize_model(..., basis="bits")``) writes the other.
BASIS_DEFAULT = "states"
CONFIGS: Dict[int, Tuple[int, int]] = {4: (8, 3), 3: (12, 4)}
CODE_MIN, CODE_MAX = -8, 7  # a coefficient: 4-bit two's complement
EXP_CODES = 16  # an exponent code: 0..15
# float32's normal exponents: 2^(e + exp_base) must be a normal float32 for every code e
EXP_ABS_MIN, EXP_ABS_MAX = -126, 127
EXP_BASE_MIN, EXP_BASE_MAX = EXP_ABS_MIN, EXP_ABS_MAX - (EXP_CODES - 1)
DTYPES = {"seeds": mx.uint16, "codes": mx.uint8, "exp_base": mx.int32}


# ----------------------------------------------------------------------------------------------
# configuration and shapes


@dataclass(frozen=True)
class SeedLMConfig:
    C: int
    P: int
    K: int = K_DEFAULT
    basis: str = BASIS_LEGACY

    def __post_init__(self):
        check_config(self.C, self.P, self.K)
        check_basis(self.basis)

    @property
    def bits_per_block(self) -> int:
        return self.K + 4 + 4 * self.P

    @property
    def bits(self) -> float:
        b = self.bits_per_block / self.C
        return int(b) if b == int(b) else b

    @classmethod
    def for_bits(cls, bits: int, C: Optional[int] = None, P: Optional[int] = None,
                 basis: str = BASIS_LEGACY) -> "SeedLMConfig":
        if (C is None) != (P is None):
            raise MlxeffError("give both C and P, or neither")
        if C is None:
            if bits not in CONFIGS:
                raise MlxeffError(f"SeedLM has presets for {sorted(CONFIGS)} bits, not {bits}; give C and P")
            C, P = CONFIGS[bits]
        return cls(int(C), int(P), basis=basis)


def check_config(C, P, K=K_DEFAULT, error=MlxeffError) -> None:
    """Raise ``error`` unless (C, P, K) is a configuration of the format."""
    if K != K_DEFAULT:
        raise error(f"unsupported SeedLM register width K={K} (only K={K_DEFAULT})")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (C, P)) or not 1 <= P <= C:
        raise error(f"unknown SeedLM configuration C={C!r}, P={P!r} (need integers 1 <= P <= C)")


def check_basis(basis, error=MlxeffError) -> None:
    if basis not in BASES:
        raise error(f"unknown SeedLM basis {basis!r} (one of {', '.join(BASES)})")


def num_blocks(in_features: int, C: int) -> int:
    return -(-in_features // C)


def codes_width(nb: int, P: int) -> int:
    return -(-nb * (P + 1) // 2)


def packed_shapes(out_features: int, in_features: int, C: int, P: int) -> Dict[str, tuple]:
    nb = num_blocks(in_features, C)
    return {"seeds": (out_features, nb), "codes": (out_features, codes_width(nb, P)), "exp_base": ()}


# ----------------------------------------------------------------------------------------------
# spec entries (config.json)


def spec_entry(out_features: int, in_features: int, C: int, P: int, K: int = K_DEFAULT,
               bias: bool = False, basis: str = BASIS_LEGACY) -> dict:
    """The ``mlxeff.quantization`` entry of a layer (keys in the documented order; ``basis`` is
    written only when it is not the legacy "states", so older files stay byte-identical)."""
    out = {"method": "seedlm", "K": K, "C": C, "P": P, "bits": SeedLMConfig(C, P, K, basis).bits,
           "in_features": in_features, "out_features": out_features}
    if basis != BASIS_LEGACY:
        out["basis"] = basis
    if bias:
        out["bias"] = True
    return out


def spec_config(spec: dict) -> SeedLMConfig:
    """The configuration a spec entry names, checked (also against its ``bits``)."""
    K = spec.get("K", K_DEFAULT)
    C, P = spec.get("C"), spec.get("P")
    check_config(C, P, K)
    cfg = SeedLMConfig(C, P, K, spec.get("basis", BASIS_LEGACY))
    if spec.get("bits") is not None and not math.isclose(float(spec["bits"]), float(cfg.bits)):
        raise MlxeffError(f"SeedLM C={C}, P={P} stores {cfg.bits} bits per weight, the spec says {spec['bits']}")
    return cfg


def check_spec_shape(spec: dict, out_features: int, in_features: int) -> None:
    if (spec.get("in_features"), spec.get("out_features")) != (in_features, out_features):
        raise MlxeffError(f"spec says {spec.get('out_features')}x{spec.get('in_features')} but the "
                          f"model's layer is {out_features}x{in_features}")


# ----------------------------------------------------------------------------------------------
# packing


def pack_codes(exps: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """exps (out, nb) in 0..15 and coeffs (out, nb, P) in -8..7 -> codes (out, ceil(nb(P+1)/2)) uint8."""
    exps = np.asarray(exps)
    coeffs = np.asarray(coeffs)
    out, nb, P = coeffs.shape
    if exps.min(initial=0) < 0 or exps.max(initial=0) > EXP_CODES - 1:
        raise ValueError("exponent codes must be in 0..15")
    if coeffs.min(initial=0) < CODE_MIN or coeffs.max(initial=0) > CODE_MAX:
        raise ValueError("coefficients must be in -8..7")
    nib = np.concatenate([exps[..., None].astype(np.uint8), (coeffs.astype(np.int16) & 15).astype(np.uint8)], -1)
    nib = nib.reshape(out, nb * (P + 1))
    if nib.shape[1] % 2:
        nib = np.concatenate([nib, np.zeros((out, 1), np.uint8)], 1)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)


def unpack_codes(codes: mx.array, nb: int, P: int) -> Tuple[mx.array, mx.array]:
    """codes (rows, width) uint8 -> (exponent codes (rows, nb) int32, coefficients (rows, nb, P) int32)."""
    codes = codes.astype(mx.int32)
    nib = mx.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1)
    nib = nib[:, : nb * (P + 1)].reshape(codes.shape[0], nb, P + 1)
    c = nib[..., 1:]
    return nib[..., 0], mx.where(c >= 8, c - 16, c)


def pow2(e: mx.array) -> mx.array:
    """Exact 2^e in float32 for integer e in [-126, 127], built from the exponent bits."""
    bits = (e.astype(mx.int32) + 127) << 23
    return bits.view(mx.float32)


# ----------------------------------------------------------------------------------------------
# checks of packed arrays


def check_packed(seeds, codes, C: int, P: int, in_features: int) -> Tuple[int, int]:
    """(out, nb) of a packed tensor; ValueError on a configuration, dtype or shape it cannot be."""
    return _check_shapes(tuple(seeds.shape), seeds.dtype, tuple(codes.shape), codes.dtype, C, P,
                         in_features)


@lru_cache(maxsize=1024, typed=True)  # shapes only: the same few per model, checked once each
def _check_shapes(sshape, sdtype, cshape, cdtype, C: int, P: int, in_features: int) -> Tuple[int, int]:
    check_config(C, P, error=ValueError)
    if len(sshape) != 2 or sdtype != DTYPES["seeds"]:
        raise ValueError(f"seeds must be a 2-D uint16 array, got {sshape} {sdtype}")
    out, nb = sshape
    if nb != num_blocks(in_features, C):
        raise ValueError(f"seeds has {nb} blocks per row; in_features={in_features} at C={C} needs "
                         f"{num_blocks(in_features, C)}")
    want = (out, codes_width(nb, P))
    if cdtype != DTYPES["codes"] or cshape != want:
        raise ValueError(f"codes must be uint8 of shape {want}, got {cshape} {cdtype}")
    return out, nb


def validate_packed(arrays: Dict[str, mx.array], out_features: int, in_features: int, C: int, P: int,
                    name: str, source) -> None:
    """Check loaded ``seeds``/``codes``/``exp_base`` (dtypes, shapes, nonzero seeds, exp_base in
    range); raise MlxeffError naming ``source`` and the tensor ``name.key``."""
    shapes = packed_shapes(out_features, in_features, C, P)
    for key, dtype in DTYPES.items():
        a = arrays[key]
        if a.dtype != dtype:
            raise MlxeffError(f"{name}.{key} has dtype {a.dtype}, SeedLM stores {dtype}", source)
        if tuple(a.shape) != shapes[key]:
            raise MlxeffError(f"{name}.{key} has shape {tuple(a.shape)} but the spec implies {shapes[key]}",
                              source)
    seeds = arrays["seeds"]
    bad = (seeds == 0).reshape(-1)
    if bad.size and bad.any().item():
        r, b = divmod(int(mx.argmax(bad.astype(mx.uint8)).item()), seeds.shape[1])
        raise MlxeffError(f"{name}.seeds[{r}, {b}] is 0, which is not a valid LFSR state", source)
    eb = int(arrays["exp_base"].item())
    if not EXP_BASE_MIN <= eb <= EXP_BASE_MAX:
        raise MlxeffError(f"{name}.exp_base = {eb} is out of range [{EXP_BASE_MIN}, {EXP_BASE_MAX}] "
                          f"(2^(e + exp_base) must be a normal float32 for e in 0..15)", source)


# ----------------------------------------------------------------------------------------------
# the reference reconstruction (numpy on the host, into an MLX array)


def _exp_base_scalar(exp_base) -> mx.array:
    if isinstance(exp_base, mx.array):
        return exp_base.astype(mx.int32).reshape(())
    return mx.array(int(exp_base), dtype=mx.int32)


@lru_cache(maxsize=8)
def basis_table(C: int, P: int, basis: str = BASIS_LEGACY, K: int = K_DEFAULT) -> mx.array:
    """(2^K, C, P) float32: row s is the basis of seed s (``lfsr.bases``; row 0, never a valid
    seed, is zeros). 6.3 MB at C=8 P=3, built once per process (about 0.1 s)."""
    U = lfsr.bases(np.arange(1, 1 << K), C, P, basis, K)
    table = mx.array(np.concatenate([np.zeros((1, C, P), np.float32), U]))
    mx.eval(table)
    return table


def reconstruct(seeds: mx.array, codes: mx.array, exp_base, C: int, P: int, in_features: int,
                dtype=mx.float32, K: int = K_DEFAULT, basis: str = BASIS_LEGACY) -> mx.array:
    """The dense weight (out, in_features) of a packed tensor, computed in float32, in ``dtype``.

    Each block's basis column u_p is read from ``_cycle_columns`` (the values of ``basis_table``,
    every seed's C x P basis, built by ``lfsr`` from the register's cycle, which the tests check
    against stepping the register), and ``u[c, p] * (c_p * 2^(e + exp_base))`` is summed over p
    in order: ``w = u_0 k_0``, then ``w = w + u_p k_p`` for p = 1 .. P-1, each product and sum
    rounded to float32 (no fused multiply-add). The result is contiguous (a strided weight makes
    every CPU matmul against it about 10x slower). Seeds must be nonzero (``validate_packed``);
    shapes are checked (ValueError).

    Computed with numpy on the host (``_reconstruct_rows``), in chunks of rows, on up to
    ``_THREADS`` threads (numpy releases the GIL), written straight into the returned array's
    memory. Why: the first MLX formulation gathered every block's C x P basis as one (out, nb, C, P)
    array (0.7 G floats for an OpenELM-270M model) on MLX's single-threaded CPU gather; it took
    11-14 s per 270M model on one core of the 2-core CPU box. The first numpy formulation (one
    table per column, coefficients broadcast, 4096-block chunks) took 3.5-3.9 s for the 231 M block
    weights of a 270M model there (median of four or five fresh processes each, 4 bits, either
    basis), this one 1.6-1.8 s, bit for bit the same. About 0.6 s of that is allocating the 0.9 GB
    result: ``mx.zeros`` touches every page first, on MLX's one CPU thread (0.07 s of it is the
    fill; the rest the page faults, which any first write pays, and MLX has no uninitialised array).
    """
    out, nb = check_packed(seeds, codes, C, P, in_features)
    check_basis(basis, error=ValueError)
    seeds, codes = np.asarray(seeds), np.asarray(codes)  # views of the evaluated MLX arrays
    coef = _coef_rows(int(_exp_base_scalar(exp_base).item()), C)
    cycle = _cycle_columns(C, P, basis, K)
    # On the CPU the result is written in place through a numpy view of an evaluated MLX array
    # (the memory is shared; a numpy array copied by mx.array would touch every page twice).
    # Elsewhere the array's memory may belong to a device, so numpy fills its own and MLX copies.
    if mx.default_device() == mx.cpu:
        result = mx.zeros((out, in_features), mx.float32)
        mx.eval(result)
        W = np.asarray(result)
        if not (W.flags.c_contiguous and W.flags.writeable):
            raise RuntimeError("MLX gave no writable contiguous view of a new array")
    else:
        result, W = None, np.empty((out, in_features), np.float32)
    rows = max(1, _CHUNK_BLOCKS // nb)  # rows per chunk (``_CHUNK_BLOCKS`` says why so many)
    tasks = [(r, min(out, r + rows)) for r in range(0, out, rows)]
    threads = min(_THREADS, len(tasks))
    if threads > 1 and out * nb >= _THREAD_MIN_BLOCKS:
        step = -(-len(tasks) // threads)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda t: _reconstruct_rows(seeds, codes, coef, cycle, P, W, tasks[t:t + step]),
                          range(0, len(tasks), step)))
    else:
        _reconstruct_rows(seeds, codes, coef, cycle, P, W, tasks)
    if result is None:
        result = mx.array(W)
    return result if dtype == mx.float32 else result.astype(dtype)


# Blocks per chunk (1 MB of float32 per array at C = 8), threads, and the fewest blocks worth a
# thread pool. Chunks this large spill the arrays from a 1 MB L2, but a numpy call costs 1-2.5 us
# however small, and two threads mostly wait for each other's GIL hand-offs when the calls are
# short: the 270M model's arithmetic (4 bits, pages already touched, 2-core CPU box, medians of six
# runs) took 0.55 s on two threads at 32768 blocks against 0.91 s at 16384, 0.65 s at 65536 and
# 0.98 s on one thread at 16384. Threads: the CPUs this process may run on (a process pinned to
# one core runs one thread), at most 8.
_CHUNK_BLOCKS = 32768
_THREADS = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8)
_THREAD_MIN_BLOCKS = 1 << 16
# byte -> its two nibbles, low first: the uint16 lo | hi << 8 stored little-endian
_NIBBLES = (np.arange(256) & 15 | (np.arange(256) >> 4) << 8).astype("<u2")


def _coef_table(exp_base: int) -> np.ndarray:
    """(256,) float32: entry e * 16 + n is ``c * 2^(e + exp_base)`` for the exponent code e and the
    coefficient nibble n (c its value), computed by the format's own ``unpack_codes`` and ``pow2``
    on every code byte (read as one block of P = 1: exponent code low, coefficient nibble high)."""
    e, c = unpack_codes(mx.arange(256, dtype=mx.uint8)[:, None], 1, 1)
    by_byte = c[:, 0, 0].astype(mx.float32) * pow2(e[:, 0] + exp_base)  # byte n * 16 + e
    return np.array(by_byte).reshape(16, 16).T.reshape(-1)


@lru_cache(maxsize=64)  # per (exp_base, C): 0.5-1.5 ms of MLX operations, 64 layers per 270M model
def _coef_rows(exp_base: int, C: int) -> np.ndarray:
    """(256, C) float32, read-only: ``_coef_table`` with each entry repeated C times (a row scales a
    gathered C-float basis column with one contiguous multiply)."""
    rows = np.ascontiguousarray(np.repeat(_coef_table(exp_base)[:, None], C, axis=1))
    rows.setflags(write=False)
    return rows


def _column_step(C: int, basis: str) -> int:
    """Register steps from one column of a basis to the next: column p of the seed i steps along
    the cycle is column 0 of the seed i + p * step (``states``: a column is the next state, 1;
    ``bits``: a column is the next 2C stream bits, 2C)."""
    check_basis(basis, error=ValueError)
    return 1 if basis == "states" else 2 * C


@lru_cache(maxsize=8)
def _cycle_columns(C: int, P: int, basis: str, K: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """``(rows, position, step)``: ``rows`` (2^K - 1 + (P - 1) * step, C) float32, row j column 0
    of the basis of the seed j steps along the register's cycle from state 1 (wrapping), so that
    column p of seed s is ``rows[position[s] + p * step]`` (``_column_step``); ``position`` (2^K,)
    intp, a state's place in the cycle (0 for state 0, never a valid seed). 2 MB at C=8 against
    ``basis_table``'s 6.3 MB, and the P columns of a states block are adjacent rows: the gathers
    that dominate ``_reconstruct_rows`` hit the cache more often: 28-42 % less time per weight
    than one (2^K, C) table per column (a 5120x1280 layer, both bases, 3 and 4 bits, medians of
    8 runs on one core of the 2-core CPU box)."""
    states, index = lfsr.cycle_table(K)
    step = _column_step(C, basis)
    seeds = states[np.arange(len(states) + (P - 1) * step) % len(states)]
    rows = np.ascontiguousarray(lfsr.bases(seeds, C, P, basis, K)[:, :, 0])
    return rows, np.maximum(index, 0).astype(np.intp), step


def _reconstruct_rows(seeds, codes, coef, cycle, P, W, tasks) -> None:
    """Fill W's rows for each (first, last) row range of ``tasks``: per column p, gather u_p of each
    block's seed (a C-float row of the ``_cycle_columns`` table ``cycle``), scale it by k_p (a
    C-float row of ``coef``, looked up by the block's exponent and c_p nibbles) and add it to the
    sum of the columns before it."""
    table, position, step = cycle
    nb, C, inp = seeds.shape[1], table.shape[1], W.shape[1]
    columns = [table[p * step:] for p in range(P)]  # contiguous views: column p at the seed's place
    rows = max((last - first for first, last in tasks), default=0)
    direct = inp == nb * C  # no padded block: the sum is built in W's own rows
    acc = None if direct else np.empty((rows * nb, C), np.float32)
    term, k = np.empty((rows * nb, C), np.float32), np.empty((rows * nb, C), np.float32)
    place, key = np.empty(rows * nb, np.intp), np.empty(rows * nb, np.intp)
    pairs = np.empty((rows, codes.shape[1]), "<u2")
    # ndarray.take (0.7 us a call against np.take's 2.5 us) with mode "clip" (mode "raise" writes
    # out through a buffer): every index here is in range, so clipping changes nothing
    with np.errstate(over="ignore", invalid="ignore"):  # inf and nan where MLX makes them
        for first, last in tasks:
            m = (last - first) * nb
            _NIBBLES.take(codes[first:last], out=pairs[: last - first], mode="clip")
            nibbles = pairs[: last - first].view(np.uint8)[:, : nb * (P + 1)].reshape(m, P + 1)  # e, c_0 ..
            e16 = nibbles[:, 0] << 4
            position.take(seeds[first:last].reshape(m), out=place[:m], mode="clip")
            w, t = (W[first:last].reshape(m, C) if direct else acc[:m]), term[:m]
            for p in range(P):
                np.bitwise_or(e16, nibbles[:, p + 1], out=key[:m])
                coef.take(key[:m], axis=0, out=k[:m], mode="clip")
                u = w if p == 0 else t
                columns[p].take(place[:m], axis=0, out=u, mode="clip")
                np.multiply(u, k[:m], out=u)
                if p:
                    np.add(w, t, out=w)
            if not direct:
                W[first:last] = w.reshape(last - first, nb * C)[:, :inp]
