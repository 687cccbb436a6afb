"""One request's generation on top of ``mlxeff.stream_generate``: stops, logprobs, statistics.

``run`` turns a prompt (token ids) and ``GenerationOptions`` into ``Delta`` events (text that is
safe to show, plus per-token log-probabilities when asked) and one ``Finish`` (the whole text, the
finish reason, the ``usage`` statistics). It builds the technique hooks per request (hooks hold
per-generation state), adds mlx-lm's penalty processors, applies ``--max-kv-size`` through
``WindowedKVCache``, matches stop strings on the detokenized text and checks ``cancelled()``
between tokens, closing the engine's generator when it says so. The server and ``mlxeff chat``
both generate through it.

The prompt is processed in one go: a cancellation is noticed from the first token on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..generate import stats_dict, stream_generate
from .options import GenerationOptions, RequestError, StopScanner
from .window_cache import make_window_cache


@dataclass
class TokenLogprob:
    """A generated token, its log-probability and the ``top`` alternatives (id, text, logprob)."""

    token: int
    text: str
    logprob: float
    top: List[Tuple[int, str, float]] = field(default_factory=list)
    offset: int = 0  # where the token's text begins in the generated text


@dataclass
class Delta:
    text: str
    logprobs: List[TokenLogprob] = field(default_factory=list)


@dataclass
class Finish:
    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    usage: Dict[str, float]
    tokens: List[int] = field(default_factory=list)  # every token generated (EOS included)
    logprobs: List[TokenLogprob] = field(default_factory=list)


def technique_hooks(model, specs: Dict[str, dict], *, model_dir=None, step_size: Optional[int] = None) -> dict:
    """The engine hooks for ``specs`` (empty for none)."""
    if not specs:
        return {}
    from ..techniques.registry import build_hooks

    return build_hooks(model, specs, model_dir=model_dir, step_size=step_size)


def owns_cache(hooks: dict) -> bool:
    """Whether a technique replaces the prefill or the decode step (and so makes its own cache)."""
    return hooks.get("prefill") is not None or hooks.get("decode") is not None


def cache_owner(specs: Dict[str, dict]) -> Optional[str]:
    """The flag of the first technique in ``specs`` that makes its own cache, or None."""
    from ..techniques.registry import get

    for name in specs:
        t = get(name)
        if "prefill" in t.hooks or "decode" in t.hooks:
            return t.flag
    return None


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _logprob_entry(tokenizer, token: int, row: mx.array, top_n: int, offset: int,
                   text: str) -> TokenLogprob:
    """The token's entry; its ``text`` is what it added to the output (the detokenizer's segment:
    a token that ends inside a UTF-8 character adds nothing and the next adds the character), so
    the entries' texts join to the output; alternatives are decoded on their own."""
    chosen = row[token].item()
    top: List[Tuple[int, str, float]] = []
    if top_n > 0:
        idx = mx.argpartition(-row, top_n - 1)[:top_n]
        vals = row[idx]
        order = mx.argsort(-vals)
        for i, v in zip(idx[order].tolist(), vals[order].tolist()):
            top.append((int(i), _token_text(tokenizer, int(i)), float(v)))
    return TokenLogprob(token, text, float(chosen), top, offset)


def run(model, tokenizer, prompt: Sequence[int], options: GenerationOptions, *, model_dir=None,
        prefill_step_size: Optional[int] = None, max_kv_size: Optional[int] = None,
        prompt_cache: Optional[list] = None,
        cancelled: Callable[[], bool] = lambda: False) -> Iterator:
    """Yield ``Delta``s and, last, a ``Finish`` (see the module docstring). ``prompt_cache``
    (already holding the tokens before ``prompt``) is extended in place; with ``max_kv_size`` and
    no ``prompt_cache`` a windowed cache is made."""
    hooks = technique_hooks(model, options.techniques, model_dir=model_dir, step_size=prefill_step_size)
    attention = hooks.pop("attention", None)
    if owns_cache(hooks) and (max_kv_size or prompt_cache is not None):
        owner = cache_owner(options.techniques) or "this technique"
        what = "--max-kv-size" if max_kv_size else "a reused prompt cache"
        raise RequestError(f"{owner} keeps its own cache and cannot run with {what}")
    if prompt_cache is None and max_kv_size:
        prompt_cache = make_window_cache(model, max_kv_size)
    processors = options.logits_processors(model.args.vocab_size)
    scanner = StopScanner(options.stop)
    tokens: List[int] = []
    entries: List[TokenLogprob] = []
    released = 0
    mx.reset_peak_memory()
    steps = stream_generate(
        model, tokenizer, mx.array(list(prompt), dtype=mx.uint32), options.max_tokens,
        temp=options.temp, top_p=options.top_p, top_k=options.top_k, min_p=options.min_p,
        seed=options.seed, prefill_step_size=prefill_step_size, attention=attention,
        prompt_cache=prompt_cache, logits_processors=processors or None, **hooks)
    last, reason = None, "length"
    try:
        for last in steps:
            tokens.append(last.token)
            offset = len(scanner.text)
            if options.logprobs is not None and last.token not in tokenizer.eos_token_ids:
                entries.append(_logprob_entry(tokenizer, last.token, last.logprobs,
                                              options.logprobs, offset, last.text))
            text = scanner.add(last.text)
            if scanner.stopped_at is not None:
                reason = "stop"
                break
            if last.finish_reason is not None:
                reason = last.finish_reason
                text += scanner.flush()
                break
            if cancelled():
                reason = "cancelled"
                break
            fresh = [e for e in entries[released:] if e.offset < scanner.emitted]
            released += len(fresh)
            if text or fresh:
                yield Delta(text, fresh)
        else:
            text = ""
    finally:
        steps.close()
    end = scanner.stopped_at if scanner.stopped_at is not None else len(scanner.text)
    kept = [e for e in entries if e.offset < end]
    tail = kept[released:]
    if reason != "cancelled" and (text or tail):
        yield Delta(text, tail)
    usage = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
             "total_tokens": len(prompt) + len(tokens)}
    if last is not None:
        stats = stats_dict(last)
        for key in ("prompt_tokens", "generation_tokens", "finish_reason"):
            stats.pop(key, None)
        if hooks.get("drafter") is None:
            for key in ("decode_forwards", "drafted_tokens", "accepted_tokens", "acceptance_rate",
                        "tokens_per_forward"):
                stats.pop(key, None)
        usage.update(stats)
    yield Finish(scanner.final_text, reason, usage, tokens, kept)
