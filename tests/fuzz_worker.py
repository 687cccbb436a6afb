"""The property suite's sandbox: a process that has imported mlxeff and forks one child per case.

Protocol: one JSON request per line on stdin -> one JSON result per line on stdout.
Request: ``{"kind": "model"|"convert"|"tokenizer"|"llama2c", "path": ..., "out": ..., "config": ...,
"tmpdir": ..., "timeout": seconds}``. The child (fresh after ``fork``, nothing computed in this
process before) sets an address-space limit as a safety net, runs the case, and reports; this
process waits at most ``timeout`` seconds, kills it past that, and measures its peak resident
memory with ``wait4``. Result: ``{"outcome": "loaded"|"refused"|"traceback"|"crash"|"hang",
"message", "finite", "seconds", "maxrss_mb"}``.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys
import time
import traceback

ADDRESS_LIMIT = 8 << 30  # bytes of address space per case: a blow-up fails inside the child


def prepare():
    """Import everything a case may touch, so that a forked child starts warm."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import mlx.core  # noqa: F401
    import mlx_lm.tokenizer_utils  # noqa: F401
    import sentencepiece  # noqa: F401
    import tokenizers  # noqa: F401
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
    from transformers.utils import logging as hf_logging

    import mlxeff  # noqa: F401
    import mlxeff.convert  # noqa: F401
    import mlxeff.convert.tokenizer  # noqa: F401
    import mlxeff.io  # noqa: F401

    hf_logging.set_verbosity_error()


def run_case(req: dict) -> dict:
    import mlx.core as mx

    import mlxeff
    from mlxeff.errors import MlxeffError

    def finite(model):
        # computed in float32, as `mlxeff generate` computes on the CPU (--dtype auto)
        model.set_dtype(mx.float32)
        out = model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]) % model.args.vocab_size)
        return bool(mx.all(mx.isfinite(out)).item())

    kind = req["kind"]
    try:
        if kind == "model":
            model, tok = mlxeff.load(req["path"])
            ok = finite(model)
            if tok is not None:
                ids = tok.encode("Once upon a time, a café 日本 🤖")
                ok = ok and all(0 <= i < model.args.vocab_size for i in ids)
                tok.decode(ids)
            return {"outcome": "loaded", "finite": ok}
        if kind == "convert":
            from mlxeff.convert import convert

            convert(req["path"], req["out"], config=req.get("config"), tokenizer=False, dtype="float32",
                    progress=False)
            model, _ = mlxeff.load(req["out"])
            return {"outcome": "loaded", "finite": finite(model)}
        if kind == "llama2c":
            from mlxeff.convert.tokenizer import check, from_path

            tok = from_path(req["path"])
            check(tok, {"model_type": "llama", "eos_token_id": 2}, 512, req["path"])
            ids = tok.encode("Once upon a time, a café 日本 🤖")
            return {"outcome": "loaded", "finite": all(0 <= i < 512 for i in ids)}
        raise ValueError(f"unknown kind {kind}")
    except MlxeffError as e:
        return {"outcome": "refused", "message": str(e)}
    except BaseException:
        return {"outcome": "traceback", "message": traceback.format_exc()[-3000:]}


def child(req: dict, wfd: int) -> None:
    import tempfile

    # Python's temporary folders (the loaders' scratch folders) go to the case's own folder; the
    # environment's TMPDIR stays, so MLX keeps its compiled-kernel cache across cases.
    tempfile.tempdir = req["tmpdir"]
    # Libraries may print to stdout (tokenizers does, for unknown options in a tokenizer.json):
    # that is this process's protocol stream, so the child's stdout goes to /dev/null.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    t = time.perf_counter()
    result = run_case(req)
    result["seconds"] = time.perf_counter() - t
    data = (json.dumps(result) + "\n").encode()
    while data:
        data = data[os.write(wfd, data):]
    os._exit(0)


def serve() -> None:
    prepare()
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                child(req, w)
            finally:
                os._exit(1)
        os.close(w)
        buf, deadline, hung = b"", t + req.get("timeout", 20), False
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                hung = True
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                buf += chunk
        os.close(r)
        _, status, usage = os.wait4(pid, 0)
        elapsed = time.perf_counter() - t
        if hung:
            result = {"outcome": "hang", "message": f"no result after {elapsed:.1f} s"}
        elif buf:
            result = json.loads(buf)
        else:
            result = {"outcome": "crash", "message": f"child exited with status {status:#x} and no result"}
        result["maxrss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
        result.setdefault("seconds", elapsed)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
