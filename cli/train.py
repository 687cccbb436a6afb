"""``mlxeff train``: train a layer-wise scaled language model from text files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from .common import print_json
from .train_options import TrainingRun, training_options


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@training_options(folder="OUT")
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
    init: Optional[Path] = typer.Option(None, "--init", help="Continue training a saved model "
                                        "directory (its shape, weights and tokenizer; affine "
                                        "4/8-bit layers are dequantized to float32 first). The "
                                        "shape options are then ignored; the optimizer starts "
                                        "fresh."),
    run: TrainingRun = None,
    save_dtype: str = typer.Option("float16", "--save-dtype", help="Precision of the saved "
                                   "model: float16, bfloat16 or float32."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train a model on text files, checkpointing into OUT (automatically, and on Ctrl-C; continue
    with --resume) and saving the final model (with its tokenizer) to OUT/model in the mlxeff
    format."""
    from mlxeff.progress import silenced
    from mlxeff.train import run_training

    shape = dict(config=config, layers=layers, model_dim=model_dim, head_dim=head_dim,
                 qkv_mult=tuple(qkv_mult), ffn_mult=tuple(ffn_mult), gqa_groups=gqa_groups,
                 ffn_divisor=ffn_divisor)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    with silenced(json_output):  # bars off for --json, and back on afterwards (in-process callers)
        summary = run_training(
            run.cfg, train_files=train_files, valid_files=valid_files or [], out=out,
            tokenizer=tokenizer, vocab_size=vocab_size, tokenizer_chars=tokenizer_chars, shape=shape,
            eval_tokens=run.eval_tokens, save_dtype=save_dtype, cache_dir=run.cache_dir,
            resume=run.resume, init=init, say=say,
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
