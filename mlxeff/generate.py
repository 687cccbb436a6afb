"""Prefill/decode engine, sampling, streaming and statistics.

The engine is mlx-lm's ``generate_step`` loop (chunked prefill, KV cache, one decode step computed
ahead of the token being yielded) with three explicit hooks a technique can plug into:

- ``prefill``: a ``PrefillStrategy`` that fills the cache from the prompt and returns the logits of
  the last prompt position (KV Prediction, LazyLLM);
- ``decode``: a ``DecodeStrategy`` that runs one token through the model (LazyLLM's revival,
  early exit);
- ``attention``: an attention function installed on every layer for the duration of the call
  (pruned attention, superposition).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

Sampler = Callable[[mx.array], mx.array]


class PrefillStrategy:
    """Fills ``cache`` from ``prompt`` (1-D token ids) and returns the last position's logits (1, V)."""

    def make_cache(self, model: nn.Module) -> list:
        return model.make_cache()

    def __call__(self, model: nn.Module, prompt: mx.array, cache: list) -> mx.array:
        raise NotImplementedError


@dataclass
class ChunkedPrefill(PrefillStrategy):
    """The baseline: all but the last prompt token in chunks of ``step_size`` tokens, evaluated
    chunk by chunk (only the cache, so no chunk computes logits), then the last token alone, so the
    output head runs for one position (as mlx-lm's ``generate_step`` does)."""

    step_size: int = 512

    def __call__(self, model, prompt, cache):
        while prompt.size > 1:
            n = min(self.step_size, prompt.size - 1)
            model(prompt[:n][None], cache=cache)
            mx.eval([c.state for c in cache])
            prompt = prompt[n:]
            mx.clear_cache()
        return model(prompt[None], cache=cache)[:, -1, :]


class DecodeStrategy:
    """Runs one token (shape (1,)) through the model and returns its logits (1, V)."""

    def __call__(self, model: nn.Module, token: mx.array, cache: list) -> mx.array:
        return model(token[None], cache=cache)[:, -1, :]


@dataclass
class GenerationResponse:
    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    ttft: float  # seconds from the call to the first token
    finish_reason: Optional[str] = None


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[Callable]] = None,
    prompt_cache: Optional[list] = None,
    prefill: Optional[PrefillStrategy] = None,
    decode: Optional[DecodeStrategy] = None,
) -> Generator[tuple, None, None]:
    """Yield ``(token, logprobs)`` pairs; ``max_tokens=-1`` never stops by itself."""
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    prefill = prefill or ChunkedPrefill()
    decode = decode or DecodeStrategy()
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    cache = prompt_cache if prompt_cache is not None else prefill.make_cache(model)
    tokens = prompt

    def sample(logits):
        nonlocal tokens
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
                next_y, next_logprobs = sample(decode(model, y, cache))
            mx.async_eval(next_y, next_logprobs)
        if n == 0:
            mx.eval(y)
        if n == max_tokens:
            break
        yield y.item(), logprobs
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs
        n += 1


def encode_prompt(tokenizer: TokenizerWrapper, prompt: Union[str, Sequence[int], mx.array]) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        add_special = bos is None or not prompt.startswith(bos)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return mx.array(list(prompt), dtype=mx.uint32)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    *,
    sampler: Optional[Sampler] = None,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    attention: Optional[Callable] = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Stream ``GenerationResponse``s: text segments plus running statistics.

    ``kwargs`` go to ``generate_step`` (``prefill``, ``decode``, ``prompt_cache``,
    ``logits_processors``). ``attention`` replaces every layer's attention during the call.
    """
    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (-1 for no limit)")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if seed is not None:
        mx.random.seed(seed)
    if sampler is None:
        sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    if attention is not None:
        model.set_attention(attention)
    try:
        with wired_limit(model, [generation_stream]):
            tic = time.perf_counter()
            ids = encode_prompt(tokenizer, prompt)
            steps = generate_step(ids, model, max_tokens=max_tokens, sampler=sampler, **kwargs)
            token, logprobs, n = None, None, 0
            ttft = prompt_tps = 0.0
            for n, (token, logprobs) in enumerate(steps):
                if n == 0:
                    ttft = time.perf_counter() - tic
                    prompt_tps = ids.size / ttft
                    tic = time.perf_counter()
                if token in tokenizer.eos_token_ids:
                    break
                detokenizer.add_token(token)
                if n + 1 == max_tokens:
                    break
                yield GenerationResponse(
                    detokenizer.last_segment, token, logprobs, ids.size, prompt_tps, n + 1,
                    (n + 1) / (time.perf_counter() - tic), mx.get_peak_memory() / 1e9, ttft,
                )
            detokenizer.finalize()
            finished = token in tokenizer.eos_token_ids
            yield GenerationResponse(
                detokenizer.last_segment, token, logprobs, ids.size, prompt_tps, n + 1,
                (n + 1) / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9, ttft,
                "stop" if finished else "length",
            )
    finally:
        if attention is not None:
            model.set_attention(None)


def format_stats(r: GenerationResponse) -> str:
    """The statistics lines ``mlx_lm.generate`` prints, plus time to first token."""
    return (
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {r.peak_memory:.3f} GB\n"
        f"Time to first token: {r.ttft:.3f} s"
    )


def stats_dict(r: GenerationResponse) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "prompt_tps": r.prompt_tps,
        "generation_tokens": r.generation_tokens,
        "generation_tps": r.generation_tps,
        "peak_memory_gb": r.peak_memory,
        "ttft_s": r.ttft,
        "finish_reason": r.finish_reason,
    }


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """Generate a complete response; with ``verbose`` stream it and print the statistics."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose and last is not None:
        print("\n" + "=" * 10 + "\n" + format_stats(last))
    return text
