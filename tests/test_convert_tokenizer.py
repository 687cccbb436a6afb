"""SentencePiece -> Hugging Face tokenizer conversion, and the OpenELM path end to end:
a CoreNet checkpoint with the padded 32128-row vocabulary plus the Llama-2 tokenizer.model."""

import gzip
import json
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlxeff
from conftest import SHARED_DATA, make_model, tiny_args, write_corenet
from mlxeff.convert import convert
from mlxeff.convert.tokenizer import sentencepiece_to_hf

SPM = SHARED_DATA / "tokenizers" / "llama2" / "tokenizer.model"
VALID = SHARED_DATA / "gutenberg-children" / "valid.txt.gz"
needs_spm = pytest.mark.skipif(not SPM.exists(), reason="shared/data/tokenizers/llama2/tokenizer.model is absent")


@needs_spm
def test_converted_tokenizer_matches_sentencepiece():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SPM))
    tok = sentencepiece_to_hf(SPM)
    assert len(tok) == 32000 and (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    texts = ["Hello world", "  two  spaces", " leading", "trailing ", "tabs\tand\nnewlines", "ünïcödé 🤖 日本語", ""]
    if VALID.exists():
        with gzip.open(VALID, "rt") as f:
            texts += f.read(400_000).splitlines()
    mismatched = [t for t in texts if tok.encode(t) != [1] + sp.encode(t)]
    assert mismatched == []
    for t in texts[:300]:
        ids = tok.encode(t)
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:])


@needs_spm
def test_corenet_openelm_path_with_llama2_tokenizer(tmp_path, monkeypatch, capsys):
    # a tiny OpenELM with the real vocabulary size: 32128 CoreNet rows sliced to the 32000 pieces
    args = tiny_args(vocab_size=32000)
    model = make_model(args)
    pt = write_corenet(model, tmp_path / "checkpoint_ema_best.pt", rows=32128, dtype="float16")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(args.to_dict()))
    s = convert(pt, tmp_path / "out", config=cfg, vocab_size=32000, tokenizer=SPM,
                dtype="float32", progress=False)
    assert s["tokenizer_size"] == 32000 and s["vocab_size"] == 32000
    loaded, tok = mlxeff.load(tmp_path / "out")
    assert tok.encode("Once upon a time")[:1] == [1]
    ref = make_model(args)
    from mlx.utils import tree_map

    ref.update(tree_map(lambda p: p.astype(mx.float16).astype(mx.float32), model.parameters()))
    x = mx.array([tok.encode("Once upon a time there was")])
    np.testing.assert_allclose(np.array(loaded(x)), np.array(ref(x)), atol=1e-5, rtol=0)

    from mlxeff.cli.main import main

    monkeypatch.setenv("MLXEFF_NO_OPENBLAS", "1")
    monkeypatch.setattr(sys, "argv", ["mlxeff", "generate", "Once upon a time", "--model", str(tmp_path / "out"),
                                      "-n", "4", "--json"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    assert json.loads(capsys.readouterr().out)["generation_tokens"] >= 1
