"""Sampling settings, the sampler, and the speculative acceptance rule.

``SamplingConfig`` validates temperature, top-p, top-k and min-p at the boundary (the CLI and the
Python API raise the same ``SamplingError`` line) and builds mlx-lm's filter chain (top-p, then
min-p, then top-k, on log-probabilities; then a categorical draw at the temperature), so a
sampled token follows exactly mlx-lm's ``make_sampler`` distribution.

Multi-token decoding verifies drafted tokens against that same distribution:

- greedy (temperature 0): a draft is accepted while it equals the argmax of its row; the first
  disagreement is replaced by the argmax, so the output is bit-identical to plain greedy decoding;
- sampling: the standard speculative rule (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv
  2302.01318): draft token x with draft probability q(x) is accepted with probability
  min(1, p(x) / q(x)); on a rejection the token is drawn from normalise(max(p - q, 0)) and the
  rest of the draft is dropped; when every draft is accepted one more token is drawn from the
  next row. A deterministic drafter (prompt lookup) has q = a point mass on its token. The output
  distribution is exactly p's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .errors import MlxeffError

Sampler = Callable[[mx.array], mx.array]


class SamplingError(MlxeffError, ValueError):
    """A sampling value outside its range (a ``MlxeffError`` and a ``ValueError``)."""


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingConfig:
    """temp >= 0 (0: greedy), 0 < top_p <= 1 (1: off), top_k >= 0 (0: off), 0 <= min_p <= 1."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        if _number("--temp", self.temp) < 0:
            raise SamplingError(f"--temp must be at least 0 (0 is greedy), got {self.temp}")
        if not 0 < _number("--top-p", self.top_p) <= 1:
            raise SamplingError(f"--top-p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"--top-k must be an integer of at least 0 (0 turns it off), got {self.top_k!r}")
        if not 0 <= _number("--min-p", self.min_p) <= 1:
            raise SamplingError(f"--min-p must be in [0, 1] (0 turns it off), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def filter(self, logprobs: mx.array) -> mx.array:
        """mlx-lm's filter chain on log-probabilities (filtered entries become -inf)."""
        if 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if 0 < self.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs

    def sampler(self) -> Sampler:
        """log-probabilities (n, V) -> tokens (n,), as mlx-lm's ``make_sampler`` draws them."""
        if self.greedy:
            return lambda logprobs: mx.argmax(logprobs, axis=-1)
        return lambda logprobs: mx.random.categorical(self.filter(logprobs) * (1.0 / self.temp))

    def probabilities(self, logprobs: mx.array) -> mx.array:
        """The distribution the sampler draws from, (n, V) float32 (one-hot at the argmax when greedy)."""
        if self.greedy:
            return (mx.arange(logprobs.shape[-1]) == mx.argmax(logprobs, axis=-1, keepdims=True)
                    ).astype(mx.float32)
        return mx.softmax(self.filter(logprobs).astype(mx.float32) * (1.0 / self.temp), axis=-1)


def accept_greedy(draft: Sequence[int], targets: Sequence[int]) -> Tuple[int, int]:
    """(number of drafts accepted, the token that follows them) given the argmax ``targets`` of
    the len(draft) + 1 verified rows."""
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return n, int(targets[n])


def accept_sampled(draft: Sequence[int], target_probs: mx.array,
                   draft_probs: Optional[mx.array] = None) -> Tuple[int, int]:
    """The speculative rule for ``draft`` (d tokens) against ``target_probs`` (d + 1, V);
    ``draft_probs`` (d, V) is the drafter's distribution (None: a point mass on each draft)."""
    d = len(draft)
    if d:
        idx = mx.array(list(draft))
        p = mx.take_along_axis(target_probs[:d], idx[:, None], axis=1)[:, 0]
        q = mx.ones((d,)) if draft_probs is None else mx.take_along_axis(draft_probs, idx[:, None], axis=1)[:, 0]
        accept = (mx.random.uniform(shape=(d,)) * q < p).tolist()
    for i in range(d):
        if not accept[i]:
            if draft_probs is None:
                residual = target_probs[i] * (mx.arange(target_probs.shape[-1]) != draft[i])
            else:
                residual = mx.maximum(target_probs[i] - draft_probs[i], 0.0)
            return i, _draw(residual, fallback=target_probs[i])
    return d, _draw(target_probs[d])


def _draw(weights: mx.array, fallback: Optional[mx.array] = None) -> int:
    total = weights.sum()
    if fallback is not None and total.item() <= 0:  # p == q exactly: any draw from p is right
        weights, total = fallback, fallback.sum()
    return int(mx.random.categorical(mx.log(weights / total)).item())


def row_logprobs(logits: mx.array, history: List[int],
                 processors: Optional[Sequence[Callable]] = None) -> mx.array:
    """Log-probabilities of each row of ``logits`` (n, V) after the logits processors, row i seeing
    ``history`` plus the tokens of rows < i (``history`` holds them all: len(history) - n + i + 1
    tokens precede row i's prediction)."""
    n = logits.shape[0]
    if not processors:
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    rows = []
    for i in range(n):
        row = logits[i:i + 1]
        seen = mx.array(history[: len(history) - n + i + 1])
        for proc in processors:
            row = proc(seen, row)
        rows.append(row)
    out = rows[0] if n == 1 else mx.concatenate(rows, axis=0)
    return out - mx.logsumexp(out, axis=-1, keepdims=True)
