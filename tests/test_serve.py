"""``mlxeff serve`` driven by the official openai client on a loopback port.

The servers run in this process (``ServerThread``, a free port on 127.0.0.1) so the tests can
compare with ``mlxeff.generate`` on the same model object and read the worker's counters; one
test starts the real command in a subprocess. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import mlxeff
from conftest import make_model, tiny_args

openai = pytest.importorskip("openai")

from mlxeff.chat import chat_format, render  # noqa: E402
from mlxeff.io import default_model_dir  # noqa: E402
from mlxeff.server import ServedModel, ServerThread, create_app  # noqa: E402
from mlxeff.server.options import StopScanner, stop_scan  # noqa: E402

TIMEOUT = 60


def start(model, tokenizer, path, **kw):
    served = ServedModel(model, tokenizer, path.name, path, chat_format=chat_format(tokenizer), **kw)
    app = create_app(served)
    thread = ServerThread(app)
    url = thread.__enter__()
    return thread, url, app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    mlxeff.save(make_model(tiny_args(vocab_size=len(tiny_tokenizer)), seed=3), tiny_tokenizer, path)
    model, tokenizer = mlxeff.load(path)
    thread, url, app = start(model, tokenizer, path)
    yield dict(model=model, tokenizer=tokenizer, path=path, url=url, app=app)
    thread.__exit__(None, None, None)


@pytest.fixture(scope="module")
def default():
    """The embedded model (real text), computing in float32 as ``mlxeff generate`` does on a CPU."""
    import mlx.core as mx

    path = default_model_dir()
    model, tokenizer = mlxeff.load(path)
    model.set_dtype(mx.float32)
    thread, url, app = start(model, tokenizer, path)
    yield dict(model=model, tokenizer=tokenizer, path=path, url=url, app=app)
    thread.__exit__(None, None, None)


def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def raw(server, method, route, body=None, data=None):
    """(status, parsed JSON) of a plain HTTP request."""
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(server["url"] + route, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def reference(server, prompt, max_tokens, **kw):
    return mlxeff.generate(server["model"], server["tokenizer"], prompt, max_tokens=max_tokens, **kw)


def assert_still_serving(server):
    out = client(server).completions.create(model="m", prompt="Once upon a time", max_tokens=4)
    assert out.choices[0].text == reference(server, "Once upon a time", 4)


# ---- the routes --------------------------------------------------------------------------------

def test_models_and_health(tiny):
    models = client(tiny).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    status, body = raw(tiny, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "tiny"


def test_completion_equals_generate(tiny):
    c = client(tiny)
    want = reference(tiny, "Once upon a time", 12)
    out = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12)
    assert out.choices[0].text == want
    assert out.choices[0].finish_reason in ("length", "stop")
    u = out.usage.model_dump()
    assert u["prompt_tokens"] == len(tiny["tokenizer"].encode("Once upon a time"))
    assert u["completion_tokens"] >= 1 and u["ttft_s"] > 0 and u["generation_tps"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    chunks = list(c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == u["completion_tokens"]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == out.choices[0].finish_reason and not any(finishes[:-1])


def test_chat_streamed_and_not(tiny):
    c = client(tiny)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell a story"}]
    tok = tiny["tokenizer"]
    ids = render(tok, chat_format(tok), messages)
    want = reference(tiny, ids, 10).split("\nUser:")[0]
    out = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want
    assert out.usage.prompt_tokens == len(ids)
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_stop_strings_and_logprobs(tiny):
    c = client(tiny)
    full = reference(tiny, "Once upon a time", 16)
    stop = full[-3:]
    k = full.index(stop)
    assert k > 0
    out = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, stop=[stop])
    assert out.choices[0].text == full[:k] and out.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=16, stop=stop, stream=True))
    assert streamed == full[:k]
    out = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, logprobs=3)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                     max_tokens=5, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(x.top_logprobs) == 2 and x.logprob <= 0 for x in content)


def test_stop_scan():
    assert stop_scan("hello world", ["wor"]) == (6, 6)
    assert stop_scan("hello wo", ["world"]) == (None, 6)  # "wo" may begin the stop string
    assert stop_scan("hello", []) == (None, 5)
    s = StopScanner(("END",))
    assert s.add("abc E") == "abc " and s.add("N") == "" and s.add("D more") == ""
    assert s.final_text == "abc " and s.stopped_at == 4
    s = StopScanner(("END",))
    assert s.add("abE") == "ab" and s.add("x") == "Ex" and s.flush() == ""


def test_sampling_seed_and_penalties(tiny):
    c = client(tiny)
    a = c.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, seed=7)
    b = c.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text
    plain = reference(tiny, "Once upon a time", 16)
    tokens = tiny["tokenizer"].encode(plain, add_special_tokens=False)
    assert len(set(tokens)) < len(tokens)  # the random model repeats itself
    pen = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16,
                               extra_body={"repetition_penalty": 5.0})
    assert pen.choices[0].text != plain
    pres = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16,
                                presence_penalty=2.0)
    assert pres.choices[0].text != plain


def test_drafter_statistics_and_lossless(tiny):
    c = client(tiny)
    want = reference(tiny, "Once upon a time", 20)
    out = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20,
                               extra_body={"mlxeff": {"lookup": {"draft": 4}}})
    assert out.choices[0].text == want
    u = out.usage.model_dump()
    assert u["decode_forwards"] >= 1 and u["tokens_per_forward"] >= 1.0
    assert "accepted_tokens" in u and u["drafted_tokens"] >= u["accepted_tokens"]


# ---- a real model: concurrency and techniques ---------------------------------------------------

PROMPTS = ["Once upon a time", "The little girl", "In the morning the king", "Tom and his dog"]


def test_four_concurrent_clients_get_their_own_greedy_text(default):
    want = [reference(default, p, 16) for p in PROMPTS]
    assert len(set(want)) == len(want)

    def ask(prompt):
        c = client(default)
        return c.completions.create(model="default", prompt=prompt, max_tokens=16).choices[0].text

    def ask_stream(prompt):
        c = client(default)
        s = c.completions.create(model="default", prompt=prompt, max_tokens=16, stream=True)
        return "".join(ch.choices[0].text for ch in s)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, PROMPTS))
        got_stream = list(pool.map(ask_stream, PROMPTS))
    assert got == want and got_stream == want


def test_cli_generate_agrees(default):
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    proc = subprocess.run([sys.executable, "-m", "mlxeff.cli.main", "generate", PROMPTS[0],
                           "--max-tokens", "16", "--json"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = client(default).completions.create(model="default", prompt=PROMPTS[0], max_tokens=16)
    assert out.choices[0].text == json.loads(proc.stdout)["text"]


def test_lazyllm_keep_one_equals_plain(default):
    prompt = ("The old woman lived in a small house at the edge of the wood, and every morning she "
              "walked down to the river to fetch water. One day she found a basket among the "
              "reeds, and in the basket")
    c = client(default)
    plain = c.completions.create(model="default", prompt=prompt, max_tokens=16)
    lazy = c.completions.create(model="default", prompt=prompt, max_tokens=16,
                                extra_body={"mlxeff": {"lazy": {"keep": [1.0, 1.0], "recent": 0}}})
    assert lazy.choices[0].text == plain.choices[0].text == reference(default, prompt, 16)
    pruned = c.completions.create(model="default", prompt=prompt, max_tokens=8,
                                  extra_body={"mlxeff": {"lazy": {"keep": [0.8, 0.5]}}})
    assert pruned.usage.completion_tokens >= 1


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,needle", [
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "mlxeff": {"nope": {}}}, "nope"),
    ({"prompt": "hi", "mlxeff": {"lazy": {"bogus": 1}}}, "bogus"),
    ({"prompt": "hi", "mlxeff": {"lookup": {"draft": 0}}}, "--lookup-draft"),
    ({"prompt": "hi", "mlxeff": {"kv-prediction": "/etc"}}, "bare name"),
    ({"prompt": "hi", "mlxeff": ["lazy"]}, "mlxeff"),
    ({"prompt": [10 ** 9]}, "vocabulary"),
])
def test_bad_requests_get_a_4xx_json_error(tiny, body, needle):
    status, out = raw(tiny, "POST", "/v1/completions", body)
    assert 400 <= status < 500, out
    assert needle in out["error"]["message"], out
    assert_still_serving(tiny)


def test_malformed_json_and_unknown_route(tiny):
    status, out = raw(tiny, "POST", "/v1/chat/completions", data=b'{"messages": [')
    assert status == 400 and "JSON" in out["error"]["message"]
    status, out = raw(tiny, "POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and "role" in out["error"]["message"]
    status, out = raw(tiny, "GET", "/v1/nothing")
    assert status == 404 and out["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(tiny).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                             extra_body={"mlxeff": {"lookup": {"ngram": "three"}}})
    assert "ngram" in str(e.value)
    assert_still_serving(tiny)


def test_too_long_prompt(tiny):
    served = tiny["app"].state.served
    served.max_context = 32
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client(tiny).completions.create(model="tiny", prompt="Once upon a time " * 20, max_tokens=4)
        assert "context" in str(e.value) and "32" in str(e.value)
        out = client(tiny).completions.create(model="tiny", prompt="Once upon a time", max_tokens=100)
        assert out.usage.total_tokens == 32 and out.choices[0].finish_reason == "length"
    finally:
        served.max_context = None
    assert_still_serving(tiny)


# ---- disconnects, responsiveness, memory ----------------------------------------------------------

def open_stream(server, max_tokens):
    host, port = server["url"].split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def wait_idle(server, timeout=10.0):
    worker = server["app"].state.worker
    deadline = time.monotonic() + timeout
    while worker.running is not None or worker.queued:
        assert time.monotonic() < deadline, "the generation did not stop"
        time.sleep(0.02)


def test_disconnect_mid_stream_stops_generation(tiny):
    worker = tiny["app"].state.worker
    cancelled = worker.cancelled
    conn, resp = open_stream(tiny, 100_000)  # minutes of work if it were not stopped
    for _ in range(3):
        assert resp.readline().startswith(b"data: ") and resp.readline() == b"\n"
    conn.sock.shutdown(2)
    conn.close()
    wait_idle(tiny)
    assert worker.cancelled == cancelled + 1
    status, body = raw(tiny, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert_still_serving(tiny)


def test_disconnect_while_waiting_stops_a_plain_request(tiny):
    worker = tiny["app"].state.worker
    cancelled = worker.cancelled
    host, port = tiny["url"].split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time",
                                                        "max_tokens": 100_000}),
                 {"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while worker.running is None:  # the generation has started
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conn.sock.shutdown(2)
    conn.close()
    wait_idle(tiny)
    assert worker.cancelled == cancelled + 1
    assert_still_serving(tiny)


def test_health_answers_during_a_generation(tiny):
    conn, resp = open_stream(tiny, 100_000)
    resp.readline()
    t = time.perf_counter()
    status, body = raw(tiny, "GET", "/health")
    assert status == 200 and body["running"] is True
    assert time.perf_counter() - t < 2.0
    conn.sock.shutdown(2)
    conn.close()
    wait_idle(tiny)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc for the RSS")
def test_memory_stays_flat_over_200_requests(tiny):
    c = client(tiny)
    peaks, rss = [], []
    for i in range(200):
        out = c.completions.create(model="tiny", prompt=f"Once upon a time {i}", max_tokens=4,
                                   stream=i % 2 == 1, **({"stream_options": {"include_usage": True}}
                                                          if i % 2 else {}))
        usage = list(out)[-1].usage if i % 2 else out.usage
        peaks.append(usage.model_dump()["peak_memory_gb"])
        rss.append(_rss_bytes())
    assert max(peaks[20:]) <= 1.1 * max(peaks[:20])
    assert max(rss[20:]) <= 1.1 * max(rss[:20])


# ---- the command -----------------------------------------------------------------------------------

def test_serve_help_lists_every_option():
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--model", "--host", "--port", "--max-tokens", "--temp", "--top-p", "--top-k",
                 "--min-p", "--chat-template", "--max-context", "--max-kv-size",
                 "--prefill-step-size", "--dtype", "--log-level", "--lazy", "--lookup"):
        assert flag in out, flag


def test_serve_command(default):
    """The command as a user runs it: the embedded model (stored in float16, cast to float32)."""
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlxeff.cli.main", "serve", "--port", "0",
                             "--log-level", "warning", "--max-tokens", "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        timer = threading.Timer(120, proc.kill)
        timer.start()
        line = proc.stdout.readline()
        timer.cancel()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        server = {"url": m.group(0)}
        out = client(server).completions.create(model="default", prompt="Once upon a time")
        assert out.usage.completion_tokens <= 6
        assert out.choices[0].text == reference(default, "Once upon a time", 6)
        chat = client(server).chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Hello"}], stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in chat)
        assert raw(server, "GET", "/health")[0] == 200
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode in (0, -15), proc.stderr.read()


def test_serve_refuses_bad_options(tiny):
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    proc = subprocess.run([sys.executable, "-m", "mlxeff.cli.main", "serve", "--model",
                           str(tiny["path"]), "--port", "0", "--max-kv-size", "3"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        "error: --max-kv-size must be at least 6 (the first 4 tokens are always kept), got 3"]
    for args, needle in ((["--lazy", "--max-kv-size", "64"], "--lazy"),
                         (["--lookup-draft", "0"], "--lookup-draft"),
                         (["--chat-template", str(tiny["path"] / "missing.jinja")], "missing.jinja")):
        result = CliRunner().invoke(app, ["serve", "--model", str(tiny["path"]), "--port", "0", *args])
        assert result.exit_code == 1, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
