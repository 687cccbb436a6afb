"""RefreshKV: decoding over a refreshed top-K subset of a long context.

Paper: Xu, Goyal and Choi, "RefreshKV: Updating Small KV Cache During Long-form Generation",
ACL 2025, arXiv 2411.05787 (its first version: "Recycled Attention").

Algorithm. The full KV cache is kept; most decoding steps attend, in every layer and KV head, only
to K of its slots (the *subset*), and a full-attention step now and then re-selects them:

- *Selection* (after a full step of a layer): the attention weights of that step's token over every
  cached slot, GQA groups reduced by the maximum over their query heads, max-pooled over a window
  of ``pool`` neighbouring slots (SnapKV's pooling, arXiv 2404.14469) that reaches ``reach`` slots
  further forward (a high score at slot i lifts slots i - pool//2 .. i + pool//2 + reach; a
  deviation, below), and the K highest per KV head. The token just decoded is always among them.
- *Partial steps*: the new token's keys and values are written to the full cache as usual and the
  token joins the subset; to keep K, the selected slot with the lowest score leaves it (once every
  selected slot has left, the oldest new token does). The attention reads the subset in place
  (``attend_index`` (1, KVH, K); the pruned-attention kernel on a GPU). Keys keep the RoPE of
  their original positions: nothing is moved or re-rotated.
- *Schedule*: fixed, a full step every ``every`` tokens (S); or dynamic (``threshold`` s): every
  ``check_every`` tokens (QC) each layer compares its query -- the mean over its query heads --
  with its query at its last full step, and runs a full step (and re-selects) only where the
  cosine similarity is not above s.
- ``grow=True`` with ``pool=1`` and the fixed schedule is the first version (Recycled Attention):
  raw top-K (``reach`` defaults to 0 there), the subset growing by the decoded tokens until the
  next refresh (no eviction).

Exactness: K at least the context, or S = 1, decodes exactly as plain decoding (same tokens, same
logits: those steps run the model's plain attention; a full step only also reads the weights).

Defaults: K = context/8 and ``pool`` 7 (the paper's, after SnapKV's kernel size); ``reach`` S - 1
(QC - 1 under the dynamic schedule, 0 with ``grow``); S = 10 (the paper's fixed-stride ablation);
QC = 5 (its better-quality setting). The threshold has no default:
the paper tuned it per model (0.85 for Llama-3.1-8B, 0.95 for Qwen2-7B). On the default model the
similarity of a layer's queries 5 tokens apart has a median of about 0.37 (measured on three
held-out passages, CPU), so 0.4 there refreshes about as often as S = 10.

Cost: a full step also computes the attention weights of its token in float32 over every slot
(``want_scores``, about one more attention's work), and the re-selection of all layers is one
batched top-K; a partial step costs one attention over K slots per layer plus one small op per
step (the eviction rule in closed form, ``ring_subset``). No step synchronises with the host
except the dynamic schedule's checks (one read per layer).

Deviations and resolved choices:

- The first selection comes from the first decoded token's full step, not from the prefill's last
  token: RefreshKV fills only the decode hook, so it composes with every prefill technique and
  never touches the prefill (one full step more per generation than the paper). On the default
  model's key-value retrieval it is also the better point (``benchmarks/refreshkv.py diagnose``,
  40 items, benchmarks/RESULTS.md): the head that copies the value (layer 19's query head 4 in 39
  items) looks, at the prompt's last token (``Corresponding value:``), at the end of the prompt (a
  median 650 slots past the value), and at the first answer token (`` "``) at the value's first
  slot; selected at the prompt's last token, 0 of 40 answers survived (4 with ``reach`` 9).
- The pooling window reaches ``reach`` slots forward (SnapKV's kernel is centred; the paper takes
  it over). A head that copies a span from the context reads one slot further at every generated
  token, so the slots it will read before the next refresh are the ones *after* the one it read at
  the full step. On the default model's key-value retrieval (an 8-hex-digit value, 6-8 tokens)
  the centred window of 7 covers the value's first 4 tokens: with S = 10, 6 of 40 answers
  survived (teacher-forced on full attention's answer); the 34 others broke at value token 5-8, at
  a partial step, that token's slot outside the copying head's subset. A centred window of 13 kept
  32 (the 8 others broke at token 8); ``reach`` 6 or 9 kept 40; the dynamic schedule kept 17 with
  ``reach`` 0 and 40 with 4. With ``reach`` S - 1 a span begun at a full step stays in the subset
  until the next one (under the dynamic schedule, QC - 1: until the next check). The cost: a
  selected cluster takes up to ``reach`` more of the K slots (the same K as the baselines).
  End to end (``benchmarks/refreshkv.py quality``, K = 256 of 2,048, 40 items): key-value
  retrieval 6/40 -> 40/40 (S = 10) and 17/40 -> 40/40 (dynamic), full attention 40/40;
  multi-document QA 23/40 -> 22/40 (full 22/40); tail perplexity x1.070 -> x1.062 of full's.
- K is one number for every layer and KV head; by default one eighth of the cache at that first
  full step (the paper's K = L/8), then fixed for the generation. While a layer holds at most K
  tokens its "subset" is every slot (plain attention); a full step re-selects when it outgrows K.
- The dynamic schedule decides per layer, as the paper does, from the layer's own queries of the
  current step (the cache's ``attend_index`` is then a callable that the attention calls with them;
  one host synchronisation per layer at a check). The queries are compared as the attention
  receives them, after qk-norm and RoPE: a query that moved to another position attends
  differently to the same keys, which is what the check is about (the paper does not say).
  "Not above" the threshold refreshes (the paper's "lower than"; equality is measure-zero).
- The fixed and dynamic counters run on cache slots (tokens since the layer's last full step or
  check), so a rewound cache (speculative decoding) keeps them consistent.
- Several tokens in one call (a drafter's proposal verified at once) run as a full step without
  re-selection: every row attends everything, the subset stays as it was (new tokens join it by
  slot number, so tokens trimmed afterwards leave it by themselves). Every token kept is the
  sampler's choice from the logits this strategy computed, but the output is not RefreshKV
  alone's: alone, those rows would have been partial steps. Calls without a draft stay partial.
- A bounded cache (mlx-lm's rotating cache, the server's ``--max-kv-size`` window) is refused:
  it moves tokens between slots.
- State lives in this strategy, not in the cache: it is derived (any full step rebuilds it), so a
  cache that was trimmed below a refresh, extended by a new prefill or replaced is detected and the
  next step is a full one.
- Ties among equal pooled scores (max pooling makes plateaus) are broken arbitrarily.
- Option names follow the registry's ``--NAME-OPTION`` rule: ``--refreshkv-k``,
  ``--refreshkv-every``, ``--refreshkv-threshold``, ``--refreshkv-check-every``,
  ``--refreshkv-pool``, ``--refreshkv-reach``, ``--refreshkv-grow`` (the ``--refresh-k`` spellings
  are not available).

Comparisons (same subset size K, same machinery, ``mlxeff.techniques.refreshkv_baselines``):
StreamingLLM (attention sinks + recent window) and H2O (heavy hitters + recent window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..engine import DecodeStrategy
from ..errors import MlxeffError
from .registry import Option, Technique, register


class RefreshError(MlxeffError, ValueError):
    """A RefreshKV setting that cannot be used."""


# ---- selection (pure functions) -----------------------------------------------------------------

def group_max(scores: mx.array, kv_heads: int) -> mx.array:
    """Attention weights (B, H, n) reduced over each GQA group by the maximum: (B, KVH, n)."""
    B, H, n = scores.shape
    return scores.reshape(B, kv_heads, H // kv_heads, n).max(axis=2)


def max_pool(x: mx.array, window: int, reach: int = 0) -> mx.array:
    """Maximum over ``window`` (odd) neighbouring entries of the last axis, centred ('same'), and
    the ``reach`` entries before them: entry j takes the maximum of x[j - window//2 - reach ..
    j + window//2], so a high score also lifts the ``reach`` slots after its centred window."""
    if window <= 1 and reach == 0:
        return x
    h = window // 2
    width = window + reach
    n = x.shape[-1]
    lead = x.shape[:-1]
    padded = mx.pad(x.reshape(-1, n), [(0, 0), (h + reach, h)], constant_values=-math.inf)
    rows = padded.shape[0]
    windows = mx.as_strided(padded, (rows, n, width), (n + width - 1, 1, 1))
    return windows.max(axis=-1).reshape(*lead, n)


def select_top(scores: mx.array, k: int, pool: int = 1, reach: int = 0) -> mx.array:
    """The ``k`` slots of highest (pooled, ``max_pool(scores, pool, reach)``) score per row of
    ``scores`` (B, R, n), the last slot (the token just decoded) always included; int32 (B, R, k),
    ordered by ascending score (the newest last), so that column j is the j-th to leave."""
    n = scores.shape[-1]
    pooled = max_pool(scores.astype(mx.float32), pool, reach)
    pooled = mx.where(mx.arange(n) == n - 1, math.inf, pooled)
    top = mx.argpartition(-pooled, kth=k - 1, axis=-1)[..., :k]
    order = mx.argsort(mx.take_along_axis(pooled, top, axis=-1), axis=-1)
    return mx.take_along_axis(top, order, axis=-1).astype(mx.int32)


def _ring(base: mx.array, start: mx.array, current: mx.array) -> mx.array:
    """The subset for the token at slot ``current`` (R,) given the selection ``base`` (B, R, K)
    made when slot ``start - 1`` (R,) was decoded: the tokens ``start .. current`` take columns
    0, 1, ... (the lowest scores leave first) and, past K of them, overwrite the oldest new token."""
    K = base.shape[-1]
    col = mx.arange(K, dtype=mx.int32)
    age = current[:, None] - start[:, None] - col  # >= 0: column taken by a new token
    newest = start[:, None] + col + K * (age // K)
    return mx.where(age >= 0, newest, base)


ring_subset = mx.compile(_ring)


def cosine(a: mx.array, b: mx.array) -> mx.array:
    """Row-wise cosine similarity of (B, D) arrays."""
    num = (a * b).sum(axis=-1)
    return num / mx.maximum(mx.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1)), 1e-30)


def check_appending(cache, flag: str) -> None:
    """Refuse a bounded cache (mlx-lm's rotating cache, the server's window): it moves tokens
    between slots, and a subset names slots."""
    if any(getattr(c, "max_size", None) is not None for c in cache):
        raise MlxeffError(f"{flag} needs a cache that keeps every token (not a bounded window)")


def default_k(context: int) -> int:
    """The paper's subset size: one eighth of the context (at least 1)."""
    return max(1, math.ceil(context / 8))


# ---- settings ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefreshConfig:
    """``k`` slots per layer and KV head (None: one eighth of the context at the first full step);
    a full step every ``every`` tokens, or, with ``threshold``, when a layer's query similarity
    checked every ``check_every`` tokens is not above it; ``pool`` the max-pooling window (odd; 1:
    raw scores); ``reach``: a high score also keeps the ``reach`` slots after its pooling window
    (None: the partial steps until the next refresh, S - 1, or until the next check, QC - 1; 0
    with ``grow``); ``grow``: no eviction, the subset grows by the decoded tokens until the next
    refresh (the first version)."""

    k: Optional[int] = None
    every: Optional[int] = None
    threshold: Optional[float] = None
    check_every: Optional[int] = None
    pool: int = 7
    grow: bool = False
    reach: Optional[int] = None

    def __post_init__(self):
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise RefreshError(f"--refreshkv-k must be at least 1, got {self.k}")
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise RefreshError(f"--refreshkv-every must be at least 1, got {self.every}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and 0.0 < self.threshold <= 1.0):
            raise RefreshError(f"--refreshkv-threshold must be in (0, 1], got {self.threshold}")
        if self.check_every is not None and (not isinstance(self.check_every, int) or self.check_every < 1):
            raise RefreshError(f"--refreshkv-check-every must be at least 1, got {self.check_every}")
        if self.threshold is not None and self.every is not None:
            raise RefreshError("--refreshkv-every (fixed schedule) and --refreshkv-threshold "
                               "(dynamic schedule) exclude each other; give one")
        if self.threshold is None and self.check_every is not None:
            raise RefreshError("--refreshkv-check-every needs --refreshkv-threshold (the dynamic schedule)")
        if not isinstance(self.pool, int) or self.pool < 1 or self.pool % 2 == 0:
            raise RefreshError(f"--refreshkv-pool must be an odd number >= 1, got {self.pool}")
        if self.reach is not None and (not isinstance(self.reach, int) or self.reach < 0):
            raise RefreshError(f"--refreshkv-reach must be at least 0, got {self.reach}")

    @property
    def dynamic(self) -> bool:
        return self.threshold is not None

    @property
    def stride(self) -> int:
        """S (fixed schedule) or QC (dynamic)."""
        if self.dynamic:
            return self.check_every if self.check_every is not None else 5
        return self.every if self.every is not None else 10

    @property
    def forward(self) -> int:
        """The slots after a high score's pooling window that the selection keeps too."""
        if self.reach is not None:
            return self.reach
        return 0 if self.grow else self.stride - 1


# ---- the decode strategy -----------------------------------------------------------------------

ALL, RING = 0, 1  # a layer attends every slot (it holds at most K), or its subset


class RefreshDecode(DecodeStrategy):
    """``DecodeStrategy`` for the engine: partial steps over each layer's subset, full steps by the
    schedule (see the module docstring). ``stats`` counts layer steps and full ones."""

    def __init__(self, config: Optional[RefreshConfig] = None):
        self.config = config or RefreshConfig()
        self.stats = dict(steps=0, layer_steps=0, full_layer_steps=0)
        self._owner = None  # the first layer cache of the cache list the state belongs to
        self.used: List[Optional[mx.array]] = []  # the subset each layer attended at the last step

    # -- state --------------------------------------------------------------------------------

    def _layout(self, model: nn.Module):
        heads = [layer.attn.n_kv_heads for layer in model.layers]
        self._rows = np.concatenate([[0], np.cumsum(heads)]).astype(int)
        self._heads = heads
        self._row_layer = np.repeat(np.arange(len(heads)), heads)  # the layer of each KV-head row

    def _valid(self, cache) -> bool:
        if self._owner is not cache[0] or len(cache) != len(self._mode):
            return False
        offsets = np.array([c.offset for c in cache])
        if np.any(offsets > self._expect):  # a new prefill extended the cache
            return False
        ring = self._mode == RING
        return bool(np.all(offsets[ring] >= self._start[ring]))  # not trimmed below a refresh

    def _reset(self, model, cache, k: int) -> None:
        self._layout(model)
        L = len(cache)
        self._owner = cache[0]
        self.k = k
        self._mode = np.full(L, ALL)
        self._start = np.zeros(L, np.int64)  # first slot decoded after the layer's last refresh
        self._check = np.zeros(L, np.int64)  # slot of the layer's last full step or check
        self._query: List[Optional[mx.array]] = [None] * L
        self._bases: List[Optional[mx.array]] = [None] * L
        self._base_all: Optional[mx.array] = None
        self._start_rows: Optional[mx.array] = None  # _start per KV-head row, on the device
        self._expect = np.array([c.offset for c in cache])

    # -- one call ------------------------------------------------------------------------------

    def __call__(self, model, tokens, cache):
        n = int(tokens.size)
        valid = self._owner is not None and self._valid(cache)
        if n > 1:  # a drafter's rows: full attention, no re-selection
            out = model(tokens[None], cache=cache).squeeze(0)
            if valid:
                self._expect = np.array([c.offset for c in cache])
            self.used = [None] * len(cache)
            return out
        if not valid:
            check_appending(cache, "--refreshkv")
            self._reset(model, cache, self.config.k or default_k(cache[0].offset + 1))
            full = np.ones(len(cache), bool)
        else:
            full = self._schedule(cache)
        offsets = np.array([c.offset for c in cache])  # the new token's slot in every layer
        index = self._subsets(offsets)
        decided = {}  # layer -> ran a full step (the dynamic rule fills it during the forward)
        for l, c in enumerate(cache):
            if self.config.dynamic and (full[l] or self._due_check(l, offsets[l])):
                c.attend_index = self._decider(l, c, offsets[l], bool(full[l]), index, decided)
            elif full[l]:
                c.want_scores = True
                decided[l] = True
            else:
                c.attend_index = None if self._mode[l] == ALL else index(l)
                decided[l] = False
        try:
            out = model(tokens[None], cache=cache).squeeze(0)
            self.used = [index(l) if not decided[l] and self._mode[l] == RING else None
                         for l in range(len(cache))]
            refreshed = [l for l in range(len(cache)) if decided[l]]
            self._refresh(cache, refreshed, offsets)
        finally:
            for c in cache:
                c.attend_index, c.want_scores, c.scores = None, False, None
        self._expect = offsets + 1
        self.stats["steps"] += 1
        self.stats["layer_steps"] += len(cache)
        self.stats["full_layer_steps"] += len(refreshed)
        return out

    def _schedule(self, cache) -> np.ndarray:
        """Layers whose step must be full regardless of the queries: a layer that outgrew K while
        attending everything, and (fixed schedule) a layer ``every`` tokens after its refresh."""
        offsets = np.array([c.offset for c in cache])
        full = (self._mode == ALL) & (offsets + 1 > self.k)
        if not self.config.dynamic:
            full |= (self._mode == RING) & (offsets - (self._start - 1) >= self.config.stride)
        return full

    def _due_check(self, l: int, offset: int) -> bool:
        return self._mode[l] == RING and offset - self._check[l] >= self.config.stride

    def _subsets(self, offsets: np.ndarray):
        """``index(l)``: layer l's subset for the new token (lazy, built once per step)."""
        built = {}

        def index(l: int) -> mx.array:
            if "all" not in built:
                built["all"] = self._build(offsets)
            lo, hi = self._rows[l], self._rows[l + 1]
            if not self.config.grow:
                return built["all"][:, lo:hi]
            return built["all"][l]
        return index

    def _build(self, offsets: np.ndarray):
        if not self.config.grow:
            if self._start_rows is None:
                self._start_rows = mx.array(self._start[self._row_layer].astype(np.int32))
            uniform = bool(np.all(offsets == offsets[0]))  # one slot for every layer (the rule)
            current = mx.array((offsets[:1] if uniform else offsets[self._row_layer]).astype(np.int32))
            return ring_subset(self._base_all, self._start_rows, current)
        # no eviction: the selection plus every token decoded since, per layer
        out = {}
        for l, base in enumerate(self._bases):
            if base is not None:
                new = mx.arange(int(self._start[l]), int(offsets[l]) + 1, dtype=mx.int32)
                B, KVH, _ = base.shape
                out[l] = mx.concatenate([base, mx.broadcast_to(new, (B, KVH, new.size))], axis=-1)
        return out

    def _decider(self, l, c, offset, forced, index, decided):
        """The dynamic schedule's per-layer rule, run by the attention with the layer's queries."""
        def decide(q):
            mean_q = q[:, :, -1, :].astype(mx.float32).mean(axis=1)  # (B, D)
            full = forced or float(cosine(mean_q, self._query[l]).min().item()) <= self.config.threshold
            self._check[l] = offset
            decided[l] = full
            if full:
                self._query[l] = mean_q
                c.want_scores = True
                return None
            return index(l)
        return decide

    def _refresh(self, cache, layers: List[int], offsets: np.ndarray) -> None:
        """New subsets from the full steps' attention weights (lazy: no synchronisation)."""
        if not layers:
            return
        for l in layers:
            self._start[l] = offsets[l] + 1
            self._check[l] = offsets[l]
        self._start_rows = None
        ring = [l for l in layers if offsets[l] + 1 > self.k]
        for l in layers:
            if offsets[l] + 1 <= self.k:
                self._mode[l], self._bases[l] = ALL, None
        for n in sorted({int(offsets[l]) + 1 for l in ring}):  # layers of one length together
            group = [l for l in ring if offsets[l] + 1 == n]
            scores = mx.concatenate([group_max(cache[l].scores, self._heads[l]) for l in group], axis=1)
            chosen = select_top(scores, self.k, self.config.pool, self.config.forward)
            bounds = np.cumsum([self._heads[l] for l in group])[:-1].tolist()
            for l, part in zip(group, mx.split(chosen, bounds, axis=1) if len(group) > 1 else [chosen]):
                self._mode[l], self._bases[l] = RING, part
        if not self.config.grow and any(b is not None for b in self._bases):
            B = cache[0].keys.shape[0]
            parts = [b if b is not None else mx.zeros((B, self._heads[l], self.k), mx.int32)
                     for l, b in enumerate(self._bases)]  # rows of layers attending everything: unused
            self._base_all = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)

def _check(low: int):
    return lambda v: None if v is None or v >= low else f"must be at least {low}, got {v}"


def _build(ctx, o) -> dict:
    try:
        return {"decode": RefreshDecode(RefreshConfig(**o))}
    except RefreshError as e:
        from .registry import TechniqueError

        raise TechniqueError(str(e)) from None


register(Technique(
    name="refreshkv",
    title="RefreshKV (arXiv 2411.05787)",
    summary="Decode over a top-K subset of the cache per layer and KV head, re-selected by a "
    "full-attention step every S tokens (or, with a threshold, when a layer's query drifts); the "
    "full cache is kept. Default: K = context/8, S = 10.",
    hooks=("decode",),
    options=(
        Option("k", int, None, "Slots per layer and KV head (default: one eighth of the context "
               "at the first decoding step).", check=_check(1)),
        Option("every", int, None, "Fixed schedule: a full step every S tokens (default 10).",
               metavar="S", check=_check(1)),
        Option("threshold", float, None, "Dynamic schedule: a layer runs a full step when the "
               "cosine similarity of its query to its last full step's is not above this, in (0, 1].",
               check=lambda v: None if v is None or 0.0 < v <= 1.0 else f"must be in (0, 1], got {v}"),
        Option("check_every", int, None, "Dynamic schedule: compare the queries every QC tokens "
               "(default 5).", metavar="QC", check=_check(1)),
        Option("pool", int, 7, "Max-pooling window over neighbouring slots before the top-K "
               "(odd; 1: raw scores, the first version).", check=lambda v: None if v >= 1 and v % 2
               else f"must be an odd number >= 1, got {v}"),
        Option("grow", bool, False, "No eviction: the subset grows by the decoded tokens until "
               "the next refresh (the first version; with --refreshkv-pool 1 and the fixed schedule)."),
        Option("reach", int, None, "A selected slot also brings the slots after its pooling window "
               "(default: S - 1, or QC - 1 with a threshold; 0 with --refreshkv-grow).",
               check=lambda v: None if v is None or v >= 0 else f"must be at least 0, got {v}"),
    ),
    build=_build,
))
