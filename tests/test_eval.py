"""Perplexity windows, continuation scoring, zero-shot scorers, greedy agreement, `mlxeff eval`."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import SHARED_DATA, make_model, tiny_args

from mlxeff import eval as ev
from mlxeff.errors import MlxeffError


@pytest.fixture(scope="module")
def model():
    return make_model(tiny_args(vocab_size=96), seed=1)


def brute_force_nll(model, tokens, window, stride):
    """Each token t >= 1 scored once, with the context its first covering window gives it."""
    tokens = [int(t) for t in tokens]
    scored, total, begin, frontier = 0, 0.0, 0, 1
    while True:
        end = min(begin + window, len(tokens))
        for t in range(frontier, end):
            ctx = tokens[begin:t]
            logits = model(mx.array([ctx]))[0, -1].astype(mx.float32)
            total += (mx.logsumexp(logits) - logits[tokens[t]]).item()
            scored += 1
        frontier = end
        if end == len(tokens):
            return scored, total / scored
        begin += stride


@pytest.mark.parametrize("window,stride", [(16, 8), (16, 15), (16, 1), (64, 32)])
def test_perplexity_scores_each_token_once(model, window, stride):
    tokens = np.random.default_rng(0).integers(3, 96, size=41)
    res = ev.perplexity(model, tokens, window=window, stride=stride, batch_size=3)
    n, nll = brute_force_nll(model, tokens, window, stride)
    assert res["tokens"] == n == 40
    assert res["nll"] == pytest.approx(nll, rel=1e-4)
    assert res["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_perplexity_bad_arguments(model):
    with pytest.raises(MlxeffError, match="stride"):
        ev.perplexity(model, np.arange(10), window=8, stride=8)
    with pytest.raises(MlxeffError, match="at least 2 tokens"):
        ev.perplexity(model, np.arange(1), window=8)


def test_continuation_logprob_matches_full_forward(model):
    ctx, cont = [5, 6, 7, 8], [9, 10, 11]
    seq = mx.array([ctx + cont])
    logits = model(seq)[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ref = sum(logp[len(ctx) - 1 + i, c].item() for i, c in enumerate(cont))
    assert ev.continuation_logprob(model, ctx, cont) == pytest.approx(ref, abs=1e-4)


def test_greedy_tokens_and_agreement(model):
    prompt = [4, 5, 6]
    got = ev.greedy_tokens(model, prompt, 8)
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    assert got == seq[3:]
    assert ev.greedy_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == 0.75
    assert ev.prefix_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == 0.25
    assert ev.greedy_agreement([1, 2], [1, 2, 3]) == 1.0 and ev.prefix_agreement([], []) == 1.0


def test_multiple_choice_and_lambada(tiny_tokenizer):
    m = make_model(tiny_args(vocab_size=len(tiny_tokenizer)), seed=2)
    items = [{"query": "Once upon a", "choices": ["time", "forest", "girl"], "gold": 0},
             {"query": "the little", "choices": ["girl", "village"], "gold": 1}]
    res = ev.multiple_choice(m, tiny_tokenizer, items)
    # The scorer's pick must be the argmax of continuation_logprob with the space moved over.
    right = 0
    for it in items:
        ctx = tiny_tokenizer.encode(it["query"], add_special_tokens=False)
        lps = [ev.continuation_logprob(m, ctx, tiny_tokenizer.encode(" " + c, add_special_tokens=False))
               for c in it["choices"]]
        right += int(np.argmax(lps) == it["gold"])
    assert res["items"] == 2 and res["accuracy"] == right / 2
    lam = ev.lambada(m, tiny_tokenizer, [{"context": "Once upon a", "continuation": "time"}])
    ctx = tiny_tokenizer.encode("Once upon a", add_special_tokens=False)
    cont = tiny_tokenizer.encode(" time", add_special_tokens=False)
    logits = m(mx.array([ctx + cont[:-1]]))[0, len(ctx) - 1:]
    greedy = mx.argmax(logits, axis=-1).tolist() == cont
    assert lam["accuracy"] == float(greedy)
    assert lam["mean_logprob"] == pytest.approx(ev.continuation_logprob(m, ctx, cont), abs=1e-4)
    with pytest.raises(MlxeffError, match="query, choices, gold"):
        ev.multiple_choice(m, tiny_tokenizer, [{"query": "x"}])


@pytest.mark.skipif(not (SHARED_DATA / "eval" / "copa.jsonl.gz").is_file(),
                    reason="../shared/data/eval is absent (evaluation sets are not shipped)")
def test_reads_shared_eval_files(tiny_tokenizer):
    from mlxeff.data import iter_jsonl

    m = make_model(tiny_args(vocab_size=len(tiny_tokenizer)), seed=2)
    res = ev.multiple_choice(m, tiny_tokenizer, iter_jsonl(SHARED_DATA / "eval" / "copa.jsonl.gz"),
                             limit=5)
    assert res["items"] == 5
    lam = ev.lambada(m, tiny_tokenizer, iter_jsonl(SHARED_DATA / "eval" / "lambada_openai.jsonl.gz"),
                     limit=3)
    assert lam["items"] == 3


def test_cli_eval(saved_dir, tmp_path, tiny_tokenizer):
    from conftest import TEXT

    path, model = saved_dir
    f = tmp_path / "text.txt.gz"
    f.write_bytes(gzip.compress(TEXT.encode()))
    r = subprocess.run([sys.executable, "-m", "mlxeff.cli.main", "eval", str(path), "--perplexity",
                        str(f), "--window", "32", "--stride", "16", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False) + [2]
    ref = ev.perplexity(model, np.array(ids), window=32, stride=16)
    assert out["tokens"] == len(ids) - 1 == ref["tokens"]
    assert out["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    bad = CliRunner().invoke(app, ["eval", str(path), "--perplexity", str(tmp_path / "missing.txt")])
    assert isinstance(bad.exception, MlxeffError) and "no such text file" in str(bad.exception)
