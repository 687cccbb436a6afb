"""``mlxeff generate``: stream text from a model, then print the statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from .common import DTYPE_HELP, apply_compute_dtype, fail, print_json


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
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    # --- technique options (each technique adds its own here) ---
    kv_prediction: Optional[Path] = typer.Option(
        None, "--kv-prediction", help="KV Prediction (arXiv 2410.08391): an auxiliary model + "
        "predictor directory (from train-kv-prediction; a bare NAME means MODEL/kv_prediction/NAME) "
        "that processes the prompt in place of the model."),
    lazy: bool = typer.Option(
        False, "--lazy", help="LazyLLM (arXiv 2407.14057): prune prompt tokens progressively with "
        "depth by the last token's attention, reviving them while decoding (default schedule: keep "
        "0.8 -> 0.5 of the tokens over 4 stages in 30%-90% of the depth, never the last 32)."),
    lazy_keep: Optional[Tuple[float, float]] = typer.Option(
        None, "--lazy-keep", metavar="START END", help="LazyLLM keep ratios in (0, 1] at the first "
        "and the last pruning layer, START >= END (implies --lazy)."),
    lazy_range: Optional[Tuple[float, float]] = typer.Option(
        None, "--lazy-range", metavar="START END", help="LazyLLM pruning layers from START to END "
        "as fractions of the depth, e.g. 0.3 0.9 (implies --lazy)."),
    lazy_stages: Optional[int] = typer.Option(
        None, "--lazy-stages", help="LazyLLM number of pruning layers (default 4, or as many as fit "
        "in the range; implies --lazy)."),
    lazy_recent: Optional[int] = typer.Option(
        None, "--lazy-recent", help="LazyLLM: the last N prompt tokens are never pruned (default 32; "
        "0 keeps only the last token, the paper's rule; implies --lazy)."),
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
    apply_compute_dtype(net, dtype)
    hooks = {"prefill": ChunkedPrefill(prefill_step_size)}
    # --- technique hooks (each technique sets hooks["prefill"|"decode"|"attention"] here) ---
    if kv_prediction is not None:
        from mlxeff.techniques.kv_prediction import KVPrediction, resolve_dir

        kvp = KVPrediction.load(resolve_dir(kv_prediction, path), base=net)
        apply_compute_dtype(kvp.auxiliary, dtype)
        apply_compute_dtype(kvp.predictor, dtype)
        hooks["prefill"] = kvp.prefill(prefill_step_size)
    if lazy or lazy_keep or lazy_range or lazy_stages is not None or lazy_recent is not None:
        from mlxeff.techniques.lazyllm import LazySchedule, ScheduleError, lazy_hooks, max_stages

        if kv_prediction is not None:
            fail("--lazy and --kv-prediction both replace the prefill; choose one")
        kw = {}
        if lazy_keep:
            kw.update(keep_start=lazy_keep[0], keep_end=lazy_keep[1])
        if lazy_range:
            kw.update(start=lazy_range[0], end=lazy_range[1])
        if lazy_recent is not None:
            kw.update(recent=lazy_recent)
        try:
            if lazy_stages is None:  # the default count, or as many as fit in a shallow model
                rng = LazySchedule(**kw)
                kw.update(stages=max(1, min(rng.stages, max_stages(len(net.layers), rng.start, rng.end))))
            else:
                kw.update(stages=lazy_stages)
            hooks.update(lazy_hooks(LazySchedule(**kw), len(net.layers), prefill_step_size))
        except ScheduleError as e:
            fail(f"--lazy: {e}")

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
