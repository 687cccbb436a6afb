"""``mlxeff eval``: perplexity of a model on a text file, or its score on a task."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from .common import DTYPE_HELP, fail, load_for_generation, print_json
from .techniques import with_techniques


def register(app: typer.Typer) -> None:
    app.command("eval")(with_techniques(evaluate))


def evaluate(
    model: Optional[Path] = typer.Argument(None, help="An mlxeff model directory (default: the "
                                           "embedded model)."),
    text: Optional[Path] = typer.Option(None, "--perplexity", help="Text to score: .txt or .txt.gz "
                                        "(one document, followed by EOS, as in training)."),
    task: Optional[str] = typer.Option(None, "--task", help="A task instead of --perplexity: "
                                       "multidoc-qa, kv-retrieval, copy, repeat (generated; held-out "
                                       "books), "
                                       "nq-open-oracle, kv75 (generated from the sets), "
                                       "lambada_openai, arc_easy, piqa (log-probabilities)."),
    data: Optional[Path] = typer.Option(None, "--data", help="--task's data: the corpus directory "
                                        "(valid.txt.gz beside train-*.txt.gz) for multidoc-qa, "
                                        "copy and repeat; the set's .jsonl.gz file, or its directory, for the "
                                        "others."),
    docs: Optional[int] = typer.Option(None, "--docs", help="Passages per prompt (multidoc-qa 10, "
                                       "nq-open-oracle 10) or key-value pairs (kv-retrieval 50, "
                                       "kv75 75)."),
    context_tokens: Optional[int] = typer.Option(None, "--context-tokens", help="Prompt size in "
                                                 "tokens (multidoc-qa, about; default 2000) or the "
                                                 "passage to copy (copy; default 200) or to "
                                                 "restart (repeat; default 1000)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Items to score (generated tasks: "
                                        "default 200; sets: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated items and distractors."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="--perplexity: score only "
                                             "the first N tokens."),
    window: int = typer.Option(512, "--window", help="--perplexity: tokens per window (context + "
                               "scored)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="--perplexity: distance between "
                                         "window starts (default window/2); each token is scored "
                                         "once."),
    batch_size: int = typer.Option(16, "--batch-size", help="--perplexity: windows per forward pass."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (and no progress)."),
    techniques: dict = None,
):
    """Print the number of scored tokens, their mean negative log-likelihood (nats), the
    perplexity and bits per byte of a text (--perplexity), or a model's accuracy on a task with its
    95% interval (--task; generated tasks run greedy decoding through the generation engine, with
    the techniques chosen by their flags below)."""

    if (text is None) == (task is None):
        fail("give either '--perplexity' FILE or '--task' NAME", code=2)
    if task is not None:
        task_command(model, task, data=data, docs=docs, context_tokens=context_tokens, limit=limit,
                     seed=seed, dtype=dtype, json_output=json_output, techniques=techniques)
        return
    if techniques:
        fail("technique options apply to --task (generation), not to --perplexity", code=2)
    perplexity_command(model, text, max_tokens=max_tokens, window=window, stride=stride,
                       batch_size=batch_size, dtype=dtype, json_output=json_output)


def perplexity_command(model, text: Path, *, max_tokens, window, stride, batch_size, dtype,
                       json_output) -> None:
    from mlxeff import data
    from mlxeff.eval import perplexity

    if max_tokens is not None and max_tokens < 2:
        fail("--max-tokens must be at least 2")
    if batch_size < 1:
        fail("--batch-size must be at least 1")
    path, net, tokenizer = load_for_generation(model, dtype)
    files = data.expand_files([str(text)], "text")
    raw = data.read_text(files[0])
    # with --max-tokens only what is scored (and one more, to know whether the text was cut)
    tokens = data.tokenize_files(files, tokenizer, limit=None if max_tokens is None else max_tokens + 1)
    truncated = max_tokens is not None and len(tokens) > max_tokens
    if truncated:
        tokens = tokens[:max_tokens]
    result = perplexity(net, tokens, window=window, stride=stride, batch_size=batch_size,
                        progress=False if json_output else None)
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


METRIC_NAMES = {"exact": "exact match", "contains": "contains the answer",
                "token_accuracy": "tokens copied exactly", "accuracy": "accuracy"}


def task_command(model, task: str, *, data, docs, context_tokens, limit, seed, dtype, json_output,
                 techniques: Optional[dict] = None) -> dict:
    """Score a model on a task; ``techniques`` (registry specs) become the engine's hooks, passed
    through the runner unchanged."""
    from mlxeff.errors import MlxeffError
    from mlxeff.tasks import corpus, get_task, runner
    from mlxeff.techniques.registry import build_hooks

    info = get_task(task)
    runner.check_options(info, docs, context_tokens, limit, techniques)  # before loading anything
    path, net, tokenizer = load_for_generation(model, dtype)
    try:
        hooks = build_hooks(net, techniques, model_dir=path) if techniques else {}
    except MlxeffError as e:
        fail(str(e))
    result = runner.evaluate_task(net, tokenizer, task, data=data, docs=docs,
                                  context_tokens=context_tokens, limit=limit, seed=seed, hooks=hooks,
                                  cache_dir=corpus.default_cache_dir(),
                                  progress=False if json_output else None)
    out = {"model": str(path), "data": None if data is None else str(data),
           "techniques": {k: {o: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                              for o, v in opts.items()} for k, opts in (techniques or {}).items()},
           **result}
    if json_output:
        print_json(out)
        return out
    s = out["settings"]
    where = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.items()
                      if v is not None and k in ("docs", "context_tokens"))
    print(f"task:                   {task} -- {info.description}" + (f" ({where})" if where else ""))
    print(f"model:                  {path}")
    lo, hi = out["ci95"]
    print(f"items:                  {out['items']:,}")
    print(f"{METRIC_NAMES[out['metric']] + ':':<24}{100 * out['accuracy']:.1f}%  "
          f"(95% interval {100 * lo:.1f}-{100 * hi:.1f}%, {out['interval']})")
    if "accuracy_norm" in out:
        print(f"{'accuracy per character:':<24}{100 * out['accuracy_norm']:.1f}%")
    if info.kind == "generate":
        for key in ("exact", "contains"):
            if key != out["metric"]:
                print(f"{METRIC_NAMES[key] + ':':<24}{100 * out[key]:.1f}%")
        p = out["prompt_tokens"]
        print(f"prompt tokens:          {p['mean']:,.0f} on average ({p['min']:,}-{p['max']:,})")
        if "by_position" in out and len(out["by_position"]) <= 20:
            cells = "  ".join(f"{k}: {100 * v['accuracy']:.0f}%" for k, v in out["by_position"].items())
            print(f"by gold position:       {cells}")
    return out
