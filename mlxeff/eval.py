"""Evaluation: perplexity, continuation scoring, zero-shot tasks, agreement with a reference.

- ``perplexity``: sliding windows of ``window`` tokens whose starts are ``stride`` apart; each
  token (but the first, which has no context) is scored exactly once, by the first window that
  contains it as a target, so it sees up to ``window - 1`` tokens of context (at least
  ``window - stride`` after the first window); ``stride < window`` is required.
- ``continuation_logprob``: sum of log p(continuation | context).
- ``multiple_choice``: {query, choices, gold} items scored by the log-probability of each choice
  after the query (accuracy) and by that log-probability per character of the choice
  (``accuracy_norm``, as the lm-eval-harness's acc_norm).
- ``lambada``: last-word accuracy: every continuation token must be the greedy argmax.
- ``greedy_tokens`` runs the generation engine (so prefill/decode/attention hooks apply);
  ``greedy_agreement`` is the position-wise match fraction of two token lists and
  ``prefix_agreement`` the fraction of identical leading tokens (both over the shorter length).

Long loops report through ``mlxeff.progress.bar`` (``progress=None``: a bar when stderr is a
terminal). Generation tasks (multi-document QA, key-value retrieval, copy, ...) live in
``mlxeff.tasks``.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import MlxeffError
from .progress import bar


def _token_logprobs(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    logits = model(inputs).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - lse


def perplexity(model: nn.Module, tokens, window: int = 512, stride: Optional[int] = None,
               batch_size: int = 16, progress: Optional[bool] = None) -> Dict[str, float]:
    """Sliding-window perplexity of a 1-D token sequence (see the module docstring); ``progress``
    shows a bar over the windows (None: when stderr is a terminal)."""
    tokens = np.asarray(tokens)
    if window < 2:
        raise MlxeffError(f"window must be at least 2, got {window}")
    stride = max(window // 2, 1) if stride is None else stride
    if not 1 <= stride < window:
        # A window's first token is only context; a stride of `window` would never score it.
        raise MlxeffError(f"stride must be between 1 and window - 1 ({window - 1}), got {stride}")
    n = len(tokens)
    if n < 2:
        raise MlxeffError(f"need at least 2 tokens to score, got {n}")
    # (start, first scored target index) for each window; targets are absolute positions.
    spans = []
    frontier, begin = 1, 0
    while True:
        end = min(begin + window, n)
        spans.append((begin, end, frontier))
        frontier = end
        if end == n:
            break
        begin += stride
    total, count = 0.0, 0
    full = [s for s in spans if s[1] - s[0] == window]
    rest = [s for s in spans if s[1] - s[0] != window]
    with bar(total=len(spans), desc="perplexity", unit="window", show=progress) as pbar:
        for group in (full, rest):
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                batch = mx.array(np.stack([tokens[b:e] for b, e, _ in chunk]).astype(np.int32))
                lp = _token_logprobs(model, batch[:, :-1], batch[:, 1:])
                # target j of a window starting at b is position b + 1 + j
                offs = np.array([f - b - 1 for b, _, f in chunk])
                mask = mx.array(np.arange(batch.shape[1] - 1)[None, :] >= offs[:, None])
                total += float((lp * mask).sum().item())
                count += int(mask.sum().item())
                pbar.update(len(chunk))
    nll = -total / count
    return {"tokens": count, "nll": nll, "ppl": math.exp(min(nll, 700.0)), "window": window,
            "stride": stride}


def continuation_logprob(model: nn.Module, context_ids: Sequence[int],
                         continuation_ids: Sequence[int]) -> float:
    """log p(continuation | context), summed over the continuation's tokens."""
    lp, _ = _continuation_scores(model, context_ids, continuation_ids)
    return lp


def _continuation_scores(model, context_ids, continuation_ids):
    context_ids, continuation_ids = list(context_ids), list(continuation_ids)
    if not context_ids or not continuation_ids:
        raise MlxeffError("context and continuation must both be non-empty")
    seq = mx.array([context_ids + continuation_ids], dtype=mx.int32)
    logits = model(seq[:, :-1]).astype(mx.float32)[0, len(context_ids) - 1:]
    targets = mx.array(continuation_ids, dtype=mx.int32)
    lp = logits[mx.arange(len(continuation_ids)), targets] - mx.logsumexp(logits, axis=-1)
    greedy = mx.all(mx.argmax(logits, axis=-1) == targets)
    return float(lp.sum().item()), bool(greedy.item())


def _split_space(context: str, continuation: str):
    """Byte-level BPE attaches a space to the following word: move trailing spaces over."""
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped):] + continuation


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _total(items, limit: Optional[int]) -> Optional[int]:
    n = len(items) if hasattr(items, "__len__") else None
    return limit if n is None else (n if limit is None else min(n, limit))


def multiple_choice(model: nn.Module, tokenizer, items: Iterable[dict], delimiter: str = " ",
                    limit: Optional[int] = None, progress: Optional[bool] = None) -> Dict[str, float]:
    """Zero-shot accuracy on {query, choices, gold} items (``correct``/``correct_norm``: counts)."""
    correct = correct_norm = n = 0
    with bar(total=_total(items, limit), desc="multiple choice", unit="item", show=progress) as pbar:
        for item in items:
            if limit is not None and n >= limit:
                break
            try:
                query, choices, gold = item["query"], item["choices"], int(item["gold"])
            except (KeyError, TypeError, ValueError):
                raise MlxeffError(f"item {n}: expected fields query, choices, gold") from None
            scores, norms = [], []
            for choice in choices:
                ctx, cont = _split_space(query + delimiter, choice)
                lp, _ = _continuation_scores(model, _encode(tokenizer, ctx), _encode(tokenizer, cont))
                scores.append(lp)
                norms.append(lp / max(len(choice), 1))
            correct += int(np.argmax(scores) == gold)
            correct_norm += int(np.argmax(norms) == gold)
            n += 1
            pbar.update(1)
    if n == 0:
        raise MlxeffError("no items to score")
    return {"items": n, "accuracy": correct / n, "accuracy_norm": correct_norm / n,
            "correct": correct, "correct_norm": correct_norm}


def lambada(model: nn.Module, tokenizer, items: Iterable[dict], limit: Optional[int] = None,
            progress: Optional[bool] = None) -> Dict[str, float]:
    """Last-word accuracy and mean log-probability on {context, continuation} items."""
    correct = n = 0
    total_lp = 0.0
    with bar(total=_total(items, limit), desc="lambada", unit="item", show=progress) as pbar:
        for item in items:
            if limit is not None and n >= limit:
                break
            try:
                context, continuation = item["context"], item["continuation"]
            except (KeyError, TypeError):
                raise MlxeffError(f"item {n}: expected fields context, continuation") from None
            ctx, cont = _split_space(context + " ", continuation.strip())
            lp, greedy = _continuation_scores(model, _encode(tokenizer, ctx), _encode(tokenizer, cont))
            correct += int(greedy)
            total_lp += lp
            n += 1
            pbar.update(1)
    if n == 0:
        raise MlxeffError("no items to score")
    return {"items": n, "accuracy": correct / n, "mean_logprob": total_lp / n, "correct": correct}


def greedy_tokens(model: nn.Module, prompt_ids: Sequence[int], n: int, **generate_kwargs) -> List[int]:
    """``n`` greedy tokens after ``prompt_ids`` through the generation engine (EOS does not stop
    it); ``generate_kwargs`` go to ``mlxeff.generate.generate_step`` (prefill, decode, ...)."""
    from .generate import generate_step

    if n < 1:
        raise MlxeffError(f"n must be at least 1, got {n}")
    prompt = mx.array(list(prompt_ids), dtype=mx.uint32)
    out = []
    for token, _ in generate_step(prompt, model, max_tokens=n, **generate_kwargs):
        out.append(int(token))
    return out


def greedy_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions (over the shorter list) where ``a`` and ``b`` hold the same token."""
    n = min(len(a), len(b))
    if n == 0:
        return 1.0 if len(a) == len(b) else 0.0
    return sum(int(x == y) for x, y in zip(a[:n], b[:n])) / n


def prefix_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of the shorter list covered by the leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 1.0 if len(a) == len(b) else 0.0
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k / n
