"""Baselines for RefreshKV at the same subset size K: StreamingLLM and H2O.

Both are eviction methods; here they are what decoding *attends*, over the engine's full positioned
cache (nothing is freed: the comparison is about which tokens each step sees, as in the RefreshKV
paper's, arXiv 2411.05787, Table 1). They use the same machinery as ``mlxeff.techniques.refreshkv``
(``attend_index`` on the caches, the pruned-attention kernel on a GPU).

- **StreamingLLM** (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
  arXiv 2309.17453): the first ``sinks`` slots (4, as the RefreshKV paper sets it) and the most
  recent ``K - sinks``.
  Deviation: StreamingLLM re-assigns positions inside its rolling cache; here keys keep the RoPE of
  their original positions (the cache stores rotated keys), as RefreshKV's do.
- **H2O** (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
  Language Models", arXiv 2306.14048): ``K - recent`` heavy hitters and the ``recent`` newest
  tokens (K/2 each by default, the RefreshKV paper's setting). A token's score is the attention
  weight it has received, accumulated over the steps that attended it (GQA: the maximum over the
  group's query heads, as RefreshKV selects). When a token leaves the recent window it competes with
  the heavy hitters: the lowest accumulated score of the two leaves for good (greedy eviction).
  Deviation: H2O accumulates from the prefill's whole attention matrix; the engine's prefill is
  left untouched, so the scores start at the first decoded token, whose step attends everything
  (while the cache holds at most K tokens, every step does).

Both: while a layer holds at most K tokens every slot is attended (plain decoding); several tokens
in one call (a drafter's rows) attend everything (H2O then starts afresh at the next step, with one
full step). A bounded cache (a sliding window) is refused: it moves tokens between slots.
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx
import numpy as np

from ..engine import DecodeStrategy
from .refreshkv import check_appending, default_k, group_max
from .registry import Option, Technique, TechniqueError, register


class StreamingDecode(DecodeStrategy):
    """Attention sinks + recent window: ``k`` slots (None: one eighth of the context at the first
    decoding step), ``sinks`` of them the first ones."""

    def __init__(self, k: Optional[int] = None, sinks: int = 4):
        if k is not None and k < 1:
            raise TechniqueError(f"--streaming-llm-k must be at least 1, got {k}")
        if sinks < 0 or (k is not None and sinks >= k):
            raise TechniqueError(f"--streaming-llm-sinks must be in [0, K - 1], got {sinks} with K {k}")
        self.config_k = self.k = k
        self.sinks = sinks
        self._owner = None
        self.used: Optional[mx.array] = None

    def window(self, slot: int) -> Optional[np.ndarray]:
        """The slots a token at ``slot`` attends (None: every one)."""
        if slot + 1 <= self.k:
            return None
        recent = self.k - self.sinks
        return np.concatenate([np.arange(self.sinks), np.arange(slot + 1 - recent, slot + 1)])

    def __call__(self, model, tokens, cache):
        if tokens.size > 1:
            self.used = None
            return model(tokens[None], cache=cache).squeeze(0)
        if self._owner is not cache[0]:
            check_appending(cache, "--streaming-llm")
            self._owner = cache[0]
            self.k = self.config_k or default_k(cache[0].offset + 1)
            if self.sinks >= self.k:
                raise TechniqueError(f"--streaming-llm-sinks {self.sinks} leaves no recent slot "
                                     f"of K {self.k}")
        slots = self.window(cache[0].offset)
        index = None if slots is None else mx.array(slots.astype(np.int32))
        self.used = index
        for c in cache:
            c.attend_index = index
        try:
            return model(tokens[None], cache=cache).squeeze(0)
        finally:
            for c in cache:
                c.attend_index = None


class H2ODecode(DecodeStrategy):
    """Heavy hitters by accumulated attention + a recent window: ``k`` slots per layer and KV head
    (None: one eighth of the context at the first decoding step), ``recent`` of them the newest
    (default K/2)."""

    def __init__(self, k: Optional[int] = None, recent: Optional[int] = None):
        if k is not None and k < 1:
            raise TechniqueError(f"--h2o-k must be at least 1, got {k}")
        if recent is not None and (recent < 1 or (k is not None and recent > k)):
            raise TechniqueError(f"--h2o-recent must be in [1, K], got {recent} with K {k}")
        self.config_k, self.config_recent = k, recent
        self._owner = None
        self.used: List[Optional[mx.array]] = []

    def _reset(self, model, cache):
        check_appending(cache, "--h2o")
        self._owner = cache[0]
        self.k = self.config_k or default_k(cache[0].offset + 1)
        self.recent = self.config_recent or max(1, self.k // 2)
        if self.recent > self.k:
            raise TechniqueError(f"--h2o-recent must be in [1, K], got {self.recent} with K {self.k}")
        self._heads = [layer.attn.n_kv_heads for layer in model.layers]
        self.acc: List[Optional[mx.array]] = [None] * len(cache)  # (B, KVH, slots) accumulated
        self.heavy: List[Optional[mx.array]] = [None] * len(cache)  # (B, KVH, k - recent) slots
        self._expect = cache[0].offset

    def __call__(self, model, tokens, cache):
        if tokens.size > 1:  # drafted rows: attend everything; the next step starts afresh
            self._owner, self.used = None, [None] * len(cache)
            return model(tokens[None], cache=cache).squeeze(0)
        if self._owner is not cache[0] or cache[0].offset != self._expect:
            self._reset(model, cache)
        o = cache[0].offset  # the new token's slot
        recent = mx.arange(max(0, o + 1 - self.recent), o + 1, dtype=mx.int32)
        self.used = []
        for l, c in enumerate(cache):
            c.want_scores = True
            if self.heavy[l] is not None:
                B, KVH, _ = self.heavy[l].shape
                c.attend_index = mx.concatenate(
                    [self.heavy[l], mx.broadcast_to(recent, (B, KVH, recent.size))], axis=-1)
            self.used.append(c.attend_index)
        try:
            out = model(tokens[None], cache=cache).squeeze(0)
            for l, c in enumerate(cache):
                got = group_max(c.scores.astype(mx.float32), self._heads[l])  # (B, KVH, attended)
                acc = got[..., :0] if self.acc[l] is None else self.acc[l]
                acc = mx.concatenate([acc, mx.zeros(acc.shape[:2] + (o + 1 - acc.shape[-1],))], axis=-1)
                if c.attend_index is None:
                    acc = acc + got
                else:
                    B, KVH, _ = got.shape
                    acc = acc.at[mx.arange(B)[:, None, None], mx.arange(KVH)[None, :, None],
                                 c.attend_index].add(got)
                self.acc[l] = acc
                self.heavy[l] = self._evict(l, acc, o)
        finally:
            for c in cache:
                c.attend_index, c.want_scores, c.scores = None, False, None
        self._expect = o + 1
        return out

    def _evict(self, l: int, acc: mx.array, o: int) -> Optional[mx.array]:
        """The heavy hitters for the next token (slot o + 1), None while it may attend everything:
        the first time the cache outgrows K, the highest accumulated scores outside the next recent
        window; afterwards the token leaving the window replaces the weakest heavy hitter if it
        has accumulated more."""
        if o + 2 <= self.k:
            return None
        heavy_n = self.k - self.recent
        leaving = o + 1 - self.recent  # in this token's window, not in the next one's
        heavy = self.heavy[l]
        if heavy_n == 0:
            return acc[..., :0].astype(mx.int32)
        if heavy is None:
            top = mx.argpartition(-acc[..., :leaving + 1], kth=heavy_n - 1, axis=-1)[..., :heavy_n]
            return mx.sort(top.astype(mx.int32), axis=-1)
        held = mx.take_along_axis(acc, heavy, axis=-1)
        weakest = mx.argmin(held, axis=-1, keepdims=True)  # (B, KVH, 1)
        beats = acc[..., leaving:leaving + 1] > mx.take_along_axis(held, weakest, axis=-1)
        replace = (mx.arange(heavy_n) == weakest) & beats
        return mx.where(replace, leaving, heavy)


def _positive(v):
    return None if v is None or v >= 1 else f"must be at least 1, got {v}"


register(Technique(
    name="streaming-llm",
    title="StreamingLLM (arXiv 2309.17453), a RefreshKV baseline",
    summary="Decode attending only the first SINKS tokens and the most recent ones, K in all "
    "(the full cache is kept; for comparison with --refreshkv at the same K).",
    hooks=("decode",),
    options=(
        Option("k", int, None, "Slots attended per step (default: one eighth of the context at "
               "the first decoding step).", check=_positive),
        Option("sinks", int, 4, "Attention-sink slots (the first tokens) among them.",
               check=lambda v: None if v >= 0 else f"must be at least 0, got {v}"),
    ),
    build=lambda ctx, o: {"decode": StreamingDecode(o["k"], o["sinks"])},
))

register(Technique(
    name="h2o",
    title="H2O (arXiv 2306.14048), a RefreshKV baseline",
    summary="Decode attending the heavy hitters (most accumulated attention) and the most recent "
    "tokens, K in all per layer and KV head (the full cache is kept; for comparison with "
    "--refreshkv at the same K).",
    hooks=("decode",),
    options=(
        Option("k", int, None, "Slots attended per step, per layer and KV head (default: one "
               "eighth of the context at the first decoding step).", check=_positive),
        Option("recent", int, None, "The newest tokens among them (default K/2).", check=_positive),
    ),
    build=lambda ctx, o: {"decode": H2ODecode(o["k"], o["recent"])},
))
