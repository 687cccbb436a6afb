"""The generation engine: prefill, then decode one token per forward or verify drafted tokens.

The loop is mlx-lm's ``generate_step`` (chunked prefill, one decode step computed ahead of the
token being yielded) with three hooks a technique plugs into, each a small object:

- ``prefill``: a ``PrefillStrategy`` makes the cache and fills it from the prompt, returning the
  last position's logits (KV Prediction, LazyLLM);
- ``decode``: a ``DecodeStrategy`` runs tokens appended after everything cached and returns their
  logits, one row per token (LazyLLM's revival);
- ``drafter``: a ``Drafter`` proposes the next tokens; one decode forward verifies them all, the
  longest prefix the sampler agrees with is kept (``mlxeff.sampling``: greedy output is
  bit-identical to plain decoding; sampling keeps the target distribution) and the cache is
  rewound over the rest (prompt lookup, draft models, early exit).

Without a drafter the engine runs mlx-lm's pipelined loop unchanged. With one the loop is
synchronous: the next draft depends on the tokens just accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream

from .cache import trim_cache
from .progress import bar
from .sampling import SamplingConfig, Sampler, accept_greedy, accept_sampled, row_logprobs


class PrefillStrategy:
    """Fills ``cache`` from ``prompt`` (1-D token ids) and returns the last position's logits (1, V)."""

    def make_cache(self, model: nn.Module) -> list:
        return model.make_cache()

    def __call__(self, model: nn.Module, prompt: mx.array, cache: list) -> mx.array:
        raise NotImplementedError


# Prompt chunk length when none is given: 2048 on a GPU, as mlx-lm's default, 512 on the CPU. On
# the GPU a prefill of this size is bound by launches and host work per chunk, not arithmetic: on
# an H100 (CUDA, the default model's shapes, float16) 2,048-token chunks prefilled 2,048 tokens in
# 9.4 ms against 23.5 ms for 512-token chunks, and 4,096 tokens in 21.7 ms against 61.0 ms
# (benchmarks/RESULTS.md, "Prefill chunk length on the GPU, and LazyLLM's pruned stages"). On
# the CPU the arithmetic dominates and every CPU figure in RESULTS.md was measured with 512. On
# Metal 2048 is mlx-lm's choice, not measured here.
GPU_PREFILL_STEP = 2048
CPU_PREFILL_STEP = 512


def prefill_step_size(step_size: Optional[int] = None) -> int:
    """``step_size``, or the default chunk length for the default device when it is None."""
    if step_size is not None:
        return step_size
    return CPU_PREFILL_STEP if mx.default_device() == mx.cpu else GPU_PREFILL_STEP


@dataclass
class ChunkedPrefill(PrefillStrategy):
    """The baseline: all but the last prompt token in chunks of ``step_size`` tokens, evaluated
    chunk by chunk (only the cache, so no chunk computes logits), then the last token alone, so the
    output head runs for one position (as mlx-lm's ``generate_step`` does). A prompt of more than
    one chunk shows a progress bar (on a terminal)."""

    step_size: Optional[int] = None  # None: ``prefill_step_size()``, by device

    def __call__(self, model, prompt, cache):
        step = prefill_step_size(self.step_size)
        with bar(prompt.size, "prompt", "tok", show=None if prompt.size > step else False,
                 leave=False) as progress:
            while prompt.size > 1:
                n = min(step, prompt.size - 1)
                model(prompt[:n][None], cache=cache)
                mx.eval([c.state for c in cache])
                prompt = prompt[n:]
                mx.clear_cache()
                progress.update(n)
            return model(prompt[None], cache=cache)[:, -1, :]


class DecodeStrategy:
    """Runs ``tokens`` (n,), appended after everything cached, through the model; their logits (n, V)."""

    def __call__(self, model: nn.Module, tokens: mx.array, cache: list) -> mx.array:
        # squeeze, not ``[0]``: MLX turns an integer index into a gather, one more kernel a step
        return model(tokens[None], cache=cache).squeeze(0)


@dataclass
class Draft:
    """Proposed next tokens and, for a sampling drafter, its distribution per token (d, V)."""

    tokens: List[int]
    probs: Optional[mx.array] = None


class Drafter:
    """Proposes up to ``k`` tokens to follow ``context`` (every token so far, prompt included,
    the last one not yet run through the model). ``max_draft`` caps ``k``."""

    max_draft: int = 4

    def start(self, model: nn.Module, prompt: Sequence[int], cache: list,
              sampling: Optional[SamplingConfig] = None) -> None:
        """Called once after the prefill, with the engine's sampling settings (a drafter that
        samples its proposals draws them under these, so they match the distribution verified)."""

    def propose(self, context: Sequence[int], k: int) -> Draft:
        raise NotImplementedError

    def feedback(self, proposed: int, accepted: int) -> None:
        """How many of the last proposal's tokens were accepted."""


@dataclass
class DecodeStats:
    """Decode forwards run, tokens drafted and drafts accepted (the engine fills it)."""

    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.generated / self.forwards if self.forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    sampling: Optional[SamplingConfig] = None,
    logits_processors: Optional[List[Callable]] = None,
    prompt_cache: Optional[list] = None,
    prefill: Optional[PrefillStrategy] = None,
    decode: Optional[DecodeStrategy] = None,
    drafter: Optional[Drafter] = None,
    stats: Optional[DecodeStats] = None,
) -> Generator[tuple, None, None]:
    """Yield ``(token, logprobs)`` pairs; ``max_tokens=-1`` never stops by itself.

    ``sampling`` (default greedy) or a custom ``sampler`` (log-probabilities -> tokens; not with a
    drafter, whose verification needs the distribution) chooses the tokens."""
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    prefill = prefill or ChunkedPrefill()
    decode = decode or DecodeStrategy()
    stats = stats if stats is not None else DecodeStats()
    sampling = sampling or SamplingConfig()
    cache = prompt_cache if prompt_cache is not None else prefill.make_cache(model)
    if drafter is not None:
        if sampler is not None:
            raise ValueError("a drafter verifies against a SamplingConfig, not a custom sampler")
        yield from _drafted_loop(prompt, model, max_tokens, sampling, logits_processors, cache,
                                 prefill, decode, drafter, stats)
        return
    sampler = sampler or sampling.sampler()
    tokens = prompt

    def sample(logits):
        if logits_processors:
            for proc in logits_processors:
                logits = proc(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    with mx.stream(generation_stream):
        y, logprobs = sample(prefill(model, prompt, cache))
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        if n != max_tokens:
            with mx.stream(generation_stream):
                if logits_processors:
                    tokens = mx.concatenate([tokens, y])
                next_y, next_logprobs = sample(decode(model, y, cache)[-1:])
                stats.forwards += 1
            mx.async_eval(next_y, next_logprobs)
        if n == 0:
            mx.eval(y)
        if n == max_tokens:
            break
        stats.generated += 1
        yield y.item(), logprobs
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs
        n += 1


def _drafted_loop(prompt, model, max_tokens, sampling, processors, cache, prefill, decode,
                  drafter, stats):
    history = [int(t) for t in prompt.tolist()]
    with mx.stream(generation_stream):
        lp = row_logprobs(prefill(model, prompt, cache), history, processors)
        y = int(sampling.sampler()(lp).item())
    drafter.start(model, history, cache, sampling)
    history.append(y)
    stats.generated += 1
    yield y, lp[0]
    n = 1
    while max_tokens == -1 or n < max_tokens:
        k = drafter.max_draft if max_tokens == -1 else min(drafter.max_draft, max_tokens - n - 1)
        draft = drafter.propose(history, k) if k > 0 else Draft([])
        d = len(draft.tokens)
        with mx.stream(generation_stream):
            logits = decode(model, mx.array([y] + draft.tokens, dtype=mx.uint32), cache)
            lp = row_logprobs(logits, history + draft.tokens, processors)
            if sampling.greedy:
                accepted, nxt = accept_greedy(draft.tokens, mx.argmax(lp, axis=-1).tolist())
            else:
                accepted, nxt = accept_sampled(draft.tokens, sampling.probabilities(lp), draft.probs)
        if d > accepted:
            trim_cache(cache, d - accepted)
        drafter.feedback(d, accepted)
        stats.forwards += 1
        stats.drafted += d
        stats.accepted += accepted
        new = draft.tokens[:accepted] + [nxt]
        for i, t in enumerate(new):
            stats.generated += 1
            yield t, lp[i]
        history.extend(new)
        y = nxt
        n += len(new)
        if stats.forwards % 256 == 0:
            mx.clear_cache()
