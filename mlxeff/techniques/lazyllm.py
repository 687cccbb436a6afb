"""LazyLLM: dynamic token pruning for long-context inference.

Paper: Fu et al., "LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference",
arXiv 2407.14057.

Algorithm. The prompt's KV cache is computed only for the tokens that matter for the next
prediction, layer by layer:

- *Importance*: at the layer before a pruning layer, the attention of the last token to every
  active position, averaged over heads (that row is computed explicitly from the layer's RoPE'd
  queries and keys, GQA-aware: query head ``h`` reads KV head ``h // group``).
- *Progressive schedule*: pruning layers spread evenly from ``start`` (about 30% of the depth) to
  ``end`` (about 90%); at the i-th of ``stages`` pruning layers the active set shrinks to the top
  ``keep_i * N`` positions by importance, ``keep_i`` interpolated linearly from ``keep_start`` to
  ``keep_end``. The last token is always kept. Pruned tokens are not computed in deeper layers.
- *Aux Cache*: the hidden state of a token pruned at layer ``l`` (its input to layer ``l``) is kept.
- *Decoding*: the new token is computed in every layer and attends over every cached position of
  that layer. At each pruning layer the selection is made again from the new token's attention;
  a selected token that layer ``l`` has not computed is *revived* from its Aux Cache entry and
  computed from layer ``l`` on (until the next pruning layer decides again), so no token is ever
  computed twice in a layer. Tokens keep their original RoPE positions.

Cache design. Every token has a *depth*: the number of layers that computed it (a token pruned at
layer ``l`` has depth ``l``; kept and generated tokens have depth L). Layer ``l``'s ``LayerCache``
(mlx-lm's ``KVCache`` plus a ``positions`` array) holds exactly the tokens of depth > ``l``, in the
order they were computed, so the active set shrinks with depth by construction. The Aux Cache holds
one entry per token of depth < L: its hidden state entering layer ``depth``. Revival appends a
token's keys and values to the caches of the layers it is computed in, out of position order;
attention is therefore causal *by position* (``mlxeff.techniques.pruned_attention``) whenever rows
other than the new token are computed. When all positions of a layer are contiguous the model's own
``nn.RoPE`` (scalar offset) is used, otherwise ``rope_at`` (``mx.fast.rope`` with one offset per
token), which gives bit-identical rotations.

Deviations and resolved choices:

- The importance that decides what enters layer ``l`` comes from layer ``l - 1``'s attention (the
  paper's attention map "at the previous layer"); pruning layers are therefore >= 1.
- A recent window: besides the last token (the paper's rule, ``recent=0``), the last ``recent``
  prompt positions (default 32) are kept at every pruning layer. The default model, trained on
  hard-wrapped book text, counts characters since the last line break: pruning one recent line
  break flips its next token (measured). With 512-token prompts and keep 0.8 -> 0.5 (12 prompts,
  ``benchmarks/lazyllm.py``, CPU), next-token agreement with plain decoding over 32 steps was 0.872
  with ``recent=0`` and 0.914 with 32, and the free-running greedy continuations agreed on 21% and
  37% of 32 tokens. Recent positions are never pruned, so they never need reviving.
- Keep ratios are fractions of the whole context (prompt + generated tokens), not of the currently
  active set; ``keep_start >= keep_end`` is required so that selections are nested. One stage
  prunes once, to ``keep_end``.
- Pruning layers: ``floor(x + 0.5)`` of an even spread between ``round(start * L)`` (at least 1) and
  ``round(end * L)`` (at most L - 1); a schedule whose stages do not fit there is an error.
- During decoding a token cached in a layer stays there even when not selected again (the new token
  attends over all cached positions): pruning saves computation, never discards computed state.
- The prompt is processed stage by stage (the layers between two pruning layers), each stage in
  chunks of ``step_size`` active rows exactly as the plain prefill cuts the prompt (all but the last
  token in chunks, then the last token alone), so keep ratio 1.0 is the plain computation and the
  importance row comes from the last token's own chunk. Batch size 1, as the generation engine.
- Selecting at a decode step needs the scores on the host: one synchronisation per pruning layer and
  step (skipped for stages that keep everything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from ..errors import MlxeffError
from ..generate import DecodeStrategy, PrefillStrategy
from .pruned_attention import kernel_available, pruned_attention, pruned_attention_kernel


class ScheduleError(MlxeffError, ValueError):
    """A LazyLLM schedule that cannot be applied (a ``MlxeffError`` and a ``ValueError``)."""


# ---- the schedule (pure functions) -------------------------------------------------------------

@dataclass(frozen=True)
class LazySchedule:
    """Progressive pruning: ``stages`` pruning layers from ``start`` to ``end`` (fractions of the
    depth), keeping ``keep_start`` ... ``keep_end`` of the context, always including the last
    ``recent`` prompt positions (0: only the last one, the paper's rule)."""

    keep_start: float = 0.8
    keep_end: float = 0.5
    start: float = 0.3
    end: float = 0.9
    stages: int = 4
    recent: int = 32

    def __post_init__(self):
        for name in ("keep_start", "keep_end"):
            r = getattr(self, name)
            if not (isinstance(r, (int, float)) and 0.0 < r <= 1.0):
                raise ScheduleError(f"keep ratio {name}={r} is outside (0, 1]")
        if self.keep_start < self.keep_end:
            raise ScheduleError(
                f"keep ratios must not grow with depth (keep_start {self.keep_start} < keep_end {self.keep_end})"
            )
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ScheduleError(f"the pruning range {self.start}..{self.end} must satisfy 0 <= start <= end <= 1")
        if not isinstance(self.stages, int) or self.stages < 1:
            raise ScheduleError(f"stages must be a positive integer, got {self.stages}")
        if not isinstance(self.recent, int) or self.recent < 0:
            raise ScheduleError(f"recent must be a non-negative integer, got {self.recent}")

    @classmethod
    def full(cls) -> "LazySchedule":
        """Keep everything: equals plain prefill and decoding."""
        return cls(keep_start=1.0, keep_end=1.0)

    def stages_for(self, num_layers: int) -> Dict[int, float]:
        """``{pruning layer: keep ratio}`` for a model of ``num_layers`` layers."""
        return dict(zip(pruning_layers(num_layers, self.start, self.end, self.stages),
                        stage_keeps(self.keep_start, self.keep_end, self.stages)))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def pruning_layers(num_layers: int, start: float, end: float, stages: int) -> List[int]:
    """The layers at whose input the active set shrinks, spread evenly over [start, end] of the
    depth; layer 0 is never one (importance comes from the previous layer)."""
    if stages > num_layers:
        raise ScheduleError(f"the schedule has {stages} stages but the model has only {num_layers} layers")
    if num_layers < 2:
        raise ScheduleError("LazyLLM needs a model with at least 2 layers")
    first = min(max(1, _round_half_up(start * num_layers)), num_layers - 1)
    last = max(min(num_layers - 1, _round_half_up(end * num_layers)), first)
    if stages > last - first + 1:
        raise ScheduleError(
            f"{stages} stages do not fit in layers {first}..{last} of {num_layers}; "
            "use fewer stages or a wider pruning range"
        )
    if stages == 1:
        return [first]
    step = (last - first) / (stages - 1)
    return [_round_half_up(first + i * step) for i in range(stages)]


def max_stages(num_layers: int, start: float, end: float) -> int:
    """The most pruning layers that fit in [start, end] of a ``num_layers``-layer model."""
    if num_layers < 2:
        return 0
    first = min(max(1, _round_half_up(start * num_layers)), num_layers - 1)
    last = max(min(num_layers - 1, _round_half_up(end * num_layers)), first)
    return last - first + 1


def stage_keeps(keep_start: float, keep_end: float, stages: int) -> List[float]:
    if stages == 1:
        return [keep_end]
    return [keep_start + (keep_end - keep_start) * i / (stages - 1) for i in range(stages)]


def keep_count(ratio: float, n: int) -> int:
    """Tokens kept out of ``n`` (at least one); rounding guards against 0.3 * 10 = 3.0000000000000004."""
    return max(1, min(n, math.ceil(round(ratio * n, 6))))


def computed_fraction(num_tokens: int, num_layers: int, stages: Dict[int, float], recent: int = 0) -> float:
    """Fraction of (token, layer) pairs a prefill computes under ``stages`` (the last token and
    the ``recent`` last positions are always among the kept ones)."""
    active, total = num_tokens, 0
    for layer in range(num_layers):
        if layer in stages:
            active = min(active, max(keep_count(stages[layer], num_tokens), min(recent, num_tokens)))
        total += active
    return total / (num_tokens * num_layers)


# ---- RoPE at explicit positions, importance ----------------------------------------------------

def rope_at(x: mx.array, positions: mx.array, rope: nn.RoPE) -> mx.array:
    """``rope`` applied to ``x`` (1, heads, n, D) with token j at ``positions[j]``.

    ``mx.fast.rope`` takes one offset per batch entry, so every token becomes its own batch entry:
    the rotation is exactly what ``rope(x, offset=p)`` gives a token at position ``p``."""
    if x.shape[0] != 1:
        raise ValueError("rope_at expects a batch of one sequence")
    y = mx.fast.rope(x.transpose(2, 1, 0, 3), rope.dims, traditional=rope.traditional, base=rope.base,
                     scale=rope.scale, offset=positions.astype(mx.int32))
    return y.transpose(2, 1, 0, 3)


def last_token_importance(q_last: mx.array, keys: mx.array, scale: float) -> mx.array:
    """Attention of one query ``q_last`` (1, H, 1, D) over ``keys`` (1, KVH, n, D), softmaxed in
    float32 and averaged over the H heads: shape (n,)."""
    _, H, _, D = q_last.shape
    KVH = keys.shape[1]
    q = q_last.reshape(1, KVH, H // KVH, D).astype(mx.float32)
    scores = (q * scale) @ keys.astype(mx.float32).swapaxes(-1, -2)  # (1, KVH, G, n)
    return mx.softmax(scores, axis=-1).mean(axis=(0, 1, 2))


# ---- caches ------------------------------------------------------------------------------------

UNFILLED = 2**31 - 1  # the position of a buffer slot not written yet: later than every query


class LayerCache(KVCache):
    """One layer's keys and values (mlx-lm's growing buffer) for the tokens this layer computed,
    in the order computed, and their positions. ``slot_positions`` covers the whole buffer (its
    unfilled tail at ``UNFILLED``), so the pruned-attention kernel can read the buffers in place:
    a slice of them is not contiguous, and the GPU kernel call would copy it."""

    def __init__(self):
        super().__init__()
        self.slot_positions: Optional[mx.array] = None  # (buffer length,) int32

    @property
    def positions(self) -> Optional[mx.array]:
        """(offset,) int32: the positions of the cached tokens, in cache order."""
        return None if self.slot_positions is None else self.slot_positions[: self.offset]

    def update(self, keys: mx.array, values: mx.array, positions: mx.array):
        prev = self.offset
        out = self.update_and_fetch(keys, values)
        size = self.keys.shape[2]
        if self.slot_positions is None or self.slot_positions.shape[0] != size:
            grown = mx.full((size,), UNFILLED, dtype=mx.int32)
            if prev:
                grown[:prev] = self.slot_positions[:prev]
            self.slot_positions = grown
        self.slot_positions[prev : self.offset] = positions.astype(mx.int32)
        return out

    def in_place(self) -> tuple:
        """(keys, values, index, k_positions) naming the cached tokens inside the whole buffers."""
        return self.keys, self.values, mx.arange(self.offset, dtype=mx.int32), self.slot_positions


def _copy_layer(c: LayerCache) -> LayerCache:
    # KVCache writes into its buffers in place: the copy needs buffers of its own.
    new = LayerCache()
    if c.keys is not None:
        new.keys, new.values = mx.array(c.keys), mx.array(c.values)
        new.slot_positions = mx.array(c.slot_positions)
    new.offset = c.offset
    return new


def attend_by_position(q: mx.array, keys: mx.array, values: mx.array, cache: LayerCache,
                       positions: mx.array, scale: float) -> mx.array:
    """Attention of the rows ``q`` at ``positions`` over the layer's cached tokens (``keys`` and
    ``values`` as ``cache.update`` returned them), causal by position. The GPU kernel reads the
    cache's whole buffers (no copy of a slice); elsewhere the slices go to ``pruned_attention``."""
    if kernel_available(q.shape[-1]):
        k, v, index, kpos = cache.in_place()
        return pruned_attention_kernel(q, k, v, index, scale=scale, q_positions=positions, k_positions=kpos)
    return pruned_attention(q, keys, values, None, scale=scale, q_positions=positions,
                            k_positions=cache.positions)


@dataclass
class AuxEntry:
    """Tokens whose next layer to compute is this one: positions (m,) and hidden states (1, m, d)."""

    positions: np.ndarray
    hidden: mx.array


class LazyCache(list):
    """The per-layer ``LayerCache``s (the list the engine passes around) plus the Aux Cache, the
    schedule and statistics."""

    def __init__(self, num_layers: int, schedule: LazySchedule):
        super().__init__(LayerCache() for _ in range(num_layers))
        self.schedule = schedule
        self.stages = schedule.stages_for(num_layers)
        self.aux: List[Optional[AuxEntry]] = [None] * num_layers
        self._pending_aux: Dict[int, Tuple[mx.array, mx.array]] = {}  # lazily built by the prefill
        self.depth = np.zeros(0, np.int64)  # per position: layers computed
        self.prompt_tokens = 0
        self.next_position = 0
        self.computed = [0] * num_layers  # prompt-token computations per layer
        self.revived = 0  # revivals (a token re-entering the computation at some layer)

    @property
    def num_layers(self) -> int:
        return len(self)

    def percent_computed(self) -> float:
        """Prompt-token layer computations (prefill and revivals) as a percentage of N x L."""
        if self.prompt_tokens == 0:
            return 0.0
        return 100.0 * sum(self.computed) / (self.prompt_tokens * self.num_layers)

    def materialize_aux(self) -> None:
        """Move the prefill's lazily computed Aux Cache entries to the host-indexed form."""
        for layer, (pos, hidden) in sorted(self._pending_aux.items()):
            p = np.array(pos, dtype=np.int64)
            self.aux[layer] = AuxEntry(p, hidden)
            self.depth[p] = layer
        self._pending_aux.clear()

    def arrays(self) -> list:
        """Every array the cache holds (to evaluate it completely, e.g. when timing a prefill)."""
        out = [a for c in self for a in (c.keys, c.values, c.positions) if a is not None]
        out += [a for pair in self._pending_aux.values() for a in pair]
        return out + [e.hidden for e in self.aux if e is not None]

    def clone(self) -> "LazyCache":
        """An independent copy (decode continues differently from the same prefill)."""
        new = LazyCache.__new__(LazyCache)
        list.__init__(new, (_copy_layer(c) for c in self))
        new.schedule, new.stages = self.schedule, dict(self.stages)
        new.aux = [None if e is None else AuxEntry(e.positions.copy(), e.hidden) for e in self.aux]
        new._pending_aux = dict(self._pending_aux)
        new.depth = self.depth.copy()
        new.prompt_tokens, new.next_position = self.prompt_tokens, self.next_position
        new.computed, new.revived = list(self.computed), self.revived
        return new

    def stats(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "pruning_layers": {int(k): v for k, v in self.stages.items()},
            "computed_per_layer": list(self.computed),
            "percent_computed": self.percent_computed(),
            "revived": self.revived,
            "aux_tokens": int(sum(len(a.positions) for a in self.aux if a is not None)
                              + sum(int(p.size) for p, _ in self._pending_aux.values())),
        }


# ---- the layer step ----------------------------------------------------------------------------

def _layer(layer, h: mx.array, positions: mx.array, cache: LayerCache, *, offset: Optional[int],
           mode: str):
    """One transformer block over the rows ``h`` (1, n, d) at ``positions``.

    ``mode``: "causal" (rows in position order after everything cached: a prefill chunk), "decode"
    (one row after everything cached), or "positions" (any rows: causal by position).
    Returns the block's output and the rows' RoPE'd queries with the layer's keys."""
    attn = layer.attn
    B, n, _ = h.shape
    q, k, v = attn.project(layer.attn_norm(h))
    if offset is not None:
        q, k = attn.rope(q, offset=offset), attn.rope(k, offset=offset)
    else:
        q, k = rope_at(q, positions, attn.rope), rope_at(k, positions, attn.rope)
    keys, values = cache.update(k, v, positions)
    if mode == "positions":
        out = attend_by_position(q, keys, values, cache, positions, attn.scale)
    else:
        mask = create_attention_mask(h, cache) if mode == "causal" else None
        out = attn.attention_fn(q, keys, values, scale=attn.scale, mask=mask, cache=cache)
    h = h + attn.out_proj(out.transpose(0, 2, 1, 3).reshape(B, n, -1))
    return h + layer.ffn(layer.ffn_norm(h)), q, keys


# ---- prefill -----------------------------------------------------------------------------------

def _chunks(n: int, step: int):
    """Row ranges as the plain prefill cuts them: all but the last row in chunks of ``step``,
    then the last row alone (so that keep ratio 1.0 runs exactly the plain computation)."""
    start = 0
    while n - start > 1:
        stop = min(start + step, n - 1)
        yield start, stop
        start = stop
    yield start, n


def lazy_prefill(model: nn.Module, prompt: mx.array, cache: LazyCache, step_size: int = 512) -> mx.array:
    """Fill ``cache`` from ``prompt`` (1-D ids) with progressive pruning; the last position's
    logits (1, V).

    The layers between two pruning layers form a stage with a fixed active set; a stage runs its
    active rows through its layers in chunks of ``step_size`` (as the plain prefill does), and its
    last chunk (the last token alone) yields the importance that prunes the next stage's input."""
    N = int(prompt.size)
    layers = model.layers
    L = len(layers)
    if step_size < 1:
        raise ValueError(f"step_size must be at least 1, got {step_size}")
    if cache.prompt_tokens:
        raise MlxeffError("LazyLLM prefill needs a fresh cache (use LazyPrefill.make_cache)")
    cache.prompt_tokens = cache.next_position = N
    cache.depth = np.full(N, L, dtype=np.int64)
    h = model.transformer.token_embeddings(prompt[None])
    positions = mx.arange(N, dtype=mx.int32)
    contiguous = True
    importance = None
    # The recent positions are the last active rows at every stage: they are never pruned.
    recent = min(N, max(1, cache.schedule.recent))
    bounds = [0] + sorted(cache.stages) + [L]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if importance is not None:  # prune at layer lo; the recent positions are always kept
            keep = max(keep_count(cache.stages[lo], N), recent)
            order = mx.argsort(-importance.at[-recent:].add(mx.inf))
            kept, pruned = mx.sort(order[:keep]), mx.sort(order[keep:])
            cache._pending_aux[lo] = (mx.take(positions, pruned), mx.take(h, pruned, axis=1))
            h, positions = mx.take(h, kept, axis=1), mx.take(positions, kept)
            contiguous = False
            importance = None
        n = h.shape[1]
        outs = []
        for c0, c1 in _chunks(n, step_size):
            hc, pc = h[:, c0:c1], positions[c0:c1]
            for l in range(lo, hi):
                hc, q, keys = _layer(layers[l], hc, pc, cache[l], offset=c0 if contiguous else None,
                                     mode="causal")
            outs.append(hc)
            if c1 < n:  # bound the graph as the plain prefill does; the last chunk stays lazy
                mx.eval(hc, [(cache[l].keys, cache[l].values, cache[l].positions) for l in range(lo, hi)],
                        list(cache._pending_aux.values()))
                mx.clear_cache()
        for l in range(lo, hi):
            cache.computed[l] += n
        if hi < L and max(keep_count(cache.stages[hi], N), recent) < n:
            importance = last_token_importance(q, keys, layers[hi - 1].attn.scale)
        h = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
    return model.logits(model.transformer.norm(h[:, -1:]))[:, -1, :]


# ---- decode ------------------------------------------------------------------------------------

def lazy_decode(model: nn.Module, token: mx.array, cache: LazyCache) -> mx.array:
    """Run one token (shape (1,)) through every layer, reviving the pruned prompt tokens that the
    new token's attention selects; the token's logits (1, V)."""
    cache.materialize_aux()
    layers = model.layers
    L = len(layers)
    p = cache.next_position
    cache.depth = np.append(cache.depth, L)
    h = model.transformer.token_embeddings(token.reshape(1, 1))
    carried_h: Optional[mx.array] = None  # revived rows being computed, (1, m, d)
    carried = np.zeros(0, np.int64)  # their positions
    importance = None
    for l, layer in enumerate(layers):
        if importance is not None:
            carried_h, carried = _reselect(cache, l, importance, carried_h, carried, p)
            importance = None
        m = carried.size
        if m:
            rows = mx.concatenate([carried_h, h], axis=1)
            pos = mx.array(np.append(carried, p).astype(np.int32))
            out, q, keys = _layer(layer, rows, pos, cache[l], offset=None, mode="positions")
            carried_h, h = out[:, :m], out[:, m:]
            cache.depth[carried] = l + 1
            cache.computed[l] += int(np.count_nonzero(carried < cache.prompt_tokens))
        else:
            pos = mx.array([p], dtype=mx.int32)
            h, q, keys = _layer(layer, h, pos, cache[l], offset=p, mode="decode")
        nxt = l + 1
        if nxt in cache.stages and cache.stages[nxt] < 1.0:
            importance = last_token_importance(q[:, :, -1:], keys, layer.attn.scale)
    cache.next_position = p + 1
    return model.logits(model.transformer.norm(h))[:, -1, :]


def _reselect(cache: LazyCache, l: int, importance: mx.array, carried_h, carried: np.ndarray, p: int):
    """At pruning layer ``l``: pick the top tokens by the new token's attention at layer l - 1;
    selected tokens of depth l (in the Aux Cache, or just carried here) go on; carried tokens not
    selected are parked in the Aux Cache at layer l."""
    prev_pos = np.array(cache[l - 1].positions, dtype=np.int64)
    scores = np.array(importance.astype(mx.float32))
    candidates = prev_pos != p
    keep = keep_count(cache.stages[l], p)
    cand_idx = np.flatnonzero(candidates)
    if keep < cand_idx.size:
        top = cand_idx[np.argpartition(-scores[cand_idx], keep - 1)[:keep]]
    else:
        top = cand_idx
    selected = prev_pos[top]
    need = selected[cache.depth[selected] == l]
    aux = cache.aux[l]
    go_on = np.isin(carried, need)
    parts_h, parts_pos = [], []
    if carried.size and go_on.any():
        parts_h.append(mx.take(carried_h, mx.array(np.flatnonzero(go_on).astype(np.int32)), axis=1))
        parts_pos.append(carried[go_on])
    park_h, park_pos = [], []
    if carried.size and (~go_on).any():
        park_h.append(mx.take(carried_h, mx.array(np.flatnonzero(~go_on).astype(np.int32)), axis=1))
        park_pos.append(carried[~go_on])
    if aux is not None and aux.positions.size:
        revive = np.isin(aux.positions, need)
        if revive.any():
            parts_h.append(mx.take(aux.hidden, mx.array(np.flatnonzero(revive).astype(np.int32)), axis=1))
            parts_pos.append(aux.positions[revive])
            cache.revived += int(np.count_nonzero(revive))
        if (~revive).any():
            park_h.insert(0, mx.take(aux.hidden, mx.array(np.flatnonzero(~revive).astype(np.int32)), axis=1))
            park_pos.insert(0, aux.positions[~revive])
    cache.aux[l] = (AuxEntry(np.concatenate(park_pos), mx.concatenate(park_h, axis=1))
                    if park_pos else None)
    if not parts_pos:
        return None, np.zeros(0, np.int64)
    return mx.concatenate(parts_h, axis=1), np.concatenate(parts_pos)


# ---- engine hooks ------------------------------------------------------------------------------

@dataclass
class LazyPrefill(PrefillStrategy):
    """``PrefillStrategy`` for ``mlxeff.generate``: LazyLLM's progressive pruning of the prompt."""

    schedule: LazySchedule = LazySchedule()
    step_size: int = 512

    def make_cache(self, model: nn.Module) -> LazyCache:
        return LazyCache(len(model.layers), self.schedule)

    def __call__(self, model, prompt, cache):
        if not isinstance(cache, LazyCache):
            raise MlxeffError("LazyPrefill needs the cache from its make_cache (a LazyCache)")
        return lazy_prefill(model, prompt, cache, self.step_size)


class LazyDecode(DecodeStrategy):
    """``DecodeStrategy`` for ``mlxeff.generate``: one token with re-selection and revival."""

    def __call__(self, model, token, cache):
        if not isinstance(cache, LazyCache):
            return super().__call__(model, token, cache)
        return lazy_decode(model, token, cache)


def lazy_hooks(schedule: Optional[LazySchedule] = None, num_layers: Optional[int] = None,
               step_size: int = 512) -> dict:
    """``{"prefill": ..., "decode": ...}`` for ``mlxeff.stream_generate(..., **hooks)``; with
    ``num_layers`` the schedule is checked against the model first."""
    schedule = schedule or LazySchedule()
    if num_layers is not None:
        schedule.stages_for(num_layers)
    return {"prefill": LazyPrefill(schedule, step_size), "decode": LazyDecode()}
