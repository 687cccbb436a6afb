"""Corpus reading, BPE tokenizer, token cache, packing and deterministic batches."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from mlxeff import data
from mlxeff.errors import MlxeffError

WORDS = ("the a little girl boy cat dog ran sat saw went home into forest garden and then "
         "quickly slowly happy old red big small tree house over under").split()


def corpus_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Deterministic pseudo-English with paragraphs, indentation and non-ASCII text."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_sentences):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=rng.integers(4, 12))]
        lines.append(" ".join(words).capitalize() + ".")
        if i % 7 == 6:
            lines.append("\n    \u201cOh!\u201d said Ren\u00e9e \u2014 caf\u00e9 na\u00efve.\n")
    return "\n".join(lines) + "\n"


def write_corpus(directory: Path, n_files: int = 2, sentences: int = 400) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        text = corpus_text(sentences, seed=i)
        if i % 2:
            p = directory / f"part-{i}.txt.gz"
            p.write_bytes(gzip.compress(text.encode()))
        else:
            p = directory / f"part-{i}.txt"
            p.write_text(text, encoding="utf-8")
        files.append(p)
    return files


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    files = write_corpus(d)
    out = d / "tok"
    data.train_tokenizer(files, 400, out)
    return out, files


def test_split_chunks_keeps_encoding(tok_dir):
    out, _ = tok_dir
    tok = data.load_tokenizer(out)
    text = corpus_text(300, seed=5) + "  trailing   spaces \n\n\n  and more\n"
    chunks = data.split_chunks(text, size=50)
    assert len(chunks) > 20 and "".join(chunks) == text
    backend = tok._tokenizer.backend_tokenizer
    whole = backend.encode(text, add_special_tokens=False).ids
    pieces = [i for c in chunks for i in backend.encode(c, add_special_tokens=False).ids]
    assert pieces == whole


def test_tokenizing_with_a_limit_gives_the_streams_first_tokens(tok_dir, tmp_path, monkeypatch):
    """``limit`` stops early (``mlxeff eval --max-tokens``) with a prefix of the whole stream, across
    chunk batches and files, never cached."""
    out, files = tok_dir
    tok = data.load_tokenizer(out)
    monkeypatch.setattr(data, "CHUNK_CHARS", 64)  # many chunks, a few per batch
    whole = data.tokenize_files(files, tok)
    encoded = []
    real = data.split_chunks
    monkeypatch.setattr(data, "split_chunks", lambda text, size=64: encoded.append(1) or real(text, 64))
    for limit in (1, 37, len(whole) // 2, len(whole) - 1, len(whole) + 5):
        encoded.clear()
        part = data.tokenize_files(files, tok, cache_dir=tmp_path, limit=limit)
        assert len(part) >= min(limit, len(whole)) and np.array_equal(part, whole[: len(part)]), limit
        if limit < len(whole) // 3:
            assert len(encoded) < len(files)  # later files were never read into the tokenizer
    assert not list(tmp_path.glob("tokens-*"))
    text = data.read_text(files[0])
    ids = data.encode_text(tok, text)
    for limit in (5, 200):
        got = data.encode_text(tok, text, limit)
        assert limit <= len(got) < len(ids) and np.array_equal(got, ids[: len(got)])


def test_tokenizer_special_ids_round_trip_and_streaming(tok_dir):
    out, _ = tok_dir
    tok = data.load_tokenizer(out)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.eos_token_ids == {2}
    text = "The cat sat \u2014 caf\u00e9 \U0001F600 unseen-w\u00f6rds 123\n  indented"
    ids = tok.encode(text, add_special_tokens=True)
    assert 1 not in ids and 0 not in ids  # no BOS added, no unknown bytes
    assert tok.decode(ids) == text
    detok = tok.detokenizer
    detok.reset()
    streamed = ""
    for i in ids:
        detok.add_token(i)
        streamed += detok.last_segment
    detok.finalize()
    streamed += detok.last_segment
    assert streamed == text
    assert (out / "tokenizer_config.json").read_text().count("PreTrainedTokenizerFast") == 1


def test_token_cache_and_key(tok_dir, tmp_path):
    out, files = tok_dir
    tok = data.load_tokenizer(out)
    cache = tmp_path / "cache"
    a = data.tokenize_files(files, tok, cache)
    assert a.dtype == np.uint16 and a[-1] == 2
    assert int((a == 2).sum()) == len(files)  # one EOS per document
    assert len(list(cache.glob("tokens-*.npy"))) == 1
    b = data.tokenize_files(files, tok, cache)
    assert isinstance(b, np.memmap) and np.array_equal(a, b)
    direct = np.concatenate([np.append(data.encode_text(tok, data.read_text(f)), 2) for f in files])
    assert np.array_equal(a, direct)
    # A changed file gets a new cache entry.
    changed = tmp_path / "changed.txt"
    changed.write_text(data.read_text(files[0]) + "More text.\n")
    c = data.tokenize_files([changed, files[1]], tok, cache)
    assert len(list(cache.glob("tokens-*.npy"))) == 2 and len(c) > len(a)


def test_tokenizing_shows_a_byte_bar_only_when_asked(tok_dir, capsys, monkeypatch):
    import mlxeff.progress

    monkeypatch.setattr(mlxeff.progress, "_enabled", None)  # as no --json has configured it
    out, files = tok_dir
    tok = data.load_tokenizer(out)
    kb = f"{sum(len(data.read_bytes(f)) for f in files) / 1000:.1f}k"  # uncompressed
    quiet = data.tokenize_files(files, tok)  # stderr is no terminal here
    assert capsys.readouterr().err == ""
    shown = data.tokenize_files(files, tok, progress=True)
    err = capsys.readouterr().err
    assert "tokenizing: 100%" in err and f"{kb}/{kb}" in err and "B/s" in err, err
    assert np.array_equal(quiet, shown)


def test_packing_epochs_and_determinism():
    tokens = np.arange(1001, dtype=np.uint16)
    ds = data.PackedDataset(tokens, 10, seed=3)
    assert ds.num_sequences == 100
    epoch0 = ds.samples(0, 100)
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 1000, 10))  # every sequence once
    assert np.array_equal(epoch0[:, 1:], epoch0[:, :-1] + 1)  # inputs and shifted targets
    epoch1 = ds.samples(100, 100)
    assert sorted(epoch1[:, 0].tolist()) == sorted(epoch0[:, 0].tolist())
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(ds.batch(7, 16), data.PackedDataset(tokens, 10, seed=3).batch(7, 16))
    assert not np.array_equal(ds.batch(7, 16), data.PackedDataset(tokens, 10, seed=4).batch(7, 16))
    # A batch straddling the epoch boundary takes the end of one order and the start of the next.
    straddle = ds.batch(6, 16)  # samples 96..111
    assert np.array_equal(straddle[:4], epoch0[96:]) and np.array_equal(straddle[4:], epoch1[:12])


def test_bad_inputs(tmp_path, tok_dir):
    out, _ = tok_dir
    tok = data.load_tokenizer(out)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text \xff\xfe broken")
    with pytest.raises(MlxeffError, match="not valid UTF-8"):
        data.tokenize_files([bad], tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(MlxeffError, match="empty"):
        data.tokenize_files([empty], tok)
    with pytest.raises(MlxeffError, match="empty"):
        data.train_tokenizer([empty], 300, tmp_path / "t")
    with pytest.raises(MlxeffError, match="no .*files match"):
        data.expand_files([str(tmp_path / "nothing-*.txt")])
    with pytest.raises(MlxeffError, match=".txt or .txt.gz"):
        (tmp_path / "x.json").write_text("{}")
        data.expand_files([str(tmp_path / "x.json")])
    with pytest.raises(MlxeffError, match="fewer than one sequence"):
        data.PackedDataset(np.arange(5), 10)
