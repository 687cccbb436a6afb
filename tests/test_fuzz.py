"""Property-based mutation campaign against every loader (hypothesis).

For tiny models in every format the loaders read -- mlxeff directories (float32 with a tokenizer,
float16 affine-quantized, sharded with an index), CoreNet ``.pt`` and Hugging Face
``pytorch_model.bin`` checkpoints, tokenizer directories and llama2.c ``tokenizer.bin`` -- each
example mutates the files (config.json fields and text, safetensors headers, length fields and
data, the index, zip structure, pickle opcodes and objects, tokenizer JSON, special files in
place of tokenizer files) and loads the result in a forked sandbox (``fuzz_worker.py``). The
property, for every case:

- it loads and its logits are finite (and the tokenizer's ids fit the vocabulary), or it raises
  one ``MlxeffError`` whose one-line message names a file of the case;
- within ``TIMEOUT`` seconds and ``MAX_RSS_MB`` of resident memory;
- with no side effect: the case's files are unchanged, a failed conversion leaves no output and
  no temporary folder, scratch folders are removed.

CI runs ``MLXEFF_FUZZ_EXAMPLES`` (default 200) derandomized examples per file kind (25 s on an
idle 2-core CPU, a minute or two on a busy one). The long campaign (SECURITY.md has its last
outcome):

    MLXEFF_FUZZ_EXAMPLES=2000 MLXEFF_FUZZ_REPORT=fuzz-report.json python -m pytest -q tests/test_fuzz.py

runs random (not derandomized) examples and writes the outcome counts to the report file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import SHARED_DATA  # noqa: E402

EXAMPLES = int(os.environ.get("MLXEFF_FUZZ_EXAMPLES", "200"))
LONG = "MLXEFF_FUZZ_EXAMPLES" in os.environ
TIMEOUT = 20.0
MAX_RSS_MB = 2048
# No shrinking: a case costs ~0.1-1 s in the sandbox and the failing example is printed as found.
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
                    suppress_health_check=list(HealthCheck), print_blob=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate])
TOK512 = SHARED_DATA / "models" / "stories260K" / "tok512.bin"
STATS = defaultdict(Counter)
WORST = defaultdict(lambda: {"seconds": 0.0, "maxrss_mb": 0.0})


# --- the sandbox ------------------------------------------------------------------------------

class Sandbox:
    def __init__(self):
        self.proc = None

    def start(self):
        env = dict(os.environ, MLXEFF_NO_OPENBLAS="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fuzz_worker.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(Path(__file__).parent))
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps({**req, "timeout": TIMEOUT}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()
    _report()


def _report():
    if not STATS:
        return
    lines = [f"{kind}: {dict(c)} worst {WORST[kind]['seconds']:.2f} s, {WORST[kind]['maxrss_mb']:.0f} MB"
             for kind, c in sorted(STATS.items())]
    sys.stderr.write("\nfuzz outcomes\n  " + "\n  ".join(lines) + "\n")
    report = os.environ.get("MLXEFF_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({"examples_per_test": EXAMPLES, "outcomes": STATS,
                                            "worst": WORST}, indent=2, default=dict))


# --- base artifacts ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    import mlx.core as mx

    import mlxeff.io as io
    from conftest import make_tokenizer, write_hf_openelm
    from hostile import corenet_file, mlxeff_dir, tiny_model

    root = tmp_path_factory.mktemp("fuzz")
    (root / "llama2c").mkdir()
    tok = make_tokenizer()
    b = {"cases": root / "cases", "f32": mlxeff_dir(root / "f32", tokenizer=tok, vocab=len(tok)),
         "f16q": mlxeff_dir(root / "f16q", quantize="affine", dtype=mx.float16)}
    old, io.MAX_SHARD_BYTES = io.MAX_SHARD_BYTES, 30_000
    try:
        b["sharded"] = mlxeff_dir(root / "sharded")
    finally:
        io.MAX_SHARD_BYTES = old
    model = tiny_model()
    (root / "corenet").mkdir()
    b["corenet"] = corenet_file(root / "corenet" / "ckpt.pt", model)
    (root / "corenet" / "config.json").write_text(json.dumps(model.args.to_dict()))
    b["hfbin"] = write_hf_openelm(model, root / "hfbin", fmt="bin")
    b["cases"].mkdir()
    if TOK512.exists():
        b["llama2c"] = root / "llama2c" / TOK512.name
        shutil.copyfile(TOK512, b["llama2c"])
    return b


class Case:
    """A fresh copy of a base artifact with output and scratch folders, removed on exit."""

    def __init__(self, base: Path, kind: str, cases: Path):
        self.root = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=cases))
        self.dir = self.root / "case"
        self.dir.mkdir()
        self.target = self.dir / base.name
        (shutil.copytree if base.is_dir() else shutil.copyfile)(base, self.target)
        (self.root / "outparent").mkdir()
        (self.root / "tmp").mkdir()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.root, ignore_errors=True)

    def snapshot(self):
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.dir, followlinks=False):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st_ = os.lstat(p)
                if os.path.islink(p):
                    out[str(p)] = ("link", os.readlink(p))
                elif p.is_file() and not p.is_symlink() and st_.st_size < (8 << 20) and os.path.isfile(p):
                    out[str(p)] = ("file", hashlib.sha1(p.read_bytes()).hexdigest())
                else:
                    out[str(p)] = ("other", st_.st_mode, st_.st_size)
        return out


def check(sandbox, case: Case, req: dict, stat_kind: str):
    before = case.snapshot()
    result = sandbox.run({**req, "tmpdir": str(case.root / "tmp")})
    STATS[stat_kind][result["outcome"]] += 1
    worst = WORST[stat_kind]
    worst["seconds"] = max(worst["seconds"], result["seconds"])
    worst["maxrss_mb"] = max(worst["maxrss_mb"], result["maxrss_mb"])
    assert result["outcome"] in ("loaded", "refused"), result["message"]
    assert result["maxrss_mb"] < MAX_RSS_MB, result
    if result["outcome"] == "loaded":
        assert result["finite"], "loaded, but the logits are not finite (or token ids exceed the vocabulary)"
    else:
        msg = result["message"]
        assert "\n" not in msg and str(case.dir) in msg, msg
    assert case.snapshot() == before, "the load changed the case's files"
    assert os.listdir(case.root / "tmp") == [], "scratch files were left behind"
    outs = os.listdir(case.root / "outparent")
    assert outs == (["out"] if result["outcome"] == "loaded" and req["kind"] == "convert" else []), outs


# --- value strategies --------------------------------------------------------------------------

NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
    st.sampled_from([0, -1, 1, 2, 3, 7, 1023, 1024, 1025, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 192, 2 ** 63, 10 ** 30]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, -0.0, 1e-320, 1e308, 0.5, 64.0, 64.5]),
    st.text(max_size=12), st.sampled_from(["/dev/zero", "../config.json", "tokenizer.json", "x" * 300]),
    st.lists(st.integers(-3, 70), max_size=6), st.lists(st.floats(allow_nan=False), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 9), max_size=3),
)
TEXT_VALUES = ["NaN", "Infinity", "-Infinity", "1e999", "9" * 4301, "-0", "1e-400", "[]", "{}", '"x"', "null",
               "true", "[" * 200 + "]" * 200, "2.5", "4294967488"]


def walk_path(data, obj, max_depth=6):
    """A random path into decoded JSON (a list of keys/indices), drawn step by step."""
    path = []
    while isinstance(obj, (dict, list)) and obj and len(path) < max_depth:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
        key = data.draw(st.sampled_from(keys if len(keys) <= 64 else keys[:32] + keys[-32:]))
        path.append(key)
        obj = obj[key]
        if data.draw(st.integers(0, 3)) == 0:
            break
    return path


def set_path(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def del_path(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]


def text_mutation(data, raw: bytes) -> bytes:
    op = data.draw(st.sampled_from(["number", "truncate", "flip", "bom", "dupkey", "nest", "insert"]))
    if not raw:
        return b"{"
    if op == "number":
        positions = [i for i in range(len(raw)) if raw[i:i + 1].isdigit() and not raw[i - 1:i].isdigit()] or [0]
        i = data.draw(st.sampled_from(positions[:200]))
        j = i
        while j < len(raw) and raw[j:j + 1] in b"0123456789.eE+-":
            j += 1
        return raw[:i] + data.draw(st.sampled_from(TEXT_VALUES)).encode() + raw[j:]
    if op == "truncate":
        return raw[:data.draw(st.integers(0, len(raw) - 1))]
    if op == "flip":
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
        return bytes(b)
    if op == "bom":
        return b"\xef\xbb\xbf" + raw
    if op == "dupkey":
        key = data.draw(st.sampled_from([b'"vocab_size"', b'"model_dim"', b'"mlxeff"', b'"model"', b'"x"']))
        return b"{" + key + b": " + json.dumps(data.draw(NASTY)).encode() + b", " + raw.lstrip()[1:]
    if op == "nest":
        depth = data.draw(st.sampled_from([50, 65, 999, 5000]))
        return raw.rstrip()[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    i = data.draw(st.integers(0, len(raw)))
    return raw[:i] + data.draw(st.binary(min_size=1, max_size=8)) + raw[i:]


def json_mutation(data, path: Path, extra_ops=None):
    """Mutate a JSON file: 1-3 structural or textual changes (``extra_ops``: name -> fn(data, obj))."""
    extra_ops = extra_ops or {}
    for _ in range(data.draw(st.integers(1, 3))):
        raw = path.read_bytes()
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            obj = None
        op = data.draw(st.sampled_from(["set", "set", "delete", "add", "text", *extra_ops])) if obj is not None else "text"
        if op == "text" or not isinstance(obj, (dict, list)) or not obj:
            path.write_bytes(text_mutation(data, raw))
            continue
        if op in extra_ops:
            extra_ops[op](data, obj)
        else:
            p = walk_path(data, obj)
            if op == "set":
                set_path(obj, p, data.draw(NASTY))
            elif op == "delete":
                del_path(obj, p)
            else:
                target = obj
                for k in p[:-1]:
                    target = target[k]
                if isinstance(target, dict):
                    target[data.draw(st.text(max_size=8))] = data.draw(NASTY)
                elif isinstance(target, list):
                    target.append(data.draw(NASTY))
        path.write_text(json.dumps(obj))


# --- config.json ------------------------------------------------------------------------------

def _resize_layers(data, cfg):
    n = data.draw(st.sampled_from([0, 1, 3, 5, 1024, 1025, 10 ** 4, 10 ** 5]))
    cfg["num_transformer_layers"] = n
    for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
        if isinstance(cfg.get(k), list) and cfg[k]:
            cfg[k] = [cfg[k][0]] * n


@SETTINGS
@given(data=st.data(), variant=st.sampled_from(["f32", "f16q", "sharded"]))
def test_config_json(sandbox, bases, data, variant):
    with Case(bases[variant], "config", bases["cases"]) as case:
        json_mutation(data, case.target / "config.json", {"layers": _resize_layers})
        check(sandbox, case, {"kind": "model", "path": str(case.target)}, "config.json")


# --- safetensors --------------------------------------------------------------------------------

DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
               "F8_E4M3", "F8_E5M2", "C64", "f32", 4, None]


def _header_op(data, h):
    names = [k for k in h if k != "__metadata__"]
    if not names:
        h[data.draw(st.text(max_size=4))] = data.draw(NASTY)
        return
    name = data.draw(st.sampled_from(names))
    e = h[name]
    op = data.draw(st.sampled_from(["dtype", "dim", "rank", "offset", "shift", "swap", "delete", "copy",
                                    "rename", "metadata", "entry"]))
    if not isinstance(e, dict):
        h[name] = data.draw(NASTY)
    elif op == "dtype":
        e["dtype"] = data.draw(st.sampled_from(DTYPE_CODES))
    elif op == "dim" and isinstance(e.get("shape"), list) and e["shape"]:
        i = data.draw(st.integers(0, len(e["shape"]) - 1))
        d = e["shape"][i] if isinstance(e["shape"][i], int) else 3
        e["shape"][i] = data.draw(st.sampled_from([0, 1, -1, d + 1, d * 2, d + 2 ** 32, 2 ** 31, 2 ** 63,
                                                   float(d), d + 0.5, str(d), True, None]))
    elif op == "rank" and isinstance(e.get("shape"), list):
        e["shape"] = e["shape"] + [1] if data.draw(st.booleans()) or not e["shape"] else e["shape"][1:]
    elif op == "offset" and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2:
        e["data_offsets"][data.draw(st.integers(0, 1))] = data.draw(NASTY)
    elif op == "shift" and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2:
        k = data.draw(st.integers(-16, 16))
        e["data_offsets"] = [o + k if isinstance(o, int) else o for o in e["data_offsets"]]
    elif op == "swap" and isinstance(e.get("data_offsets"), list):
        e["data_offsets"] = list(reversed(e["data_offsets"]))
    elif op == "delete":
        del h[name]
    elif op == "copy":
        h[name + "_copy"] = dict(e)
    elif op == "rename":
        h[data.draw(st.sampled_from(names + ["x", "", "a\nb", "\ud800x", "transformer.norm.weight\x00"]))] = h.pop(name)
    elif op == "metadata":
        h["__metadata__"] = data.draw(NASTY)
    else:
        e[data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = data.draw(NASTY)


def _mutate_safetensors(data, st_file: Path):
    from hostile import read_st, write_st

    header, body = read_st(st_file)
    op = data.draw(st.sampled_from(["header", "header", "header", "text", "length", "data", "nan", "truncate",
                                    "append"]))
    length = None
    if op == "header":
        h = json.loads(header)
        for _ in range(data.draw(st.integers(1, 2))):
            _header_op(data, h)
        header = json.dumps(h).encode()
    elif op == "text":
        header = text_mutation(data, header)
    elif op == "length":
        length = data.draw(st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(len(header) - 8, len(header) + 8)
                                     .filter(lambda n: n >= 0)))
    elif op == "data" and body:
        b = bytearray(body)
        for _ in range(data.draw(st.integers(1, 8))):
            b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
        body = bytes(b)
    elif op == "nan" and len(body) >= 4:
        i = data.draw(st.integers(0, len(body) // 4 - 1)) * 4
        bits = data.draw(st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff",
                                          b"\xff\xff\x7f\x7f", b"\x00\x00\x7c\x00", b"\x00\x7c\x00\x7c"]))
        body = body[:i] + bits + body[i + 4:]
    elif op == "truncate":
        cut = data.draw(st.integers(0, max(0, len(body) - 1)))
        body = body[:cut]
    else:
        body = body + data.draw(st.binary(min_size=1, max_size=16))
    write_st(st_file, header, body, length)


@SETTINGS
@given(data=st.data(), variant=st.sampled_from(["f32", "f16q", "sharded"]))
def test_safetensors(sandbox, bases, data, variant):
    with Case(bases[variant], "safetensors", bases["cases"]) as case:
        files = sorted(case.target.glob("*.safetensors"))
        index = case.target / "model.safetensors.index.json"
        if index.exists() and data.draw(st.integers(0, 3)) == 0:
            json_mutation(data, index)
        else:
            _mutate_safetensors(data, data.draw(st.sampled_from(files)))
        check(sandbox, case, {"kind": "model", "path": str(case.target)}, "safetensors")


# --- torch zip / pickle -------------------------------------------------------------------------

PICKLE_SNIPPETS = [b"r\x00\x00\x00\x10", b"r\xff\xff\xff\x7f", b"q\xff", b"h\xff", b"j\xff\xff\xff\x0f",
                   b"\x95" + struct.pack("<Q", 2 ** 40), b"\x8e" + struct.pack("<Q", 2 ** 40), b"L" + b"9" * 5000 + b"L\n",
                   b"(", b")", b"t", b"0", b"2", b"N", b"u", b"s", b"b", b"R", b"\x93", b"}", b"]", b"e",
                   b"c__builtin__\neval\n", b"cposix\nsystem\n", b"\x8a\x08" + b"\xff" * 8, b"K\xff", b"."]


def _object_mutation(data, path: Path, fmt: str):
    import numpy as np

    from conftest import corenet_state
    from hostile import tiny_model
    from mlxeff.convert import torch_save as ts

    state = corenet_state(tiny_model())
    if fmt == "hf":
        state = type(state)((("transformer." + k if k != "classifier.weight" else "lm_head.weight"), v)
                            for k, v in state.items())
    names = list(state)
    for _ in range(data.draw(st.integers(1, 2))):
        op = data.draw(st.sampled_from(["reshape", "dtype", "key", "value", "view", "training", "drop"]))
        name = data.draw(st.sampled_from(names))
        if op == "reshape":
            shape = tuple(data.draw(st.lists(st.integers(0, 70), max_size=3)))
            state[name] = ts.tensor(np.ones(shape, np.float32))
        elif op == "dtype":
            dt = data.draw(st.sampled_from(["float16", "float64", "uint8", "int64", "bool", "int8"]))
            a = np.ones((2, 3) if data.draw(st.booleans()) else (64,), np.float32)
            state[name] = ts.tensor(a.astype(dt))
        elif op == "key":
            state[data.draw(st.sampled_from([7, 10 ** 100, ("a",), "", "x" * 2000, 2.5, None, "a\nb", "\ud800"]))] = state[name]
        elif op == "value":
            state[name] = data.draw(NASTY)
        elif op == "view" and isinstance(state.get(name), ts.Tensor):
            t = state[name]
            state[name] = ts.Tensor(t.storage, t.shape, tuple(data.draw(st.lists(st.integers(0, 10 ** 6), min_size=len(t.shape), max_size=len(t.shape)))),
                                    data.draw(st.integers(0, 10 ** 6)))
        elif op == "training":
            state = {"model_state_dict": state, "epoch": data.draw(NASTY)} if fmt == "corenet" else state
            names = list(state)
        else:
            state.pop(name, None)
            names = list(state) or ["x"]
    ts.save(state, path)


def _zip_mutation(data, path: Path):
    from hostile import rezip

    raw = bytearray(path.read_bytes())
    op = data.draw(st.sampled_from(["flip", "central", "truncate", "append", "recompress", "pickle", "insert"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 16))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(raw))
    elif op == "central":
        heads = [i for i in range(len(raw) - 4) if raw[i:i + 4] == b"PK\x01\x02"]
        if heads:
            pos = data.draw(st.sampled_from(heads))
            field, size = data.draw(st.sampled_from([(6, 2), (8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2),
                                                     (30, 2), (42, 4), (46, 1)]))
            value = data.draw(st.integers(0, 2 ** (8 * size) - 1))
            raw[pos + field:pos + field + size] = value.to_bytes(size, "little")
        path.write_bytes(bytes(raw))
    elif op == "truncate":
        path.write_bytes(bytes(raw[:data.draw(st.integers(0, len(raw) - 1))]))
    elif op == "append":
        path.write_bytes(bytes(raw) + data.draw(st.binary(min_size=1, max_size=64)))
    elif op == "recompress":
        method = data.draw(st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]))
        tmp = path.with_name("re.tmp")
        rezip(path, tmp, compress=method)
        tmp.replace(path)
    else:
        def edit(name, blob):
            if not name.endswith("data.pkl"):
                return blob
            b = bytearray(blob)
            if op == "pickle":
                for _ in range(data.draw(st.integers(1, 4))):
                    b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
            else:
                i = data.draw(st.integers(2, len(b)))
                b[i:i] = data.draw(st.sampled_from(PICKLE_SNIPPETS))
            return bytes(b)
        tmp = path.with_name("re.tmp")
        rezip(path, tmp, member_fn=edit)
        tmp.replace(path)


@SETTINGS
@given(data=st.data(), variant=st.sampled_from(["corenet", "hfbin"]))
def test_torch_checkpoints(sandbox, bases, data, variant):
    with Case(bases[variant], "torch", bases["cases"]) as case:
        file = case.target if variant == "corenet" else case.target / "pytorch_model.bin"
        if data.draw(st.integers(0, 2)) == 0:
            _object_mutation(data, file, "corenet" if variant == "corenet" else "hf")
        else:
            _zip_mutation(data, file)
        req = {"kind": "convert", "path": str(file if variant == "corenet" else case.target),
               "out": str(case.root / "outparent" / "out")}
        if variant == "corenet":
            req["config"] = str(bases["corenet"].parent / "config.json")
        check(sandbox, case, req, "torch")


# --- tokenizers ----------------------------------------------------------------------------------

SPECIAL_TARGETS = ["/dev/zero", "/dev/urandom", "/dev/null", "fifo", "dir", "sparse", "loop", "dangling"]


def _special_file(data, target: Path):
    what = data.draw(st.sampled_from(SPECIAL_TARGETS))
    if target.exists() or target.is_symlink():
        target.unlink()
    if what.startswith("/dev/"):
        os.symlink(what, target)
    elif what == "fifo":
        os.mkfifo(target)
    elif what == "dir":
        target.mkdir()
    elif what == "sparse":
        with open(target, "wb") as f:
            f.truncate(65 << 20)
    elif what == "loop":
        os.symlink(target.name, target)
    else:
        os.symlink(target.name + ".missing", target)


def _tokenizer_config_op(data, cfg):
    key = data.draw(st.sampled_from(["tokenizer_class", "tokenizer_file", "vocab_file", "merges_file",
                                     "fast_tokenizer_files", "auto_map", "chat_template_type", "tool_parser_type",
                                     "model_max_length", "added_tokens_decoder", "bos_token", "eos_token",
                                     "chat_template"]))
    cfg[key] = data.draw(st.one_of(NASTY, st.sampled_from(
        ["LlamaTokenizer", "AutoTokenizer", "GPT2Tokenizer", "../../x", "/etc/passwd", "tokenizer.json",
         {"AutoTokenizer": ["x.Y", None]}, ["tokenizer.../../x.json"], "{{ raise('x') }}", 10 ** 20])))


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["tokenizer.json", "tokenizer.json", "tokenizer_config.json",
                                              "special", "llama2c"]))
def test_tokenizer_files(sandbox, bases, data, which):
    if which == "llama2c":
        if not TOK512.exists():
            pytest.skip("shared/data/models/stories260K/tok512.bin is absent")
        with Case(bases["llama2c"], "tokenizer", bases["cases"]) as case:
            raw = bytearray(case.target.read_bytes())
            op = data.draw(st.sampled_from(["flip", "truncate", "length", "score", "append"]))
            if op == "flip":
                for _ in range(data.draw(st.integers(1, 8))):
                    raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
            elif op == "truncate":
                raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
            elif op in ("length", "score"):
                pos = data.draw(st.integers(0, len(raw) // 4 - 1)) * 4
                raw[pos:pos + 4] = (data.draw(st.integers(-(2 ** 31), 2 ** 31 - 1)).to_bytes(4, "little", signed=True)
                                    if op == "length" else b"\x00\x00\xc0\x7f")
            else:
                raw += data.draw(st.binary(min_size=1, max_size=32))
            case.target.write_bytes(bytes(raw))
            check(sandbox, case, {"kind": "llama2c", "path": str(case.target)}, "tokenizer")
            return
    with Case(bases["f32"], "tokenizer", bases["cases"]) as case:
        if which == "special":
            name = data.draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                              "chat_template.jinja", "tokenizer.model", "vocab.json"]))
            _special_file(data, case.target / name)
        elif which == "tokenizer_config.json":
            json_mutation(data, case.target / which, {"key": _tokenizer_config_op})
        else:
            json_mutation(data, case.target / which)
        check(sandbox, case, {"kind": "model", "path": str(case.target)}, "tokenizer")
