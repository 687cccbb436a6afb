"""``evaluate_task``: build a task's items and score a model on them.

Generation tasks run through the engine: ``mlxeff.generate.generate_step`` with greedy decoding
and the caller's ``hooks`` (engine keyword arguments such as ``prefill`` and ``decode``) passed
through unchanged, so every technique is evaluated the way it generates. Generation stops at EOS,
at the first token that contains a newline, or after the item's ``max_tokens``; the prediction is
the text before the newline. The prompt is encoded as ``mlxeff generate`` encodes it
(``generate.encode_prompt``). lambada_openai, arc_easy and piqa are scored by log-probabilities
(``mlxeff.eval``); they take no hooks.

The result: ``accuracy`` is the task's headline metric (exact match, contains, or copy's token
accuracy), with ``ci95`` (the Wilson score interval; for copy's token accuracy taken over items,
see ``scoring``), the other metrics, accuracy by
the gold passage's position, prompt lengths in tokens, the settings and a few predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..errors import MlxeffError
from . import TaskInfo, get_task
from .corpus import token_counter
from .generators import Item, copy_task, kv_retrieval, multidoc_qa, repeat_task
from .scoring import contains_match, exact_match, token_accuracy, wilson_interval

SAMPLES = 3


def check_options(info: TaskInfo, docs, context_tokens, limit, hooks) -> None:
    if docs is not None and info.docs is None:
        raise MlxeffError(f"--docs does not apply to --task {info.name}")
    if context_tokens is not None and info.context_tokens is None:
        raise MlxeffError(f"--context-tokens does not apply to --task {info.name}")
    if docs is not None and docs < 1:
        raise MlxeffError(f"--docs must be at least 1, got {docs}")
    if context_tokens is not None and context_tokens < 1:
        raise MlxeffError(f"--context-tokens must be at least 1, got {context_tokens}")
    if limit is not None and limit < 1:
        raise MlxeffError(f"--limit must be at least 1, got {limit}")
    if hooks and info.kind != "generate":
        raise MlxeffError(f"--task {info.name} is scored by log-probabilities, not through the "
                          "generation engine: technique options do not apply")


def build_items(name: str, tokenizer, *, data=None, docs: Optional[int] = None,
                context_tokens: Optional[int] = None, limit: Optional[int] = None, seed: int = 0,
                cache_dir: Optional[Path] = None, split=None) -> List[Item]:
    """The held-out items of a generation task (``split``: an already loaded ``BookSplit``)."""
    from . import corpus, sets

    info = get_task(name)
    if info.kind != "generate":
        raise MlxeffError(f"--task {name} has no generated items")
    docs = info.docs if docs is None else docs
    context_tokens = info.context_tokens if context_tokens is None else context_tokens
    if info.source == "set":
        path = sets.find_set(data, name)
        reader = sets.nq_items if name == "nq-open-oracle" else sets.kv75_items
        return reader(path, docs=docs, limit=limit, seed=seed)
    n = info.limit if limit is None else limit
    if name == "kv-retrieval":
        return [kv_retrieval(i, pairs=docs, split="heldout", seed=seed) for i in range(n)]
    count = token_counter(tokenizer)
    if name == "multidoc-qa":
        from .generators import multidoc_budget

        multidoc_budget(docs, context_tokens, count)  # a size error before loading the books
    if split is None:
        if data is None:
            raise MlxeffError(f"--task {name} needs --data: the corpus directory (valid.txt.gz, "
                              "the held-out books, beside the train-*.txt.gz shards)")
        split = corpus.load_split(data, "heldout", cache_dir)
    if name == "multidoc-qa":
        return [multidoc_qa(split, i, docs=docs, context_tokens=context_tokens, count=count,
                            seed=seed) for i in range(n)]
    make = repeat_task if name == "repeat" else copy_task
    return [make(split, i, context_tokens=context_tokens, count=count, seed=seed) for i in range(n)]


def generate_line(model, tokenizer, prompt: str, max_tokens: int, hooks: Optional[dict] = None):
    """Greedy tokens after ``prompt`` up to EOS, a newline or ``max_tokens``:
    ``(prompt_tokens, tokens before the newline, text before the newline)``."""
    from ..generate import encode_prompt, generate_step

    ids = encode_prompt(tokenizer, prompt)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    out: List[int] = []
    for token, _ in generate_step(ids, model, max_tokens=max_tokens, **(hooks or {})):
        if token in eos or "\n" in tokenizer.decode([token]):
            break
        out.append(token)
    text = tokenizer.decode(out) if out else ""
    return int(ids.size), out, text.split("\n")[0]


def score_items(model, tokenizer, items: List[Item], metric: str, *, hooks: Optional[dict] = None,
                progress: Optional[bool] = None, desc: str = "") -> dict:
    """Generate for every item and score (see the module docstring)."""
    from ..progress import bar

    if not items:
        raise MlxeffError("no items to score")
    drop = metric == "contains"  # SQuAD normalization for open-domain answers
    records = []
    with bar(total=len(items), desc=desc, unit="item", show=progress) as pbar:
        for item in items:
            n_prompt, out, text = generate_line(model, tokenizer, item.prompt, item.max_tokens, hooks)
            rec = {"prompt_tokens": n_prompt, "prediction": text, "answers": item.answers,
                   "exact": exact_match(text, item.answers, drop),
                   "contains": contains_match(text, item.answers, drop),
                   "gold_position": item.meta.get("gold_position")}
            if metric == "token_accuracy":
                reference = list(tokenizer.encode(item.target, add_special_tokens=False))
                rec["token_accuracy"] = token_accuracy(out, reference)
                rec["exact"] = out == reference
            records.append(rec)
            pbar.update(1)
    return summarize(records, metric)


def summarize(records: List[dict], metric: str) -> dict:
    n = len(records)
    exact = sum(r["exact"] for r in records)
    contains = sum(r["contains"] for r in records)
    out = {"metric": metric, "items": n, "exact": exact / n, "contains": contains / n}
    if metric == "token_accuracy":
        values = [r["token_accuracy"] for r in records]
        out.update(accuracy=sum(values) / n, ci95=list(wilson_interval(sum(values), n)),
                   interval="Wilson score over items", token_accuracy=sum(values) / n,
                   exact_ci95=list(wilson_interval(exact, n)))
    else:
        k = exact if metric == "exact" else contains
        out.update(accuracy=k / n, correct=k, ci95=list(wilson_interval(k, n)),
                   interval="Wilson score")
        by_pos: Dict[int, List[int]] = {}
        for r in records:
            if r["gold_position"] is not None:
                cell = by_pos.setdefault(int(r["gold_position"]), [0, 0])
                cell[0] += int(r[metric])
                cell[1] += 1
        if by_pos:
            out["by_position"] = {str(p + 1): {"accuracy": c / t, "items": t}
                                  for p, (c, t) in sorted(by_pos.items())}
    lengths = [r["prompt_tokens"] for r in records]
    out["prompt_tokens"] = {"mean": sum(lengths) / n, "min": min(lengths), "max": max(lengths)}
    out["samples"] = [{k: r[k] for k in ("prediction", "answers")} for r in records[:SAMPLES]]
    return out


def evaluate_task(model, tokenizer, name: str, *, data=None, docs: Optional[int] = None,
                  context_tokens: Optional[int] = None, limit: Optional[int] = None, seed: int = 0,
                  hooks: Optional[dict] = None, progress: Optional[bool] = None,
                  cache_dir: Optional[Path] = None, split=None) -> dict:
    """Score ``model`` on task ``name`` (``mlxeff.tasks.TASKS``); see the module docstring."""
    from .. import eval as ev
    from . import sets

    info = get_task(name)
    check_options(info, docs, context_tokens, limit, hooks)
    settings = {"seed": seed, "limit": limit}
    if info.kind == "generate":
        items = build_items(name, tokenizer, data=data, docs=docs, context_tokens=context_tokens,
                            limit=limit, seed=seed, cache_dir=cache_dir, split=split)
        settings.update(docs=info.docs if docs is None else docs,
                        context_tokens=info.context_tokens if context_tokens is None else context_tokens)
        result = score_items(model, tokenizer, items, info.metric, hooks=hooks, progress=progress,
                             desc=name)
    else:
        path = sets.find_set(data, name)
        rows = sets.rows(path)
        if info.kind == "lambada":
            result = ev.lambada(model, tokenizer, rows, limit=limit, progress=progress)
        else:
            result = ev.multiple_choice(model, tokenizer, rows, limit=limit, progress=progress)
        result.update(metric=info.metric, ci95=list(wilson_interval(result["correct"], result["items"])),
                      interval="Wilson score")
        if "correct_norm" in result:
            result["accuracy_norm_ci95"] = list(wilson_interval(result["correct_norm"], result["items"]))
    return {"task": name, "description": info.description, **result, "settings": settings}
