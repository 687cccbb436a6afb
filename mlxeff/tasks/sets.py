"""Published evaluation sets rendered as the synthetic tasks are (JSON lines, gzip'd or not).

- ``nq-open-oracle`` (Natural Questions open, with each question's gold Wikipedia passage, as
  released with Lost in the Middle, arXiv 2307.03172): ``docs`` passages -- the gold one at
  position ``index % docs`` and ``docs - 1`` distractors, the gold passages of other questions that
  contain none of this question's answers (drawn by seed) -- then the question. Scored like the
  paper: an answer, SQuAD-normalized, contained in the generated line.
- ``kv75`` (Lost in the Middle's 75-pair key-value retrieval): ``docs`` of the 75 pairs -- the
  asked one and ``docs - 1`` others drawn by seed, in their original order -- in the layout of
  ``generators.render_kv``. A whole UUID pair costs about 70 tokens of the default tokenizer, so
  all 75 pairs need about 5,300 tokens: use ``docs`` about 25 for a 2,048-token model.
- ``lambada_openai``, ``arc_easy``, ``piqa`` are scored by log-probabilities
  (``mlxeff.eval.lambada`` / ``multiple_choice``); ``rows`` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..errors import MlxeffError
from .generators import Item, item_rng, render_kv, render_passages, render_question
from .scoring import normalize

NQ_ANSWER_TOKENS = 32


def find_set(data, name: str) -> Path:
    """``data`` is the set's file or a directory holding ``NAME.jsonl(.gz)``."""
    if data is None:
        raise MlxeffError(f"--task {name} needs --data: the {name}.jsonl.gz file or the directory "
                          "that holds it")
    p = Path(data)
    if p.is_dir():
        for suffix in (".jsonl.gz", ".jsonl"):
            if (p / f"{name}{suffix}").is_file():
                return p / f"{name}{suffix}"
        raise MlxeffError(f"no {name}.jsonl.gz in this directory", p)
    if not p.is_file():
        raise MlxeffError("no such file or directory", p)
    return p


def rows(path: Path) -> List[dict]:
    from ..data import iter_jsonl

    out = list(iter_jsonl(path))
    if not out:
        raise MlxeffError("holds no items", path)
    return out


def _field(row, key, path, n):
    try:
        return row[key]
    except (KeyError, TypeError):
        raise MlxeffError(f"item {n}: no field {key!r}", path) from None


def nq_items(path: Path, *, docs: int, limit: Optional[int], seed: int = 0) -> List[Item]:
    data = rows(path)
    if docs < 1:
        raise MlxeffError(f"--docs must be at least 1, got {docs}")
    if docs > len(data):
        raise MlxeffError(f"--docs {docs} is larger than the {len(data)} passages available", path)
    gold_ctx = []
    for n, row in enumerate(data):
        ctxs = _field(row, "ctxs", path, n)
        if not ctxs or "text" not in ctxs[0]:
            raise MlxeffError(f"item {n}: no gold passage in 'ctxs'", path)
        gold_ctx.append((ctxs[0].get("title", ""), ctxs[0]["text"]))
    items = []
    for i, row in enumerate(data[:limit] if limit is not None else data):
        answers = [str(a) for a in _field(row, "answers", path, i)]
        norm = [normalize(a, drop_articles=True) for a in answers]
        rng = item_rng("nq-open-oracle", "heldout", seed, i)
        chosen = []
        for j in rng.permutation(len(data)):
            if len(chosen) == docs - 1:
                break
            text = normalize(gold_ctx[j][1], drop_articles=True)
            if j != i and not any(a and f" {a} " in f" {text} " for a in norm):
                chosen.append(int(j))
        if len(chosen) < docs - 1:
            raise MlxeffError(f"item {i}: only {len(chosen)} distractor passages lack its answers "
                              f"(--docs {docs})", path)
        gold = i % docs
        order = chosen[:gold] + [i] + chosen[gold:]
        question = str(_field(row, "question", path, i)).strip()
        question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
        prompt = (render_passages([gold_ctx[j][1] for j in order], [gold_ctx[j][0] for j in order])
                  + render_question(question))
        items.append(Item(prompt, " " + answers[0], answers, NQ_ANSWER_TOKENS,
                          {"gold_position": gold, "docs": docs}))
    return items


def kv75_items(path: Path, *, docs: int, limit: Optional[int], seed: int = 0) -> List[Item]:
    data = rows(path)
    items = []
    for i, row in enumerate(data[:limit] if limit is not None else data):
        records = [tuple(map(str, r)) for r in _field(row, "ordered_kv_records", path, i)]
        key, value = str(_field(row, "key", path, i)), str(_field(row, "value", path, i))
        if docs < 1 or docs > len(records):
            raise MlxeffError(f"--docs {docs} is not between 1 and the {len(records)} key-value "
                              "pairs of an item", path)
        where = [n for n, (k, _) in enumerate(records) if k == key]
        if not where or records[where[0]][1] != value:
            raise MlxeffError(f"item {i}: its key/value pair is not among its records", path)
        g = where[0]
        rng = item_rng("kv75", "heldout", seed, i)
        others = [n for n in range(len(records)) if n != g]
        keep = sorted([g] + [others[k] for k in rng.permutation(len(others))[:docs - 1]])
        kept = [records[n] for n in keep]
        items.append(Item(render_kv(kept, key), f' "{value}"', [value], 2 * len(value) + 8,
                          {"gold_position": keep.index(g), "docs": docs}))
    return items
