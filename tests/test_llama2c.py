"""llama2.c tokenizer.bin in `convert --tokenizer`: the real stories260K model converts with its
tok512.bin, generates readable text, reproduces the reference greedy ids through the Python API,
and its tokenizer encodes exactly as llama2.c does."""

import gzip
import json
import os
import struct
import subprocess
import sys

import pytest

import mlxeff
from conftest import SHARED_DATA
from mlxeff.convert import convert, llama2c
from mlxeff.convert.tokenizer import llama2c_to_hf
from mlxeff.errors import MlxeffError

STORIES = SHARED_DATA / "models" / "stories260K"
TOK = STORIES / "tok512.bin"
VALID = SHARED_DATA / "gutenberg-children" / "valid.txt.gz"
pytestmark = pytest.mark.skipif(not TOK.exists(), reason="shared/data/models/stories260K is absent")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "out"
    s = convert(STORIES, out, tokenizer=TOK, dtype="float32", progress=False)
    assert s["tokenizer_size"] == 512
    return out


def test_greedy_ids_from_bos_match_the_reference(converted):
    model, tok = mlxeff.load(converted)
    ref = json.loads((STORIES / "reference_greedy.json").read_text())
    ids = [r.token for r in mlxeff.stream_generate(model, tok, ref["prompt_ids"], max_tokens=len(ref["greedy_ids"]))]
    assert ids == ref["greedy_ids"]
    assert tok.decode(ids).startswith("Once upon a time, there was a little girl named Lily.")


def test_cli_convert_and_generate_print_readable_text(tmp_path):
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    out = tmp_path / "X"
    r = subprocess.run([sys.executable, "-m", "mlxeff.cli.main", "convert", str(STORIES), "-o", str(out),
                        "--tokenizer", str(TOK)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokenizer     512 tokens" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mlxeff.cli.main", "generate", "-m", str(out), "Once upon a time",
                        "--max-tokens", "40"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "there was a little girl named Lily" in r.stdout


def test_encoding_equals_llama2c(tmp_path):
    tok = llama2c_to_hf(TOK)
    vocab = llama2c.read_vocab(TOK)
    texts = ["Once upon a time", "  two  spaces ", "Lily's mom said, \"no!\"\n\tnew line", "ünïcödé 🤖 日本語", "",
             "a" * 50, "The end."]
    if VALID.exists():
        with gzip.open(VALID, "rt") as f:
            texts += [line for line in f.read(60_000).splitlines() if line.strip()][:300]
    mismatched = [t for t in texts if tok.encode(t) != llama2c.encode(vocab, t)]
    assert mismatched == []
    for t in texts[:50]:
        assert tok.decode(tok.encode(t), skip_special_tokens=True) == t


def records(raw: bytes):
    """Offsets of each record's (score, length) header in a llama2.c tokenizer file."""
    pos, out = 4, []
    while pos < len(raw):
        out.append(pos)
        pos += 8 + struct.unpack_from("<i", raw, pos + 4)[0]
    return out


@pytest.mark.parametrize("edit,match", [
    (lambda r, rec: r[:rec[300] + 5], r"record 300 is truncated"),
    (lambda r, rec: struct.pack("<i", 0) + r[4:], r"max_token_length 0 is outside"),
    (lambda r, rec: r[:rec[5] + 4] + struct.pack("<i", 99) + r[rec[5] + 8:], r"record 5 has length 99"),
    (lambda r, rec: r[:rec[5] + 4] + struct.pack("<i", -1) + r[rec[5] + 8:], r"record 5 has length -1"),
    (lambda r, rec: r[:rec[300]] + struct.pack("<f", float("nan")) + r[rec[300] + 4:], r"record 300 has score nan"),
    (lambda r, rec: r[:rec[400] + 8] + b"\xff" + r[rec[400] + 9:], r"piece 400 is not UTF-8"),
    (lambda r, rec: r[:rec[301]] + r[rec[300]:rec[301]] + r[rec[302]:], r"piece 301 .* is empty or repeated"),
    (lambda r, rec: r[:rec[1]] + r[rec[2]:], r"no EOS piece|no BOS piece"),
])
def test_damaged_tokenizer_bin_refused(tmp_path, edit, match):
    raw = TOK.read_bytes()
    bad = tmp_path / "tok.bin"
    bad.write_bytes(edit(raw, records(raw)))
    with pytest.raises(MlxeffError, match=match) as e:
        convert(STORIES, tmp_path / "out", tokenizer=bad, progress=False)
    assert str(bad) in str(e.value) and not (tmp_path / "out").exists()


def test_llama2c_special_file_refused(tmp_path):
    bad = tmp_path / "tok.bin"
    os.symlink("/dev/zero", bad)
    with pytest.raises(MlxeffError, match="expected a regular file, found a character device"):
        convert(STORIES, tmp_path / "out", tokenizer=bad, progress=False)
