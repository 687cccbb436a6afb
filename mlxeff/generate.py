"""Generation for users: ``stream_generate`` / ``generate``, statistics, techniques by name.

``stream_generate(model, tokenizer, prompt, techniques={"lazy": {...}, "lookup": {}})`` builds the
engine's hooks from the technique registry (``mlxeff.techniques.registry``: the library decides
what composes), validates the sampling values (``mlxeff.sampling``) and streams
``GenerationResponse``s with mlx-lm's statistics plus time to first token and, when a drafter
runs, accepted tokens per forward. The engine itself is ``mlxeff.engine``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Generator, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .engine import (  # noqa: F401  (the engine's parts are part of this module's API)
    ChunkedPrefill, DecodeStats, DecodeStrategy, Draft, Drafter, PrefillStrategy, generate_step,
)
from .errors import MlxeffError
from .sampling import Sampler, SamplingConfig


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
    decode: Optional[DecodeStats] = None  # forwards, drafted and accepted tokens


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
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    techniques: Optional[Dict[str, dict]] = None,
    model_dir=None,
    prefill_step_size: Optional[int] = None,
    attention: Optional[Callable] = None,
    **hooks,
) -> Generator[GenerationResponse, None, None]:
    """Stream ``GenerationResponse``s: text segments plus running statistics.

    ``techniques`` maps registry names to their options (``mlxeff.techniques.registry``);
    ``model_dir`` lets a technique find artifacts saved beside the model. ``hooks`` go to
    ``generate_step`` as they are (``prefill``, ``decode``, ``drafter``, ``prompt_cache``,
    ``logits_processors``); a hook given both ways is an error. ``attention`` replaces every
    layer's attention during the call (the previous one is restored afterwards).
    """
    if max_tokens == 0 or (isinstance(max_tokens, int) and max_tokens < -1):
        raise MlxeffError(f"--max-tokens must be at least 1 (or -1 for no limit), got {max_tokens}")
    sampling = SamplingConfig(temp, top_p, top_k, min_p)
    if techniques:
        from .techniques.registry import build_hooks

        built = build_hooks(model, techniques, model_dir=model_dir, step_size=prefill_step_size)
        both = sorted(set(built) & {k for k, v in hooks.items() if v is not None})
        if both:
            raise MlxeffError(f"the {both[0]} hook is given both by a technique and directly")
        attention = built.pop("attention", attention)
        hooks.update(built)
    hooks.setdefault("prefill", None)
    if hooks["prefill"] is None:
        hooks["prefill"] = ChunkedPrefill(prefill_step_size)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    ids = encode_prompt(tokenizer, prompt)
    if ids.size == 0:
        raise MlxeffError("the prompt is empty")
    if seed is not None:
        mx.random.seed(seed)
    stats = DecodeStats()
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    previous = model.set_attention(attention) if attention is not None else None
    try:
        with wired_limit(model, [generation_stream]):
            tic = time.perf_counter()
            steps = generate_step(ids, model, max_tokens=max_tokens, sampler=sampler,
                                  sampling=None if sampler is not None else sampling, stats=stats,
                                  **hooks)
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
                    decode=stats,
                )
            detokenizer.finalize()
            finished = token in tokenizer.eos_token_ids
            yield GenerationResponse(
                detokenizer.last_segment, token, logprobs, ids.size, prompt_tps, n + 1,
                (n + 1) / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9, ttft,
                "stop" if finished else "length", decode=stats,
            )
    finally:
        if attention is not None:
            model.set_attention(previous)


def format_stats(r: GenerationResponse) -> str:
    """The statistics lines ``mlx_lm.generate`` prints, plus time to first token and, when a
    drafter ran, how many drafted tokens were accepted."""
    lines = [
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec",
        f"Peak memory: {r.peak_memory:.3f} GB",
        f"Time to first token: {r.ttft:.3f} s",
    ]
    if r.decode is not None and r.decode.drafted:
        d = r.decode
        lines.append(f"Drafts: {d.accepted}/{d.drafted} accepted ({100 * d.acceptance_rate:.1f}%), "
                     f"{d.tokens_per_forward:.2f} tokens per forward")
    return "\n".join(lines)


def stats_dict(r: GenerationResponse) -> dict:
    out = {
        "prompt_tokens": r.prompt_tokens,
        "prompt_tps": r.prompt_tps,
        "generation_tokens": r.generation_tokens,
        "generation_tps": r.generation_tps,
        "peak_memory_gb": r.peak_memory,
        "ttft_s": r.ttft,
        "finish_reason": r.finish_reason,
    }
    if r.decode is not None:
        out.update(decode_forwards=r.decode.forwards, drafted_tokens=r.decode.drafted,
                   accepted_tokens=r.decode.accepted, acceptance_rate=r.decode.acceptance_rate,
                   tokens_per_forward=r.decode.tokens_per_forward)
    return out


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
