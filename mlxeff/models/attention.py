"""Attention and RoPE at explicit positions: the one place the model computes them.

Every technique reaches attention through the model (``Model(inputs, cache, positions=, mask=)``
and ``Transformer.forward_layers``); what varies is said with data, not code:

- ``positions`` (B, T): the RoPE position of every input token, as an ``mx.array``, a numpy array
  or a ``Positions`` (both forms). The cache records host positions: a caller that has them on the
  host passes those; positions only on the device are read back when the cache first needs them. Integers rotate exactly as
  ``nn.RoPE`` does at that offset (``mx.fast.rope`` with one offset per token); real-valued
  positions (superposition prompting's equilibrium positions) use the same rotation computed in
  plain MLX (``rope_real``). Without ``positions`` a token takes the next position of its cache.
- ``mask``: ``None`` is causal -- by index when no positions are given (the plain path, identical
  to mlx-lm's), by *position* when they are (a key is visible to a query at a position <= the
  query's, which a cache holding tokens out of order needs); ``"causal"`` forces the index rule
  (rows appended in order after everything cached); an array (boolean, or additive) is used as it
  is (superposition's fork-join graph).
- the cache: a ``PositionedKVCache`` (``mlxeff.cache``) may name a subset of its slots to attend
  (``attend_index``: RefreshKV, StreamingLLM, H2O), ask for the last query row's attention
  weights (``want_scores``: LazyLLM's importance, RefreshKV's selection) and receive the layer's
  raw keys and values before qk-norm and RoPE (``raw_sink``: KV Prediction).

The subset ``attend_index`` is an int array of slots: ``(n,)`` for every head, ``(B, n)`` per
batch entry, or ``(B|1, KVH, n)`` per KV head (a query head reads its KV head's row). It may also
be a callable, called with the layer's queries (B, H, T, D) after qk-norm and RoPE, that returns
the slots or None (every slot): a technique then decides per layer from the queries themselves
(RefreshKV's query-similarity schedule). One query row appended after everything cached sees
every listed slot (the pruned-attention kernel on a GPU, reading the cache's buffers in place;
elsewhere the listed rows gathered for ``mx.fast.scaled_dot_product_attention``); several rows, or
rows at explicit positions, attend causally by position among the listed slots. With a subset,
``scores`` are the weights over the listed slots, in the index's order: (B, H, n).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention

from ..kernels import gpu_backend
from .pruned_attention import kernel_available, pruned_attention_kernel


@dataclass
class Positions:
    """Positions (B, T) on the device and, once needed, on the host (read back at most once)."""

    device: mx.array
    _host: Optional[np.ndarray] = None

    @property
    def host(self) -> np.ndarray:
        if self._host is None:
            self._host = np.array(self.device)
        return self._host

    @property
    def known_host(self) -> Optional[np.ndarray]:
        """The host copy if there is one already (None: reading it would wait for the device)."""
        return self._host


def as_positions(positions) -> Optional[Positions]:
    """``positions`` as a ``Positions`` of shape (B, T): integers as int32, real values as float32."""
    if positions is None or isinstance(positions, Positions):
        return positions
    if isinstance(positions, np.ndarray):
        host = positions if positions.ndim == 2 else positions[None]
        kind = np.float32 if host.dtype.kind == "f" else np.int32
        return Positions(mx.array(host.astype(kind)), host)
    return Positions(positions if positions.ndim == 2 else positions[None])


def rope_at(x: mx.array, positions: mx.array, rope: nn.RoPE) -> mx.array:
    """``rope`` applied to ``x`` (B, heads, T, D) with token (b, t) at ``positions[b, t]``
    (``rope_tokens`` on the token-major view)."""
    return rope_tokens(x.transpose(0, 2, 1, 3), positions, rope)


def rope_tokens(x: mx.array, positions: mx.array, rope: nn.RoPE) -> mx.array:
    """``rope`` applied to ``x`` in token-major layout (B, T, heads, D), token (b, t) at
    ``positions[b, t]``; the result in the attention layout (B, heads, T, D).

    Integer positions: ``mx.fast.rope`` takes one offset per batch entry, so every token becomes
    its own batch entry and rotates exactly as ``rope(x, offset=p)`` rotates a token at ``p``. A
    projection's output is token-major, so a contiguous ``x`` becomes those entries without a copy
    (from the attention layout it takes one per call). Real-valued positions go through
    ``rope_real``."""
    B, T, H, D = x.shape
    positions = positions.reshape(B, T)
    if mx.issubdtype(positions.dtype, mx.floating):
        return rope_real(x.transpose(0, 2, 1, 3), positions, rope)
    y = mx.fast.rope(x.reshape(B * T, H, 1, D), rope.dims, traditional=rope.traditional, base=rope.base,
                     scale=rope.scale, offset=positions.reshape(-1).astype(mx.int32))
    return y.reshape(B, T, H, D).transpose(0, 2, 1, 3)


def rope_real(x: mx.array, positions: mx.array, rope: nn.RoPE) -> mx.array:
    """RoPE at real-valued ``positions`` (B, T), in float32 (the non-interleaved form mlxeff's
    models use, or the interleaved one when ``rope.traditional``)."""
    B, H, T, D = x.shape
    dims = rope.dims
    inv_freq = mx.power(float(rope.base), -mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    angles = (positions.astype(mx.float32) * rope.scale)[:, None, :, None] * inv_freq  # (B,1,T,d/2)
    cos, sin = mx.cos(angles), mx.sin(angles)
    xr = x[..., :dims].astype(mx.float32)
    if rope.traditional:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(B, H, T, dims)
    else:
        x1, x2 = xr[..., : dims // 2], xr[..., dims // 2:]
        rot = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    rot = rot.astype(x.dtype)
    return rot if dims == D else mx.concatenate([rot, x[..., dims:]], axis=-1)


def last_row_scores(q_last: mx.array, keys: mx.array, scale: float) -> mx.array:
    """Attention weights of one query row ``q_last`` (B, H, 1, D) over ``keys`` (B, KVH, n, D),
    softmaxed in float32: shape (B, H, n). GQA: query head h reads KV head h // (H // KVH)."""
    B, H, _, D = q_last.shape
    KVH = keys.shape[1]
    q = q_last.reshape(B, KVH, H // KVH, D).astype(mx.float32)
    scores = (q * scale) @ keys.astype(mx.float32).swapaxes(-1, -2)  # (B, KVH, G, n)
    return mx.softmax(scores, axis=-1).reshape(B, H, -1)


def position_mask(q_positions: mx.array, k_positions: mx.array) -> mx.array:
    """Boolean (B, 1, Tq, S): key slot s is visible to query t when its position is <= the query's."""
    return k_positions.reshape(k_positions.shape[0] if k_positions.ndim == 2 else 1, 1, 1, -1) \
        <= q_positions.reshape(q_positions.shape[0], 1, -1, 1)


def attend(q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask, cache=None,
           positions: Optional[mx.array] = None) -> mx.array:
    """Attention of ``q`` (B, H, T, D) over ``k``/``v`` (what the cache returned), as the module
    docstring describes: mlx-lm's attention on the plain path, by position or over a subset of
    the cache's slots where a technique asked for it."""
    index = None if cache is None else getattr(cache, "attend_index", None)
    if callable(index):
        index = index(q)  # the technique chooses this layer's slots from its queries
    if index is None and positions is None and few_rows_in_order(q, mask, cache):
        out = attend_few_rows(q, cache, scale)
    elif index is None and (positions is None or mask is not None):
        if isinstance(mask, str) and q.shape[2] == 1:
            mask = None  # one row appended after everything cached sees everything
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)
    elif index is not None and positions is None and q.shape[2] == 1 and not isinstance(mask, mx.array):
        out = attend_subset(q, k, v, cache, index, scale)
    else:
        out = attend_by_position(q, k, v, cache, positions, index, scale)
    if cache is not None and getattr(cache, "want_scores", False):
        keys = k if index is None else gather_slots(k, index)
        cache.scores = last_row_scores(q[:, :, -1:], keys, scale)
    return out


# Query rows up to which rows appended in order attend through the pruned-attention kernel on a
# CUDA GPU (0: never). MLX's CUDA backend sends 2+ query rows to cuDNN's attention, which builds a
# graph per exact (query rows, key length) pair: the verify forward of drafted decoding has a new
# key length every step, so every step built a graph per layer shape, 114 ms a forward against
# 3.7 ms (benchmarks/RESULTS.md, "Drafted decoding on the GPU"). MLX's Metal attention builds no
# per-length graphs, and the route is not measured there, so Metal keeps it.
# MLXEFF_FEW_ROWS=0 in the environment keeps MLX's attention on CUDA too.
FEW_ROWS = int(os.environ.get("MLXEFF_FEW_ROWS", "16"))


def few_rows_in_order(q: mx.array, mask, cache) -> bool:
    """Whether ``q``'s rows were appended in order after everything cached (the plain causal rule)
    and are few enough for the pruned-attention kernel, on a CUDA GPU that runs it."""
    return (1 < q.shape[2] <= FEW_ROWS and (mask is None or isinstance(mask, str))
            and getattr(cache, "ordered", False) and getattr(cache, "keys", None) is not None
            and gpu_backend() == "cuda" and kernel_available(q.shape[-1]))


def attend_few_rows(q: mx.array, cache, scale: float) -> mx.array:
    """Rows appended in order, causal over the cache's buffers read in place: every cached slot
    at a position <= the row's (slot i holds position i in an ordered cache)."""
    index, q_positions, k_positions = _in_order_arrays(cache.offset, q.shape[2], cache.keys.shape[2])
    return pruned_attention_kernel(q, cache.keys, cache.values, index, scale=scale,
                                   q_positions=q_positions, k_positions=k_positions)


@lru_cache(maxsize=4)  # one forward asks once per layer with the same numbers
def _in_order_arrays(offset: int, rows: int, size: int) -> tuple:
    return (mx.arange(offset, dtype=mx.int32), mx.arange(offset - rows, offset, dtype=mx.int32)[None],
            mx.arange(size, dtype=mx.int32))


def gather_slots(x: mx.array, index: mx.array) -> mx.array:
    """The rows ``index`` ((n,), (B, n) or (B|1, KVH, n)) of ``x`` (B, KVH, S, D): (B, KVH, n, D)."""
    if index.ndim == 1:
        return mx.take(x, index, axis=2)
    B, KVH, _, D = x.shape
    rows = index[:, :, :, None] if index.ndim == 3 else index[:, None, :, None]
    return mx.take_along_axis(x, mx.broadcast_to(rows, (B, KVH, index.shape[-1], D)), axis=2)


def attend_subset(q, k, v, cache, index, scale):
    """One query row appended after everything cached, over the listed slots (all of them are at
    earlier positions, so no mask): on a GPU the pruned-attention kernel reads the cache's whole
    buffers in place; elsewhere the listed rows are gathered for SDPA."""
    if kernel_available(q.shape[-1]):
        return pruned_attention_kernel(q, cache.keys, cache.values, index, scale=scale)
    return mx.fast.scaled_dot_product_attention(q, gather_slots(k, index), gather_slots(v, index),
                                                scale=scale)


def attend_by_position(q, k, v, cache, positions, index, scale):
    """Causal by position (and restricted to the slots ``index`` when given). On a GPU with the
    pruned-attention kernel the cache's whole buffers are read in place (a slice of mlx-lm's
    growing buffer is not contiguous, and the kernel call would copy it); elsewhere, and for
    real-valued positions, the rule is a boolean mask for ``mx.fast.scaled_dot_product_attention``
    over the (gathered) keys."""
    T = q.shape[2]
    qpos = positions if positions is not None else _next_positions(cache, T)
    kpos = cache.slot_position_array()  # the whole buffer; UNFILLED beyond the cached slots
    integral = not (mx.issubdtype(qpos.dtype, mx.floating) or mx.issubdtype(kpos.dtype, mx.floating))
    if integral and kernel_available(q.shape[-1]):
        idx = index if index is not None else mx.arange(cache.offset, dtype=mx.int32)
        return pruned_attention_kernel(q, cache.keys, cache.values, idx, scale=scale,
                                       q_positions=qpos.astype(mx.int32), k_positions=kpos)
    kpos = kpos[: k.shape[2]]
    if index is not None and index.ndim > 1:  # per batch entry or per KV head
        B, H = q.shape[:2]
        kp = mx.take(kpos, index)  # (B, n) or (B|1, KVH, n)
        kp = kp[:, None, None, :] if index.ndim == 2 else kp[:, :, None, :]
        mask = kp <= qpos.reshape(qpos.shape[0], 1, -1, 1)
        if index.ndim == 3 and mask.shape[1] != H:
            mask = mx.repeat(mask, H // mask.shape[1], axis=1)  # query head h reads KV head h // G
        k, v = gather_slots(k, index), gather_slots(v, index)
    else:
        if index is not None:
            k, v, kpos = mx.take(k, index, axis=2), mx.take(v, index, axis=2), mx.take(kpos, index)
        mask = position_mask(qpos, kpos)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    # a row that sees no key yields zeros, as the kernel does
    return mx.where(mx.any(mask, axis=-1, keepdims=True), out, 0.0).astype(q.dtype)


def _next_positions(cache, T: int) -> mx.array:
    start = cache.next_position - T  # the rows were just appended at the cache's next positions
    return mx.arange(start, start + T, dtype=mx.int32)[None]
