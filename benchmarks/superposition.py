"""Superposition prompting vs naive prompting on multi-document QA: accuracy, TTFT, prefill FLOPs.

Task (``multidoc_items``; a small function a task package can replace): NaturalQuestions-Open
with oracle passages (``nq-open-oracle``, from the lost-in-the-middle release). Questions are
shuffled (``--seed``) and cut into blocks of ``D`` (``--docs``, 10 and 20 by default); a block's
documents are its questions' gold passages in a shuffled order, so each question's gold passage
sits among ``D - 1`` other questions' gold passages (the distractors), and every question of the
block is asked against the same documents -- the setting in which the path cache built for the
documents serves every later question.

``--task multidoc-qa`` takes the project's own task instead (``book_items``: which word follows a
quoted phrase, asked of ``D`` held-out book passages in about ``--context-tokens`` tokens, the
items of ``mlxeff eval --task multidoc-qa``), the task the default model was trained to read.
Every question then has its own passages; naive prompting reads the item's prompt exactly as the
evaluation does ("Passage 1: ...", "Passage 2: ...", the question, "Answer:"), and each
superposition path is what a one-passage item looks like ("Passage 1: ...", the question,
"Answer:").

Methods, side by side per question (interleaved in each trial):

- ``naive``: the classical prompt (preamble, all documents, the question once, the response
  prefix) through the engine's plain chunked prefill;
- ``sp-top1``, ``sp-top2``: superposition prompting with path caching (the block's preamble and
  documents computed beforehand, as the paper's path caching assumes: a question costs its query
  copies and the response); ``sp-top1-nocache``, ``sp-top2-nocache``: the path cache emptied
  before every question (accuracy: identical to the cached runs, which compute the same thing);
- ablations (top-1, cached): ``sp-top1-left`` (left-aligned instead of equilibrium positions),
  ``sp-top1-attention`` (attention instead of Bayesian path scores).

Measured: accuracy (a gold answer, normalised as NQ-open's usual substring match, occurs in the
normalised answer's first line; greedy, ``--max-tokens``), the share of questions whose gold
document was among the kept paths, TTFT (the prefill and the first token's argmax, cache
evaluated; per question the median of ``--trials``, after the answer's generation -- or, for the
methods without one, ``--warmup`` runs -- warmed the method up; the table gives the mean over
questions and naive's mean divided by the method's), and the prefill FLOPs per question
(``mlxeff.techniques.superposition_flops``: weight matmuls, causal attention, output head).

Devices: each device runs in its own process (MLX's generation stream is bound to the default
device when mlx-lm is imported); CPU runs get Debian's OpenBLAS preloaded when it is installed.
The parent prints the devices side by side. The embedded default model knows children's books,
not the world: on nq-open-oracle its accuracy says little; ``--task multidoc-qa`` is its task.

    python benchmarks/superposition.py [--model DIR] [--task multidoc-qa] [--docs 10 20] [--questions 20] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA_CANDIDATES = [ROOT.parent / "shared" / "data" / "eval" / "nq-open-oracle.jsonl.gz",
                   ROOT / "shared" / "data" / "eval" / "nq-open-oracle.jsonl.gz"]
DOCUMENT_TEMPLATE = "Document (Title: {title}) {text}\n"
BOOKS_CANDIDATES = [ROOT.parent / "shared" / "data" / "gutenberg-children",
                    ROOT / "shared" / "data" / "gutenberg-children"]
# multidoc-qa: a path is what a one-passage item of the task looks like (the format the default
# model was trained on): "Passage 1: ...", the question, "Answer:". The tokenizer adds no BOS, so
# the shared preamble (which must not be empty) is the passage label itself.
BOOK_TEMPLATE = dict(preamble="Passage 1:", document=" {text}\n", query="Question: {question}\n",
                     response="Answer:")
METHODS = ("naive", "sp-top1", "sp-top2", "sp-top1-nocache", "sp-top2-nocache", "sp-top1-left",
           "sp-top1-attention")


# ---- the task -------------------------------------------------------------------------------------

def multidoc_items(path: Path, num_docs: int, num_questions: int, seed: int = 0):
    """``num_questions`` items (question, answers, documents, gold index, block), in blocks of
    ``num_docs`` questions sharing their gold passages as documents."""
    from mlxeff.techniques.superposition import Document

    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if r.get("ctxs") and r["ctxs"][0].get("text", "").strip()]
    random.Random(seed).shuffle(records)
    items = []
    for b in range(0, len(records) - num_docs + 1, num_docs):
        block = records[b:b + num_docs]
        order = list(range(num_docs))
        random.Random(seed * 7919 + b).shuffle(order)
        docs = [Document(block[i]["ctxs"][0]["text"].strip(), block[i]["ctxs"][0].get("title", ""))
                for i in order]
        for i, r in enumerate(block):
            items.append(dict(question=r["question"], answers=r["answers"], documents=docs,
                              gold=order.index(i), block=b // num_docs))
            if len(items) == num_questions:
                return items
    return items


def book_items(corpus: Path, tokenizer, num_docs: int, num_questions: int, context_tokens: int,
               seed: int = 0):
    """The project's multi-document QA (``mlxeff eval --task multidoc-qa``: which word follows a
    quoted phrase, asked of ``num_docs`` held-out book passages in about ``context_tokens``
    tokens), as items of the same shape. Every item has its own passages (its own block), and
    keeps its rendered prompt: naive prompting reads exactly what ``mlxeff eval`` reads."""
    from mlxeff.errors import MlxeffError
    from mlxeff.tasks.runner import build_items
    from mlxeff.techniques.superposition import Document

    try:
        items = build_items("multidoc-qa", tokenizer, data=corpus, docs=num_docs,
                            context_tokens=context_tokens, limit=num_questions, seed=seed)
    except MlxeffError as e:  # e.g. passages that cannot fit --context-tokens: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    return [dict(question=it.meta["question"], answers=it.answers, prompt=it.prompt,
                 documents=[Document(p) for p in it.meta["passages"]], gold=it.meta["gold_position"],
                 block=i) for i, it in enumerate(items)]


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def correct(prediction: str, answers) -> bool:
    p = normalize(prediction.split("\n")[0] if prediction.strip() else prediction)
    return any(normalize(a) and normalize(a) in p for a in answers)


# ---- one device -------------------------------------------------------------------------------------

def method_config(name: str):
    from mlxeff.techniques.superposition import SuperpositionConfig

    k = 2 if "top2" in name else 1
    return SuperpositionConfig(top_k=k, positions="left" if name.endswith("-left") else "equilibrium",
                               scoring="attention" if name.endswith("-attention") else "bayesian")


def run_device(args) -> dict:
    import mlx.core as mx

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)  # before mlx-lm binds its generation stream
    import mlxeff
    from mlxeff.generate import ChunkedPrefill, stream_generate
    from mlxeff.io import resolve_model_dir
    from mlxeff.precision import apply_compute_dtype
    from mlxeff.techniques import superposition as sp
    from mlxeff.techniques.superposition_cache import PathCache
    from mlxeff.techniques.superposition_flops import PromptShape, naive_flops, superposition_flops

    path = resolve_model_dir(args.model)
    model, tok = mlxeff.load(path)
    apply_compute_dtype(model, args.dtype)  # auto: float32 on the CPU, affine 4-bit dequantized
    books = args.task == "multidoc-qa"
    defaults = BOOK_TEMPLATE if books else dict(preamble=sp.DEFAULT_PREAMBLE, document=DOCUMENT_TEMPLATE,
                                                query=sp.DEFAULT_QUERY, response=sp.DEFAULT_RESPONSE)
    template = sp.PromptTemplate(*(defaults[k] if getattr(args, k) is None else getattr(args, k)
                                   for k in ("preamble", "document", "query", "response"))).check()
    candidates = BOOKS_CANDIDATES if books else DATA_CANDIDATES
    data = args.data or next((p for p in candidates if p.exists()), candidates[0])
    methods = [m for m in args.methods if m in METHODS]
    blas = "openblas" if "openblas" in os.environ.get("LD_PRELOAD", "") else "bundled"
    out = dict(device=args.device, mlx=mx.__version__, blas=blas if args.device == "cpu" else None,
               model=str(path), dtype=str(model.transformer.norm.weight.dtype).replace("mlx.core.", ""),
               max_context_length=getattr(model.args, "max_context_length", None), data=str(data),
               settings={})

    def ttft(prefill, ids):
        cache = prefill.make_cache(model)
        t0 = time.perf_counter()
        y = mx.argmax(prefill(model, ids, cache), axis=-1)
        mx.eval(y, [(c.keys, c.values) for c in cache])
        return time.perf_counter() - t0

    def answer(ids, hooks):
        text = ""
        for r in stream_generate(model, tok, ids, max_tokens=args.max_tokens, **hooks):
            text += r.text
            if "\n" in text.lstrip():
                break
        return text.strip()

    started = time.perf_counter()
    for D in args.docs:
        items = (book_items(data, tok, D, args.questions, args.context_tokens, args.seed) if books
                 else multidoc_items(data, D, args.questions, args.seed))
        if not items:
            raise SystemExit(f"error: {data}: not enough questions for {D} documents")
        caches, hooks, build_s = {}, {}, {}
        for it in items:  # one path cache per block and method; built before timing
            for m in methods:
                if m == "naive" or (it["block"], m) in hooks:
                    continue
                pc = caches.setdefault((it["block"], m), PathCache())
                h = sp.superposition_hooks(tok, it["documents"], template=template,
                                           config=method_config(m), path_cache=pc)
                if "nocache" not in m:
                    t0 = time.perf_counter()
                    h["prefill"].prepare(model)  # evaluates what it computes
                    build_s.setdefault(m, []).append(time.perf_counter() - t0)
                hooks[(it["block"], m)] = h
        rows = {m: dict(correct=[], gold_kept=[], ttft=[], flops=[], tokens=[]) for m in methods}
        naive_prefill = ChunkedPrefill(args.step)
        for qi, it in enumerate(items):
            q_ids = mx.array(tok.encode(it["question"]), dtype=mx.uint32)
            fj = sp.build_prompt(tok, template, it["documents"], it["question"])
            naive_ids = mx.array(tok.encode(it["prompt"]) if "prompt" in it else sp.classical_ids(fj),
                                 dtype=mx.uint32)
            shape = PromptShape(len(fj.preamble), fj.document_lengths, len(fj.query), len(fj.response))
            naive_shape = PromptShape(naive_ids.size, [], 0, 0)  # one causal pass either way
            # answers first: they also warm every method up (the same prefill code runs)
            answered = {}
            for m in methods:
                if m == "naive":
                    answered[m] = correct(answer(naive_ids, {}), it["answers"])
                elif "nocache" not in m:
                    answered[m] = correct(answer(q_ids, hooks[(it["block"], m)]), it["answers"])
            times = {m: [] for m in methods}
            for trial in range(args.warmup + args.trials):
                for m in (methods if trial % 2 == 0 else methods[::-1]):
                    if trial < args.warmup and m in answered:
                        continue
                    if m == "naive":
                        t = ttft(naive_prefill, naive_ids)
                    else:
                        h = hooks[(it["block"], m)]
                        if "nocache" in m:
                            h["prefill"].path_cache.clear_memory()
                        t = ttft(h["prefill"], q_ids)
                    if trial >= args.warmup:
                        times[m].append(t)
            for m in methods:
                r = rows[m]
                r["ttft"].append(statistics.median(times[m]))
                if m in answered:
                    r["correct"].append(answered[m])
                if m == "naive":
                    r["flops"].append(naive_flops(model.args, naive_shape).total)
                    r["tokens"].append(naive_shape.classical_tokens)
                    continue
                h = hooks[(it["block"], m)]
                last = h["prefill"].last
                r["gold_kept"].append(it["gold"] in last.kept)
                r["flops"].append(superposition_flops(
                    model.args, shape, last.kept, cached="nocache" not in m,
                    scoring=h["prefill"].config.scoring).total)
                r["tokens"].append(shape.query * D + shape.response
                                   + (0 if "nocache" not in m else shape.preamble + sum(shape.documents)))
            if not args.quiet:
                print(f"[{args.device}] {D} documents: question {qi + 1}/{len(items)} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        setting = {}
        base_t = statistics.mean(rows["naive"]["ttft"]) if "naive" in rows else None
        base_f = statistics.mean(rows["naive"]["flops"]) if "naive" in rows else None
        for m, r in rows.items():
            t, f = statistics.mean(r["ttft"]), statistics.mean(r["flops"])
            setting[m] = dict(
                accuracy=statistics.mean(r["correct"]) if r["correct"] else None,
                gold_kept=statistics.mean(r["gold_kept"]) if r["gold_kept"] else None,
                ttft_s=t, ttft_speedup=base_t / t if base_t else None,
                prefill_gflops=f / 1e9, flops_reduction=base_f / f if base_f else None,
                prefill_tokens=statistics.mean(r["tokens"]),
                document_cache_build_s=statistics.mean(build_s[m]) if m in build_s else None)
        out["settings"][str(D)] = dict(questions=len(items), blocks=len({i["block"] for i in items}),
                                       mean_document_tokens=statistics.mean(
                                           n for i in items for n in sp.build_prompt(
                                               tok, template, i["documents"], "?").document_lengths),
                                       methods=setting)
    return out


# ---- the parent: every device, side by side ---------------------------------------------------------

def openblas_env() -> dict:
    """The environment of the CPU child: OpenBLAS preloaded as ``mlxeff``'s re-launch does."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cli.blas import child_environment

    return child_environment() or dict(os.environ)


def gpu_available() -> bool:
    import mlx.core as mx

    return mx.is_available(mx.gpu)


def print_table(results: list) -> None:
    devs = [r["device"] for r in results]
    first = results[0]
    print(f"model {first['model']}, data {first['data']}")
    for r in results:
        print(f"  {r['device']}: MLX {r['mlx']}" + (f", BLAS {r['blas']}" if r["blas"] else "")
              + f", compute dtype {r['dtype']}")
    for D, s in first["settings"].items():
        print(f"\n{D} documents, {s['questions']} questions in {s['blocks']} block(s), "
              f"{s['mean_document_tokens']:.0f} tokens per document on average")
        head = f"{'method':20s} {'acc':>5s} {'gold kept':>9s} {'GFLOPs':>8s} {'FLOPs x':>7s}"
        for d in devs:
            head += f" {d + ' TTFT ms':>13s} {d + ' x':>7s}"
        print(head)
        for m, row in s["methods"].items():
            acc = "=" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
            gk = "-" if row["gold_kept"] is None else f"{row['gold_kept']:.2f}"
            line = f"{m:20s} {acc:>5s} {gk:>9s} {row['prefill_gflops']:8.2f} {row['flops_reduction']:7.1f}"
            for r in results:
                x = r["settings"][D]["methods"][m]
                line += f" {x['ttft_s'] * 1e3:13.1f} {x['ttft_speedup']:7.2f}"
            print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="mlxeff model directory (default: the embedded model)")
    ap.add_argument("--task", choices=["nq-open-oracle", "multidoc-qa"], default="nq-open-oracle",
                    help="nq-open-oracle (NQ questions, gold passages as each other's distractors) or "
                    "multidoc-qa (the project's task on held-out book passages, what the default "
                    "model was trained to read)")
    ap.add_argument("--data", type=Path, default=None,
                    help="nq-open-oracle.jsonl.gz, or for multidoc-qa the corpus directory")
    ap.add_argument("--context-tokens", type=int, default=2000,
                    help="multidoc-qa: the naive prompt's length in tokens (about)")
    ap.add_argument("--docs", type=int, nargs="+", default=[10, 20], help="documents per question")
    ap.add_argument("--questions", type=int, default=20, help="questions per document count")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--max-tokens", type=int, default=24, help="answer tokens at most (greedy)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--step", type=int, default=512, help="the naive prefill's chunk size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", help="auto (float32 on the CPU, the model's own on a "
                    "GPU), float32, float16 or bfloat16")
    ap.add_argument("--preamble", default=None, help="default: the task's")
    ap.add_argument("--document", default=None, help="default: the task's")
    ap.add_argument("--query", default=None, help="default: the task's")
    ap.add_argument("--response", default=None, help="default: the task's")
    ap.add_argument("--devices", nargs="+", default=None, choices=["cpu", "gpu"],
                    help="default: the CPU, and the GPU when MLX has one")
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if "naive" not in args.methods:
        args.methods = ["naive"] + list(args.methods)  # the reference of every ratio

    if args.device:  # a child: one device
        result = run_device(args)
        args.out.write_text(json.dumps(result))
        return
    devices = args.devices or (["cpu", "gpu"] if gpu_available() else ["cpu"])
    results = []
    for d in devices:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--device", d, "--out", str(out)] + list(argv or sys.argv[1:])
            env = openblas_env() if d == "cpu" else dict(os.environ)
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"error: the {d} run failed (exit {proc.returncode})")
            results.append(json.loads(out.read_text()))
    report = {"devices": results,
              "command": " ".join(["python", "benchmarks/superposition.py"] + list(argv or sys.argv[1:]))}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(results)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "superposition.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
