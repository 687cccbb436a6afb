"""Early-exit self-speculative decoding: the first layers and the shared head draft, the model verifies.

Elhoushi et al., "LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding",
arXiv 2404.16710 (self-speculation: draft with the first E layers and the model's own output head,
verify with the whole model); Zhang et al., "Draft & Verify", arXiv 2309.08168 (skipping layers
of the model itself to draft). This module is the training-free baseline: the model's first ``n``
blocks, its final norm and its head, with no early-exit training. It also holds what every
model-based drafter here shares (``mlxeff.techniques.draft_model``, ``mlxeff.techniques.m2r2``):
the draft-length policy and the drafting loop.

Algorithm. The engine hands the drafter the context whose last token ``y`` is not yet in the cache
(``mlxeff.engine``). To propose ``k`` tokens the drafter runs ``y`` through blocks ``0..n-1``
attending to the model's own cache of those layers, applies the final norm and the head, takes the
argmax ``d1`` (or samples it, see below), runs ``d1`` the same way, and so on: ``k`` single-token
steps write ``k`` entries into each of the first ``n`` layers' caches. Those writes are removed
before the proposal is returned (the cache is then exactly as the engine left it), and the
engine's verify forward runs ``[y] + draft`` through every layer, keeps the longest prefix the
sampler agrees with, and trims the rest. Greedy output is therefore identical to plain greedy
decoding, whatever the drafts are.

Choices and deviations:

- **No KV reuse across draft and verify.** LayerSkip reuses the draft's first-``n``-layer keys and
  values and its exit hidden state in the verify step. Here the verify forward recomputes them:
  in a memory-bound decode the verify reads every weight once whatever the number of rows, so
  the reuse would save little, and it would tie the verify to the drafter's numerics (a batched
  forward and k single-token forwards need not round alike).
- **Drafting writes into the model's cache and undoes it**, rather than keeping a mirrored cache:
  the drafted tokens attend to exactly the keys and values the model holds for the context
  (whatever a prefill technique put there: LazyLLM's pruned layers, KV Prediction's predicted
  cache). The undo is the positioned cache's own slot trim (``PositionedKVCache.trim``), also for
  LazyLLM's layer caches, whose ``trim`` undoes whole decode steps (drafting is not one).
- **One synchronisation per proposal.** The ``k`` steps are built as one lazy graph (each step's
  argmax feeds the next step's embedding on the device) and evaluated once; a drafter that stops
  on a per-token decision (M2R2's router) evaluates after each token instead.
- **Sampling.** A drafter whose ``sampling`` is set to a non-greedy ``SamplingConfig`` draws its
  tokens from its own distribution under the same temperature/top-p/top-k/min-p transform and
  returns it in ``Draft.probs``, so the engine's standard rule (accept with ``min(1, p/q)``) keeps
  the target distribution. The engine passes its settings to ``start``, so a drafter draws under
  exactly the transform it is verified against (greedy: the argmax, a point mass, which the rule
  also handles exactly); used outside the engine, ``sampling`` left unset proposes the argmax.
- **Draft length** (``DraftLength``, shared by every model-based drafter): the per-token
  acceptance rate ``alpha`` is tracked with exponential forgetting (each proposal counts its
  accepted tokens as successes and its first rejection, if any, as a failure: the geometric
  model of speculative decoding, Leviathan et al., arXiv 2211.17192), and the next proposal has
  the length ``k`` in ``0..max`` that maximises the expected tokens per unit of time,
  ``(1 - alpha^(k+1)) / (1 - alpha) / (1 + c k)``, where ``c`` is one drafted token's cost relative
  to one verify forward. ``c`` is measured while decoding: the drafting time per token plus the
  verify forward's time per extra row, over the time of a one-row forward (the drafter times its
  proposal, synchronised, and the span until the engine's ``feedback``; steps without a draft give
  the one-row time; exponential forgetting), starting from the drafter's weight-read ratio
  (the parameters one draft step multiplies by, head included, over the model's: the cost in a
  memory-bound decode). Measuring matters where decoding is not memory-bound: on the CPU box the
  default model's drafted tokens measured 0.8-1.2 of a one-row forward against weight shares of
  0.34-0.44 (per-operation overhead; extra verify rows are not free), a random OpenELM-270M's
  0.12-0.32, near its weight shares (``benchmarks/RESULTS.md``). When drafting does not pay
  (``k = 0``) one token is still proposed every ``probe`` steps so that ``alpha`` keeps being
  measured. Output never depends on ``k``, only speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..cache import PositionedKVCache
from ..engine import Draft, Drafter
from ..sampling import SamplingConfig
from .kv_prediction_flops import head_macs, layer_weight_macs
from .registry import Option, Technique, TechniqueError, register


# ---- the draft-length policy --------------------------------------------------------------------

def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify forward yields when ``k`` tokens are drafted, each accepted with
    probability ``alpha`` independently until the first rejection (the bonus token included)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_draft_length(alpha: float, cost: float, max_draft: int) -> int:
    """The ``k`` in ``0..max_draft`` maximising ``expected_tokens(alpha, k) / (1 + cost * k)``
    (the smallest such ``k`` on ties)."""
    best, best_rate = 0, 1.0
    for k in range(1, max_draft + 1):
        rate = expected_tokens(alpha, k) / (1.0 + cost * k)
        if rate > best_rate + 1e-12:
            best, best_rate = k, rate
    return best


@dataclass
class DraftLength:
    """Adaptive draft length from the measured acceptance rate and cost (module docstring)."""

    max_draft: int = 8
    cost: Optional[float] = None  # a drafted token's cost relative to a verify forward, fixed;
    # None: measured while decoding, starting from `prior_cost`
    prior_cost: float = 0.25  # drafters set it to their weight-read ratio
    decay: float = 0.8  # weight of the past per proposal (acceptance)
    time_decay: float = 0.9  # weight of the past per step (cost)
    prior: float = 0.6  # acceptance rate assumed before any feedback ...
    prior_weight: float = 2.0  # ... worth this many observed tokens
    probe: int = 8  # when drafting does not pay, still draft one token every `probe` steps
    _accepted: float = field(default=0.0, repr=False)
    _tried: float = field(default=0.0, repr=False)
    _idle: int = field(default=0, repr=False)
    # exponentially weighted sums: drafted steps (weight, draft s/token, verify s, tokens),
    # undrafted steps (weight, verify s), and drafted steps' tokens^2 and verify s x tokens
    _timed: list = field(default_factory=lambda: [0.0] * 8, repr=False)

    @property
    def alpha(self) -> float:
        return (self._accepted + self.prior * self.prior_weight) / (self._tried + self.prior_weight)

    @property
    def draft_cost(self) -> float:
        """A drafted token's cost relative to a one-row verify forward: its drafting time plus
        the verify forward's time per extra row. The latter is the slope of a least-squares line
        through (rows verified, verify time) over every timed step, once the steps differ in
        length (steps without a draft count with 0 rows; with one drafted length this is the
        difference of the two mean verify times per extra row); while all were drafted at one
        length, or the fit is degenerate, it is taken as 0, the memory-bound case."""
        if self.cost is not None:
            return self.cost
        w, d, v, k, w0, v0, kk, vk = self._timed
        if w == 0:
            return self.prior_cost
        n = w + w0
        mean_k, mean_v = k / n, (v + v0) / n
        var_k = kk / n - mean_k * mean_k
        if var_k > 1e-6 * max(1.0, mean_k * mean_k):
            slope = (vk / n - mean_k * mean_v) / var_k
            one_row = mean_v - slope * mean_k
            if one_row > 0:
                return (d / w + max(0.0, slope)) / one_row
        return (d / w) / (v / w)  # drafting time over the mean verify time

    def length(self) -> int:
        k = best_draft_length(self.alpha, self.draft_cost, self.max_draft)
        if k == 0 and self._idle + 1 >= self.probe:
            return 1
        return k

    def reset(self) -> None:
        """Forget the measurements (back to the priors)."""
        self._accepted = self._tried = 0.0
        self._idle = 0
        self._timed = [0.0] * 8

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            self._idle += 1
            return
        self._idle = 0
        rejected = 1.0 if accepted < proposed else 0.0
        self._accepted = self.decay * self._accepted + accepted
        self._tried = self.decay * self._tried + accepted + rejected

    def timed(self, tokens: int, draft_seconds: float, verify_seconds: float) -> None:
        """One step's measured drafting time (``tokens`` drafted) and verify forward time."""
        t, g = self._timed, self.time_decay
        if tokens:
            new = [1.0, draft_seconds / tokens, verify_seconds, float(tokens)]
            t[:4] = [g * a + b for a, b in zip(t[:4], new)]
            t[6:] = [g * t[6] + tokens * tokens, g * t[7] + verify_seconds * tokens]
        else:
            t[4:6] = [g * t[4] + 1.0, g * t[5] + verify_seconds]


class Timer:
    """Times a drafter's proposals and the engine's verify forwards for ``DraftLength.timed``.

    ``follow(sampling)`` switches the timing off while sampling: the draft lengths then depend on
    acceptances only, which the seed fixes, so a seeded run repeats itself (wall-clock costs would
    change the lengths, hence how the random draws fall, from run to run). Greedy output does not
    depend on the lengths, so greedy decoding is timed."""

    def __init__(self):
        self.proposed_at: Optional[float] = None
        self.draft_seconds = 0.0
        self.active = True

    def follow(self, sampling: Optional[SamplingConfig]) -> None:
        self.active = sampling is None or sampling.greedy

    def drafted(self, started: float) -> None:
        """A proposal started at ``started`` is ready (evaluated), possibly empty."""
        self.proposed_at = time.perf_counter()
        self.draft_seconds = self.proposed_at - started

    def verified(self, policy: DraftLength, proposed: int) -> None:
        """The engine verified the last proposal (``feedback`` is called right after)."""
        if self.proposed_at is not None and self.active:
            policy.timed(proposed, self.draft_seconds, time.perf_counter() - self.proposed_at)
        self.proposed_at = None


def follow_engine_sampling(drafter, sampling: Optional[SamplingConfig]) -> None:
    """What a model-based drafter's ``start`` does with the engine's settings: proposals drawn
    under the transform they are verified against (greedy: the argmax), and the timing of its
    ``timer`` on only while greedy (``Timer.follow``)."""
    if sampling is not None:
        drafter.sampling = None if sampling.greedy else sampling
    drafter.timer.follow(sampling)


def weight_share(args, layers: int, extra: int = 0) -> float:
    """Multiply-adds per token of the first ``layers`` blocks plus the head (plus ``extra``) over
    those of the whole model: a draft step's cost relative to a memory-bound decode step."""
    per_layer = layer_weight_macs(args)
    head = head_macs(args)
    return (sum(per_layer[:layers]) + head + extra) / (sum(per_layer) + head)


# ---- drafting on the model's own first layers ---------------------------------------------------

def undo_writes(caches: Sequence, n: int) -> None:
    """Remove the last ``n`` slots written into each of ``caches`` (a drafter's own writes)."""
    if n <= 0:
        return
    for c in caches:
        if isinstance(c, PositionedKVCache):
            PositionedKVCache.trim(c, n)  # slots, not LazyLLM's decode-step undo
        else:
            c.trim(n)


def draw(logits: mx.array,
         sampling: Optional[SamplingConfig]) -> Tuple[mx.array, Optional[mx.array]]:
    """The next token (1, 1) from one row of logits (1, V) and, when sampling, the distribution
    (V,) it was drawn from."""
    if sampling is None or sampling.greedy:
        return mx.argmax(logits, axis=-1).reshape(1, 1), None
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    probs = sampling.probabilities(logprobs)
    token = mx.random.categorical(mx.log(probs)).reshape(1, 1)
    return token, probs[0]


class LayerDrafter(Drafter):
    """Drafts with the model's first blocks on the model's cache, then its final norm and head.

    Subclasses change what one draft step computes (``hidden``) and may stop a proposal early
    (``trusted``)."""

    def __init__(self, layers: int, draft: int = 8, sampling: Optional[SamplingConfig] = None,
                 policy: Optional[DraftLength] = None):
        if layers < 1:
            raise TechniqueError(f"--early-exit needs at least 1 layer, got {layers}")
        self.layers = layers
        self.sampling = sampling
        self.policy = policy or DraftLength(max_draft=draft)
        self.model: Optional[nn.Module] = None
        self.cache: Optional[list] = None
        self.timer = Timer()

    @property
    def max_draft(self) -> int:  # type: ignore[override]
        return self.policy.max_draft

    # ---- what subclasses change -------------------------------------------------------------

    def check(self, model: nn.Module) -> None:
        n = len(model.layers)
        if self.layers > n:
            raise TechniqueError(f"--early-exit {self.layers}: the model has only {n} layers")

    def draft_cost(self, model: nn.Module) -> float:
        return weight_share(model.args, self.layers)

    def hidden(self, h: mx.array) -> mx.array:
        """One draft step's blocks on the embedded token ``h`` (1, 1, d), writing its keys and
        values into the model's cache."""
        return self.model.transformer.forward_layers(h, 0, self.layers, self.cache)

    def trusted(self, state: mx.array, logits: mx.array) -> Optional[mx.array]:
        """None, or a boolean scalar: whether drafting may go on after this token."""
        return None

    # ---- the engine's contract --------------------------------------------------------------

    def start(self, model, prompt, cache, sampling: Optional[SamplingConfig] = None) -> None:
        follow_engine_sampling(self, sampling)
        if model is not self.model:
            self.check(model)
            self.policy.prior_cost = self.draft_cost(model)
        self.model, self.cache = model, cache

    def propose(self, context: Sequence[int], k: int) -> Draft:
        started = time.perf_counter()
        k = min(k, self.policy.length())
        if k <= 0:
            self.timer.drafted(started)
            return Draft([])
        t = self.model.transformer
        token = mx.array([[context[-1]]], dtype=mx.uint32)
        tokens: List[mx.array] = []
        probs: List[mx.array] = []
        written = 0
        try:
            for _ in range(k):
                state = t.norm(self.hidden(t.token_embeddings(token)))
                written += 1
                logits = self.model.logits(state)[:, -1, :]
                token, p = draw(logits, self.sampling)
                tokens.append(token)
                if p is not None:
                    probs.append(p)
                go_on = self.trusted(state, logits)
                if go_on is not None:
                    mx.eval(token, go_on)
                    if not go_on.item():
                        break
            mx.eval(tokens, probs)
        finally:
            undo_writes(self.cache[: self.layers], written)
        self.timer.drafted(started)
        out = [int(x) for x in mx.concatenate(tokens, axis=1)[0].tolist()]
        return Draft(out, mx.stack(probs) if probs else None)

    def feedback(self, proposed: int, accepted: int) -> None:
        self.timer.verified(self.policy, proposed)
        self.policy.update(proposed, accepted)


def _in_range(low: int, high: int):
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}, got {v}"


DRAFT_OPTION = Option("draft", int, 8, "Tokens to draft at most per step (the length adapts "
                      "to the acceptance rate below that).", check=_in_range(1, 64))


def _build(ctx, o) -> dict:
    drafter = LayerDrafter(o["layers"], o["draft"])
    drafter.check(ctx.model)
    return {"drafter": drafter}


register(Technique(
    name="early-exit",
    title="Early-exit self-speculative decoding (LayerSkip, arXiv 2404.16710)",
    summary="Draft with the model's first N layers and its own head (no training); one forward "
    "of the whole model verifies the draft (greedy output is identical to plain decoding).",
    hooks=("drafter",),
    value=Option("layers", int, None, "Layers the drafts run through.", metavar="N",
                 check=_in_range(1, 4096)),
    options=(DRAFT_OPTION,),
    build=_build,
))
