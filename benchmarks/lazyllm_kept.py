"""Which prompt tokens LazyLLM keeps on multi-document QA: the gold passage's phrase and answer.

The multi-document QA task (``mlxeff eval --task multidoc-qa``) asks which word follows a quoted
phrase in one of K passages. Answering means finding the phrase's occurrence in the gold passage
and reading the token after it. For each held-out item this runs LazyLLM's prefill
(``lazy_prefill``) with a schedule and reports whether the last layer computed the token that
starts the phrase's occurrence in the gold passage and the token that starts the answer, and
whether the first predicted token is the answer's first token, beside the plain prefill's
prediction.

    python benchmarks/lazyllm_kept.py [--model DIR] [--items 12] [--keep 0.8 0.5] [--json]

On the CPU it re-launches itself with OpenBLAS preloaded, as the ``mlxeff`` command does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "mlxeff" / "assets" / "default"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gutenberg-children"


def token_at(offsets, char: int, shift: int) -> int:
    """The first token whose text ends after character ``char`` (``shift``: tokens before the
    text, e.g. BOS)."""
    return next(i for i, (_, end) in enumerate(offsets) if end > char) + shift


def inspect_item(model, tokenizer, item, schedule) -> dict:
    from mlxeff.engine import ChunkedPrefill
    from mlxeff.generate import encode_prompt
    from mlxeff.techniques import lazyllm as lz

    ids = encode_prompt(tokenizer, item.prompt).reshape(-1)
    offsets = tokenizer._tokenizer(item.prompt, return_offsets_mapping=True,
                                   add_special_tokens=False)["offset_mapping"]
    shift = ids.size - len(offsets)
    gold = item.meta["passages"][item.meta["gold_position"]]
    start = item.prompt.index(gold) + gold.index(item.meta["phrase"])
    phrase, answer = (token_at(offsets, c, shift) for c in (start, start + len(item.meta["phrase"]) + 1))
    cache = lz.make_cache(len(model.transformer.layers), schedule)
    lazy = lz.lazy_prefill(model, ids, cache)
    plain = ChunkedPrefill(512)(model, ids, model.make_cache())
    kept = set(cache[len(cache) - 1].positions.tolist())
    first = tokenizer.encode(item.target, add_special_tokens=False)[0]
    return {"gold_position": item.meta["gold_position"], "phrase_kept": phrase in kept,
            "answer_kept": answer in kept, "kept_fraction": len(kept) / ids.size,
            "lazy_first_token_right": int(mx.argmax(lazy[0]).item()) == first,
            "plain_first_token_right": int(mx.argmax(plain[0]).item()) == first}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--items", type=int, default=12)
    p.add_argument("--docs", type=int, default=10)
    p.add_argument("--context-tokens", type=int, default=2000)
    p.add_argument("--keep", type=float, nargs=2, default=(0.8, 0.5), metavar=("START", "END"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.items < 1:
        raise SystemExit(f"error: --items must be at least 1, got {args.items}")
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark()
    from mlxeff.cli.common import load_for_generation
    from mlxeff.errors import MlxeffError
    from mlxeff.tasks.runner import build_items
    from mlxeff.techniques.lazyllm import LazySchedule

    try:
        _, model, tokenizer = load_for_generation(args.model, "auto")
        items = build_items("multidoc-qa", tokenizer, data=args.data, docs=args.docs,
                            context_tokens=args.context_tokens, limit=args.items)
        schedule = LazySchedule(*args.keep)
    except MlxeffError as e:
        raise SystemExit(f"error: {e}")
    records = [inspect_item(model, tokenizer, it, schedule) for it in items]
    n = len(records)
    summary = {k: sum(r[k] for r in records) for k in
               ("phrase_kept", "answer_kept", "lazy_first_token_right", "plain_first_token_right")}
    summary["both_kept_lazy_right"] = sum(r["lazy_first_token_right"] for r in records
                                          if r["phrase_kept"] and r["answer_kept"])
    summary["both_kept"] = sum(r["phrase_kept"] and r["answer_kept"] for r in records)
    out = {"device": str(mx.default_device()), "model": str(args.model), "items": n,
           "keep": list(args.keep), "summary": summary, "records": records}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{n} items, keep {args.keep[0]} -> {args.keep[1]}: " +
          ", ".join(f"{k} {v}/{n}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
