import mlx.core as mx
import numpy as np
import pytest

import mlxeff
from conftest import make_model, tiny_args
from mlxeff.generate import ChunkedPrefill, DecodeStrategy, PrefillStrategy, generate_step


def greedy_reference(model, prompt, n):
    """Greedy decoding by full forward passes over the growing sequence (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[len(prompt):]


def test_engine_equals_full_forward_greedy():
    model = make_model()
    prompt = [1, 7, 3, 55, 21, 9, 14, 2, 88, 41, 17]
    for step in (3, 4, 512):  # chunked prefill must not change the result
        got = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=12,
                                           prefill=ChunkedPrefill(step))]
        assert got == greedy_reference(model, prompt, 12)


def test_hooks_are_called():
    model = make_model()
    seen = {"prefill": 0, "decode": 0}

    class CountingPrefill(ChunkedPrefill):
        def __call__(self, model, prompt, cache):
            seen["prefill"] += 1
            return super().__call__(model, prompt, cache)

    class CountingDecode(DecodeStrategy):
        def __call__(self, model, token, cache):
            seen["decode"] += 1
            return super().__call__(model, token, cache)

    out = list(generate_step(mx.array([1, 2, 3]), model, max_tokens=5,
                             prefill=CountingPrefill(), decode=CountingDecode()))
    assert len(out) == 5 and seen["prefill"] == 1 and seen["decode"] >= 4


def test_stream_generate_stats_and_eos(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    model = make_model(tiny_args(vocab_size=vocab))
    responses = list(mlxeff.stream_generate(model, tiny_tokenizer, "Once upon a time", max_tokens=8))
    last = responses[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.prompt_tokens == len(tiny_tokenizer.encode("Once upon a time"))
    assert last.generation_tokens <= 8 and last.ttft > 0 and last.generation_tps > 0
    text = mlxeff.generate(model, tiny_tokenizer, "Once upon a time", max_tokens=8)
    assert text == "".join(r.text for r in responses)


def test_sampling_is_seeded(tiny_tokenizer):
    model = make_model(tiny_args(vocab_size=len(tiny_tokenizer)))
    kw = dict(max_tokens=10, temp=1.0, top_p=0.9)
    a = mlxeff.generate(model, tiny_tokenizer, "Once", seed=3, **kw)
    b = mlxeff.generate(model, tiny_tokenizer, "Once", seed=3, **kw)
    assert a == b


def test_mlx_lm_stream_generate_runs_on_mlxeff_model(tiny_tokenizer):
    from mlx_lm import stream_generate as lm_stream

    model = make_model(tiny_args(vocab_size=len(tiny_tokenizer)))
    prompt = tiny_tokenizer.encode("Once upon a time")
    lm = [r.token for r in lm_stream(model, tiny_tokenizer, prompt, max_tokens=6)]
    ours = [r.token for r in mlxeff.stream_generate(model, tiny_tokenizer, prompt, max_tokens=6)]
    assert lm == ours and len(lm) >= 1


def test_empty_prompt_rejected():
    with pytest.raises(ValueError, match="empty"):
        next(generate_step(mx.array([], dtype=mx.uint32), make_model()))
