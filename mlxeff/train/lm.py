"""Language-model training from text files (what ``mlxeff train`` runs): a tokenizer (reused or a
byte-level BPE trained on the corpus), a layer-wise scaled model (OpenELM, arXiv 2404.14619),
``train_loop``, and the final model in the mlxeff format in ``OUT/model``.

Every option is checked before ``OUT`` is created; a run that fails before its first checkpoint
removes the ``OUT`` it created (``run_folder``), so bad input leaves no empty or half-filled
folder behind.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .. import data
from ..errors import MlxeffError
from ..io import atomic_directory
from .checkpoints import refuse_existing, run_folder
from .config import DTYPES, TrainConfig
from .corpus import CorpusFiles, check_eval_tokens, load_corpus
from .loop import train_loop
from .losses import lm_loss, valid_loss_fn


def build_args(shape: dict, vocab_size: int, seq_len: int):
    """ModelArgs from ``--config NAME`` or the layer-wise scaling options."""
    from ..models import layerwise_config, openelm_config

    if shape.get("config"):
        args = openelm_config(shape["config"], vocab_size=vocab_size)
    else:
        for name in ("layers", "model_dim", "head_dim", "gqa_groups", "ffn_divisor"):
            if shape[name] < 1:
                raise MlxeffError(f"--{name.replace('_', '-')} must be at least 1, got {shape[name]}")
        args = layerwise_config(
            shape["layers"], shape["model_dim"], shape["head_dim"],
            qkv_multipliers=tuple(shape["qkv_mult"]), ffn_multipliers=tuple(shape["ffn_mult"]),
            num_gqa_groups=shape["gqa_groups"], ffn_dim_divisor=shape["ffn_divisor"],
            vocab_size=vocab_size,
        )
    args.max_context_length = seq_len  # the context the model is trained on
    args.bos_token_id, args.eos_token_id = 1, 2
    return args


def init_model(args, seed: int):
    """A fresh model: MLX's default init, with each residual branch's output projection scaled by
    1/sqrt(2 * layers) (GPT-2's rule) so the residual stream's variance does not grow with depth."""
    from ..models import Model

    mx.random.seed(seed)
    model = Model(args)
    scale = (2 * args.num_transformer_layers) ** -0.5
    for layer in model.layers:
        layer.attn.out_proj.weight = layer.attn.out_proj.weight * scale
        layer.ffn.proj_2.weight = layer.ffn.proj_2.weight * scale
    mx.eval(model.parameters())
    return model


def load_init_model(init_dir: Path, seq_len: int):
    """A saved model to continue training from, in float32 (loaded as trainers load their frozen
    base, ``techniques.artifacts.load_frozen_base``: affine 4/8-bit layers dequantized, exactly
    ``mx.dequantize`` of the stored weights); SeedLM layers are refused, their weights are not
    trainable parameters. Its context grows to ``seq_len`` if shorter."""
    from ..quant.seedlm import bits_per_weight
    from ..techniques.artifacts import load_frozen_base

    model, _, _ = load_frozen_base(init_dir, mx.float32)
    if bits_per_weight(model)["weights"]:
        raise MlxeffError("--init: a SeedLM model cannot be trained; convert the float model "
                          "instead", init_dir)
    model.args.max_context_length = max(model.args.max_context_length or 0, seq_len)
    mx.eval(model.parameters())
    return model


def _initial_model(init, tok, tok_dir: Path, shape: dict, seq_len: int, seed: int):
    """A fresh model of ``shape`` (``init_model``), or the saved model ``init`` to continue,
    checked against the tokenizer."""
    if init is None:
        return init_model(_model_args(tok, tok_dir, shape, seq_len), seed)
    model = load_init_model(Path(init), seq_len)
    if model.args.vocab_size != _vocab_of(tok):
        raise MlxeffError(f"--init: the model has {model.args.vocab_size} vocabulary rows, the "
                          f"tokenizer {_vocab_of(tok)} tokens", tok_dir)
    return model


def _check_tokenizer_options(tokenizer: Optional[Path], vocab_size: Optional[int]) -> None:
    if tokenizer is not None and vocab_size is not None:
        raise MlxeffError("give either --tokenizer DIR or --vocab-size N, not both")
    if tokenizer is None and vocab_size is None:
        raise MlxeffError("give --tokenizer DIR (reuse one) or --vocab-size N (train one)")


def _vocab_of(tok) -> int:
    return len(tok._tokenizer.backend_tokenizer.get_vocab())


def _resolve_tokenizer(out: Path, tokenizer: Optional[Path], vocab_size: Optional[int],
                       files, tokenizer_chars: int, say):
    if tokenizer is not None:
        return data.load_tokenizer(tokenizer), Path(tokenizer)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tok = data.load_tokenizer(tok_dir)
        if _vocab_of(tok) != vocab_size:
            raise MlxeffError(f"holds a tokenizer of {_vocab_of(tok)} tokens, not --vocab-size "
                              f"{vocab_size}", tok_dir)
        say(f"reusing tokenizer {tok_dir}")
        return tok, tok_dir
    tic = time.perf_counter()
    say(f"training a {vocab_size}-token byte-level BPE on up to {tokenizer_chars:,} characters ...")
    with atomic_directory(tok_dir) as tmp:
        data.train_tokenizer(files, vocab_size, tmp, max_chars=tokenizer_chars)
    say(f"tokenizer trained in {time.perf_counter() - tic:.1f} s")
    return data.load_tokenizer(tok_dir), tok_dir


def _model_args(tok, tok_dir: Path, shape: dict, seq_len: int):
    args = build_args(shape, _vocab_of(tok), seq_len)
    if (tok.bos_token_id, tok.eos_token_id) != (args.bos_token_id, args.eos_token_id):
        raise MlxeffError(f"the tokenizer's BOS/EOS ids are {tok.bos_token_id}/{tok.eos_token_id}, "
                          "expected 1/2 (<s>, </s>)", tok_dir)
    return args


def _keep_figures_of_the_run_that_trained(summary: dict, previous: Path) -> None:
    """A resumed run that was already complete trained nothing: keep the earlier figures."""
    old = json.loads(previous.read_text())
    for key in ("train_time_s", "wall_time_s", "tokens_per_s", "resumed_from", "device"):
        summary[key] = old.get(key, summary[key])


def run_training(cfg: TrainConfig, *, train_files, valid_files, out, tokenizer=None,
                 vocab_size=None, tokenizer_chars: int = 40_000_000, shape: dict,
                 eval_tokens: int = 262_144, save_dtype: str = "float16", cache_dir=None,
                 resume: bool = False, init=None, say=print, log=None) -> dict:
    """Tokenizer, token cache, model, ``train_loop``, and the final model in ``out/model``.
    ``init``: a saved model directory to continue training from (its shape and weights; ``shape``
    is then ignored, and the tokenizer is the model's unless ``tokenizer`` names one)."""
    from ..io import save

    wall = time.perf_counter()
    out = Path(out)
    # Every option is checked before anything is created.
    if save_dtype not in DTYPES:
        raise MlxeffError(f"--save-dtype must be one of {sorted(DTYPES)}, got {save_dtype!r}")
    check_eval_tokens(eval_tokens, cfg.seq_len)
    if init is not None:
        if vocab_size is not None:
            raise MlxeffError("--init keeps the model's tokenizer; --vocab-size does not apply")
        if not (Path(init) / "config.json").is_file():
            raise MlxeffError("--init: not a model directory (no config.json)", init)
        tokenizer = tokenizer or Path(init)
    _check_tokenizer_options(tokenizer, vocab_size)
    if out.exists() and not out.is_dir():
        raise MlxeffError("exists and is not a directory", out)
    files = CorpusFiles.expand(train_files, valid_files)
    if init is None:
        build_args(shape, vocab_size or 512, cfg.seq_len)
    if not resume:
        refuse_existing(out)

    with run_folder(out, say):
        tok, tok_dir = _resolve_tokenizer(out, tokenizer, vocab_size, files.train, tokenizer_chars,
                                          say)
        # before tokenizing, so a bad shape or model fails fast (no MLX randomness in between)
        model = _initial_model(init, tok, tok_dir, shape, cfg.seq_len, cfg.seed)
        args = model.args
        corpus = load_corpus(files, tok, Path(cache_dir) if cache_dir else out / "cache", cfg, say)
        windows = corpus.valid_windows(cfg.seq_len, eval_tokens)
        if init is not None:
            say(f"continuing from {init}")
        n_params = args.num_parameters()
        say(f"model: {args.num_transformer_layers} layers, width {args.model_dim}, "
            f"{n_params:,} parameters; {cfg.tokens_per_step:,} tokens per step, "
            f"{corpus.epochs(cfg):.2f} epochs")
        valid_fn = None if windows is None else valid_loss_fn(windows, cfg.batch_size)
        result = train_loop(model, partial(lm_loss, z_loss=cfg.z_loss),
                            corpus.batch_fn(cfg.batch_size), cfg, out_dir=out, valid_fn=valid_fn,
                            resume=resume, log=log, say=say)
    model.set_dtype(DTYPES[save_dtype])
    model_dir = out / "model"
    save(model, tok, model_dir, force=True)
    valid = result["valid"] or {}
    summary = {
        "model_dir": str(model_dir),
        "parameters": n_params,
        "config": args.to_dict(),
        "init": str(init) if init is not None else None,
        "train": cfg.to_dict(),
        **files.describe(),
        "train_tokens_available": int(len(corpus.train_tokens)),
        "tokens_seen": result["tokens_seen"],
        "epochs": corpus.epochs(cfg),
        "steps": cfg.steps,
        "resumed_from": result["start_step"],
        "train_time_s": result["train_time_s"],
        "wall_time_s": time.perf_counter() - wall,
        "tokens_per_s": result["tokens_per_s"],
        "final_loss": result["final_loss"],
        "valid_loss": valid.get("loss"),
        "valid_ppl": valid.get("ppl"),
        "device": str(mx.default_device()),
        "save_dtype": save_dtype,
        "history": result["history"],
    }
    previous = out / "summary.json"
    if result["start_step"] == cfg.steps and previous.is_file():
        _keep_figures_of_the_run_that_trained(summary, previous)
    previous.write_text(json.dumps(summary, indent=1))
    return summary
