"""How faithfully a model copies from its context: teacher-forced against free-running.

The copy and repeat tasks (``mlxeff eval --task copy|repeat``) score greedy generation by token
position: one early wrong token shifts or ends the copy, and every later position counts as
wrong. This separates the two things that figure mixes. For each held-out item it measures

- *teacher-forced accuracy*: one forward over the prompt and the reference continuation; the
  share of reference tokens that are the model's argmax given the true prefix (how well it copies
  when it is on track);
- *generated accuracy*: the task's own metric, through the generation engine (greedy, stopping at
  a newline as the task does);
- *first miss*: the index of the first generated token that differs from the reference, the two
  tokens there, and whether a full forward over the prompt and the reference up to that point
  ranks the generated token first too -- when it does, the miss is the model's choice, not a
  difference between the engine's cached decoding and a full forward.

    python benchmarks/copy_fidelity.py [--model DIR] [--copy-items 10] [--repeat-items 6] [--json]

On the CPU it re-launches itself with OpenBLAS preloaded, as the ``mlxeff`` command does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "mlxeff" / "assets" / "default"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gutenberg-children"


def fidelity(model, tokenizer, item) -> dict:
    from mlxeff.generate import encode_prompt
    from mlxeff.tasks.runner import generate_line
    from mlxeff.tasks.scoring import token_accuracy

    prompt = encode_prompt(tokenizer, item.prompt).reshape(-1)
    reference = list(tokenizer.encode(item.target, add_special_tokens=False))
    ref = mx.array(reference, dtype=prompt.dtype)
    logits = model(mx.concatenate([prompt, ref[:-1]])[None])[0, prompt.size - 1:]
    predicted = mx.argmax(logits, axis=-1)  # row i: the full forward's choice after ref[:i]
    forced = mx.mean(predicted == ref).item()
    _, out, _ = generate_line(model, tokenizer, item.prompt, item.max_tokens)
    miss = next((i for i, (g, r) in enumerate(zip(out, reference)) if g != r), None)
    rec = {"prompt_tokens": int(prompt.size), "reference_tokens": len(reference),
           "generated_tokens": len(out),
           "teacher_forced_accuracy": forced, "generated_accuracy": token_accuracy(out, reference),
           "first_miss": miss}
    if miss is not None:
        rec.update(generated=tokenizer.decode([out[miss]]), reference=tokenizer.decode([reference[miss]]),
                   full_forward_agrees=int(predicted[miss].item()) == out[miss])
    return rec


def run_task(model, tokenizer, name: str, items: int, context_tokens: int, data: Path) -> dict:
    from mlxeff.tasks.runner import build_items

    records = [fidelity(model, tokenizer, it)
               for it in build_items(name, tokenizer, data=data, context_tokens=context_tokens, limit=items)]
    misses = [r["first_miss"] for r in records if r["first_miss"] is not None]
    return {"task": name, "context_tokens": context_tokens, "items": len(records),
            "teacher_forced_accuracy": statistics.mean(r["teacher_forced_accuracy"] for r in records),
            "generated_accuracy": statistics.mean(r["generated_accuracy"] for r in records),
            "exact_copies": len(records) - len(misses),
            "median_first_miss": statistics.median(misses) if misses else None,
            "misses_the_full_forward_agrees_with": sum(r.get("full_forward_agrees", False) for r in records),
            "records": records}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the corpus folder (valid.txt.gz)")
    p.add_argument("--copy-items", type=int, default=10)
    p.add_argument("--repeat-items", type=int, default=6)
    p.add_argument("--copy-tokens", type=int, default=200)
    p.add_argument("--repeat-tokens", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if min(args.copy_items, args.repeat_items) < 0 or args.copy_items + args.repeat_items == 0:
        raise SystemExit("error: --copy-items and --repeat-items must be at least 0, and not both 0")
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark()
    from mlxeff.cli.common import load_for_generation
    from mlxeff.errors import MlxeffError

    try:
        _, model, tokenizer = load_for_generation(args.model, "auto")
        tasks = [run_task(model, tokenizer, name, n, ctx, args.data)
                 for name, n, ctx in (("copy", args.copy_items, args.copy_tokens),
                                      ("repeat", args.repeat_items, args.repeat_tokens)) if n > 0]
    except MlxeffError as e:
        raise SystemExit(f"error: {e}")
    out = {"device": str(mx.default_device()), "model": str(args.model), "tasks": tasks}
    if args.json:
        print(json.dumps(out))
        return
    for t in tasks:
        print(f"{t['task']} ({t['items']} items, {t['context_tokens']} tokens): teacher-forced "
              f"{t['teacher_forced_accuracy']:.1%}, generated {t['generated_accuracy']:.1%}, exact copies "
              f"{t['exact_copies']}, median first miss {t['median_first_miss']}, misses a full forward "
              f"makes too {t['misses_the_full_forward_agrees_with']}")


if __name__ == "__main__":
    main()
