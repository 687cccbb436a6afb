"""Shared fixtures: tiny configs, fixed seeds, no network."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mlxeff.models import Model, layerwise_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"

TEXT = (
    "Once upon a time there was a little girl who lived in a village near the forest. "
    "Whenever she went out, the little girl wore a red riding cloak, so everyone in the village "
    "called her Little Red Riding Hood. One morning she asked her mother if she could go to visit "
    "her grandmother as it had been a while since they had seen each other. "
) * 4


def tiny_args(**kw):
    base = dict(vocab_size=96, ffn_dim_divisor=32)
    base.update(kw)
    return layerwise_config(4, 64, 16, **base)


def make_model(args=None, seed=0, dtype=mx.float32):
    mx.random.seed(seed)
    model = Model(args or tiny_args())
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def tiny_model():
    return make_model()


def make_tokenizer(vocab_size: int = 96):
    """A byte-level BPE tokenizer trained on a few sentences, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0], show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def saved_dir(tmp_path, tiny_tokenizer):
    import mlxeff

    vocab = len(tiny_tokenizer)
    model = make_model(tiny_args(vocab_size=vocab))
    out = tmp_path / "tiny"
    mlxeff.save(model, tiny_tokenizer, out)
    return out, model
