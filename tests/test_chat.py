"""Chat: templates, a session that reuses its prompt cache, --max-kv-size's window, the command."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlxeff
from conftest import make_model, tiny_args
from mlxeff.chat import DEFAULT_CHAT_TEMPLATE, ChatSession, chat_format, common_prefix, render
from mlxeff.errors import MlxeffError
from mlxeff.server.options import GenerationOptions, RequestError
from mlxeff.server.runner import Delta, Finish, run
from mlxeff.server.window_cache import WindowedKVCache, make_window_cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("chat") / "tiny"
    mlxeff.save(make_model(tiny_args(vocab_size=len(tiny_tokenizer)), seed=5), tiny_tokenizer, path)
    model, tokenizer = mlxeff.load(path)
    return path, model, tokenizer


def test_default_template_is_a_transcript(tiny):
    _, _, tok = tiny
    fmt = chat_format(tok)
    assert fmt.template == DEFAULT_CHAT_TEMPLATE and fmt.stops == ("\nUser:",)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                   chat_template=fmt.template)
    assert text == "<s>Be kind.\n\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert render(tok, fmt, messages) == tok.encode(text, add_special_tokens=False)


def test_template_file(tiny, tmp_path):
    _, _, tok = tiny
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
    fmt = chat_format(tok, f)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True, chat_template=fmt.template)
    assert text == "[user] Hi\n[assistant]" and fmt.stops == ()
    assert render(tok, fmt, [{"role": "user", "content": "Hi"}]) == tok.encode(text, add_special_tokens=False)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(MlxeffError, match="bad.jinja"):
        chat_format(tok, bad)
    with pytest.raises(MlxeffError, match="missing.jinja"):
        chat_format(tok, tmp_path / "missing.jinja")


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2


def last_logits(model, ids, cache=None):
    return model(mx.array(ids)[None], cache=cache)[0, -1]


def test_session_reuses_its_prompt_cache(tiny):
    _, model, tok = tiny
    fmt = chat_format(tok)
    session = ChatSession(model, tok, fmt, GenerationOptions(max_tokens=6), system_prompt="Hello.")
    events = list(session.send("Once upon a time"))
    assert isinstance(events[-1], Finish) and all(isinstance(e, Delta) for e in events[:-1])
    first = session.last.usage
    assert first["reused_tokens"] == 0
    ids2 = render(tok, fmt, session.messages + [{"role": "user", "content": "And then?"}])
    # what the second turn will find: the cache extended by the new tokens only
    cache, rest = session._prepare(list(ids2))
    assert 0 < len(rest) < len(ids2) and session.cached == ids2[: len(ids2) - len(rest)]
    got = last_logits(model, rest, cache)
    want = last_logits(model, ids2)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
    session2 = ChatSession(model, tok, fmt, GenerationOptions(max_tokens=6), system_prompt="Hello.")
    list(session2.send("Once upon a time"))
    list(session2.send("And then?"))
    u = session2.last.usage
    assert u["prompt_tokens"] == len(ids2) and u["reused_tokens"] == len(ids2) - len(rest)
    fresh = mlxeff.generate(model, tok, ids2, max_tokens=6).split("\nUser:")[0]
    assert session2.last.text == fresh
    session2.reset()
    assert session2.messages == [{"role": "system", "content": "Hello."}] and session2.cache is None


def test_session_with_lazyllm_processes_everything(tiny):
    _, model, tok = tiny
    opts = GenerationOptions(max_tokens=4, techniques={"lazy": {"keep": (1.0, 1.0)}})
    session = ChatSession(model, tok, chat_format(tok), opts)
    list(session.send("Hi"))
    list(session.send("Again"))
    assert session.last.usage["reused_tokens"] == 0 and session.cache is None


# ---- --max-kv-size -------------------------------------------------------------------------------

def window_mask(T, max_size, keep=4):
    q = np.arange(T)[:, None]
    k = np.arange(T)[None]
    return mx.array((k <= q) & ((k > q - (max_size - keep)) | (k < keep)))


@pytest.mark.parametrize("chunks", [[5] * 6 + [1] * 10, [17, 1, 1, 9, 1, 1, 1, 4]])
def test_window_cache_equals_a_windowed_full_forward(chunks):
    model = make_model(tiny_args(vocab_size=64), seed=2)
    T, max_size = sum(chunks), 12
    tokens = mx.array(np.random.default_rng(0).integers(0, 64, size=T), dtype=mx.uint32)
    want = model(tokens[None], mask=window_mask(T, max_size))[0]
    cache = make_window_cache(model, max_size)
    got, start = [], 0
    for n in chunks:
        got.append(model(tokens[start:start + n][None], cache=cache)[0])
        start += n
        assert cache[0].offset <= max_size - 1 + n  # memory stays bounded
        assert cache[0].next_position == start
    got = mx.concatenate(got, axis=0)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
    assert cache[0].evicted > 0
    # the plain (unbounded) result differs: the window really bounds the attention
    assert not mx.allclose(model(tokens[None])[0], want, atol=1e-4).item()


def test_window_cache_rejects_explicit_positions():
    cache = WindowedKVCache(8)
    k = mx.zeros((1, 1, 2, 4))
    with pytest.raises(ValueError, match="max-kv-size"):
        cache.update_and_fetch(k, k, positions=mx.array([[0, 1]]))


def test_window_with_a_drafter_is_lossless(tiny):
    _, model, tok = tiny
    prompt = tok.encode("Once upon a time there was a little girl who lived in a village")

    def text(techniques):
        events = list(run(model, tok, prompt, GenerationOptions(max_tokens=24, techniques=techniques),
                          max_kv_size=10))
        return events[-1]

    plain, drafted = text({}), text({"lookup": {"draft": 4}})
    assert drafted.text == plain.text and drafted.usage["decode_forwards"] >= 1
    with pytest.raises(RequestError, match="--lazy"):
        list(run(model, tok, prompt, GenerationOptions(techniques={"lazy": {}}), max_kv_size=10))


def test_options_are_checked():
    for kw, needle in ((dict(repetition_penalty=-1.0), "repetition_penalty"),
                       (dict(presence_penalty=3.0), "presence_penalty"),
                       (dict(max_tokens=0), "max_tokens"), (dict(stop=("",)), "stop"),
                       (dict(logprobs=99), "logprobs"), (dict(top_p=0.0), "--top-p")):
        with pytest.raises(MlxeffError, match=needle):
            GenerationOptions(**kw)


# ---- the command ---------------------------------------------------------------------------------

def run_chat(path, *args, stdin=""):
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    return subprocess.run([sys.executable, "-m", "mlxeff.cli.main", "chat", "--model", str(path), *args],
                          input=stdin, capture_output=True, text=True, timeout=120, env=env)


def test_chat_command_keeps_the_cache_between_turns(tiny):
    path, _, _ = tiny
    proc = run_chat(path, "--max-tokens", "5", "--stats", "--repetition-penalty", "1.3",
                    "--presence-penalty", "0.5", "--max-kv-size", "64",
                    stdin="Hello\nHow are you?\n/reset\nHi again\n/quit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    stats = re.findall(r"\[prompt (\d+) tokens \((\d+) from the cache", proc.stdout)
    assert len(stats) == 3, proc.stdout
    (p1, r1), (p2, r2), (p3, r3) = [(int(a), int(b)) for a, b in stats]
    assert r1 == 0 and 0 < r2 < p2 and p2 > p1
    assert "(new conversation)" in proc.stdout and r3 < p3


@pytest.mark.parametrize("args,needle", [
    (["--max-kv-size", "2"], "--max-kv-size"),
    (["--repetition-penalty", "-1"], "--repetition-penalty"),
    (["--lazy", "--max-kv-size", "64"], "--lazy"),
])
def test_chat_command_refuses_bad_options(tiny, args, needle):
    path, _, _ = tiny
    proc = run_chat(path, *args, stdin="Hello\n")
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_chat_help_lists_every_option():
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    out = CliRunner().invoke(app, ["chat", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--model", "--system-prompt", "--chat-template", "--max-tokens", "--temp", "--top-p",
                 "--top-k", "--min-p", "--seed", "--repetition-penalty", "--repetition-context-size",
                 "--presence-penalty", "--presence-context-size", "--frequency-penalty",
                 "--frequency-context-size", "--max-kv-size", "--prefill-step-size", "--dtype",
                 "--stats", "--lazy", "--lookup"):
        assert flag in out, flag
