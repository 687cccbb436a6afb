"""The training mixture: items from training books only, each inside one packed training sequence."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from test_tasks import DEFAULT, HELDOUT_WORDS, TRAIN_WORDS, write_corpus

from mlxeff import data
from mlxeff.errors import MlxeffError
from mlxeff.tasks import corpus, generators, mixture

SEQ = 256


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(DEFAULT)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok):
    root = write_corpus(tmp_path_factory.mktemp("mixcorpus"), planted=False)
    out = root / "mix" / "tasks.txt.gz"
    stats = mixture.build(root, tok, out, tokens=12_000, seq_len=SEQ, seed=0, progress=False)
    return root, out, stats


def test_items_sit_inside_packed_sequences(built, tok):
    root, out, stats = built
    # exactly what `mlxeff train --train tasks.txt.gz --train "train-*.txt.gz"` packs
    files = data.expand_files([str(out), str(root / "train-*.txt.gz")], "training")
    tokens = data.tokenize_files(files, tok)
    packed = data.PackedDataset(tokens, SEQ, seed=0)
    pieces = gzip.decompress(out.read_bytes()).decode()
    assert stats["tokens"] == len(data.encode_text(tok, pieces))
    assert sum(stats["items"].values()) == len(stats["places"]) > 10
    assert set(stats["items"]) == {"multidoc-qa", "kv-retrieval", "copy"} and min(stats["items"].values()) > 0
    for offset, n, task, _ in stats["places"]:
        seq, at = divmod(offset, SEQ)
        assert at + n <= SEQ, f"{task} item at {offset} crosses a sequence boundary"
        item = packed.sequence(seq)[at:at + n].tolist()
        text = tok.decode(item)
        assert text.endswith("\n")
        assert text.startswith(("Passage 1:", "Extract the value", "Text:"))
        assert list(tok.encode(text, add_special_tokens=False)) == item


def test_items_carry_followups_that_fit(built, tok):
    root, out, stats = built
    text = gzip.decompress(out.read_bytes()).decode()
    assert text.count("\nQuestion: ") > 2 * stats["items"]["multidoc-qa"]
    assert text.count("\nKey: ") > 2 * stats["items"]["kv-retrieval"]
    count = corpus.token_counter(tok)
    split = corpus.load_split(root, "train")
    item = next(it for it in (mixture.draw_item(split, k, count, 0, SEQ)[1] for k in range(50))
                if len(it.followups) > 1)
    while item.followups:  # trimmed to a limit below the item's size: the last follow-ups go
        before = len(item.followups)
        n = mixture.fit_followups(item, count, count(item.text()) - 1)
        assert len(item.followups) < before and n == count(item.text())


def test_items_come_from_training_books(built):
    root, out, stats = built
    text = gzip.decompress(out.read_bytes()).decode()
    body = re.sub(r"Passage \d+|Question|Which word follows|Answer|Text|Copy|Extract the value "
                  r"corresponding to the specified key in the JSON object below|JSON data|Key|"
                  r"Corresponding value|[0-9a-f]{8}", " ", text)
    words = set(re.findall(r"[a-z]+", body.lower()))
    assert words <= set(TRAIN_WORDS) and not words & set(HELDOUT_WORDS)


def test_mixture_is_deterministic_and_summarized(built, tok, tmp_path):
    root, out, stats = built
    again = tmp_path / "again.txt.gz"
    mixture.build(root, tok, again, tokens=12_000, seq_len=SEQ, seed=0, progress=False)
    assert again.read_bytes() == out.read_bytes()
    summary = json.loads(out.with_name("tasks.json").read_text())
    assert summary["tokens"] == stats["tokens"] >= 12_000 and summary["seq_len"] == SEQ
    assert summary["filler_tokens"] + sum(summary["item_tokens"].values()) == summary["tokens"]
    other = tmp_path / "other.txt.gz"
    mixture.build(root, tok, other, tokens=2_000, seq_len=SEQ, seed=1, progress=False)
    assert gzip.decompress(other.read_bytes())[:2000] != gzip.decompress(out.read_bytes())[:2000]


def test_workers_write_the_same_file(built, tok, tmp_path):
    root, out, stats = built
    par = tmp_path / "par.txt.gz"
    again = mixture.build(root, tok, par, tokens=12_000, seq_len=SEQ, seed=0, progress=False, workers=2)
    assert par.read_bytes() == out.read_bytes()
    assert again["places"] == stats["places"] and again["item_numbers"] == stats["item_numbers"]


def test_mixture_bad_input(built, tok, tmp_path):
    root, _, _ = built
    with pytest.raises(MlxeffError, match="must end in .txt.gz"):
        mixture.build(root, tok, tmp_path / "x.txt", tokens=10)
    with pytest.raises(MlxeffError, match="--seq-len must be at least 256"):
        mixture.build(root, tok, tmp_path / "x.txt.gz", tokens=10, seq_len=64)
    with pytest.raises(MlxeffError, match="--workers must be at least 1"):
        mixture.build(root, tok, tmp_path / "x.txt.gz", tokens=10, workers=0)
    with pytest.raises(MlxeffError, match="no train-"):
        mixture.build(tmp_path, tok, tmp_path / "x.txt.gz", tokens=10)
    r = subprocess.run([sys.executable, "-m", "mlxeff.tasks.mixture", "--data", str(tmp_path),
                        "--tokenizer", str(DEFAULT), "--out", str(tmp_path / "y.txt.gz"),
                        "--tokens", "10"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "y.txt.gz").exists()


def test_fillers_and_places_use_whole_tokens(built, tok):
    root, _, _ = built
    split = corpus.load_split(root, "train")
    count = corpus.token_counter(tok)
    rng = np.random.default_rng(0)
    for need in (1, 5, 40, 200):
        piece, n = mixture.filler(split, rng, need, count)
        assert need <= n <= need + mixture.FILLER_SLACK and n == count(piece) and piece.endswith("\n")


def test_weights_add_repeat_items_inside_sequences(built, tok, tmp_path):
    root, _, _ = built
    out = tmp_path / "rep.txt.gz"
    weights = mixture.parse_weights("multidoc-qa=1,repeat=2")
    assert weights == {"multidoc-qa": 1.0, "repeat": 2.0}
    stats = mixture.build(root, tok, out, tokens=8_000, seq_len=SEQ, seed=0, progress=False,
                          weights=weights)
    assert set(stats["items"]) == {"multidoc-qa", "repeat"} and stats["items"]["repeat"] > 0
    assert stats["weights"] == weights
    text = gzip.decompress(out.read_bytes()).decode()
    ids = data.encode_text(tok, text)
    for offset, n, task, piece in stats["places"]:
        assert offset // SEQ == (offset + n - 1) // SEQ
        if task == "repeat":  # the passage, a separator, the whole passage again
            item = tok.decode(ids[offset:offset + n].tolist())
            body = item[:-1]
            assert any(body == body[:k] + sep + body[:k] for sep in generators.REPEAT_SEPARATORS
                       for k in [(len(body) - len(sep)) // 2] if k > 20), item
    # the default weights still make the default model v2's file
    assert mixture.parse_weights("multidoc-qa=2,kv-retrieval=1,copy=1.5") == mixture.WEIGHTS


@pytest.mark.parametrize("text,expect", [("nope=1", "unknown task 'nope'"),
                                         ("copy=x", "is not TASK=NUMBER"),
                                         ("copy=-1", "must be at least 0"),
                                         ("copy=0", "at least one task needs a positive weight")])
def test_bad_weights_are_one_line(text, expect):
    with pytest.raises(MlxeffError, match=expect):
        mixture.parse_weights(text)
