"""SeedLM: weights as seeds of a pseudo-random generator (Shafipour et al., arXiv 2410.10714).

Each block of C consecutive weights of a row is replaced by the seed of a 16-bit LFSR, whose next
C*P states form a C x P basis U (``mlxeff.quant.lfsr``), a shared 4-bit exponent and P 4-bit
coefficients: ``w ~= 2^(e + exp_base) * U @ c``. Data-free, exactly (K + 4 + 4P) / C bits per
weight (4 at C=8 P=3, 3 at C=12 P=4). At run time the basis is regenerated, trading memory traffic
for arithmetic. The packed format (normative), its checks and the reference reconstruction live in
``mlxeff.quant.seedlm_format``; the seed search in ``mlxeff.quant.seedlm_encoder``; the fused GPU
kernels in ``mlxeff.quant.seedlm_kernels``. This module holds the layers and model quantization.

Modules: ``SeedLMLinear(in_features, out_features, C, P, basis=...)`` and ``SeedLMEmbedding``
(only with ``include_embeddings``; its table is packed like a Linear weight of shape (vocab, dims))
hold ``seeds``, ``codes``, ``exp_base`` as parameters; ``basis`` ("states" or "bits",
``seedlm_format``) picks the basis and its kernels (``KERNELS``: ``seedlm_kernels`` or
``seedlm_bits_kernels``). ``SeedLMLinear.__call__`` uses the fused GPU kernels where they cover
(C, P) (up to ``MAX_ROWS`` rows of x: matvec, 8 for states, 1 for bits; more rows: dequantise
to x's dtype per call, then matmul); otherwise a dense reconstruction in x's dtype (computed in
float32 by ``seedlm_format.reconstruct``, on the host) built once per dtype, cached (not saved) and
rebuilt if the packed arrays are replaced. ``SeedLMEmbedding`` decodes the looked-up rows per call
(the dequantise kernel on a GPU, else ``reconstruct``); as ``reconstruct`` evaluates its inputs,
the CPU paths do not run inside ``mx.compile``.

Construction: one path. A layer is built from its ``config.json`` spec entry by the builder
registered here for ``"method": "seedlm"`` (``mlxeff.quant.apply_quantization_spec``), on load and
when quantizing: ``quantize_model`` encodes every target weight, then builds the spec, applies it
and fills the packed arrays.

Deviations and choices (see also ``seedlm_format`` and ``seedlm_encoder``):
- Taps for K=16 are our maximal-length choice (``lfsr`` says why); any maximal tap set yields the
  same family of bases up to a relabelling of seeds.
- The exponent is shared per block as in the paper, but offset by a per-tensor ``exp_base`` so the
  4-bit code spans the tensor's actual range.
- Embeddings and the output head stay at their original precision unless ``include_embeddings``.
"""

from __future__ import annotations

import math
import re
import time
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxeffError
from ..progress import bar
from . import seedlm_bits_kernels, seedlm_kernels
from .seedlm_encoder import EncoderConfig, encode_matrix
from .seedlm_format import (BASIS_DEFAULT, BASIS_LEGACY, K_DEFAULT, SeedLMConfig, check_basis, check_config,
                            check_spec_shape, num_blocks, pack_codes, packed_shapes, reconstruct, spec_config,
                            spec_entry, validate_packed)
from .spec import apply_quantization_spec, register_method


# ----------------------------------------------------------------------------------------------
# modules


class _Dense:
    """Cache of a dense reconstruction, keyed on the identity of the packed arrays (not saved)."""

    def __init__(self):
        self.key, self.weights = None, {}


# the GPU kernels of each basis: modules with kernel_available(C, P), MAX_ROWS, seedlm_matvec and
# seedlm_dequantize of one signature
KERNELS = {"states": seedlm_kernels, "bits": seedlm_bits_kernels}


class _SeedLMBase(nn.Module):
    def __init__(self, rows: int, cols: int, C: int, P: int, K: int = K_DEFAULT, basis: str = BASIS_LEGACY):
        super().__init__()
        check_config(C, P, K)
        check_basis(basis)
        self.C, self.P, self.K, self.basis = C, P, K, basis
        shapes = packed_shapes(rows, cols, C, P)
        self.seeds = mx.ones(shapes["seeds"], dtype=mx.uint16)
        self.codes = mx.zeros(shapes["codes"], dtype=mx.uint8)
        self.exp_base = mx.array(0, dtype=mx.int32)
        self._dense_cache = _Dense()

    def _packed_rows_cols(self) -> Tuple[int, int]:
        raise NotImplementedError

    def dense_weight(self, dtype=mx.float32) -> mx.array:
        """The reconstruction (computed in float32, then cast), built once per set of packed arrays
        and dtype; only the dtypes asked for are kept (no float32 copy beside a float16 one)."""
        key = (id(self.seeds), id(self.codes), id(self.exp_base))
        cache = self._dense_cache
        if cache.key != key:
            cache.key, cache.weights = key, {}
        if dtype not in cache.weights:
            _, cols = self._packed_rows_cols()
            w = reconstruct(self.seeds, self.codes, self.exp_base, self.C, self.P, cols, dtype=dtype,
                            K=self.K, basis=self.basis)
            mx.eval(w)
            cache.weights[dtype] = w
        return cache.weights[dtype]

    def spec(self) -> dict:
        rows, cols = self._packed_rows_cols()
        return spec_entry(rows, cols, self.C, self.P, self.K, bias="bias" in self, basis=self.basis)

    def set_packed(self, seeds, codes, exp_base) -> None:
        self.seeds, self.codes = mx.array(seeds), mx.array(codes)
        self.exp_base = mx.array(int(exp_base), dtype=mx.int32)

    def validate_packed(self, name: str, source) -> None:
        """Check loaded packed arrays; raise MlxeffError naming ``source`` and the tensor."""
        rows, cols = self._packed_rows_cols()
        arrays = {"seeds": self.seeds, "codes": self.codes, "exp_base": self.exp_base}
        validate_packed(arrays, rows, cols, self.C, self.P, name, source)


class SeedLMLinear(_SeedLMBase):
    """A Linear layer stored in the SeedLM format (leaf module, like ``nn.QuantizedLinear``)."""

    def __init__(self, in_features: int, out_features: int, C: int, P: int, bias: bool = False,
                 K: int = K_DEFAULT, basis: str = BASIS_LEGACY):
        super().__init__(out_features, in_features, C, P, K, basis)
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = mx.zeros((out_features,))

    def _packed_rows_cols(self):
        return self.out_features, self.in_features

    def _extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, C={self.C}, P={self.P}, "
                f"basis={self.basis}")

    def __call__(self, x: mx.array) -> mx.array:
        kernels = KERNELS[self.basis]
        if kernels.kernel_available(self.C, self.P):
            lead = x.shape[:-1]
            rows = math.prod(lead)
            if rows <= kernels.MAX_ROWS:
                y = kernels.seedlm_matvec(x.reshape(rows, -1), self.seeds, self.codes, self.exp_base,
                                          self.C, self.P, self.in_features)
                y = y.reshape(*lead, self.out_features)
            else:
                W = kernels.seedlm_dequantize(self.seeds, self.codes, self.exp_base, self.C, self.P,
                                              self.in_features, dtype=x.dtype)
                y = x @ W.T
        else:
            y = x @ self.dense_weight(x.dtype).T
        if "bias" in self:
            y = y + self.bias
        return y


class SeedLMEmbedding(_SeedLMBase):
    """An Embedding table (vocab, dims) stored in the SeedLM format; rows decoded on lookup."""

    def __init__(self, num_embeddings: int, dims: int, C: int, P: int, K: int = K_DEFAULT,
                 basis: str = BASIS_LEGACY):
        super().__init__(num_embeddings, dims, C, P, K, basis)
        self.num_embeddings, self.dims = num_embeddings, dims

    def _packed_rows_cols(self):
        return self.num_embeddings, self.dims

    def __call__(self, ids: mx.array) -> mx.array:
        flat = ids.reshape(-1)
        # the dequantise kernel on a GPU, ``reconstruct`` elsewhere (on the host: on a GPU that
        # would synchronise every decode step); K is the format's one register width
        rows = KERNELS[self.basis].seedlm_dequantize(self.seeds[flat], self.codes[flat], self.exp_base,
                                                     self.C, self.P, self.dims, dtype=mx.float32)
        return rows.reshape(*ids.shape, self.dims)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.dense_weight(x.dtype).T


@register_method("seedlm")
def build_from_spec(module: nn.Module, spec: dict) -> nn.Module:
    """The empty SeedLM layer (packed arrays to be filled) that a spec entry describes for ``module``."""
    cfg = spec_config(spec)
    if isinstance(module, nn.Embedding):
        rows, cols = module.weight.shape
        made = SeedLMEmbedding(rows, cols, cfg.C, cfg.P, cfg.K, cfg.basis)
    elif isinstance(module, nn.Linear):
        rows, cols = module.weight.shape
        made = SeedLMLinear(cols, rows, cfg.C, cfg.P, bias=bool(spec.get("bias", False)), K=cfg.K,
                            basis=cfg.basis)
    else:
        raise MlxeffError(f"SeedLM does not apply to {type(module).__name__}")
    check_spec_shape(spec, rows, cols)
    return made


# ----------------------------------------------------------------------------------------------
# encoding weights and models


def quantize_weight(weight, C: int, P: int, *, config=None, group=None, progress=None,
                    basis: str = BASIS_DEFAULT):
    """Encode an (out, in) weight: ``(seeds, codes, exp_base, EncodedMatrix)`` (numpy arrays)."""
    enc = encode_matrix(weight, C, P, config=config or EncoderConfig(), group=group, progress=progress,
                        basis=basis)
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
                   config=None, report: Optional[list] = None, basis: str = BASIS_DEFAULT) -> nn.Module:
    """Replace the model's Linear layers in the transformer blocks by ``SeedLMLinear``, in place.

    ``bits`` picks a preset (4: C=8 P=3; 3: C=12 P=4) unless C and P are given; ``basis`` the basis
    (``seedlm_format``: ``BASIS_DEFAULT``, the paper's normalised register states, or "bits"). Embeddings and the
    output head stay as they are unless ``include_embeddings``. Every weight is encoded first; then
    the per-layer spec is applied (``apply_quantization_spec``, as on load), the packed arrays
    filled, and the spec recorded in ``model.mlxeff_meta["quantization"]`` (saved by
    ``mlxeff.save``), so an interrupted run leaves the model as it was (at the cost of holding the
    packed arrays, a few bits a weight, until the last layer is encoded). ``group`` is an
    ``mx.distributed`` group (default: ``mx.distributed.init()``); every rank gets the same model.
    ``config`` is a ``seedlm_encoder.EncoderConfig``; ``report``, if a list, receives one dict per
    layer (path, shape, relative error, squared error and norm, seconds). ``progress``: a bar
    (``mlxeff.progress.bar``, blocks per second and ETA) on rank 0 where stderr is a terminal;
    False silences it.
    """
    cfg = SeedLMConfig.for_bits(bits, C, P, basis)
    group = group if group is not None else mx.distributed.init()
    targets = quantizable_modules(model, include_embeddings)
    total = sum(m.weight.shape[0] * num_blocks(m.weight.shape[1], cfg.C) for _, m in targets)
    encoder_config = config or EncoderConfig()
    show = None if progress and group.rank() == 0 else False
    packed, rows_report = {}, []
    with bar(total, desc=f"seedlm {cfg.bits}-bit", unit="blocks", show=show) as blocks_bar:
        for path, module in targets:
            t0 = time.perf_counter()
            seeds, codes, exp_base, enc = quantize_weight(module.weight, cfg.C, cfg.P, config=encoder_config,
                                                          group=group, progress=blocks_bar, basis=cfg.basis)
            packed[path] = (seeds, codes, exp_base)
            rows_report.append({"path": path, "shape": list(module.weight.shape),
                                "rel_error": math.sqrt(enc.sq_error / enc.sq_norm) if enc.sq_norm else 0.0,
                                "sq_error": enc.sq_error, "sq_norm": enc.sq_norm,
                                "seconds": time.perf_counter() - t0})
    specs = {path: spec_entry(*m.weight.shape, cfg.C, cfg.P, cfg.K, bias="bias" in m, basis=cfg.basis)
             for path, m in targets}
    apply_quantization_spec(model, specs, source="quantize_model")
    built = dict(model.named_modules())
    for path, module in targets:
        built[path].set_packed(*packed.pop(path))  # the numpy copy goes as the layer takes its own
        if "bias" in module:
            built[path].bias = module.bias
    if report is not None:
        report.extend(rows_report)
    meta = dict(getattr(model, "mlxeff_meta", None) or {})
    meta["quantization"] = {**(meta.get("quantization") or {}), **specs}
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
