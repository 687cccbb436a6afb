"""Synthetic tasks that need a model to read its context: multi-document QA, key-value retrieval,
copy. Each item is a plain-text prompt (no chat template) and the continuation a reader writes.

- **multi-document QA** (after the multi-document QA of "Lost in the Middle", Liu et al., arXiv
  2307.03172, with book passages instead of Wikipedia): ``docs`` passages from far-apart places
  of the split's books, a question answerable from exactly one of them -- *which word follows a
  quoted phrase* -- and a one-word answer::

      Passage 1: ...
      Passage 2: ...
      Question: Which word follows "he had never seen"?
      Answer: anything

  The phrase is ``PHRASE_WORDS`` plain words of the gold passage and occurs exactly once in the
  prompt's passages (case-insensitive, whole words), so the answer is determined; the answer is a
  plain word (trailing punctuation dropped). The gold passage sits at position ``index % docs``
  (every position equally often). Passages are cut to a token budget so the prompt has at most
  ``context_tokens`` tokens (about that many: ``QUESTION_RESERVE`` tokens are kept for the phrase).
- **key-value retrieval** (the layout of Lost in the Middle's kv75 set): ``pairs`` random keys with
  values in a JSON object, one key asked. Keys and values are 8 hex digits (the first group of a
  UUID; a whole UUID costs 34 tokens of the default tokenizer, so 50 UUID pairs would not fit a
  2,048-token context, while 50 pairs of 8-digit ones take about 1,100 tokens). The reader writes
  the value in quotes, as it appears in the object; the gold pair sits at ``index % pairs``.
- **copy**: a passage of about ``context_tokens`` tokens to be repeated verbatim after a marker::

      Text: ...
      Copy: ...

- **repeat**: the same without a marker -- the passage, then its first ``RESTART_WORDS`` words
  again, and the reader continues the restarted passage (what prompt lookup's copy-heavy prompt
  asks: ``benchmarks/prompt_lookup.py``). Book text never repeats itself, so a model trained on
  books and marked copies alone does not continue an unmarked restart; training items (the whole
  passage twice) are meant to teach it (4,666 of them in the default model v2.1's 196 M training
  tokens did not: ``benchmarks/RESULTS.md``, "Default model v2.1"). The separator before the
  restart is drawn per item from ``REPEAT_SEPARATORS`` (none, as when token lists are
  concatenated; a space; a line break); evaluation items use none.

Training items may carry **follow-ups** (``followups=N``): after the answer, N further questions
about the same passages (multi-document QA) or N further keys of the same object (key-value
retrieval), each with its answer on its line -- the many-queries-per-context layout of multi-query
associative recall (Zoology, Arora et al., arXiv 2312.04927). One context then teaches N+1
retrievals instead of one answer token per ~1,000 tokens of context; the prompt up to the first
answer is exactly the evaluation item. Follow-ups are drawn after everything else, so an item's
prompt and answer do not depend on N; evaluation uses N=0.

Items are pure functions of (task, split, seed, index, settings, tokenizer): item ``i`` is the
same whatever ``--limit`` is. ``split`` is ``"train"`` (training-mixture items, from the training
books) or ``"heldout"`` (evaluation items, from the held-out books); the two splits also draw from
different random streams, so key-value items never coincide either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MlxeffError
from .corpus import BookSplit, CountTokens, draw_passage, draw_passages

PHRASE_WORDS = 4
QUESTION_RESERVE = 16  # tokens kept for the quoted phrase of a multi-document question
MIN_PASSAGE_TOKENS = 24
ANSWER_TOKENS = 8  # a one-word answer; the newline after it ends generation earlier
VALUE_TOKENS = 16  # a quoted 8-hex-digit value
KEY_DIGITS = 8
RESTART_WORDS = 4  # words of the passage repeated in a repeat item's prompt
REPEAT_SEPARATORS = ("", " ", "\n")
_TASK_CODES = {"multidoc-qa": 1, "kv-retrieval": 2, "copy": 3, "nq-open-oracle": 4, "kv75": 5,
               "mixture": 6, "filler": 7, "repeat": 8}
_SPLIT_CODES = {"train": 0, "heldout": 1}
_PLAIN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_ANSWER = re.compile(r"([A-Za-z]+(?:'[A-Za-z]+)?)[.,;:!?]*")


@dataclass
class Item:
    """One task item: ``prompt`` (ends where the reader continues), ``target`` (the continuation a
    perfect reader writes, without the newline that ends it), ``answers`` (gold strings the
    scorers compare with), ``max_tokens`` (generation budget) and task-specific ``meta``."""

    prompt: str
    target: str
    answers: List[str]
    max_tokens: int
    meta: dict = field(default_factory=dict)
    followups: List[str] = field(default_factory=list)

    def text(self) -> str:
        """The whole example as training text: prompt, target, newline, then the follow-up
        questions with their answers (one line pair each, training items only)."""
        return self.prompt + self.target + "\n" + "".join(self.followups)


def item_rng(task: str, split: str, seed: int, index: int) -> np.random.Generator:
    if split not in _SPLIT_CODES:
        raise MlxeffError(f"unknown split {split!r} (train or heldout)")
    if int(seed) < 0:
        raise MlxeffError(f"--seed must be at least 0, got {seed}")
    return np.random.default_rng([_TASK_CODES[task], _SPLIT_CODES[split], int(seed), int(index)])


# ---------------------------------------------------------------------------------------------
# rendering (shared by evaluation and the training mixture)


def render_passages(passages: Sequence[str], titles: Optional[Sequence[str]] = None) -> str:
    lines = []
    for i, p in enumerate(passages, 1):
        head = f"Passage {i}" + (f" ({titles[i - 1]})" if titles else "")
        lines.append(f"{head}: {p}\n")
    return "".join(lines)


def render_question(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def phrase_question(phrase: str) -> str:
    return f'Which word follows "{phrase}"?'


def render_kv(records: Sequence[Tuple[str, str]], key: str) -> str:
    """Lost in the Middle's key-value prompt: one pair per line of a JSON object."""
    body = ",\n ".join(f'"{k}": "{v}"' for k, v in records)
    return ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
            f"JSON data:\n{{{body}}}\n\nKey: \"{key}\"\nCorresponding value:")


def render_copy(passage: str) -> str:
    return f"Text: {passage}\nCopy:"


# ---------------------------------------------------------------------------------------------
# multi-document QA


def _occurrences(phrase: str, text: str) -> int:
    return len(re.findall(r"(?<![A-Za-z'])" + re.escape(phrase) + r"(?![A-Za-z'])", text,
                          flags=re.IGNORECASE))


def pick_phrase(passage: str, others: str, rng: np.random.Generator,
                n: int = PHRASE_WORDS) -> Optional[Tuple[str, str]]:
    """``(phrase, answer)``: ``n`` plain words of ``passage`` followed by a plain word, the phrase
    occurring once in ``passage`` and nowhere in ``others``; None when no such phrase exists."""
    words = passage.split(" ")
    candidates = []
    for j in range(n, len(words)):
        if _ANSWER.fullmatch(words[j]) and all(_PLAIN.fullmatch(w) for w in words[j - n:j]):
            candidates.append(j)
    for j in rng.permutation(candidates) if candidates else []:
        phrase = " ".join(words[j - n:j])
        if _occurrences(phrase, passage) == 1 and _occurrences(phrase, others) == 0:
            return phrase, _ANSWER.fullmatch(words[j]).group(1)
    return None


def multidoc_budget(docs: int, context_tokens: int, count: CountTokens) -> int:
    """Tokens per passage so that a ``docs``-passage prompt has at most ``context_tokens``."""
    if docs < 1:
        raise MlxeffError(f"--docs must be at least 1, got {docs}")
    skeleton = render_passages([""] * docs) + render_question(phrase_question(""))
    per = (context_tokens - count(skeleton) - QUESTION_RESERVE) // docs
    if per < MIN_PASSAGE_TOKENS:
        raise MlxeffError(f"--docs {docs}: {docs} passages of at least {MIN_PASSAGE_TOKENS} tokens "
                          f"do not fit in --context-tokens {context_tokens}")
    return per


def multidoc_qa(split: BookSplit, index: int, *, docs: int, context_tokens: int,
                count: CountTokens, seed: int = 0, followups: int = 0) -> Item:
    per = multidoc_budget(docs, context_tokens, count)
    rng = item_rng("multidoc-qa", split.name, seed, index)
    gold = index % docs
    drawn = draw_passages(split, rng, docs, per, count)
    passages = [p for _, p in drawn]
    for _ in range(50):
        others = "\n".join(p for i, p in enumerate(passages) if i != gold)
        found = pick_phrase(passages[gold], others, rng)
        if found is not None:
            break
        # no unique phrase in the gold passage: draw another one in its place
        taken = [s for i, (s, _) in enumerate(drawn) if i != gold]
        drawn[gold] = draw_passage(split, rng, per, count, taken=taken,
                                   min_gap=min(100_000, len(split.text) // (4 * docs)))
        passages[gold] = drawn[gold][1]
    else:
        raise MlxeffError(f"found no unique phrase to ask about in {split.name} item {index}")
    phrase, answer = found
    prompt = render_passages(passages) + render_question(phrase_question(phrase))
    return Item(prompt, " " + answer, [answer], ANSWER_TOKENS,
                {"gold_position": gold, "docs": docs, "phrase": phrase, "passages": passages,
                 "question": phrase_question(phrase)},
                _qa_followups(passages, {phrase.lower()}, rng, followups))


def _qa_followups(passages: Sequence[str], asked: set, rng: np.random.Generator, n: int) -> List[str]:
    """Up to ``n`` further questions about the same passages, each with its answer line. They
    are drawn after everything the item itself draws, so the item's prompt and answer do not
    depend on ``n``."""
    lines = []
    for _ in range(2 * n):
        if len(lines) == n:
            break
        at = int(rng.integers(0, len(passages)))
        others = "\n".join(p for i, p in enumerate(passages) if i != at)
        found = pick_phrase(passages[at], others, rng)
        if found is None or found[0].lower() in asked:
            continue
        asked.add(found[0].lower())
        lines.append(render_question(phrase_question(found[0])) + " " + found[1] + "\n")
    return lines


# ---------------------------------------------------------------------------------------------
# key-value retrieval, copy and repeat


def random_hex(rng: np.random.Generator, count: int, digits: int = KEY_DIGITS) -> List[str]:
    """``count`` distinct random strings of ``digits`` hex digits."""
    out, seen = [], set()
    while len(out) < count:
        for v in rng.integers(0, 16 ** digits, size=count - len(out), dtype=np.int64):
            s = f"{int(v):0{digits}x}"
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out


def kv_retrieval(index: int, *, pairs: int, split: str = "heldout", seed: int = 0,
                 followups: int = 0) -> Item:
    if pairs < 1:
        raise MlxeffError(f"--docs (key-value pairs) must be at least 1, got {pairs}")
    rng = item_rng("kv-retrieval", split, seed, index)
    keys = random_hex(rng, pairs)
    values = random_hex(rng, pairs)
    gold = index % pairs
    records = list(zip(keys, values))
    others = [i for i in rng.permutation(pairs).tolist() if i != gold][:max(0, followups)]
    return Item(render_kv(records, keys[gold]), f' "{values[gold]}"', [values[gold]], VALUE_TOKENS,
                {"gold_position": gold, "docs": pairs},
                [f'Key: "{keys[i]}"\nCorresponding value: "{values[i]}"\n' for i in others])


def copy_task(split: BookSplit, index: int, *, context_tokens: int, count: CountTokens,
              seed: int = 0) -> Item:
    if context_tokens < MIN_PASSAGE_TOKENS:
        raise MlxeffError(f"--context-tokens must be at least {MIN_PASSAGE_TOKENS} for copy, "
                          f"got {context_tokens}")
    rng = item_rng("copy", split.name, seed, index)
    _, passage = draw_passage(split, rng, context_tokens, count)
    target = " " + passage
    return Item(render_copy(passage), target, [passage], count(target) + 2,
                {"passage_tokens": count(target)})


def repeat_task(split: BookSplit, index: int, *, context_tokens: int, count: CountTokens,
                seed: int = 0) -> Item:
    """The passage, a separator, its first ``RESTART_WORDS`` words again; the target is the rest of
    the passage. Held-out items use no separator; training items draw one (module docstring)."""
    if context_tokens < MIN_PASSAGE_TOKENS:
        raise MlxeffError(f"--context-tokens must be at least {MIN_PASSAGE_TOKENS} for repeat, "
                          f"got {context_tokens}")
    rng = item_rng("repeat", split.name, seed, index)
    _, passage = draw_passage(split, rng, context_tokens, count)
    train = split.name == "train"
    sep = REPEAT_SEPARATORS[int(rng.integers(len(REPEAT_SEPARATORS)))] if train else ""
    words = passage.split(" ")
    head, rest = " ".join(words[:RESTART_WORDS]), " " + " ".join(words[RESTART_WORDS:])
    return Item(passage + sep + head, rest, [rest.strip()], count(rest) + 2,
                {"passage_tokens": count(passage)})
