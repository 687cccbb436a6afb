"""``mlxeff train``: train a layer-wise scaled language model from text files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from .common import print_json


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def train(
    train_files: List[str] = typer.Option(..., "--train", help="Training text: .txt/.txt.gz files or "
                                          "glob patterns (quote them); repeat the option for more."),
    valid_files: Optional[List[str]] = typer.Option(None, "--valid", help="Validation text files or "
                                                    "globs (perplexity every --eval-every steps)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: checkpoints/, cache/, "
                             "tokenizer/ (if trained), model/ (the final model), summary.json."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Reuse this tokenizer "
                                             "directory (tokenizer.json), e.g. a model directory."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Train a byte-level BPE "
                                             "tokenizer of this size into OUT/tokenizer."),
    tokenizer_chars: int = typer.Option(40_000_000, "--tokenizer-chars", help="Characters of the "
                                        "training text the BPE trainer reads (an equal share of "
                                        "each file)."),
    config: Optional[str] = typer.Option(None, "--config", help="A named architecture "
                                         "(openelm-270M, openelm-450M, openelm-1_1B, openelm-3B) "
                                         "instead of the shape options."),
    layers: int = typer.Option(4, "--layers", help="Transformer layers."),
    model_dim: int = typer.Option(128, "--model-dim", help="Model width."),
    head_dim: int = typer.Option(32, "--head-dim", help="Attention head width."),
    qkv_mult: Tuple[float, float] = typer.Option((0.5, 1.0), "--qkv-mult", help="Query-width "
                                                 "multipliers of the first and last layer."),
    ffn_mult: Tuple[float, float] = typer.Option((0.5, 4.0), "--ffn-mult", help="FFN-width "
                                                 "multipliers of the first and last layer."),
    gqa_groups: int = typer.Option(4, "--gqa-groups", help="Query heads per KV head."),
    ffn_divisor: int = typer.Option(64, "--ffn-divisor", help="FFN widths are multiples of this."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per training sequence."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per micro-batch."),
    accum: int = typer.Option(1, "--accum", help="Micro-batches per optimizer step."),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate."),
    min_lr: float = typer.Option(3e-4, "--min-lr", help="Learning rate at the last step."),
    warmup: int = typer.Option(100, "--warmup", help="Linear warm-up steps."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW decoupled weight decay."),
    clip: float = typer.Option(1.0, "--clip", help="Gradient clipping by global norm (0 = off)."),
    z_loss: float = typer.Option(1e-4, "--z-loss", help="z-loss coefficient (OpenELM)."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute precision: float32 or bfloat16 "
                              "(bf16 keeps fp32 master weights; use float32 on CPU)."),
    save_dtype: str = typer.Option("float16", "--save-dtype", help="Precision of the saved "
                                   "model: float16, bfloat16 or float32."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and data order."),
    eval_every: int = typer.Option(0, "--eval-every", help="Validate every N steps (0 = at the end)."),
    eval_tokens: int = typer.Option(262_144, "--eval-tokens", help="Validation tokens per evaluation."),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (0 = at the end)."),
    log_every: int = typer.Option(10, "--log-every", help="Progress every N steps."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Token cache directory "
                                             "(default OUT/cache)."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Do not mx.compile the step."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT's newest checkpoint."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train a model on text files, checkpointing into OUT and saving the final model (with its
    tokenizer) to OUT/model in the mlxeff format."""
    from mlxeff.train import TrainConfig, run_training

    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, seq_len=seq_len, accum=accum, lr=lr, min_lr=min_lr,
        warmup=warmup, weight_decay=weight_decay, clip=clip, z_loss=z_loss, dtype=dtype,
        seed=seed, eval_every=eval_every, save_every=save_every, log_every=log_every,
        compile=not no_compile,
    )
    shape = dict(config=config, layers=layers, model_dim=model_dim, head_dim=head_dim,
                 qkv_mult=tuple(qkv_mult), ffn_mult=tuple(ffn_mult), gqa_groups=gqa_groups,
                 ffn_divisor=ffn_divisor)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    summary = run_training(
        cfg, train_files=train_files, valid_files=valid_files or [], out=out, tokenizer=tokenizer,
        vocab_size=vocab_size, tokenizer_chars=tokenizer_chars, shape=shape,
        eval_tokens=eval_tokens, save_dtype=save_dtype, cache_dir=cache_dir, resume=resume,
        say=say,
    )
    if json_output:
        print_json(summary)
    else:
        v = summary.get("valid_ppl")
        print(f"model: {summary['model_dir']} ({summary['parameters']:,} parameters)")
        print(f"tokens seen: {summary['tokens_seen']:,}  wall time: {summary['wall_time_s']:.1f} s  "
              f"train: {summary['tokens_per_s']:,.0f} tokens/s")
        print(f"final train loss: {summary['final_loss']:.4f}" +
              (f"  valid loss: {summary['valid_loss']:.4f}  valid ppl: {v:.3f}" if v else ""))
