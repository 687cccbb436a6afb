"""``mlxeff eval``: perplexity of a model on a text file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from .common import DTYPE_HELP, apply_compute_dtype, fail, print_json


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)


def evaluate(
    model: Optional[Path] = typer.Argument(None, help="An mlxeff model directory (default: the "
                                           "embedded model)."),
    text: Path = typer.Option(..., "--perplexity", help="Text to score: .txt or .txt.gz (one "
                              "document, followed by EOS, as in training)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score only the first N "
                                             "tokens."),
    window: int = typer.Option(512, "--window", help="Tokens per window (context + scored)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Distance between window starts "
                                         "(default window/2); each token is scored once."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per forward pass."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Print the number of scored tokens, their mean negative log-likelihood (nats), the
    perplexity and bits per byte of the text."""

    import mlxeff
    from mlxeff import data
    from mlxeff.eval import perplexity
    from mlxeff.io import resolve_model_dir

    if max_tokens is not None and max_tokens < 2:
        fail("--max-tokens must be at least 2")
    if batch_size < 1:
        fail("--batch-size must be at least 1")
    path = resolve_model_dir(model)
    net, tokenizer = mlxeff.load(path)
    if tokenizer is None:
        fail(f"{path}: no tokenizer files (tokenizer.json)")
    apply_compute_dtype(net, dtype)
    files = data.expand_files([str(text)], "text")
    raw = data.read_text(files[0])
    tokens = data.tokenize_files(files, tokenizer)
    truncated = max_tokens is not None and len(tokens) > max_tokens
    if truncated:
        tokens = tokens[:max_tokens]
    result = perplexity(net, tokens, window=window, stride=stride, batch_size=batch_size)
    out = {"model": str(path), "file": str(text), **result}
    if not truncated:
        # All tokens but the first are scored; bytes make the figure comparable across tokenizers.
        out["bits_per_byte"] = result["nll"] * result["tokens"] / math.log(2) / len(raw.encode())
    if json_output:
        print_json(out)
        return
    print(f"tokens: {result['tokens']:,}")
    print(f"mean NLL: {result['nll']:.4f} nats/token")
    print(f"perplexity: {result['ppl']:.3f}  (window {result['window']}, stride {result['stride']})")
    if "bits_per_byte" in out:
        print(f"bits per byte: {out['bits_per_byte']:.4f}")
