"""``mlxeff generate``: stream text from a model, then print the statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import fail, print_json


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="An mlxeff model directory (default: the embedded model)."
    ),
    max_tokens: int = typer.Option(100, "--max-tokens", "-n", help="Tokens to generate at most."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Minimum probability relative to the top token."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    prefill_step_size: int = typer.Option(512, "--prefill-step-size", help="Prompt chunk length."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    # --- technique options (each technique adds its own here) ---
    kv_prediction: Optional[Path] = typer.Option(
        None, "--kv-prediction", help="KV Prediction (arXiv 2410.08391): an auxiliary model + "
        "predictor directory (from train-kv-prediction; a bare NAME means MODEL/kv_prediction/NAME) "
        "that processes the prompt in place of the model."),
):
    """Generate text from PROMPT, streaming it, then print prompt and generation speed,
    peak memory and time to first token (as mlx_lm.generate does)."""
    import mlxeff
    from mlxeff.generate import ChunkedPrefill, format_stats, stats_dict
    from mlxeff.io import resolve_model_dir

    if max_tokens < 1:
        fail("--max-tokens must be at least 1")
    if prefill_step_size < 1:
        fail("--prefill-step-size must be at least 1")
    path = resolve_model_dir(model)
    net, tokenizer = mlxeff.load(path)
    if tokenizer is None:
        fail(f"{path}: no tokenizer files (tokenizer.json or tokenizer.model); convert with --tokenizer")
    hooks = {"prefill": ChunkedPrefill(prefill_step_size)}
    # --- technique hooks (each technique sets hooks["prefill"|"decode"|"attention"] here) ---
    if kv_prediction is not None:
        from mlxeff.techniques.kv_prediction import KVPrediction, resolve_dir

        kvp_dir = resolve_dir(kv_prediction, path)
        hooks["prefill"] = KVPrediction.load(kvp_dir, base=net).prefill(prefill_step_size)

    text, last = "", None
    for last in mlxeff.stream_generate(
        net, tokenizer, prompt, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
        min_p=min_p, seed=seed, **hooks,
    ):
        text += last.text
        if not json_output:
            print(last.text, end="", flush=True)
    if json_output:
        print_json({"prompt": prompt, "text": text, "model": str(path), **stats_dict(last)})
    else:
        print("\n" + "=" * 10)
        print(format_stats(last))
