"""Pruned attention: attention of a few queries over a listed subset of cache slots.

The operation at the heart of LazyLLM (arXiv 2407.14057), Recycled Attention and superposition
prompting: queries ``q`` attend over the key/value cache slots named in ``index`` only, without
materialising a gathered copy of the selected rows. It serves a decode step (one query per
sequence) and short prefill chunks (a few queries), with optional causal masking *by position*:
a key is visible to a query when ``k_positions[slot] <= q_positions[query]``, which is what a cache
holding tokens out of order (LazyLLM's revived tokens) needs.

Three implementations of one algorithm (one kernel body for two backends, one plain-MLX reference):

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

The index is one list of slots for every head and batch entry ``(n,)``, one per batch entry
``(B, n)``, or one per batch entry and KV head ``(B, KVH, n)`` (RefreshKV's per-head selections; a
leading 1 serves every batch entry): the threadgroup of a (batch entry, KV head) walks its own row.

Choices and limits: ``index`` entries must be distinct slots in ``[0, S)`` (a repeated slot counts
twice; out-of-range slots are not checked on the GPU); a query row that sees no key returns zeros
(the reference agrees); the kernel needs ``head_dim`` a multiple of 32 (at most 256) and falls back
to the reference otherwise; accumulation is in float32 whatever the input dtype.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from functools import partial
from typing import Optional

import mlx.core as mx

from ..kernels import KernelSpec, KernelUnavailable, build, gpu_backend, type_name

MAX_WARPS = 16  # SIMD groups per threadgroup of the walk, at most
MAX_ROWS = 8  # query rows (GQA heads x queries) per threadgroup
KEYS_PER_SPLIT = 64  # keys per split while threadgroups are fewer than TARGET_GROUPS
TARGET_GROUPS = 128  # about one threadgroup per SM of a large GPU
# Split counts a launch may use: each count is a kernel compiled at its first use, and LazyLLM's
# index grows every decoding step, so the counts are few (powers of two and 1.5x powers of two).
SPLIT_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

_INPUTS = ("q", "k", "v", "index")
_CAUSAL_INPUTS = _INPUTS + ("qpos", "kpos")

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


def specialise(spec: KernelSpec, backend: str, dtype, causal: bool = False, scale: float = 1.0,
               **ints) -> KernelSpec:
    """``spec`` with its compile-time constants (``T``, the ints, ``CAUSAL``, ``PA_SCALE``) written
    into the source as ``#define``s, under a name unique to them. Template arguments would do the
    same, but MLX formats them into the kernel's name and source on every call (~4 us per call for
    eight, measured on CUDA), and a decode step calls this kernel once per layer."""
    values = (("T", type_name(dtype, backend)), *((k, str(int(v))) for k, v in ints.items()),
              ("CAUSAL", "1" if causal else "0"), ("PA_SCALE", f"{float(scale)!r}f"))
    tag = hashlib.sha1(repr(values).encode()).hexdigest()[:16]
    inputs = spec.input_names if spec is COMBINE_SPEC or not causal else _CAUSAL_INPUTS
    return replace(spec, name=f"{spec.name}_{tag}", input_names=inputs, defines=spec.defines + values)


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
    if index is not None:
        _index_shape_ok(index, B, k.shape[1])
    for x, name in ((q_positions, "q_positions"), (k_positions, "k_positions")):
        _batch_shape_ok(x, B, name)
    if q_positions is not None and q_positions.shape[-1] != Lq:
        raise ValueError(f"q_positions has {q_positions.shape[-1]} entries for {Lq} queries")
    if k_positions is not None and k_positions.shape[-1] != k.shape[2]:
        raise ValueError(f"k_positions has {k_positions.shape[-1]} entries for {k.shape[2]} cache slots")


def _index_shape_ok(index: mx.array, batch: int, kv_heads: int) -> None:
    """(n,), (B, n), or (B or 1, KVH, n): a row per KV head."""
    if index.ndim == 3:
        if index.shape[0] not in (1, batch) or index.shape[1] != kv_heads:
            raise ValueError(f"a per-head index must have shape ({batch} or 1, {kv_heads}, n), "
                             f"got {tuple(index.shape)}")
        return
    _batch_shape_ok(index, batch, "index")


def _check(q, k, v, index, q_positions, k_positions):
    _validate(q, k, v, index, q_positions, k_positions)
    B = q.shape[0]
    if index.ndim == 3:
        idx = index if index.dtype == mx.int32 else index.astype(mx.int32)
        idx = idx if idx.shape[0] == B else mx.broadcast_to(idx, (B,) + tuple(idx.shape[1:]))
    else:
        idx = _as_batched(index, B, "index")
    return (idx, _as_batched(q_positions, B, "q_positions"), _as_batched(k_positions, B, "k_positions"))


def pruned_attention_reference(q: mx.array, k: mx.array, v: mx.array, index: mx.array, *, scale: float,
                               q_positions: Optional[mx.array] = None,
                               k_positions: Optional[mx.array] = None) -> mx.array:
    """Attention of ``q`` (B, H, Lq, D) over the slots ``index`` ((n,), (B, n) or per KV head
    (B|1, KVH, n)) of ``k``/``v`` (B, KVH, S, D), in plain MLX ops; causal by position when
    positions are given."""
    idx, qpos, kpos = _check(q, k, v, index, q_positions, k_positions)
    B, H, Lq, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    n = idx.shape[-1]
    rows = idx[:, :, :, None] if idx.ndim == 3 else idx[:, None, :, None]  # (B, KVH or 1, n, 1)
    gather = mx.broadcast_to(rows, (B, KVH, n, D))
    kg = mx.take_along_axis(k, gather, axis=2).astype(mx.float32)
    vg = mx.take_along_axis(v, gather, axis=2).astype(mx.float32)
    # Rows (g, i) of one KV head: query head kvh * G + g, query i.
    qr = q.astype(mx.float32).reshape(B, KVH, G * Lq, D)
    scores = (qr * scale) @ kg.swapaxes(-1, -2)  # (B, KVH, G*Lq, n)
    if qpos is not None:
        if idx.ndim == 3:  # (B, KVH, n): each KV head's own slots
            kp = mx.take_along_axis(kpos, idx.reshape(B, -1), axis=1).reshape(B, KVH, 1, n)
        else:
            kp = mx.take_along_axis(kpos, idx, axis=1)[:, None, None, :]  # (B, 1, 1, n)
        qp = mx.tile(qpos, (1, G))  # (B, G*Lq), row g*Lq + i -> qpos[i]
        visible = kp <= qp[:, None, :, None]
        scores = mx.where(visible, scores, -mx.inf)
        any_visible = mx.any(visible, axis=-1, keepdims=True)
        probs = mx.where(any_visible, mx.softmax(scores, axis=-1), 0.0)
    else:
        probs = mx.softmax(scores, axis=-1)
    out = probs @ vg
    return out.reshape(B, H, Lq, D).astype(q.dtype)


def kernel_supported(head_dim: int) -> bool:
    return head_dim % 32 == 0 and head_dim <= 256


def kernel_available(head_dim: int) -> bool:
    """Whether ``pruned_attention`` runs the custom kernel here: a GPU backend and a head size the
    kernel supports (callers that shape their inputs for the kernel ask the same question)."""
    return gpu_backend() is not None and kernel_supported(head_dim)


def default_launch(rows_per_group: int, head_dim: int) -> tuple:
    """(warps, unroll) of the walk: 16 SIMD groups of 2 keys in flight when a row block's registers
    allow it, else 4 of 4."""
    return (16, 2) if rows_per_group * head_dim <= 512 else (4, 4)


def default_splits(n: int, groups: int) -> int:
    """Enough splits for ``KEYS_PER_SPLIT`` keys each, but no more than about ``TARGET_GROUPS``
    threadgroups in all, rounded down to one of ``SPLIT_COUNTS``; one split (a single kernel, no
    merge) when the batch x KV heads alone fill the GPU. One threadgroup per KV head walking all keys is bound by latency, not bandwidth (its
    SIMD groups' serial chains of per-key reductions; more keys in flight do not help): for 1024
    keys it took 44.8 us of GPU time on an H100, 16 parts of 64 keys plus the merge 7.6 us (dense
    SDPA over all 4096 slots: 20.9 us; ``benchmarks/pruned_attention.py --kernel-time --sweep``,
    RESULTS.md)."""
    wanted = min(math.ceil(n / KEYS_PER_SPLIT), math.ceil(TARGET_GROUPS / max(groups, 1)))
    return max(c for c in SPLIT_COUNTS if c <= max(wanted, 1))


def launch_config(q_shape, k_shape, n: int, n_splits: Optional[int] = None,
                  warps: Optional[int] = None, unroll: Optional[int] = None) -> dict:
    """Grid, threadgroup and compile-time ints of the walk (shared by the GPU call and metal-check).
    ``warps``/``unroll`` default to ``default_launch``, ``n_splits`` to ``default_splits``."""
    B, H, Lq, D = q_shape
    KVH = k_shape[1]
    rows = (H // KVH) * Lq
    rows_per_group = min(MAX_ROWS, rows)
    row_blocks = math.ceil(rows / rows_per_group)
    dw, du = default_launch(rows_per_group, D)
    warps, unroll = warps or dw, unroll or du
    # 16 SIMD groups at most: with 32 (1024 threads) the walk needs more registers than a CUDA
    # block has, and the launch fails (measured on an H100).
    if not 1 <= warps <= MAX_WARPS or not 1 <= unroll <= 16:
        raise ValueError(f"warps must be in 1..{MAX_WARPS} and unroll in 1..16, got {warps}, {unroll}")
    groups = B * KVH * row_blocks
    splits = default_splits(n, groups) if n_splits is None else int(n_splits)
    if splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    return dict(
        grid=(32 * warps * splits, row_blocks, B * KVH),
        threadgroup=(32 * warps, 1, 1),
        ints=dict(D=D, ROWS=rows_per_group, WARPS=warps, UNROLL=unroll, NSPLIT=splits),
    )


def kernel_inputs(q, k, v, index, q_positions=None, k_positions=None):
    """The walk's inputs, (q, k, v, index[, qpos, kpos]), and ``causal``. ``index`` goes in as
    given, (n,), (B, n) or (B|1, KVH, n) (the kernel reads each): no reshape or broadcast op per
    call."""
    _validate(q, k, v, index, q_positions, k_positions)
    if index.dtype != mx.int32:
        index = index.astype(mx.int32)
    if q_positions is None:
        return [q, k, v, index], False
    B = q.shape[0]
    return [q, k, v, index, _as_batched(q_positions, B, "q_positions"),
            _as_batched(k_positions, B, "k_positions")], True


def _plan(q_shape, k_shape, n: int, dtype, causal: bool, scale: float, n_splits, warps, unroll,
          backend: str) -> list:
    """The kernel launches of one call, as (specialised spec, keyword arguments) pairs; cached per
    signature, since a decode step calls this once per layer and Python time is a large part of
    such a call."""
    key = (tuple(q_shape), tuple(k_shape), n, dtype, causal, scale, n_splits, warps, unroll, backend)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    B, H, Lq, D = q_shape
    if not kernel_supported(D):
        raise ValueError(f"the pruned-attention kernel needs head_dim % 32 == 0 and <= 256, got {D}")
    cfg = launch_config(q_shape, k_shape, n, n_splits, warps, unroll)
    ints = cfg["ints"]
    walk = dict(grid=cfg["grid"], threadgroup=cfg["threadgroup"])
    if ints["NSPLIT"] == 1:
        plan = [(specialise(SINGLE_SPEC, backend, dtype, causal, scale, **ints),
                 dict(output_shapes=[tuple(q_shape)], output_dtypes=[dtype], **walk))]
    else:
        rows = B * H * Lq
        plan = [
            (specialise(PARTIAL_SPEC, backend, dtype, causal, scale, **ints),
             dict(output_shapes=[(rows, ints["NSPLIT"], D), (rows, ints["NSPLIT"], 2)],
                  output_dtypes=[mx.float32, mx.float32], **walk)),
            (specialise(COMBINE_SPEC, backend, dtype, D=D, NSPLIT=ints["NSPLIT"]),
             dict(grid=(D * rows, 1, 1), threadgroup=(D, 1, 1), output_shapes=[tuple(q_shape)],
                  output_dtypes=[dtype])),
        ]
    if len(_PLANS) > 512:  # LazyLLM's index length changes every step: keep the cache bounded
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


_PLANS: dict = {}


def _launch(ins, causal: bool, q_shape, dtype, scale, n_splits, call, warps, unroll, backend):
    """The kernel sequence for one call; ``call(spec, inputs=..., **launch)`` runs one kernel and
    returns its outputs (MLX on a GPU, or metal-check on the CPU in the tests)."""
    plan = _plan(q_shape, ins[1].shape, ins[3].shape[-1], dtype, causal, scale, n_splits, warps,
                 unroll, backend)
    return _chain([(partial(call, spec), kw) for spec, kw in plan], ins)


def _chain(steps, outs) -> mx.array:
    """Run (kernel, launch keywords) steps, each on the previous one's outputs (the combine takes
    the walk's two); the last one's output."""
    for run, kw in steps:
        outs = run(inputs=outs, **kw)
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
    warps: Optional[int] = None,
    unroll: Optional[int] = None,
    backend: Optional[str] = None,
) -> mx.array:
    """The custom kernel (Metal or CUDA); raises ``KernelUnavailable`` without a GPU backend.
    ``n_splits``, ``warps`` and ``unroll`` tune the launch (the defaults suit a decode step)."""
    backend = backend or gpu_backend()
    if backend is None:
        raise KernelUnavailable("pruned attention: no GPU backend on this device (use the reference)")
    if q_positions is None and index.dtype == mx.int32:
        # The decode path: a call with the shapes of an earlier one needs no checks and no plan
        # lookup, only the launches (Python time is a large part of such a call).
        key = (q.shape, k.shape, v.shape, index.shape, q.dtype, scale, n_splits, warps, unroll, backend)
        entry = _FAST.get(key)
        if entry is None:
            _validate(q, k, v, index, None, None)
            plan = _plan(q.shape, k.shape, index.shape[-1], q.dtype, False, scale, n_splits, warps,
                         unroll, backend)
            launches = [(_kernel(spec, backend), kw) for spec, kw in plan]
            if len(_FAST) > 512:
                _FAST.clear()
            entry = _FAST[key] = [launches, 0, None]
        if entry[2] is not None:
            return entry[2](q, k, v, index)
        entry[1] += 1
        if entry[1] >= COMPILE_AFTER:
            # A shape that keeps coming back (every layer of every decode step of a fixed-size
            # selection) runs as a compiled graph: MLX replays the traced kernel nodes instead of
            # rebuilding each kernel's source and arguments per call. A shape seen once or twice
            # (LazyLLM's index grows every step) is not worth a trace. MLX keys a compiled graph
            # by the default stream too, so a later call on another stream traces again.
            entry[2] = mx.compile(partial(_chain_inputs, entry[0]))
        return _chain(entry[0], [q, k, v, index])
    ins, causal = kernel_inputs(q, k, v, index, q_positions, k_positions)
    return _launch(ins, causal, q.shape, q.dtype, scale, n_splits,
                   lambda spec, **kw: _kernel(spec, backend)(**kw), warps, unroll, backend)


def _chain_inputs(launches, q, k, v, index):
    return _chain(launches, [q, k, v, index])


COMPILE_AFTER = 3  # calls with one shape before its launches run as a compiled graph
_FAST: dict = {}
_KERNELS: dict = {}


def _kernel(spec: KernelSpec, backend: str):
    """``build(spec, backend)`` looked up by the specialised name (unique per constants; a string's
    hash is cached, a dataclass's is recomputed on every lookup)."""
    fn = _KERNELS.get((spec.name, backend))
    if fn is None:
        fn = _KERNELS[(spec.name, backend)] = build(spec, backend)
    return fn


def pruned_attention_metal_check(q, k, v, index, *, scale, q_positions=None, k_positions=None,
                                 n_splits=None, warps=None, unroll=None):
    """The Metal body executed on the CPU by the metal-check emulator (tests only; numpy out)."""
    import numpy as np

    from ..kernels import metal_check_run

    def np_dtype(d):
        return {mx.float32: np.float32, mx.float16: np.float16, mx.int32: np.int32}[d]

    def call(spec, inputs, output_dtypes, **kw):
        ins = [np.asarray(x) for x in inputs]
        return metal_check_run(spec, ins, output_dtypes=[np_dtype(d) for d in output_dtypes], **kw)

    ins, causal = kernel_inputs(q, k, v, index, q_positions, k_positions)
    return _launch(ins, causal, q.shape, q.dtype, scale, n_splits, call, warps, unroll, "metal")


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
    """Attention of ``q`` (B, H, Lq, D) over the cache slots ``index`` ((n,), (B, n) or per KV head
    (B|1, KVH, n); None: every slot) of ``k`` and ``v`` (B, KVH, S, D). With ``q_positions``
    ((Lq,) or (B, Lq)) and ``k_positions`` ((S,) or (B, S)) a key is visible to a query only at a
    position <= the query's.
    The custom kernel runs on Metal/CUDA GPUs; elsewhere (and for unsupported head sizes) plain MLX:
    the reference, or for every slot ``mx.fast.scaled_dot_product_attention`` with a boolean mask
    (no gathered copy)."""
    if kernel_available(q.shape[-1]):
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
