"""Scorers for generated answers, and 95% intervals for accuracies.

- ``normalize``: lower case, punctuation (Unicode category P) and quotes removed, whitespace
  collapsed; with ``drop_articles`` also the words a/an/the, as SQuAD's answer normalization
  (Rajpurkar et al., arXiv 1606.05250), which Lost in the Middle's NQ scorer uses. The synthetic
  tasks keep articles: "the" can be the word that follows a phrase.
- ``exact_match``: the normalized prediction equals a normalized gold answer.
- ``contains_match``: a normalized gold answer occurs in the normalized prediction, on word
  boundaries (Lost in the Middle's "best subspan" exact match).
- ``token_accuracy``: the fraction of reference tokens the generation reproduces at the same
  position (missing tokens count as wrong; tokens beyond the reference are ignored).
- ``wilson_interval``: the Wilson score interval (Wilson, JASA 1927) of a binomial proportion; it
  stays inside [0, 1] and is sensible at 0% and 100%, where the normal approximation collapses.
- For copy's token accuracy (a mean of per-item values in [0, 1], whose tokens are not independent
  trials) the same Wilson interval is taken with the mean as the proportion and the items as the
  trials: a [0, 1]-valued variable of mean m has variance at most m(1 - m), so this is conservative,
  and unlike mean +- 1.96 sd / sqrt(n) it does not collapse to a point when every item scores alike.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Iterable, Sequence, Tuple

Z95 = 1.959963984540054


def normalize(text: str, drop_articles: bool = False) -> str:
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    if drop_articles:
        text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Iterable[str], drop_articles: bool = False) -> bool:
    pred = normalize(prediction, drop_articles)
    return any(pred == normalize(a, drop_articles) for a in answers)


def contains_match(prediction: str, answers: Iterable[str], drop_articles: bool = False) -> bool:
    pred = f" {normalize(prediction, drop_articles)} "
    for a in answers:
        gold = normalize(a, drop_articles)
        if gold and f" {gold} " in pred:
            return True
    return False


def token_accuracy(generated: Sequence[int], reference: Sequence[int]) -> float:
    if not reference:
        raise ValueError("the reference is empty")
    return sum(int(g == r) for g, r in zip(generated, reference)) / len(reference)


def wilson_interval(successes: float, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval of ``successes`` out of ``n`` (a fractional count: see above)."""
    if n <= 0:
        raise ValueError("no trials")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)
