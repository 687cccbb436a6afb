"""Prompt lookup decoding: draft tokens copied from the context itself, verified in one forward.

Yang et al., "Inference with Reference: Lossless Acceleration of Large Language Models",
arXiv 2304.04487 (copying spans of a reference text as drafts), in the training-free form known
as prompt lookup decoding (Saxena, 2023, github.com/apoorvumang/prompt-lookup-decoding; llama.cpp's
n-gram "lookup" drafters). Text that repeats what the prompt holds -- quoting a document, editing
code, answering from a passage -- is cheap to predict: find where the last few tokens occurred
before and propose what followed them.

Algorithm. After every accepted step, take the last n tokens of the context (prompt plus output,
n from ``ngram`` down to 1) and look for their most recent earlier occurrence that has at least
one token after it; propose up to ``draft`` tokens that followed it. No match at any n: no draft
(the engine then decodes one token, as plain decoding does). The engine verifies the proposal in
one forward and keeps the longest prefix the sampler agrees with (``mlxeff.sampling``), so greedy
output is identical to plain greedy decoding.

Choices: the most recent occurrence wins (recent text is the likeliest to be repeated; HF's
implementation takes the first); n-gram sizes are tried from the largest down (a longer match is
a better predictor); a match may overlap the tail itself (repetitive text such as "a a a" then
drafts its own continuation). The search is a vectorised comparison over the whole context per
step, O(context x n), which at 10^4 tokens costs a few tens of microseconds on a CPU.

Deviation: the proposal is cut to the length that maximises the expected tokens per unit of time
(``early_exit.DraftLength``, shared with the model-based drafters: the acceptance rate tracked with
forgetting, a verified extra row's cost measured from the verify forwards' times). The reference
method always proposes the whole continuation; on the CPU, where a verify forward's extra rows
are not free, long mostly rejected drafts made decoding slower than plain (0.77-0.89x on
copy-heavy prompts with the default model) and the adaptive length made it faster (1.16x;
benchmarks/RESULTS.md). ``--lookup-fixed`` restores the reference behaviour. While sampling, the
verify cost is not re-measured (``early_exit.Timer.follow``), so a seeded run repeats itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..engine import Draft, Drafter
from .early_exit import DraftLength, Timer
from .registry import Option, Technique, register


def find_continuation(context: np.ndarray, ngram: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens following the most recent earlier occurrence of the context's last
    n tokens, for n = ``ngram`` .. 1 (empty when nothing matches)."""
    L = context.size
    for n in range(min(ngram, L - 1), 0, -1):
        tail = context[L - n:]
        # windows starting at 0 .. L - n - 1: each has at least one token after it
        windows = np.lib.stride_tricks.sliding_window_view(context[: L - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = hits[-1] + n
            return context[start: start + k]
    return context[:0]


@dataclass
class PromptLookup(Drafter):
    """The drafter: ``ngram`` the longest n-gram matched, ``draft`` tokens proposed at most.
    ``adaptive``: a ``DraftLength`` policy (``policy``, made here when not given) shortens the
    proposals from the measured acceptance and verify cost; off: always as many as the match
    offers, up to ``draft``."""

    ngram: int = 3
    draft: int = 8
    adaptive: bool = True
    policy: Optional[DraftLength] = None
    _buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def __post_init__(self):
        if not self.adaptive:
            self.policy = None
        elif self.policy is None:
            # drafting is free; a verified extra row is assumed to cost 5% of a one-row forward
            # until the verify forwards have been timed (then measured: DraftLength.draft_cost)
            self.policy = DraftLength(self.draft, prior_cost=0.05)
        self.timer = Timer()

    @property
    def max_draft(self) -> int:  # type: ignore[override]
        return self.draft

    def start(self, model, prompt: Sequence[int], cache, sampling=None) -> None:
        self._buffer = np.asarray(list(prompt), dtype=np.int64)
        self.timer.follow(sampling)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        started = time.perf_counter()
        if len(context) != self._buffer.size:  # extend the copy by what was accepted since
            grown = np.asarray(list(context[self._buffer.size:]), dtype=np.int64)
            self._buffer = np.concatenate([self._buffer, grown])
        if self.policy is not None:
            k = min(k, self.policy.length())
        draft = Draft(find_continuation(self._buffer, self.ngram, k).tolist() if k > 0 else [])
        self.timer.drafted(started)
        return draft

    def feedback(self, proposed: int, accepted: int) -> None:
        if self.policy is not None:
            self.timer.verified(self.policy, proposed)
            self.policy.update(proposed, accepted)


def _in_range(low: int, high: int):
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}, got {v}"


register(Technique(
    name="lookup",
    title="Prompt lookup decoding (arXiv 2304.04487)",
    summary="Draft the next tokens by finding the last few tokens earlier in the prompt or the "
    "output and copying what followed; one forward verifies them all (greedy output is identical "
    "to plain decoding).",
    hooks=("drafter",),
    options=(
        Option("ngram", int, 3, "Longest n-gram to match (tried down to 1).", check=_in_range(1, 64)),
        Option("draft", int, 8, "Tokens to propose at most per step.", check=_in_range(1, 128)),
        Option("fixed", bool, False, "Always propose as many tokens as the match offers (up to "
               "--lookup-draft); by default the length adapts to the measured acceptance rate "
               "and verify cost."),
    ),
    build=lambda ctx, o: {"drafter": PromptLookup(o["ngram"], o["draft"], adaptive=not o["fixed"])},
))
