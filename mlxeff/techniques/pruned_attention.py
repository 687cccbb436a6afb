"""Pruned attention: attention of a few queries over a listed subset of cache slots.

The operation at the heart of LazyLLM (arXiv 2407.14057), Recycled Attention and superposition
prompting: queries ``q`` attend over the key/value cache slots named in ``index`` only, without
materialising a gathered copy of the selected rows. It serves a decode step (one query per
sequence) and short prefill chunks (a few queries), with optional causal masking *by position*:
a key is visible to a query when ``k_positions[slot] <= q_positions[query]``, which is what a cache
holding tokens out of order (LazyLLM's revived tokens) needs.

Three implementations of one algorithm (DESIGN.md, "Kernels"):

- ``pruned_attention_reference``: plain MLX ops (gather, scores in float32, softmax, weighted sum).
  Used on the CPU and as the oracle in the tests.
- ``metal/pruned_attention.inc``: one kernel body compiled for Metal (``mx.fast.metal_kernel``) and
  CUDA (``mx.fast.cuda_kernel``) through the macros of ``mlxeff.kernels``. Flash-decoding style:
  the index list is cut into ``n_splits`` parts; a threadgroup per (part, block of query rows,
  batch x KV head) walks its part with one SIMD group per key (lanes split the head dimension) and
  an online softmax, and a second small kernel merges the parts. With one part a single kernel
  writes the output directly.

GQA: query head ``h`` uses KV head ``h // (H // KVH)`` (MLX's convention); one threadgroup serves
all query heads of a KV head, so a gathered row is read once for the group.

Choices and limits: ``index`` entries must be distinct slots in ``[0, S)`` (a repeated slot counts
twice; out-of-range slots are not checked on the GPU); a query row that sees no key returns zeros
(the reference agrees); the kernel needs ``head_dim`` a multiple of 32 (at most 256) and falls back
to the reference otherwise; accumulation is in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

from ..kernels import KernelSpec, build, gpu_backend

WARPS = 4  # SIMD groups per threadgroup of the walk (default)
UNROLL = 4  # keys in flight per SIMD group (default)
MAX_WARPS = 16
MAX_ROWS = 8  # query rows (GQA heads x queries) per threadgroup
TARGET_GROUPS = 128  # about one threadgroup per SM of a large GPU
MIN_ROUNDS = 4  # unrolled rounds of keys per SIMD group and split, at least

_INPUTS = ("q", "k", "v", "index", "qpos", "kpos", "scale")

PARTIAL_SPEC = KernelSpec(
    name="pruned_attention_partial",
    source_file="pruned_attention.inc",
    input_names=_INPUTS,
    output_names=("part_acc", "part_ml"),
    defines=(("PA_KERNEL", "1"),),
)
SINGLE_SPEC = KernelSpec(
    name="pruned_attention_single",
    source_file="pruned_attention.inc",
    input_names=_INPUTS,
    output_names=("out",),
    defines=(("PA_KERNEL", "2"),),
)
COMBINE_SPEC = KernelSpec(
    name="pruned_attention_combine",
    source_file="pruned_attention.inc",
    input_names=("part_acc", "part_ml"),
    output_names=("out",),
    defines=(("PA_KERNEL", "3"),),
)


def _batch_shape_ok(x: Optional[mx.array], batch: int, name: str) -> None:
    if x is not None and (x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[0] not in (1, batch))):
        raise ValueError(f"{name} must have shape (n,) or ({batch}, n), got {tuple(x.shape)}")


def _as_batched(x: Optional[mx.array], batch: int, name: str) -> Optional[mx.array]:
    if x is None:
        return None
    _batch_shape_ok(x, batch, name)
    if x.ndim == 1:
        x = x[None]
    if x.dtype != mx.int32:
        x = x.astype(mx.int32)
    return x if x.shape[0] == batch else mx.broadcast_to(x, (batch, x.shape[1]))


def _validate(q, k, v, index, q_positions, k_positions) -> None:
    """Shape checks only (no array ops: the kernel path calls this once per layer and step)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k and v must have shape (B, heads, length, head_dim)")
    B, H, Lq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"{H} query heads do not split into groups of {k.shape[1]} KV heads")
    if (q_positions is None) != (k_positions is None):
        raise ValueError("give both q_positions and k_positions (causal by position) or neither")
    for x, name in ((index, "index"), (q_positions, "q_positions"), (k_positions, "k_positions")):
        _batch_shape_ok(x, B, name)
    if q_positions is not None and q_positions.shape[-1] != Lq:
        raise ValueError(f"q_positions has {q_positions.shape[-1]} entries for {Lq} queries")
    if k_positions is not None and k_positions.shape[-1] != k.shape[2]:
        raise ValueError(f"k_positions has {k_positions.shape[-1]} entries for {k.shape[2]} cache slots")


def _check(q, k, v, index, q_positions, k_positions):
    _validate(q, k, v, index, q_positions, k_positions)
    B = q.shape[0]
    return (_as_batched(index, B, "index"), _as_batched(q_positions, B, "q_positions"),
            _as_batched(k_positions, B, "k_positions"))


def pruned_attention_reference(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    index: mx.array,
    *,
    scale: float,
    q_positions: Optional[mx.array] = None,
    k_positions: Optional[mx.array] = None,
) -> mx.array:
    """Attention of ``q`` (B, H, Lq, D) over the slots ``index`` ((n,) or (B, n)) of ``k``/``v``
    (B, KVH, S, D), in plain MLX ops; causal by position when positions are given."""
    idx, qpos, kpos = _check(q, k, v, index, q_positions, k_positions)
    B, H, Lq, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    n = idx.shape[1]
    gather = mx.broadcast_to(idx[:, None, :, None], (B, KVH, n, D))
    kg = mx.take_along_axis(k, gather, axis=2).astype(mx.float32)
    vg = mx.take_along_axis(v, gather, axis=2).astype(mx.float32)
    # Rows (g, i) of one KV head: query head kvh * G + g, query i.
    qr = q.astype(mx.float32).reshape(B, KVH, G * Lq, D)
    scores = (qr * scale) @ kg.swapaxes(-1, -2)  # (B, KVH, G*Lq, n)
    if qpos is not None:
        kp = mx.take_along_axis(kpos, idx, axis=1)  # (B, n)
        qp = mx.tile(qpos, (1, G))  # (B, G*Lq), row g*Lq + i -> qpos[i]
        visible = kp[:, None, None, :] <= qp[:, None, :, None]
        scores = mx.where(visible, scores, -mx.inf)
        any_visible = mx.any(visible, axis=-1, keepdims=True)
        probs = mx.where(any_visible, mx.softmax(scores, axis=-1), 0.0)
    else:
        probs = mx.softmax(scores, axis=-1)
    out = probs @ vg
    return out.reshape(B, H, Lq, D).astype(q.dtype)


def kernel_supported(head_dim: int) -> bool:
    return head_dim % 32 == 0 and head_dim <= 256


def default_splits(n: int, groups: int, warps: int = WARPS, unroll: int = UNROLL) -> int:
    """Split the index list until about ``TARGET_GROUPS`` threadgroups run, but give every SIMD
    group at least ``MIN_ROUNDS`` unrolled rounds of keys: more, smaller splits cost more in the
    merge (partials written, read and freed) than their extra parallelism returns."""
    most = max(1, math.ceil(n / (warps * unroll * MIN_ROUNDS)))
    return max(1, min(most, math.ceil(TARGET_GROUPS / max(groups, 1)), 128))


def launch_config(q_shape, k_shape, n: int, n_splits: Optional[int] = None,
                  warps: int = WARPS, unroll: int = UNROLL) -> dict:
    """Grid, threadgroup and template ints of the walk (shared by the GPU call and metal-check)."""
    B, H, Lq, D = q_shape
    KVH = k_shape[1]
    rows = (H // KVH) * Lq
    rows_per_group = min(MAX_ROWS, rows)
    row_blocks = math.ceil(rows / rows_per_group)
    # 16 SIMD groups at most: with 32 (1024 threads) the walk needs more registers than a CUDA
    # block has, and the launch fails (measured on an H100).
    if not 1 <= warps <= MAX_WARPS or not 1 <= unroll <= 16:
        raise ValueError(f"warps must be in 1..{MAX_WARPS} and unroll in 1..16, got {warps}, {unroll}")
    groups = B * KVH * row_blocks
    splits = default_splits(n, groups, warps, unroll) if n_splits is None else int(n_splits)
    if splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    return dict(
        grid=(32 * warps * splits, row_blocks, B * KVH),
        threadgroup=(32 * warps, 1, 1),
        ints=dict(D=D, ROWS=rows_per_group, WARPS=warps, UNROLL=unroll, NSPLIT=splits),
    )


_CONSTANTS: dict = {}


def _constant(value, dtype) -> mx.array:
    """A cached one-element array (no allocation or fill kernel per call)."""
    key = (value, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = mx.array([value], dtype)
        mx.eval(_CONSTANTS[key])
    return _CONSTANTS[key]


def kernel_inputs(q, k, v, index, scale, q_positions=None, k_positions=None):
    """The seven kernel inputs (dummy positions when not causal) and ``causal``. ``index`` goes in
    as given, (n,) or (B, n) (the kernel reads either): no reshape or broadcast op per call."""
    _validate(q, k, v, index, q_positions, k_positions)
    if index.dtype != mx.int32:
        index = index.astype(mx.int32)
    causal = q_positions is not None
    if causal:
        B = q.shape[0]
        qpos = _as_batched(q_positions, B, "q_positions")
        kpos = _as_batched(k_positions, B, "k_positions")
    else:
        qpos = kpos = _constant(0, mx.int32)
    return [q, k, v, index, qpos, kpos, _constant(float(scale), mx.float32)], causal


def _plan(q_shape, k_shape, n: int, dtype, causal: bool, n_splits, warps: int, unroll: int) -> list:
    """The kernel launches of one call, as (spec, keyword arguments) pairs; cached per signature,
    since a decode step calls this once per layer and Python time is a large part of such a call."""
    key = (tuple(q_shape), tuple(k_shape), n, dtype, causal, n_splits, warps, unroll)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    B, H, Lq, D = q_shape
    if not kernel_supported(D):
        raise ValueError(f"the pruned-attention kernel needs head_dim % 32 == 0 and <= 256, got {D}")
    cfg = launch_config(q_shape, k_shape, n, n_splits, warps, unroll)
    ints = cfg["ints"]
    walk = dict(template=[("T", dtype), *ints.items(), ("CAUSAL", causal)], grid=cfg["grid"],
                threadgroup=cfg["threadgroup"])
    if ints["NSPLIT"] == 1:
        plan = [(SINGLE_SPEC, dict(output_shapes=[tuple(q_shape)], output_dtypes=[dtype], **walk))]
    else:
        rows = B * H * Lq
        plan = [
            (PARTIAL_SPEC, dict(output_shapes=[(rows, ints["NSPLIT"], D), (rows, ints["NSPLIT"], 2)],
                                output_dtypes=[mx.float32, mx.float32], **walk)),
            (COMBINE_SPEC, dict(template=[("T", dtype), ("D", D), ("NSPLIT", ints["NSPLIT"])],
                                grid=(D * rows, 1, 1), threadgroup=(D, 1, 1),
                                output_shapes=[tuple(q_shape)], output_dtypes=[dtype])),
        ]
    if len(_PLANS) > 512:  # LazyLLM's index length changes every step: keep the cache bounded
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


_PLANS: dict = {}


def _launch(ins, causal: bool, q_shape, dtype, n_splits, call, warps=WARPS, unroll=UNROLL):
    """The kernel sequence for one call; ``call(spec, inputs=..., **launch)`` runs one kernel and
    returns its outputs (MLX on a GPU, or metal-check on the CPU in the tests)."""
    plan = _plan(q_shape, ins[1].shape, ins[3].shape[-1], dtype, causal, n_splits, warps, unroll)
    outs = ins
    for spec, kw in plan:
        outs = call(spec, inputs=outs if spec is not COMBINE_SPEC else outs[:2], **kw)
    return outs[0]


def pruned_attention_kernel(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    index: mx.array,
    *,
    scale: float,
    q_positions: Optional[mx.array] = None,
    k_positions: Optional[mx.array] = None,
    n_splits: Optional[int] = None,
    warps: int = WARPS,
    unroll: int = UNROLL,
    backend: Optional[str] = None,
) -> mx.array:
    """The custom kernel (Metal or CUDA); raises ``KernelUnavailable`` without a GPU backend.
    ``n_splits``, ``warps`` and ``unroll`` tune the launch (the defaults suit a decode step)."""
    ins, causal = kernel_inputs(q, k, v, index, scale, q_positions, k_positions)
    return _launch(ins, causal, q.shape, q.dtype, n_splits,
                   lambda spec, **kw: build(spec, backend)(**kw), warps, unroll)


def pruned_attention_metal_check(q, k, v, index, *, scale, q_positions=None, k_positions=None,
                                 n_splits=None, warps=WARPS, unroll=UNROLL):
    """The Metal body executed on the CPU by shared/tools/metal-check (tests only; numpy out)."""
    import numpy as np

    from ..kernels import metal_check_run

    def np_dtype(d):
        return {mx.float32: np.float32, mx.float16: np.float16, mx.int32: np.int32}[d]

    def call(spec, inputs, template, output_dtypes, **kw):
        ins = [np.asarray(x) for x in inputs]
        template = [(n, np_dtype(v) if isinstance(v, mx.Dtype) else v) for n, v in template]
        return metal_check_run(spec, ins, template=template,
                               output_dtypes=[np_dtype(d) for d in output_dtypes], **kw)

    ins, causal = kernel_inputs(q, k, v, index, scale, q_positions, k_positions)
    return _launch(ins, causal, q.shape, q.dtype, n_splits, call, warps, unroll)


def pruned_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    index: Optional[mx.array],
    *,
    scale: float,
    q_positions: Optional[mx.array] = None,
    k_positions: Optional[mx.array] = None,
    n_splits: Optional[int] = None,
) -> mx.array:
    """Attention of ``q`` (B, H, Lq, D) over the cache slots ``index`` ((n,) or (B, n); None: every
    slot) of ``k`` and ``v`` (B, KVH, S, D). With ``q_positions`` ((Lq,) or (B, Lq)) and
    ``k_positions`` ((S,) or (B, S)) a key is visible to a query only at a position <= the query's.
    The custom kernel runs on Metal/CUDA GPUs; elsewhere (and for unsupported head sizes) plain MLX:
    the reference, or for every slot ``mx.fast.scaled_dot_product_attention`` with a boolean mask
    (no gathered copy)."""
    if gpu_backend() is not None and kernel_supported(q.shape[-1]):
        if index is None:
            index = mx.arange(k.shape[2], dtype=mx.int32)
        return pruned_attention_kernel(
            q, k, v, index, scale=scale, q_positions=q_positions, k_positions=k_positions,
            n_splits=n_splits,
        )
    if index is None:
        _validate(q, k, v, None, q_positions, k_positions)
        mask = None
        if q_positions is not None:
            qp = q_positions.reshape(-1, 1, q.shape[2], 1) if q_positions.ndim == 2 else q_positions[:, None]
            kp = k_positions.reshape(-1, 1, 1, k.shape[2]) if k_positions.ndim == 2 else k_positions[None]
            mask = kp <= qp
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        if mask is not None:  # a row that sees no key yields zeros, as the reference and kernel do
            out = mx.where(mx.any(mask, axis=-1, keepdims=True), out, 0.0).astype(q.dtype)
        return out
    return pruned_attention_reference(
        q, k, v, index, scale=scale, q_positions=q_positions, k_positions=k_positions
    )
