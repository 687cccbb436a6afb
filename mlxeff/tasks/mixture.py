"""The synthetic tasks as training text: one ``.txt.gz`` file to train on beside the books.

    python -m mlxeff.tasks.mixture --data CORPUS_DIR --tokenizer TOKENIZER_DIR --out tasks.txt.gz \\
        --tokens 12000000 --seq-len 2048 --seed 0 [--workers N]

Items come from the training books only (``corpus.load_split(..., "train")``) and are rendered
exactly as evaluation renders them (prompt, the reader's continuation, a newline), followed by
follow-up questions on the same context (``FOLLOWUPS``: 4-8 per multi-document item, 8-16 per
key-value item; ``generators`` explains why), as many as fit the training sequence. Each item's
task and size are drawn per item: multi-document QA with 2-12 passages in up to 2,000 tokens, key-
value retrieval with 2-80 pairs, copy of 20-600 tokens (weights 2:1:1.5 by count), so the evaluation
settings (10 passages in 2,000 tokens, 50 pairs, 200 tokens) lie inside the training range.
``--weights`` changes the shares and can add **repeat** items (a passage of 50-1,000 tokens, then
the whole passage again without a marker; ``generators``), as the default model v2's continued
training does (``benchmarks/default_model_v2_1.sh``).

Packing. ``mlxeff train`` concatenates its files' tokens (each file followed by EOS, in the order
given) and cuts the stream into sequences ``tokens[i*L : i*L + L + 1]`` (``mlxeff.data``), with no
regard for documents. An item cut in two would teach the wrong thing (a question answered without
its passages), so this file is laid out for that rule: **it must be the first file given to
``--train``** (its tokens then start the stream at offset 0), and before an item that would cross a
multiple of ``seq_len`` a filler -- a passage of the training books, plain text -- runs to just past
the boundary. Every item thus lies inside one training sequence. Token offsets are exact because
every piece ends with a newline and the next starts with a non-space character, a point where
byte-level BPE never merges (the file's tokenization equals the sum of its pieces'; ``build``
checks this on the whole file and on sampled items, and refuses to write otherwise).

The summary (``<out>.json`` beside the file) gives the counts: items per task, item tokens, filler
tokens. The share of the training tokens that are task items is item tokens / (this file's
tokens + the books' tokens).
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ..errors import MlxeffError
from .corpus import BookSplit, CountTokens, fit_words, load_split, token_counter
from .generators import (Item, MIN_PASSAGE_TOKENS, copy_task, item_rng, kv_retrieval,
                         multidoc_budget, multidoc_qa, repeat_task)

WEIGHTS = {"multidoc-qa": 2.0, "kv-retrieval": 1.0, "copy": 1.5}  # the default model v2's mixture
TASK_NAMES = ("multidoc-qa", "kv-retrieval", "copy", "repeat")
MAX_CONTEXT = 2000  # the largest multi-document prompt (the evaluation's size)
DOCS = (2, 12)
PAIRS = (2, 80)
COPY_TOKENS = (20, 600)
REPEAT_TOKENS = (50, 1000)
FOLLOWUPS = {"multidoc-qa": (4, 8), "kv-retrieval": (8, 16)}  # further questions per item (range)
FILLER_SLACK = 8
CHECK_ITEMS = 64


def parse_weights(text: str) -> dict:
    """``"multidoc-qa=2,copy=1.5,repeat=1"`` -> the task weights (tasks not named get 0)."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in TASK_NAMES:
            raise MlxeffError(f"--weights: unknown task {name!r} (choose from {', '.join(TASK_NAMES)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise MlxeffError(f"--weights: {part!r} is not TASK=NUMBER") from None
        if not weights[name] >= 0:
            raise MlxeffError(f"--weights: {name}'s weight must be at least 0, got {value}")
    if sum(weights.values()) <= 0:
        raise MlxeffError("--weights: at least one task needs a positive weight")
    return weights


def draw_item(split: BookSplit, number: int, count: CountTokens, seed: int,
              seq_len: int, weights: Optional[dict] = None) -> Tuple[str, Item]:
    """Training item ``number``: its task and size drawn by seed, then the item itself."""
    rng = item_rng("mixture", "train", seed, number)
    weights = WEIGHTS if weights is None else weights
    names = list(weights)
    p = np.array([weights[n] for n in names])
    task = names[int(rng.choice(len(names), p=p / p.sum()))]
    longest = min(MAX_CONTEXT, seq_len - 48)  # room for the answer and the filler's overshoot
    if task == "multidoc-qa":
        docs = int(rng.integers(DOCS[0], DOCS[1] + 1))
        docs = max(1, min(docs, (longest - 60) // (MIN_PASSAGE_TOKENS + 20)))  # short sequences
        low = min(longest, docs * (MIN_PASSAGE_TOKENS + 20) + 60)
        ctx = int(rng.integers(low, longest + 1))
        multidoc_budget(docs, ctx, count)  # raises if this seq_len is too short for the task
        more = int(rng.integers(FOLLOWUPS[task][0], FOLLOWUPS[task][1] + 1))
        return task, multidoc_qa(split, number, docs=docs, context_tokens=ctx, count=count, seed=seed,
                                 followups=more)
    if task == "kv-retrieval":
        pairs = int(rng.integers(PAIRS[0], PAIRS[1] + 1))
        pairs = min(pairs, max(1, (longest - 64) // 24))  # about 21 tokens per pair
        more = int(rng.integers(FOLLOWUPS[task][0], FOLLOWUPS[task][1] + 1))
        return task, kv_retrieval(number, pairs=pairs, split="train", seed=seed, followups=more)
    # copy or repeat: the passage twice (marked or not), within the longest context
    low, high = REPEAT_TOKENS if task == "repeat" else COPY_TOKENS
    n = max(MIN_PASSAGE_TOKENS, min(int(rng.integers(low, high + 1)), (longest - 16) // 2))
    make = repeat_task if task == "repeat" else copy_task
    return task, make(split, number, context_tokens=n, count=count, seed=seed)


def fit_followups(item: Item, count: CountTokens, limit: int) -> int:
    """Drop the item's last follow-ups until its text has at most ``limit`` tokens (when it can);
    returns its token count. Pieces add up exactly: each ends with a newline and the next starts
    with a letter, where byte-level BPE never merges."""
    n = count(item.prompt + item.target + "\n")
    keep = 0
    for line in item.followups:
        m = count(line)
        if n + m > limit:
            break
        n += m
        keep += 1
    del item.followups[keep:]
    return n


def filler(split: BookSplit, rng: np.random.Generator, need: int, count: CountTokens) -> Tuple[str, int]:
    """A training-book passage plus newline of ``need`` to ``need + FILLER_SLACK`` tokens."""
    text = split.text
    span = (need + FILLER_SLACK) * 6 + 64
    for _ in range(1000):
        at = int(rng.integers(0, max(1, len(text) - span)))
        start = text.find(" ", at) + 1
        window = text[start:start + span]
        if start <= 0 or "\n" in window:
            continue
        words = window.split(" ")[:-1]
        piece = " ".join(words[:fit_words(words, need + FILLER_SLACK - 1, count)]) + "\n"
        n = count(piece)
        if need <= n <= need + FILLER_SLACK and split.clean(start, start + len(piece) - 1):
            return piece, n
    raise MlxeffError(f"found no filler passage of {need} tokens in the training books")


def fitted_item(split: BookSplit, number: int, count: CountTokens, seed: int,
                seq_len: int, weights: Optional[dict] = None) -> Tuple[str, Item, int]:
    """Training item ``number`` as ``(task, item, tokens)``, its follow-ups fitted to ``seq_len``."""
    task, item = draw_item(split, number, count, seed, seq_len, weights)
    return task, item, fit_followups(item, count, seq_len - FILLER_SLACK)


def drawn_items(split: BookSplit, count: CountTokens, seed: int,
                seq_len: int, weights: Optional[dict] = None) -> Iterator[Tuple[str, Item, int]]:
    """Training items 0, 1, 2, ... (``fitted_item``)."""
    number = 0
    while True:
        yield fitted_item(split, number, count, seed, seq_len, weights)
        number += 1


_WORKER: dict = {}


def _start_worker(split: BookSplit, tokenizer, seed: int, seq_len: int, weights) -> None:
    _WORKER.update(split=split, count=token_counter(tokenizer), seed=seed, seq_len=seq_len,
                   weights=weights)


def _draw_batch(start: int, size: int) -> List[Tuple[str, Item, int]]:
    w = _WORKER
    return [fitted_item(w["split"], number, w["count"], w["seed"], w["seq_len"], w["weights"])
            for number in range(start, start + size)]


def parallel_items(split: BookSplit, tokenizer, seed: int, seq_len: int, workers: int,
                   batch: int = 16, weights: Optional[dict] = None) -> Iterator[Tuple[str, Item, int]]:
    """``drawn_items`` computed by ``workers`` processes, yielded in the same order. Items are pure
    functions of their number, so the file is byte-identical to the sequential one; only the
    fillers (drawn from one random stream, in file order) stay in the calling process."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker,
                               initargs=(split, tokenizer, seed, seq_len, weights))
    try:
        ahead = 4 * workers
        pending = deque(pool.submit(_draw_batch, i * batch, batch) for i in range(ahead))
        while True:
            yield from pending.popleft().result()
            pending.append(pool.submit(_draw_batch, ahead * batch, batch))
            ahead += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def layout(split: BookSplit, count: CountTokens, *, tokens: int, seq_len: int, seed: int,
           progress: Optional[bool] = None, items: Optional[Iterator[Tuple[str, Item, int]]] = None,
           weights: Optional[dict] = None):
    """The file's pieces and the items' places ``(token offset, tokens, task, piece index)``:
    ``(pieces, places, stats)``. ``items``: where the items come from (default ``drawn_items``).
    ``build`` checks the options first."""
    from ..progress import bar

    rng = item_rng("filler", "train", seed, 0)
    pieces: List[str] = []
    places: List[Tuple[int, int, str]] = []
    weights = WEIGHTS if weights is None else weights
    stats = {"weights": dict(weights), "items": {t: 0 for t in weights},
             "item_tokens": {t: 0 for t in weights}, "filler_tokens": 0}
    offset = number = 0
    items = items if items is not None else drawn_items(split, count, seed, seq_len, weights)
    with bar(total=tokens, desc="task mixture", unit="tok", unit_scale=True, show=progress) as pbar:
        while offset < tokens:
            task, item, n = next(items)
            number += 1
            text = item.text()
            if n > seq_len - FILLER_SLACK:
                continue  # cannot be placed inside one sequence
            while offset % seq_len + n > seq_len:
                piece, m = filler(split, rng, seq_len - offset % seq_len, count)
                pieces.append(piece)
                offset += m
                stats["filler_tokens"] += m
                pbar.update(m)
            places.append((offset, n, task, len(pieces)))
            pieces.append(text)
            offset += n
            stats["items"][task] += 1
            stats["item_tokens"][task] += n
            pbar.update(n)
    stats.update(tokens=offset, sequences=-(-offset // seq_len), seq_len=seq_len, seed=seed,
                 item_numbers=number)
    return pieces, places, stats


def build(data_dir, tokenizer, out: Path, *, tokens: int, seq_len: int = 2048, seed: int = 0,
          progress: Optional[bool] = None, split: Optional[BookSplit] = None,
          workers: int = 1, weights: Optional[dict] = None) -> dict:
    """Write the mixture file ``out`` (``.txt.gz``) and ``<out>.json``; returns the summary.
    ``workers`` > 1 draws the items in that many processes (same bytes)."""
    from ..data import encode_text

    out = Path(out)
    if not out.name.endswith(".txt.gz"):
        raise MlxeffError("the mixture file must end in .txt.gz", out)
    if tokens < 1:
        raise MlxeffError(f"--tokens must be at least 1, got {tokens}")
    if workers < 1:
        raise MlxeffError(f"--workers must be at least 1, got {workers}")
    if seq_len < 256:
        raise MlxeffError(f"--seq-len must be at least 256 for the task mixture, got {seq_len}")
    tic = time.perf_counter()
    split = split if split is not None else load_split(data_dir, "train")
    count = token_counter(tokenizer)
    items = (parallel_items(split, tokenizer, seed, seq_len, workers, weights=weights)
             if workers > 1 else None)
    try:
        pieces, places, stats = layout(split, count, tokens=tokens, seq_len=seq_len, seed=seed,
                                       progress=progress, items=items, weights=weights)
    finally:
        if items is not None:
            items.close()
    text = "".join(pieces)
    ids = encode_text(tokenizer, text)
    if ids.size != stats["tokens"]:
        raise MlxeffError(f"the mixture tokenizes to {ids.size:,} tokens, not the {stats['tokens']:,} "
                          "its pieces add up to (a piece boundary merged)")
    for k in np.random.default_rng(seed).permutation(len(places))[:CHECK_ITEMS]:
        off, n, _, piece = places[int(k)]
        if off // seq_len != (off + n - 1) // seq_len:
            raise MlxeffError(f"the item at token {off} crosses a sequence boundary")
        if ids[off:off + n].tolist() != list(tokenizer.encode(pieces[piece], add_special_tokens=False)):
            raise MlxeffError(f"the item at token {off} is not where the layout put it")
    stats.update(files=[str(f) for f in split.files], seconds=time.perf_counter() - tic,
                 item_token_share_of_file=sum(stats["item_tokens"].values()) / max(stats["tokens"], 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    summary_path = out.with_name(out.name[:-len(".txt.gz")] + ".json")
    fd, tmp = tempfile.mkstemp(prefix=".mixture-", suffix=".txt.gz", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
            gz.write(text.encode("utf-8"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    summary_path.write_text(json.dumps(stats, indent=1))
    stats["places"] = places
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlxeff.tasks.mixture", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="corpus directory with train-*.txt.gz")
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory (the model's)")
    ap.add_argument("--out", required=True, help="output .txt.gz (first file of --train)")
    ap.add_argument("--tokens", type=int, required=True, help="tokens of task text to write")
    ap.add_argument("--seq-len", type=int, default=2048, help="training sequence length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1,
                    help="processes drawing the items (the file is the same for any number)")
    ap.add_argument("--weights", default=None,
                    help="task weights by count, e.g. 'multidoc-qa=2,copy=1.5,repeat=1' (tasks: "
                         f"{', '.join(TASK_NAMES)}; default {','.join(f'{k}={v:g}' for k, v in WEIGHTS.items())})")
    args = ap.parse_args(argv)
    from ..data import load_tokenizer

    try:
        weights = parse_weights(args.weights) if args.weights is not None else None
        stats = build(args.data, load_tokenizer(args.tokenizer), Path(args.out), tokens=args.tokens,
                      seq_len=args.seq_len, seed=args.seed, workers=args.workers, weights=weights)
    except MlxeffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats.pop("places")
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
