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

Cache design (``mlxeff.techniques.lazyllm_cache``). Every token has a *depth*: the number of
layers that computed it. Layer ``l``'s cache (the positioned cache) holds exactly the tokens of
depth > ``l``, in the order they were computed, so the active set shrinks with depth by
construction; its Aux Cache entry holds the tokens of depth ``l`` with their hidden states entering
layer ``l``. Revival appends a token's keys and values to the caches of the layers it is computed
in, out of position order; those rows then attend causally *by position* (the model's
``positions`` input; the pruned-attention kernel on a GPU). The model computes every block,
attention and RoPE: this module only chooses rows, positions and layer ranges
(``Transformer.forward_layers``), and reads the last row's attention weights from the cache
(``want_scores``).

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
- The prompt is processed stage by stage (the layers between two pruning layers that prune: one
  that keeps every active row, as the first of 1 -> 0.9 does, runs with the layers before it),
  each stage in chunks of ``step_size`` active rows. When nothing is pruned (keep 1.0, or a prompt inside the
  recent window) the chunks are the plain prefill's (all but the last token in chunks, then the
  last token alone), so keep ratio 1.0 is the plain computation. When rows are pruned the
  computation is no longer the plain one, and the last token runs in its stage's last chunk, whose
  last row gives the importance: the plain cut adds a one-row pass through every stage, about a
  decode step's kernel launches in all on a GPU. Pruned stages may use another chunk length
  (``pruned_step_size``, by default ``step_size``): on an H100 this model's pruned stages in one
  chunk of up to 4,096 rows ran 1.15-1.65x faster than in chunks of 512
  (benchmarks/prefill_chunks.py, RESULTS.md). Batch size 1, as the generation engine.
- The prefill's selection runs on the device (sort, gathers, the kept rows' positions), and each
  stage is handed to the device (``mx.async_eval``) before the next is built: the host reads no
  score back during the prefill, and the positioned cache and the Aux Cache read the kept and
  pruned positions back when decoding first needs them. With the selection on the host, three
  blocking reads of the scores made host and GPU take turns: 10.1 ms of a 21 ms prefill of 2,048
  tokens was spent waiting in them on an H100 (benchmarks/prefill_profile.py, RESULTS.md).
- Selecting at a decode step needs the scores on the host: one synchronisation per pruning layer and
  step (skipped for stages that keep everything).
- Several tokens at once (a drafter's proposal verified in one call): the revival rule decides per
  token from that token's attention, so the tokens are run one after another; each step can be
  undone (``trim``), which keeps drafting lossless but brings no speed-up under LazyLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..engine import DecodeStrategy, PrefillStrategy
from ..errors import MlxeffError
from ..models.attention import last_row_scores, rope_at  # noqa: F401  (rope_at: part of this API)
from .lazyllm_cache import AuxEntry, LazyCache, LazyLayerCache
from .registry import Option, Technique, TechniqueError, register


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


# ---- importance ---------------------------------------------------------------------------------

def last_token_importance(q_last: mx.array, keys: mx.array, scale: float) -> mx.array:
    """Attention of one query ``q_last`` (1, H, 1, D) over ``keys`` (1, KVH, n, D), softmaxed in
    float32 and averaged over the H heads: shape (n,)."""
    return last_row_scores(q_last, keys, scale).mean(axis=(0, 1))


def _take_importance(cache: LazyLayerCache) -> mx.array:
    """The head-averaged attention row the layer's attention left in its cache (``want_scores``)."""
    scores = cache.scores
    cache.want_scores, cache.scores = False, None
    return scores.mean(axis=(0, 1))


def make_cache(num_layers: int, schedule: "LazySchedule") -> LazyCache:
    stages = schedule.stages_for(num_layers)
    return LazyCache([LazyLayerCache(stages.get(l), schedule.recent) for l in range(num_layers)], schedule)


# ---- prefill -----------------------------------------------------------------------------------

def _chunks(n: int, step: int, last_alone: bool = True):
    """Row ranges of ``step``: with ``last_alone`` as the plain prefill cuts them -- all but the
    last row in chunks, then the last row alone (so that keep ratio 1.0 runs exactly the plain
    computation) -- else the last row in the last chunk."""
    start = 0
    while n - start > (1 if last_alone else 0):
        stop = min(start + step, n - 1 if last_alone else n)
        yield start, stop
        start = stop
    if last_alone:
        yield start, n


def _prune(layer_cache: LazyLayerCache, h: mx.array, positions: Optional[mx.array], importance: mx.array,
           keep: int, recent: int):
    """Keep the ``keep`` rows of ``h`` (1, n, d) with the highest ``importance`` (n,), the last
    ``recent`` always among them, in position order; park the others in ``layer_cache``'s Aux
    Cache. All on the device: the kept rows and their ``positions`` (n,) (None: 0, 1, ...)."""
    n = h.shape[1]
    scores = mx.where(mx.arange(n) >= n - recent, mx.inf, importance)  # float32 (_take_importance)
    order = mx.argsort(-scores)
    kept, pruned = mx.sort(order[:keep]), mx.sort(order[keep:])
    if positions is None:
        positions = mx.arange(n, dtype=mx.int32)
    layer_cache.aux = AuxEntry(mx.take(positions, pruned), mx.take(h, pruned, axis=1))
    return mx.take(h, kept, axis=1), mx.take(positions, kept)


def _prefill_keeps(stages: Dict[int, float], n: int, recent: int) -> Dict[int, int]:
    """``{layer: rows kept}`` for the pruning layers at which a prefill of ``n`` tokens does prune;
    a pruning layer that keeps every active row is no stage boundary (its layers run with the
    layers before it, chunk by chunk, as the plain prefill runs them)."""
    out, active = {}, n
    for layer in sorted(stages):
        keep = max(keep_count(stages[layer], n), recent)
        if keep < active:
            out[layer] = active = keep
    return out


def lazy_prefill(model: nn.Module, prompt: mx.array, cache: LazyCache, step_size: int = 512,
                 pruned_step_size: Optional[int] = None) -> mx.array:
    """Fill ``cache`` from ``prompt`` (1-D ids) with progressive pruning; the last position's
    logits (1, V).

    The layers between two pruning layers that prune form a stage with a fixed active set; a stage
    runs its active rows through its layers in chunks of ``step_size`` (once rows have been pruned,
    of ``pruned_step_size``, by default ``step_size``), and the last row of its last chunk (the
    last token) yields the importance that prunes the next stage's input. When nothing is pruned
    the prefill is one stage cut as the plain prefill cuts the prompt, the last token alone."""
    N = int(prompt.size)
    t = model.transformer
    L = len(t.layers)
    pruned_step_size = step_size if pruned_step_size is None else pruned_step_size
    if step_size < 1 or pruned_step_size < 1:
        raise ValueError(f"step sizes must be at least 1, got {step_size} and {pruned_step_size}")
    if cache.prompt_tokens or cache[0].offset:
        raise MlxeffError("LazyLLM prefill needs a fresh cache (use LazyPrefill.make_cache)")
    for c in cache:
        c.prompt_tokens = N
    stages = cache.stages
    # The recent positions are the last active rows at every stage: they are never pruned.
    recent = min(N, max(1, cache.schedule.recent if cache.schedule else cache[0].recent))
    # The last token runs in its stage's last chunk rather than alone (a one-row pass per stage,
    # each about a decode step's launches on a GPU) unless nothing is pruned: keep 1.0 stays the
    # plain computation.
    keeps = _prefill_keeps(stages, N, recent)
    last_alone = not keeps
    h = t.token_embeddings(prompt[None])
    positions = None  # of the active rows, on the device, once rows are pruned (None: 0, 1, ...)
    importance = None
    bounds = [0] + sorted(keeps) + [L]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if importance is not None:  # prune at layer lo; the recent positions are always kept
            # on the device: the host reads no score back, and the positioned cache reads the
            # positions back only when decoding needs them, so the host builds stage after stage
            # while the device runs them
            h, positions = _prune(cache[lo], h, positions, importance, keeps[lo], recent)
            importance = None
        n = h.shape[1]
        wants = hi < L
        outs = []
        pending = 0  # token-layers built since the last evaluation
        for c0, c1 in _chunks(n, step_size if positions is None else pruned_step_size, last_alone):
            if wants and c1 == n:
                cache[hi - 1].want_scores = True
            if positions is None:
                hc = t.forward_layers(h[:, c0:c1], lo, hi, cache)
            else:
                hc = t.forward_layers(h[:, c0:c1], lo, hi, cache, positions=positions[c0:c1][None],
                                      mask="causal")
            if hi < L or c1 == n:  # the last stage's output is read at its last row only:
                outs.append(hc)  # the other chunks' last layer is never computed, as in plain prefill
            pending += (c1 - c0) * (hi - lo)
            # Bound the graph as the plain prefill does -- an evaluation per step_size tokens
            # through all L layers -- counted in token-layers, so that a stage of a few layers
            # evaluates once per several chunks rather than per chunk (a stage-per-chunk rule made
            # 5x the plain prefill's evaluations, each a synchronisation on a GPU). The last
            # chunk stays lazy.
            if c1 < n and pending >= step_size * L:
                mx.eval(hc if hi < L else [], [(cache[l].keys, cache[l].values) for l in range(lo, hi)],
                        [c.aux.hidden for c in cache if c.aux is not None])
                mx.clear_cache()
                pending = 0
        for l in range(lo, hi):
            cache[l].computed += n
        if wants:
            importance = _take_importance(cache[hi - 1])
        h = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
        if hi < L:  # the device starts on this stage while the host builds the next
            mx.async_eval(h, [(cache[l].keys, cache[l].values) for l in range(lo, hi)],
                          [] if importance is None else importance)
    return model.logits(t.norm(h[:, -1:]))[:, -1, :]


# ---- decode ------------------------------------------------------------------------------------

@dataclass
class _Carried:
    """Revived rows being computed in this step: hidden states (1, m, d) and positions (m,)."""

    hidden: Optional[mx.array] = None
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def lazy_decode(model: nn.Module, token: mx.array, cache: LazyCache) -> mx.array:
    """Run one token (shape (1,)) through every layer, reviving the pruned prompt tokens that the
    new token's attention selects; the token's logits (1, V)."""
    for c in cache:
        c.snapshot()
    t = model.transformer
    L = len(t.layers)
    p = cache.next_position
    depth = np.append(cache.depth, L)
    reselect = sorted(l for l, k in cache.stages.items() if k < 1.0)
    bounds = [0] + reselect + [L]
    h = t.token_embeddings(token.reshape(1, 1))
    carried = _Carried()
    importance = None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if importance is not None:
            carried = _reselect(cache, lo, importance, carried, p, depth)
            importance = None
        if hi < L:
            cache[hi - 1].want_scores = True
        m = carried.positions.size
        if m:
            rows = mx.concatenate([carried.hidden, h], axis=1)
            out = t.forward_layers(rows, lo, hi, cache, positions=np.append(carried.positions, p)[None])
            carried.hidden, h = out[:, :m], out[:, m:]
            depth[carried.positions] = hi
            prompt_rows = int(np.count_nonzero(carried.positions < cache.prompt_tokens))
            for l in range(lo, hi):
                cache[l].computed += prompt_rows
        else:
            h = t.forward_layers(h, lo, hi, cache)
        if hi < L:
            importance = _take_importance(cache[hi - 1])
    return model.logits(t.norm(h))[:, -1, :]


def _reselect(cache: LazyCache, l: int, importance: mx.array, carried: _Carried, p: int,
              depth: np.ndarray) -> _Carried:
    """At pruning layer ``l``: pick the top tokens by the new token's attention at layer l - 1;
    selected tokens of depth l (in the Aux Cache, or just carried here) go on; carried tokens not
    selected are parked in the Aux Cache at layer l."""
    prev_pos = cache[l - 1].positions
    scores = np.array(importance.astype(mx.float32))
    keep = keep_count(cache[l].keep, p)
    cand_idx = np.flatnonzero(prev_pos != p)
    if keep < cand_idx.size:
        cand_idx = cand_idx[np.argpartition(-scores[cand_idx], keep - 1)[:keep]]
    selected = prev_pos[cand_idx]
    need = selected[depth[selected] == l]
    aux = cache[l].aux
    go_on = np.isin(carried.positions, need)
    parts_h, parts_pos, park_h, park_pos = [], [], [], []

    def pick(hidden, mask):
        return mx.take(hidden, mx.array(np.flatnonzero(mask).astype(np.int32)), axis=1)

    if go_on.any():
        parts_h.append(pick(carried.hidden, go_on))
        parts_pos.append(carried.positions[go_on])
    if (~go_on).any():
        park_h.append(pick(carried.hidden, ~go_on))
        park_pos.append(carried.positions[~go_on])
    if aux is not None and aux.positions.size:
        revive = np.isin(aux.positions, need)
        if revive.any():
            parts_h.append(pick(aux.hidden, revive))
            parts_pos.append(aux.positions[revive])
            cache[l].revived += int(np.count_nonzero(revive))
        if (~revive).any():
            park_h.insert(0, pick(aux.hidden, ~revive))
            park_pos.insert(0, aux.positions[~revive])
    cache[l].aux = (AuxEntry(np.concatenate(park_pos), mx.concatenate(park_h, axis=1))
                    if park_pos else None)
    if not parts_pos:
        return _Carried()
    return _Carried(mx.concatenate(parts_h, axis=1), np.concatenate(parts_pos))


# ---- engine hooks ------------------------------------------------------------------------------

@dataclass
class LazyPrefill(PrefillStrategy):
    """``PrefillStrategy`` for the engine: LazyLLM's progressive pruning of the prompt."""

    schedule: LazySchedule = LazySchedule()
    step_size: int = 512
    pruned_step_size: Optional[int] = None  # chunks once rows are pruned (None: step_size)

    def make_cache(self, model: nn.Module) -> LazyCache:
        return make_cache(len(model.layers), self.schedule)

    def __call__(self, model, prompt, cache):
        if not isinstance(cache, list) or not cache or not isinstance(cache[0], LazyLayerCache):
            raise MlxeffError("LazyPrefill needs the cache from its make_cache (a LazyCache)")
        if not isinstance(cache, LazyCache):
            cache = LazyCache(cache)
        return lazy_prefill(model, prompt, cache, self.step_size, self.pruned_step_size)


class LazyDecode(DecodeStrategy):
    """``DecodeStrategy`` for the engine: tokens one at a time with re-selection and revival."""

    def __call__(self, model, tokens, cache):
        if not cache or not isinstance(cache[0], LazyLayerCache):
            return super().__call__(model, tokens, cache)
        lazy = cache if isinstance(cache, LazyCache) else LazyCache(cache)
        rows = [lazy_decode(model, tokens[i:i + 1], lazy) for i in range(tokens.size)]
        return rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)


def lazy_hooks(schedule: Optional[LazySchedule] = None, num_layers: Optional[int] = None,
               step_size: int = 512) -> dict:
    """``{"prefill": ..., "decode": ...}`` for the engine; with ``num_layers`` the schedule is
    checked against the model first."""
    schedule = schedule or LazySchedule()
    if num_layers is not None:
        schedule.stages_for(num_layers)
    return {"prefill": LazyPrefill(schedule, step_size), "decode": LazyDecode()}


def _build(ctx, o) -> dict:
    num_layers = len(ctx.model.layers)
    kw = dict(keep_start=o["keep"][0], keep_end=o["keep"][1], start=o["range"][0], end=o["range"][1],
              recent=o["recent"])
    try:
        if o["stages"] is None:  # the default count, or as many as fit in a shallow model
            rng = LazySchedule(**kw)
            kw["stages"] = max(1, min(rng.stages, max_stages(num_layers, rng.start, rng.end)))
        else:
            kw["stages"] = o["stages"]
        return lazy_hooks(LazySchedule(**kw), num_layers, ctx.step_size)
    except ScheduleError as e:
        raise TechniqueError(f"--lazy: {e}") from None


register(Technique(
    name="lazy",
    title="LazyLLM (arXiv 2407.14057)",
    summary="Prune prompt tokens progressively with depth by the last token's attention, reviving "
    "them while decoding (default schedule: keep 0.8 -> 0.5 of the tokens over 4 stages in 30%-90% "
    "of the depth, never the last 32).",
    hooks=("prefill", "decode"),
    options=(
        Option("keep", float, (0.8, 0.5), "Keep ratios in (0, 1] at the first and the last pruning "
               "layer, START >= END.", nargs=2, metavar="START END"),
        Option("range", float, (0.3, 0.9), "Pruning layers from START to END as fractions of the "
               "depth.", nargs=2, metavar="START END"),
        Option("stages", int, None, "Number of pruning layers (default 4, or as many as fit in the "
               "range)."),
        Option("recent", int, 32, "The last N prompt tokens are never pruned (0 keeps only the last "
               "token, the paper's rule)."),
    ),
    build=_build,
))
