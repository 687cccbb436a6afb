"""Task evaluations: what a model does with its context, measured through the generation engine.

- ``generators``: synthetic tasks (multi-document QA, key-value retrieval, copy, repeat) rendered as plain
  text prompts, deterministic, with training items from the training books and evaluation items
  from the held-out books only (``corpus``, ``overlap``);
- ``sets``: published sets (nq-open-oracle with distractor passages, kv75) rendered the same way;
  lambada_openai, arc_easy and piqa go to the log-probability scorers of ``mlxeff.eval``;
- ``scoring``: exact-match / contains / token-accuracy scorers and 95% intervals;
- ``runner``: ``evaluate_task`` -- greedy generation through ``mlxeff.generate.generate_step`` with
  any engine hooks (``prefill``, ``decode``, ...) passed through unchanged;
- ``mixture``: the synthetic items rendered into a training-text file whose items never straddle
  two packed training sequences.

``TASKS`` lists every task ``mlxeff eval --task`` knows, with its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ..errors import MlxeffError


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # "generate" (through the engine), "choice" or "lambada" (log-probabilities)
    source: str  # "books" (a corpus directory), "set" (a JSON-lines file) or "none"
    metric: str  # the headline: exact, contains, token_accuracy or accuracy
    docs: Optional[int]  # default --docs (passages or key-value pairs); None: not applicable
    context_tokens: Optional[int]  # default --context-tokens; None: not applicable
    limit: Optional[int]  # default number of items; None: the whole set
    description: str


TASKS: Dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("multidoc-qa", "generate", "books", "exact", 10, 2000, 200,
             "which word follows a quoted phrase, asked of K held-out book passages"),
    TaskInfo("kv-retrieval", "generate", "none", "exact", 50, None, 200,
             "the value of one of K random 8-hex-digit keys in a JSON object"),
    TaskInfo("copy", "generate", "books", "token_accuracy", None, 200, 200,
             "repeat a held-out book passage of N tokens verbatim"),
    TaskInfo("repeat", "generate", "books", "token_accuracy", None, 1000, 50,
             "continue a held-out book passage of N tokens restarted without a marker"),
    TaskInfo("nq-open-oracle", "generate", "set", "contains", 10, None, None,
             "Natural Questions with the gold Wikipedia passage among K-1 distractors"),
    TaskInfo("kv75", "generate", "set", "exact", 75, None, None,
             "Lost in the Middle's key-value retrieval (UUID pairs; K of 75 kept)"),
    TaskInfo("lambada_openai", "lambada", "set", "accuracy", None, None, None,
             "last word of a passage (every token greedy)"),
    TaskInfo("arc_easy", "choice", "set", "accuracy", None, None, None,
             "grade-school science questions, multiple choice by log-probability"),
    TaskInfo("piqa", "choice", "set", "accuracy", None, None, None,
             "physical commonsense, two choices by log-probability"),
)}


def get_task(name: str) -> TaskInfo:
    if name not in TASKS:
        raise MlxeffError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    return TASKS[name]
