"""Superposition prompting's fork-join graph as data: segments, positions, masks, path scores.

Pure functions (numpy, exact fractions) used by ``mlxeff.techniques.superposition``; the module
docstring there states the rules and cites the paper (arXiv 2404.06910). Nothing here runs the
model.

The graph: a preamble; ``n`` document paths forking from it; a copy of the query after each
document; the response joining the paths that are kept. Serialised (the single-pass order):
``[preamble][doc 1][query 1][doc 2][query 2] ... [doc n][query n]``, then the response after the
kept paths only.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import numpy as np

POSITION_RULES = ("equilibrium", "left")


@dataclass(frozen=True)
class Layout:
    """The RoPE position of every token of the graph (float64; integral where the rule gives
    integers). Every query copy shares ``query``'s positions."""

    preamble: np.ndarray
    documents: Tuple[np.ndarray, ...]
    query: np.ndarray
    response: np.ndarray
    rule: str

    @property
    def integral(self) -> bool:
        """Whether every position is an integer (one document, equal lengths, or left-aligned)."""
        return all(_is_integral(p) for p in (self.preamble, self.query, self.response, *self.documents))

    @property
    def query_start(self) -> float:
        return float(self.query[0])


def _is_integral(p: np.ndarray) -> bool:
    return bool(np.all(p == np.round(p)))


def harmonic_mean(lengths: Sequence[int]) -> Fraction:
    """The harmonic mean of the document lengths, exactly."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"document lengths must be positive, got {list(lengths)}")
    return Fraction(len(lengths)) / sum(Fraction(1, int(n)) for n in lengths)


def _fractions(start: Fraction, step: Fraction, n: int) -> np.ndarray:
    """``start + step * j`` for ``j < n``: exact integers where start and step are integers (one
    document, equal lengths), within an ulp of the exact value otherwise."""
    return float(start) + float(step) * np.arange(n, dtype=np.float64)


def layout(rule: str, preamble: int, documents: Sequence[int], query: int, response: int) -> Layout:
    """Positions for a preamble of ``preamble`` tokens, documents of the given lengths, a query of
    ``query`` tokens (one copy per path) and a response prefix of ``response`` tokens.

    ``equilibrium`` (the official code's rule): with ``H`` the harmonic mean of the document
    lengths, document ``i`` (``l_i`` tokens) takes ``P + (H / l_i) * j``, ``j = 0 .. l_i - 1``, so
    every document spans ``[P, P + H)``; the query copies take ``P + H + j``; the response
    ``P + H + m + j``. ``left``: documents at ``P + j`` (left-aligned), the queries after the
    longest document, ``P + max(l) + j``.
    """
    if rule not in POSITION_RULES:
        raise ValueError(f"unknown position rule {rule!r} (one of {', '.join(POSITION_RULES)})")
    if query < 1 or response < 1 or preamble < 1:
        raise ValueError("the preamble, the query and the response need at least one token each")
    P = Fraction(preamble)
    if rule == "equilibrium":
        H = harmonic_mean(documents)
        docs = tuple(_fractions(P, H / n, n) for n in documents)
    else:
        H = Fraction(max(documents)) if documents else Fraction(0)
        docs = tuple(_fractions(P, Fraction(1), n) for n in documents)
    q0 = P + H
    return Layout(_fractions(Fraction(0), Fraction(1), preamble), docs,
                  _fractions(q0, Fraction(1), query), _fractions(q0 + query, Fraction(1), response), rule)


# ---- segments and the fork-join mask ------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """Rows ``start .. stop - 1`` of a serialised graph: the preamble, a path's document or query
    copy, or the response."""

    kind: str  # "preamble" | "document" | "query" | "response"
    path: Optional[int]
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def serialize(preamble: int, documents: Sequence[int], query: int,
              kept: Optional[Sequence[int]] = None, response: int = 0) -> List[Segment]:
    """Segments in the single-pass order; with ``kept`` only those paths (in order), and a
    response of ``response`` tokens at the end."""
    out, s = [Segment("preamble", None, 0, preamble)], preamble
    for i in (range(len(documents)) if kept is None else kept):
        out.append(Segment("document", i, s, s + documents[i]))
        s += documents[i]
        out.append(Segment("query", i, s, s + query))
        s += query
    if response:
        out.append(Segment("response", None, s, s + response))
    return out


def sees(row: Segment, col: Segment) -> bool:
    """Whether ``row``'s tokens may attend to ``col``'s (other than itself): its ancestors."""
    if col.kind == "preamble":
        return row.kind != "preamble"
    if row.kind == "query":
        return col.kind == "document" and col.path == row.path
    if row.kind == "response":
        return col.kind in ("document", "query")
    return False


def forkjoin_mask(segments: Sequence[Segment]) -> np.ndarray:
    """Boolean (S, S): token r attends to token c when c's segment is an ancestor of r's, or both
    are in one segment and c <= r."""
    S = segments[-1].stop
    mask = np.zeros((S, S), dtype=bool)
    for a in segments:
        mask[a.start:a.stop, a.start:a.stop] = np.tril(np.ones((a.size, a.size), dtype=bool))
        for b in segments:
            if b is not a and sees(a, b):
                mask[a.start:a.stop, b.start:b.stop] = True
    return mask


def positions_of(segments: Sequence[Segment], lay: Layout) -> np.ndarray:
    """The position of every serialised token."""
    parts = []
    for s in segments:
        parts.append({"preamble": lay.preamble, "query": lay.query, "response": lay.response}.get(
            s.kind) if s.kind != "document" else lay.documents[s.path])
    return np.concatenate(parts)


# ---- path scores and pruning ------------------------------------------------------------------

def top_k(scores: Sequence[float], k: int) -> List[int]:
    """The ``k`` best paths in their original order (ties: the earlier path wins)."""
    s = np.asarray(scores, dtype=np.float64)
    if not 1 <= k <= s.size:
        raise ValueError(f"top-k {k} is outside 1..{s.size}")
    order = np.argsort(-s, kind="stable")
    return sorted(int(i) for i in order[:k])


def soft_bias(scores: Sequence[float], kept: Sequence[int], temperature: float) -> np.ndarray:
    """The official code's attenuation for the kept paths: ``log softmax(w / T)`` shifted so the
    best kept path gets 0, i.e. ``(w_i - max_kept w) / T`` (added to the response's attention
    logits over the path's tokens)."""
    w = np.asarray(scores, dtype=np.float64)[list(kept)]
    return (w - w.max()) / float(temperature)
