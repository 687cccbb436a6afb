"""SeedLM: weights as seeds of a pseudo-random generator (Shafipour et al., arXiv 2410.10714).

Each block of C consecutive weights of a row is replaced by the seed of a 16-bit LFSR, whose next
C*P states form a C x P basis U (``mlxeff.quant.lfsr``), a shared 4-bit exponent and P 4-bit
coefficients: ``w ~= 2^(e + exp_base) * U @ c``. Data-free, exactly (K + 4 + 4P) / C bits per
weight (4 at C=8 P=3, 3 at C=12 P=4). At run time the basis is regenerated, trading memory traffic
for arithmetic. The seed search lives in ``mlxeff.quant.seedlm_encoder``; the fused GPU kernels in
``mlxeff.quant.seedlm_kernels``.

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

Modules: ``SeedLMLinear(in_features, out_features, C, P)`` and ``SeedLMEmbedding`` (only with
``include_embeddings``; its table is packed like a Linear weight of shape (vocab, dims)) hold
``seeds``, ``codes``, ``exp_base`` as parameters. ``SeedLMLinear.__call__`` uses the fused GPU
kernels where ``seedlm_kernels.kernel_available(C, P)`` (rows <= 8: matvec; more rows: dequantise
to x's dtype per call, then matmul); otherwise a dense float32 reconstruction built once, cached (not
saved) and rebuilt if the packed arrays are replaced.

Deviations and choices (see also ``seedlm_encoder``):
- Taps for K=16 are our maximal-length choice (``lfsr`` says why); any maximal tap set yields the
  same family of bases up to a relabelling of seeds.
- The exponent is shared per block as in the paper, but offset by a per-tensor ``exp_base`` so the
  4-bit code spans the tensor's actual range (DESIGN.md).
- Embeddings and the output head stay at their original precision unless ``include_embeddings``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..errors import MlxeffError
from . import lfsr, register_method

K_DEFAULT = 16
CONFIGS: Dict[int, Tuple[int, int]] = {4: (8, 3), 3: (12, 4)}
EXP_BASE_MIN, EXP_BASE_MAX = -126, 112


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SeedLMConfig:
    C: int
    P: int
    K: int = K_DEFAULT

    def __post_init__(self):
        check_config(self.C, self.P, self.K)

    @property
    def bits_per_block(self) -> int:
        return self.K + 4 + 4 * self.P

    @property
    def bits(self) -> float:
        b = self.bits_per_block / self.C
        return int(b) if b == int(b) else b

    @classmethod
    def for_bits(cls, bits: int, C: Optional[int] = None, P: Optional[int] = None) -> "SeedLMConfig":
        if (C is None) != (P is None):
            raise MlxeffError("give both C and P, or neither")
        if C is None:
            if bits not in CONFIGS:
                raise MlxeffError(f"SeedLM has presets for {sorted(CONFIGS)} bits, not {bits}; give C and P")
            C, P = CONFIGS[bits]
        return cls(int(C), int(P))


def check_config(C, P, K=K_DEFAULT) -> None:
    if K != K_DEFAULT:
        raise MlxeffError(f"unsupported SeedLM register width K={K} (only K={K_DEFAULT})")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (C, P)) or not 1 <= P <= C:
        raise MlxeffError(f"unknown SeedLM configuration C={C!r}, P={P!r} (need integers 1 <= P <= C)")


def num_blocks(in_features: int, C: int) -> int:
    return -(-in_features // C)


def codes_width(nb: int, P: int) -> int:
    return -(-nb * (P + 1) // 2)


def packed_shapes(out_features: int, in_features: int, C: int, P: int) -> Dict[str, tuple]:
    nb = num_blocks(in_features, C)
    return {"seeds": (out_features, nb), "codes": (out_features, codes_width(nb, P)), "exp_base": ()}


# ----------------------------------------------------------------------------------------------
# packing


def pack_codes(exps: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """exps (out, nb) in 0..15 and coeffs (out, nb, P) in -8..7 -> codes (out, ceil(nb(P+1)/2)) uint8."""
    exps = np.asarray(exps)
    coeffs = np.asarray(coeffs)
    out, nb, P = coeffs.shape
    if exps.min(initial=0) < 0 or exps.max(initial=0) > 15:
        raise ValueError("exponent codes must be in 0..15")
    if coeffs.min(initial=0) < -8 or coeffs.max(initial=0) > 7:
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
# reference reconstruction (plain MLX ops; the CPU path and the oracle of the kernels)


@lru_cache(maxsize=4)
def basis_tables(K: int = K_DEFAULT) -> Tuple[mx.array, mx.array]:
    """(normalised states in cycle order (2^K-1,) float32, cycle index of each state (2^K,) int32)."""
    table, index = lfsr.cycle_table(K)
    return mx.array(lfsr.normalize(table, K)), mx.array(index.astype(np.int32))


def block_bases(seeds: mx.array, C: int, P: int, K: int = K_DEFAULT) -> mx.array:
    """seeds (...) -> their bases (..., C, P) float32 (seed 0 gives garbage: validate first)."""
    table, index = basis_tables(K)
    pos = index[seeds.astype(mx.int32)][..., None] + 1 + mx.arange(C * P, dtype=mx.int32)
    pos = mx.remainder(pos, lfsr.period(K))
    return table[pos].reshape(*seeds.shape, C, P)


def reconstruct(seeds: mx.array, codes: mx.array, exp_base, C: int, P: int, in_features: int,
                K: int = K_DEFAULT, row_chunk: int = 2048) -> mx.array:
    """The dense (out, in) float32 weight of a packed tensor."""
    out, nb = seeds.shape
    exp_base = mx.array(exp_base).astype(mx.int32)
    rows = []
    for r in range(0, max(out, 1), row_chunk):
        s, cd = seeds[r:r + row_chunk], codes[r:r + row_chunk]
        e, c = unpack_codes(cd, nb, P)
        U = block_bases(s, C, P, K)  # (rows, nb, C, P)
        w = (U @ c.astype(mx.float32)[..., None])[..., 0] * pow2(e + exp_base)[..., None]
        rows.append(w.reshape(s.shape[0], nb * C)[:, :in_features])
    return mx.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]


# ----------------------------------------------------------------------------------------------
# modules


def _kernels(C: int, P: int):
    """The fused-kernel module when this backend has kernels for (C, P), else None."""
    try:
        from . import seedlm_kernels as k
    except ImportError:
        return None
    return k if k.kernel_available(C, P) else None


class _Dense:
    """Cache of a dense reconstruction, keyed on the identity of the packed arrays (not saved)."""

    def __init__(self):
        self.key, self.weights = None, {}


class _SeedLMBase(nn.Module):
    def __init__(self, rows: int, cols: int, C: int, P: int, K: int = K_DEFAULT):
        super().__init__()
        check_config(C, P, K)
        self.C, self.P, self.K = C, P, K
        shapes = packed_shapes(rows, cols, C, P)
        self.seeds = mx.ones(shapes["seeds"], dtype=mx.uint16)
        self.codes = mx.zeros(shapes["codes"], dtype=mx.uint8)
        self.exp_base = mx.array(0, dtype=mx.int32)
        self._dense_cache = _Dense()

    def _packed_rows_cols(self) -> Tuple[int, int]:
        raise NotImplementedError

    def dense_weight(self, dtype=mx.float32) -> mx.array:
        """The reconstruction (computed in float32, then cast), built once per set of packed arrays
        and dtype."""
        key = (id(self.seeds), id(self.codes), id(self.exp_base))
        cache = self._dense_cache
        if cache.key != key:
            _, cols = self._packed_rows_cols()
            w = reconstruct(self.seeds, self.codes, self.exp_base, self.C, self.P, cols, self.K)
            mx.eval(w)
            cache.key, cache.weights = key, {mx.float32: w}
        if dtype not in cache.weights:
            cache.weights[dtype] = cache.weights[mx.float32].astype(dtype)
            mx.eval(cache.weights[dtype])
        return cache.weights[dtype]

    def spec(self) -> dict:
        rows, cols = self._packed_rows_cols()
        cfg = SeedLMConfig(self.C, self.P, self.K)
        out = {"method": "seedlm", "K": self.K, "C": self.C, "P": self.P, "bits": cfg.bits,
               "in_features": cols, "out_features": rows}
        if "bias" in self:
            out["bias"] = True
        return out

    def validate_packed(self, name: str, source) -> None:
        """Check loaded packed arrays; raise MlxeffError naming ``source`` and the tensor."""
        want = {"seeds": mx.uint16, "codes": mx.uint8, "exp_base": mx.int32}
        rows, cols = self._packed_rows_cols()
        shapes = packed_shapes(rows, cols, self.C, self.P)
        for key, dtype in want.items():
            a = self[key]
            if a.dtype != dtype:
                raise MlxeffError(f"{name}.{key} has dtype {a.dtype}, SeedLM stores {dtype}", source)
            if tuple(a.shape) != shapes[key]:
                raise MlxeffError(f"{name}.{key} has shape {tuple(a.shape)} but the spec implies {shapes[key]}",
                                  source)
        bad = (self.seeds == 0).reshape(-1)
        if bad.size and bad.any().item():
            r, b = divmod(int(mx.argmax(bad.astype(mx.uint8)).item()), self.seeds.shape[1])
            raise MlxeffError(f"{name}.seeds[{r}, {b}] is 0, which is not a valid LFSR state", source)
        eb = int(self.exp_base.item())
        if not EXP_BASE_MIN <= eb <= EXP_BASE_MAX:
            raise MlxeffError(f"{name}.exp_base = {eb} is out of range [{EXP_BASE_MIN}, {EXP_BASE_MAX}] "
                              f"(2^(e + exp_base) must be a normal float32 for e in 0..15)", source)


class SeedLMLinear(_SeedLMBase):
    """A Linear layer stored in the SeedLM format (leaf module, like ``nn.QuantizedLinear``)."""

    def __init__(self, in_features: int, out_features: int, C: int, P: int, bias: bool = False,
                 K: int = K_DEFAULT):
        super().__init__(out_features, in_features, C, P, K)
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = mx.zeros((out_features,))

    def _packed_rows_cols(self):
        return self.out_features, self.in_features

    def _extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, C={self.C}, P={self.P}"

    def __call__(self, x: mx.array) -> mx.array:
        k = _kernels(self.C, self.P)
        if k is not None:
            lead = x.shape[:-1]
            rows = math.prod(lead)
            if rows <= 8:
                y = k.seedlm_matvec(x.reshape(rows, -1), self.seeds, self.codes, self.exp_base,
                                    self.C, self.P, self.in_features).reshape(*lead, self.out_features)
            else:
                W = k.seedlm_dequantize(self.seeds, self.codes, self.exp_base, self.C, self.P,
                                        self.in_features, dtype=x.dtype)
                y = x @ W.T
        else:
            y = x @ self.dense_weight(x.dtype).T
        if "bias" in self:
            y = y + self.bias
        return y

    @classmethod
    def from_linear(cls, linear: nn.Linear, C: int, P: int, **encode_kw) -> "SeedLMLinear":
        """Encode ``linear`` (see ``quantize_weight`` for the keyword arguments)."""
        out_f, in_f = linear.weight.shape
        m = cls(in_f, out_f, C, P, bias="bias" in linear)
        m.set_packed(*quantize_weight(linear.weight, C, P, **encode_kw)[:3])
        if "bias" in linear:
            m.bias = linear.bias
        return m

    def set_packed(self, seeds, codes, exp_base) -> None:
        self.seeds, self.codes = mx.array(seeds), mx.array(codes)
        self.exp_base = mx.array(int(exp_base), dtype=mx.int32)


class SeedLMEmbedding(_SeedLMBase):
    """An Embedding table (vocab, dims) stored in the SeedLM format; rows decoded on lookup."""

    def __init__(self, num_embeddings: int, dims: int, C: int, P: int, K: int = K_DEFAULT):
        super().__init__(num_embeddings, dims, C, P, K)
        self.num_embeddings, self.dims = num_embeddings, dims

    def _packed_rows_cols(self):
        return self.num_embeddings, self.dims

    def __call__(self, ids: mx.array) -> mx.array:
        flat = ids.reshape(-1)
        rows = reconstruct(self.seeds[flat], self.codes[flat], self.exp_base, self.C, self.P,
                           self.dims, self.K)
        return rows.reshape(*ids.shape, self.dims)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.dense_weight(x.dtype).T

    def set_packed(self, seeds, codes, exp_base) -> None:
        SeedLMLinear.set_packed(self, seeds, codes, exp_base)


@register_method("seedlm")
def _build(module: nn.Module, spec: dict) -> nn.Module:
    K = spec.get("K", K_DEFAULT)
    C, P = spec.get("C"), spec.get("P")
    check_config(C, P, K)
    bits = SeedLMConfig(C, P, K).bits
    if spec.get("bits") is not None and not math.isclose(float(spec["bits"]), float(bits)):
        raise MlxeffError(f"SeedLM C={C}, P={P} stores {bits} bits per weight, the spec says {spec['bits']}")
    if isinstance(module, nn.Embedding):
        rows, cols = module.weight.shape
        made = SeedLMEmbedding(rows, cols, C, P, K)
    elif isinstance(module, nn.Linear):
        rows, cols = module.weight.shape
        made = SeedLMLinear(cols, rows, C, P, bias=bool(spec.get("bias", False)), K=K)
    else:
        raise MlxeffError(f"SeedLM does not apply to {type(module).__name__}")
    if (spec.get("in_features"), spec.get("out_features")) != (cols, rows):
        raise MlxeffError(f"spec says {spec.get('out_features')}x{spec.get('in_features')} but the "
                          f"model's layer is {rows}x{cols}")
    return made


# ----------------------------------------------------------------------------------------------
# encoding weights and models


def quantize_weight(weight, C: int, P: int, *, config=None, group=None, progress=None):
    """Encode an (out, in) weight: ``(seeds, codes, exp_base, EncodedMatrix)`` (numpy arrays)."""
    from .seedlm_encoder import EncoderConfig, encode_matrix

    enc = encode_matrix(weight, C, P, config=config or EncoderConfig(), group=group, progress=progress)
    return enc.seeds, pack_codes(enc.exps, enc.coeffs), enc.exp_base, enc


_BLOCK_PATH = re.compile(r"(^|\.)layers\.\d+\.")


def quantizable_modules(model: nn.Module, include_embeddings: bool = False) -> List[Tuple[str, nn.Module]]:
    """The (path, module) pairs ``quantize_model`` replaces: every Linear inside the transformer
    blocks, plus the token embeddings and an untied output head with ``include_embeddings``."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, _SeedLMBase):
            if _BLOCK_PATH.search(name) or include_embeddings:
                found.append((name, m))
        elif include_embeddings and isinstance(m, nn.Embedding):
            found.append((name, m))
    return sorted(found, key=lambda p: p[0])


def quantize_model(model: nn.Module, bits: int = 4, C: Optional[int] = None, P: Optional[int] = None, *,
                   include_embeddings: bool = False, progress: bool = True, group=None,
                   config=None, report: Optional[list] = None) -> nn.Module:
    """Replace the model's Linear layers in the transformer blocks by ``SeedLMLinear``, in place.

    ``bits`` picks a preset (4: C=8 P=3; 3: C=12 P=4) unless C and P are given. Embeddings and the
    output head stay as they are unless ``include_embeddings``. The per-layer spec is recorded in
    ``model.mlxeff_meta["quantization"]`` (saved by ``mlxeff.save``). ``group`` is an
    ``mx.distributed`` group (default: ``mx.distributed.init()``); every rank gets the same model.
    ``config`` is a ``seedlm_encoder.EncoderConfig``; ``report``, if a list, receives one dict per
    layer (path, shape, relative error, squared error and norm, seconds).
    """
    import time

    from .seedlm_encoder import EncoderConfig, Progress

    cfg = SeedLMConfig.for_bits(bits, C, P)
    group = group if group is not None else mx.distributed.init()
    targets = quantizable_modules(model, include_embeddings)
    total = sum(m.weight.shape[0] * num_blocks(m.weight.shape[1], cfg.C) for _, m in targets)
    bar = Progress(total, enabled=progress and group.rank() == 0, label=f"seedlm {cfg.bits}-bit")
    meta = dict(getattr(model, "mlxeff_meta", None) or {})
    specs = dict(meta.get("quantization") or {})
    encoder_config = config or EncoderConfig()
    for path, module in targets:
        t0 = time.perf_counter()
        seeds, codes, exp_base, enc = quantize_weight(module.weight, cfg.C, cfg.P, config=encoder_config,
                                                      group=group, progress=bar)
        rows, cols = module.weight.shape
        if isinstance(module, nn.Embedding):
            new = SeedLMEmbedding(rows, cols, cfg.C, cfg.P)
        else:
            new = SeedLMLinear(cols, rows, cfg.C, cfg.P, bias="bias" in module)
            if "bias" in module:
                new.bias = module.bias
        new.set_packed(seeds, codes, exp_base)
        model.update_modules(tree_unflatten([(path, new)]))
        specs[path] = new.spec()
        if report is not None:
            report.append({"path": path, "shape": [rows, cols],
                           "rel_error": math.sqrt(enc.sq_error / enc.sq_norm) if enc.sq_norm else 0.0,
                           "sq_error": enc.sq_error, "sq_norm": enc.sq_norm,
                           "seconds": time.perf_counter() - t0})
    bar.close()
    meta["quantization"] = specs
    model.mlxeff_meta = meta
    return model


def bits_per_weight(model: nn.Module) -> Dict[str, float]:
    """Stored bits per weight over the SeedLM layers, exact (including padding and exp_base)."""
    stored, weights = 0, 0
    for _, m in model.named_modules():
        if isinstance(m, _SeedLMBase):
            rows, cols = m._packed_rows_cols()
            stored += 8 * (m.seeds.nbytes + m.codes.nbytes + m.exp_base.nbytes)
            weights += rows * cols
    return {"bits": stored, "weights": weights, "bits_per_weight": stored / weights if weights else 0.0}
