"""Shared fixtures: tiny configs, fixed seeds, no network."""

from __future__ import annotations

import os
from pathlib import Path

# MLX's CUDA backend computes float32 matmuls in TF32 (10-bit mantissa) unless told otherwise; the
# tests compare float32 paths with tolerances of 1e-5, so they ask for full float32 before MLX loads.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
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


def interruptible() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: the default disposition, so
    that Python installs its KeyboardInterrupt handler even when the test run itself was started
    with SIGINT ignored (a background job of a non-interactive shell)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


# --- checkpoint fixtures for the converter tests (written without torch) ---

def corenet_state(model, *, rows=None, dtype="float32", exotic=False, seed=1):
    """``model``'s weights as a CoreNet state dict of ``convert.torch_save`` tensors.

    CoreNet names (no ``transformer.`` prefix, ``classifier`` for an untied head); ``rows`` pads
    the vocabulary with random rows as CoreNet does (32128 for 32000); ``dtype`` float32, float16
    or bfloat16; ``exotic`` stores 2-D weights transposed (strides) and the norms as offset views
    of one shared storage, as views of a shared buffer are saved.
    """
    from collections import OrderedDict

    import numpy as np
    from mlx.utils import tree_flatten

    from mlxeff.convert import torch_save as ts
    from mlxeff.convert.corenet import source_name

    rng = np.random.default_rng(seed)

    def bits(a):
        a = np.asarray(a, np.float32)
        if dtype == "bfloat16":
            return ts.bf16_bits(a)
        return a.astype(dtype)

    params = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    for k in ("transformer.token_embeddings.weight", "lm_head.weight"):
        if k in params and rows and rows > params[k].shape[0]:
            extra = rng.standard_normal((rows - params[k].shape[0], params[k].shape[1])).astype(np.float32)
            params[k] = np.concatenate([params[k], extra])
    state = OrderedDict()
    norms = [k for k, v in params.items() if v.ndim == 1]
    shared = None
    if exotic and norms:
        gap = 3
        flat = np.concatenate([np.concatenate([params[k], np.zeros(gap, np.float32)]) for k in norms])
        shared = ts.Storage(dtype, flat.size, bits(flat))
    offset = 0
    for k, v in params.items():
        if exotic and v.ndim == 1:
            state[source_name(k)] = ts.Tensor(shared, v.shape, (1,), offset)
            offset += v.size + 3
        elif exotic and v.ndim == 2:
            t = ts.tensor(bits(np.ascontiguousarray(v.T)), dtype)
            state[source_name(k)] = ts.Tensor(t.storage, v.shape, (1, v.shape[0]))
        else:
            state[source_name(k)] = ts.tensor(bits(v), dtype)
    state._metadata = OrderedDict({"": {"version": 1}})
    return state


def write_corenet(model, path, *, training=False, **kw):
    """A CoreNet ``.pt`` (flat, or a training checkpoint with optimizer state) for ``model``."""
    import numpy as np

    from mlxeff.convert import torch_save as ts

    state = corenet_state(model, **kw)
    obj = state
    if training:
        first = next(iter(state.values()))
        obj = {
            "iterations": 1000, "epoch": 2, "model_state_dict": state, "best_metric": np.float64(2.5),
            "optim_state_dict": {"state": {0: {"step": ts.tensor(np.array(1000.0, np.float32)),
                                               "exp_avg": ts.Tensor(first.storage, first.shape, first.stride)}},
                                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
            "gradient_scaler_state_dict": {"scale": 65536.0, "_growth_tracker": 10},
        }
    return ts.save(obj, path)


def write_hf_openelm(model, directory, *, fmt="safetensors", shard=False):
    """A Hugging Face OpenELM directory (config.json + weights) for ``model``."""
    import json

    import numpy as np
    from mlx.utils import tree_flatten

    from mlxeff.convert import torch_save as ts

    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.args.to_dict()
    cfg["torch_dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(cfg))
    weights = dict(tree_flatten(model.parameters()))
    if fmt == "bin":
        ts.save({k: ts.tensor(np.array(v)) for k, v in weights.items()}, directory / "pytorch_model.bin")
    elif shard:
        names = list(weights)
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, part in enumerate(halves):
            fname = f"model-{i + 1:05d}-of-00002.safetensors"
            mx.save_safetensors(str(directory / fname), {k: weights[k] for k in part})
            weight_map.update({k: fname for k in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        mx.save_safetensors(str(directory / "model.safetensors"), weights)
    return directory


METAL_CHECK = SHARED / "tools" / "metal-check"


def metal_check_unavailable() -> str:
    """Why shared/tools/metal-check cannot run here, or '' when it can (it needs clang++ >= 17)."""
    import re
    import shutil
    import subprocess

    if not (METAL_CHECK / "metal_check.py").exists():
        return f"metal-check not found at {METAL_CHECK}"
    names = [os.environ.get("METAL_CHECK_CXX"), "clang++-19", "clang++-18", "clang++-17", "clang++"]
    for name in filter(None, names):
        exe = shutil.which(name)
        if exe:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
            m = re.search(r"version (\d+)", out)
            if m and int(m.group(1)) >= 17:
                return ""
    return "metal-check needs clang++ >= 17 (apt-get install -y clang-19)"


def use_metal_check() -> None:
    """Skip the calling test when metal-check cannot run; otherwise make it importable."""
    import sys

    why = metal_check_unavailable()
    if why:
        pytest.skip(why)
    if str(METAL_CHECK) not in sys.path:
        sys.path.insert(0, str(METAL_CHECK))
