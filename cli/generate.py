"""``mlxeff generate``: stream text from a model, then print the statistics."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import (DTYPE_HELP, PREFILL_STEP_HELP, check_prefill_step_size, fail, load_for_generation,
                     print_json)
from .techniques import with_techniques


def register(app: typer.Typer) -> None:
    app.command("generate")(with_techniques(generate))


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """The prompt from the argument, ``-`` (standard input) or ``--prompt-file``."""
    if prompt is not None and prompt_file is not None:
        fail("give the prompt either as an argument or with --prompt-file, not both", code=2)
    if prompt_file is not None:
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{prompt_file}: cannot read the prompt ({e.__class__.__name__}: {e})")
    elif prompt == "-":
        text = sys.stdin.read()
    elif prompt is None:
        fail("no prompt: give it as an argument, - for standard input, or --prompt-file FILE", code=2)
    else:
        text = prompt
    if not text.strip():
        fail("the prompt is empty", code=2)
    return text


def generate(
    prompt: Optional[str] = typer.Argument(
        None, help="The prompt text; - reads it from standard input.", show_default=False),
    prompt_file: Optional[Path] = typer.Option(
        None, "--prompt-file", "-f", help="Read the prompt from this UTF-8 text file."),
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="An mlxeff model directory (default: the embedded model)."
    ),
    max_tokens: int = typer.Option(100, "--max-tokens", "-n", help="Tokens to generate at most."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature, >= 0 (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in (0, 1] (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Minimum probability relative to the top "
                                "token, in [0, 1] (0 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    prefill_step_size: Optional[int] = typer.Option(
        None, "--prefill-step-size", help=PREFILL_STEP_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    techniques: dict = None,
):
    """Generate text from PROMPT, streaming it, then print prompt and generation speed,
    peak memory and time to first token (as mlx_lm.generate does). Techniques are chosen with
    their flags below; with a drafter the statistics include accepted tokens per forward."""
    from mlxeff import progress
    from mlxeff.sampling import SamplingConfig, SamplingError

    if max_tokens < 1:
        fail(f"--max-tokens must be at least 1, got {max_tokens}", code=2)
    check_prefill_step_size(prefill_step_size)
    try:
        SamplingConfig(temp, top_p, top_k, min_p)
    except SamplingError as e:
        fail(str(e), code=2)
    text_in = read_prompt(prompt, prompt_file)
    with progress.silenced(json_output):
        _run(text_in, model, max_tokens, temp, top_p, top_k, min_p, seed, prefill_step_size, dtype,
             json_output, techniques)


def _run(text_in, model, max_tokens, temp, top_p, top_k, min_p, seed, prefill_step_size, dtype,
         json_output, techniques):
    import mlxeff
    from mlxeff.errors import MlxeffError
    from mlxeff.generate import format_stats, stats_dict
    from mlxeff.techniques.registry import build_hooks

    path, net, tokenizer = load_for_generation(model, dtype)
    try:
        hooks = build_hooks(net, techniques, model_dir=path, step_size=prefill_step_size) if techniques else {}
    except MlxeffError as e:
        fail(str(e))
    n_prompt = len(tokenizer.encode(text_in))
    trained = getattr(net.args, "max_context_length", None)
    if trained and n_prompt > trained:
        typer.echo(f"warning: the prompt has {n_prompt} tokens but the model was trained on "
                   f"{trained}; quality may drop beyond that", err=True)

    text, last = "", None
    for last in mlxeff.stream_generate(
        net, tokenizer, text_in, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
        min_p=min_p, seed=seed, prefill_step_size=prefill_step_size, **hooks,
    ):
        text += last.text
        if not json_output:
            print(last.text, end="", flush=True)
    if json_output:
        print_json({"prompt": text_in, "text": text, "model": str(path),
                    "techniques": {k: _jsonable(v) for k, v in (techniques or {}).items()},
                    **stats_dict(last)})
    else:
        print("\n" + "=" * 10)
        print(format_stats(last))


def _jsonable(options: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in options.items()}
