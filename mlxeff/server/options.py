"""What one generation request asks for, checked once: sampling, stops, penalties, techniques.

``GenerationOptions`` is shared by ``mlxeff serve`` (built from an OpenAI request body) and
``mlxeff chat`` (built from its flags). Sampling values are checked by ``mlxeff.sampling``; the
penalties are mlx-lm's logits processors (``mlx_lm.sample_utils.make_logits_processors``: the
repetition penalty of CTRL, arXiv 1909.05858, and OpenAI's presence and frequency penalties) with
mlx-lm's names and context sizes; technique specs are checked by the registry.

Stop strings are matched on the detokenized text (``StopScanner``), not on token ids, so a stop
string is found however the tokenizer splits it. While streaming, text that could still turn into
a stop string is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import MlxeffError
from ..sampling import SamplingConfig

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class RequestError(MlxeffError, ValueError):
    """A request the server answers with 400: the message names the field and the problem."""


@dataclass
class GenerationOptions:
    """One request's settings. ``logprobs``: None for none, n >= 0 for the chosen token's
    log-probability plus the n most likely alternatives. ``techniques``: registry specs."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    logprobs: Optional[int] = None
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    presence_penalty: Optional[float] = None
    presence_context_size: int = 20
    frequency_penalty: Optional[float] = None
    frequency_context_size: int = 20
    logit_bias: Optional[Dict[int, float]] = None
    techniques: Dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        SamplingConfig(self.temp, self.top_p, self.top_k, self.min_p)  # raises SamplingError
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer of at least 1, got {self.max_tokens!r}")
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop strings must be non-empty text, got {list(self.stop)!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if self.repetition_penalty is not None and self.repetition_penalty < 0:
            raise RequestError(f"repetition_penalty must be at least 0 (0 or 1 turns it off), "
                               f"got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be between -2 and 2, got {value}")
        for name in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"{name} must be an integer of at least 1, got {value!r}")

    def logits_processors(self, vocab_size: int) -> List:
        """mlx-lm's processors for the penalties and the logit bias (empty when none is set)."""
        from mlx_lm.sample_utils import make_logits_processors

        if self.logit_bias:
            bad = [t for t in self.logit_bias if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(f"logit_bias names token {bad[0]}, outside the vocabulary "
                                   f"(0..{vocab_size - 1})")
        return make_logits_processors(
            self.logit_bias or None, self.repetition_penalty, self.repetition_context_size,
            self.presence_penalty, self.presence_context_size, self.frequency_penalty,
            self.frequency_context_size)


def stop_scan(text: str, stops: Sequence[str], start: int = 0) -> Tuple[Optional[int], int]:
    """(where the earliest stop string begins in ``text``, or None; how much of ``text`` is safe
    to emit). Matches beginning before ``start`` were ruled out by an earlier scan. Without a
    match, the safe length excludes the longest tail of ``text`` that begins some stop string."""
    if not stops:
        return None, len(text)
    longest = max(len(s) for s in stops)
    lo = max(0, start - longest + 1)
    hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
    if hits:
        return min(hits), min(hits)
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return None, len(text) - held


@dataclass
class StopScanner:
    """Feeds text segments in; says what may be emitted and whether a stop string was met."""

    stops: Tuple[str, ...]
    text: str = ""
    emitted: int = 0
    stopped_at: Optional[int] = None

    def add(self, segment: str) -> str:
        """Append a segment; return the newly safe text (empty while a stop could be forming)."""
        if self.stopped_at is not None:
            return ""
        before = len(self.text)
        self.text += segment
        hit, safe = stop_scan(self.text, self.stops, before)
        if hit is not None:
            self.stopped_at = hit
        return self._emit(safe)

    def flush(self) -> str:
        """At the end of generation: whatever was held back (no stop string can form any more)."""
        return self._emit(len(self.text) if self.stopped_at is None else self.stopped_at)

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return out

    @property
    def final_text(self) -> str:
        return self.text if self.stopped_at is None else self.text[: self.stopped_at]
