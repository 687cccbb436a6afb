"""Speculative decoding benchmark: every drafter against plain greedy decoding, CPU and GPU side by side.

For one model (``--model``, default the embedded model; ``--random 270M`` a random-weight OpenELM
of that shape) and three kinds of prompt:

- ``story``: continuing a window of held-out book text (``gutenberg-children/valid.txt.gz``);
- ``qa``: answering a question after three passages (multi-document QA from ``nq-open-oracle``:
  the question's gold passage and two other questions' gold passages, shuffled);
- ``copy``: a passage, a blank line and the passage's first tokens again (copy-heavy output);

it runs plain greedy decoding and each drafter: prompt lookup, early exit at each ``--early-exit``
depth, a draft model (``--draft-model DIR``; by default the model's LP-0.25 layer-pruned copy,
untrained, saved to a temporary directory), each M2R2 artifact (``--m2r2 NAME|DIR``), and a drafter
that proposes nothing ("empty drafts": the engine's synchronous drafted loop without drafts, the
fixed cost every drafter starts from, against plain decoding's pipelined loop). Per device,
task and method it reports the decode speed (generated tokens after the first, over the time after
the first; summed over the task's prompts), its ratio to plain decoding, the acceptance rate
(accepted / drafted), tokens per verify forward, the share of decode time spent drafting, the
drafted token's cost relative to a verify forward as the draft-length policy measured it at the end
of each generation (median), and whether the tokens equal plain decoding's (greedy is lossless:
they must).

Other modes: ``--agreement`` (teacher-forced agreement of every early-exit depth and each M2R2
artifact with the model's argmax on held-out text) and ``--train-throughput`` (train-m2r2's step
against the model's own training step, to extrapolate training time from a measured ratio).

Methods are interleaved trial by trial (order rotating) after ``--warmup`` rounds; speeds are the
median over ``--trials``, ratios the median of the per-trial ratios. Each device runs in its own process (mlx-lm's generation stream belongs to
the default device of the process that imports it); ``--devices cpu gpu`` (default: every available
one) puts them side by side in one table. On Linux the CPU process runs with Debian's OpenBLAS
preloaded when it is installed. Run from the repository root:

    python benchmarks/speculative.py --early-exit 4 8 --m2r2 r2-rank8 --json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TASKS = ("story", "qa", "copy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: embedded)")
    p.add_argument("--random", default=None, metavar="SHAPE",
                   help="a random-weight OpenELM of this shape (270M, 450M, ...) instead of --model "
                   "(the embedded model's tokenizer for the prompts; vocabulary of the shape)")
    p.add_argument("--early-exit", type=int, nargs="*", default=None, metavar="N",
                   help="early-exit depths (default: a quarter and a half of the layers)")
    p.add_argument("--draft-model", type=Path, default=None, metavar="DIR")
    p.add_argument("--m2r2", nargs="*", default=[], metavar="NAME", help="M2R2 artifacts")
    p.add_argument("--no-lookup", action="store_true", help="leave prompt lookup out")
    p.add_argument("--no-empty", action="store_true", help="leave out the drafter that proposes "
                   "nothing (the engine's drafted loop with no drafts: its fixed cost)")
    p.add_argument("--draft", type=int, default=8, help="most tokens per draft")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--prompts", type=int, default=4, help="prompts per task")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--devices", nargs="+", default=None, choices=["cpu", "gpu"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on the CPU, float16 on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--agreement", action="store_true",
                   help="instead: teacher-forced agreement with the model's argmax of every early-exit "
                   "depth and of each --m2r2 artifact (the greedy acceptance of a one-token draft), "
                   "on --windows windows of 256 held-out tokens")
    p.add_argument("--windows", type=int, default=16, help="with --agreement")
    p.add_argument("--train-throughput", action="store_true",
                   help="instead: training tokens/s of train-m2r2's step against the model's own "
                   "training step, side by side (to extrapolate train-m2r2's GPU time)")
    p.add_argument("--rate", type=float, default=4.0, help="with --train-throughput")
    p.add_argument("--rank", type=int, default=8, help="with --train-throughput")
    p.add_argument("--batch-size", type=int, default=8, help="with --train-throughput")
    p.add_argument("--seq-len", type=int, default=128, help="with --train-throughput")
    p.add_argument("--json", action="store_true")
    p.add_argument("--on-device", default=None, help=argparse.SUPPRESS)  # child process
    return p.parse_args(argv)


# ---- prompts -------------------------------------------------------------------------------------

TASK_DATA = {"story": DATA / "gutenberg-children" / "valid.txt.gz",
             "copy": DATA / "gutenberg-children" / "valid.txt.gz",
             "qa": DATA / "eval" / "nq-open-oracle.jsonl.gz"}


def check_task_data(tasks) -> None:
    """One line and exit 1 when a task's prompt source is missing (before any model loads)."""
    for task in tasks:
        if not TASK_DATA[task].is_file():
            raise SystemExit(f"error: {TASK_DATA[task]}: not found (the {task} prompts are drawn "
                             "from it; leave the task out with --tasks)")


def build_prompts(tok, tasks, count, seed, budget):
    """Token ids per task (each prompt leaves ``budget`` tokens of context for the output)."""
    import numpy as np

    from mlxeff import data

    rng = np.random.default_rng(seed)
    out = {}
    text = None
    if {"story", "copy"} & set(tasks):
        text = np.asarray(data.encode_text(tok, data.read_text(TASK_DATA["story"])[:1_000_000]))
    if "story" in tasks:
        starts = rng.integers(0, len(text) - 300, count)
        out["story"] = [text[s:s + 256].tolist() for s in starts]
    if "copy" in tasks:
        starts = rng.integers(0, len(text) - 300, count)
        newline = tok.encode("\n\n", add_special_tokens=False)
        out["copy"] = [text[s:s + 160].tolist() + newline + text[s:s + 16].tolist() for s in starts]
    if "qa" in tasks:
        with gzip.open(TASK_DATA["qa"], "rt") as f:
            items = [json.loads(line) for _, line in zip(range(400), f)]
        prompts = []
        for i in rng.permutation(len(items))[:count]:
            others = rng.choice([j for j in range(len(items)) if j != i], 2, replace=False)
            docs = [items[i]["ctxs"][0]] + [items[j]["ctxs"][0] for j in others]
            docs = [docs[j] for j in rng.permutation(3)]
            body = "".join(f"Document [{n + 1}] (Title: {d['title']}) {d['text']}\n"
                           for n, d in enumerate(docs))
            ids = tok.encode(body + f"\nQuestion: {items[i]['question']}\nAnswer:")
            prompts.append(ids[-(512 - budget):])
        out["qa"] = prompts
    return out


# ---- one device -----------------------------------------------------------------------------------

def run_device(args) -> dict:
    device = args.on_device
    import mlx.core as mx

    mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)  # before mlx-lm makes its stream
    import mlxeff
    from mlxeff.engine import DecodeStats, generate_step
    from mlxeff.io import default_model_dir
    from mlxeff.precision import apply_compute_dtype
    from mlxeff.techniques.kv_prediction import layer_pruned_model, select_layers
    from mlxeff.techniques.registry import build_hooks

    dtype = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[
        args.dtype or ("float32" if device == "cpu" else "float16")]
    tmp = tempfile.TemporaryDirectory()
    if args.random:
        from mlxeff.models import Model, openelm_config

        _, tok = mlxeff.load(default_model_dir())
        mx.random.seed(args.seed)
        model = Model(openelm_config(args.random, vocab_size=8192))
        model_dir = Path(tmp.name) / "model"
        mlxeff.save(model, None, model_dir)
    else:
        model_dir = args.model or default_model_dir()
        model, tok = mlxeff.load(model_dir)
    if dtype == mx.float32:
        apply_compute_dtype(model, "float32" if device != "cpu" else "auto")  # affine 4-bit dequantized
    else:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    n_layers = len(model.layers)

    methods = {"plain": {}}
    if not args.no_lookup:
        methods["lookup"] = {"lookup": {"draft": args.draft}}
    for n in args.early_exit if args.early_exit is not None else sorted({max(1, n_layers // 4),
                                                                         max(1, n_layers // 2)}):
        methods[f"early-exit {n}"] = {"early-exit": {"layers": n, "draft": args.draft}}
    draft_dir = args.draft_model
    label = "draft-model"
    if draft_dir is None:
        draft_dir = Path(tmp.name) / "draft"
        layers = select_layers(n_layers, 0.25)
        mlxeff.save(layer_pruned_model(model, layers), None, draft_dir)
        label = f"draft-model LP-0.25 ({len(layers)} layers, untrained)"
    methods[label] = {"draft-model": {"path": draft_dir, "draft": args.draft}}
    for name in args.m2r2:
        methods[f"m2r2 {Path(name).name}"] = {"m2r2": {"path": name, "draft": args.draft}}
    hooks = {m: build_hooks(model, spec, model_dir=model_dir) for m, spec in methods.items()}
    if not args.no_empty:
        from mlxeff.engine import Draft, Drafter

        class EmptyDrafter(Drafter):
            def propose(self, context, k):
                return Draft([])

        hooks["empty drafts"] = {"drafter": EmptyDrafter()}
        methods["empty drafts"] = {}

    prompts = build_prompts(tok, args.tasks, args.prompts, args.seed, args.max_tokens)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"[{device}] model {args.random or model_dir}: {n_layers} layers, {dtype}; methods "
        f"{', '.join(methods)}; prompts {', '.join(f'{t} {len(p)}' for t, p in prompts.items())}")

    def decode(ids, h):
        drafter = h.get("drafter")
        draft_time = 0.0
        if drafter is not None:
            if hasattr(drafter, "policy"):
                drafter.policy.reset()
            propose = drafter.propose

            def timed(context, k):
                nonlocal draft_time
                tic = time.perf_counter()
                out = propose(context, k)
                draft_time += time.perf_counter() - tic
                return out

            drafter.propose = timed
        stats = DecodeStats()
        tokens, first = [], None
        try:
            for t, _ in generate_step(mx.array(ids, dtype=mx.uint32), model,
                                      max_tokens=args.max_tokens, stats=stats, **h):
                if first is None:
                    first = time.perf_counter()
                    draft_time = 0.0
                tokens.append(t)
            end = time.perf_counter()
        finally:
            if drafter is not None:
                del drafter.propose
        cost = drafter.policy.draft_cost if hasattr(drafter, "policy") else None
        return tokens, end - first, draft_time, stats, cost

    rows = {(task, m): {"times": [], "costs": [], "draft": 0.0, "decode": 0.0, "drafted": 0, "accepted": 0,
                        "forwards": 0, "generated": 0, "identical": True}
            for task in prompts for m in methods}
    reference = {}
    names = list(methods)
    for trial in range(args.warmup + args.trials):
        order = names[trial % len(names):] + names[: trial % len(names)]
        for task, plist in prompts.items():
            for m in order:
                total_time, total_tokens = 0.0, 0
                for i, ids in enumerate(plist):
                    tokens, dt, draft_time, stats, cost = decode(ids, hooks[m])
                    total_time += dt
                    total_tokens += len(tokens) - 1
                    if m == "plain":
                        reference.setdefault((task, i), tokens)
                    elif trial >= args.warmup and (task, i) in reference:
                        rows[(task, m)]["identical"] &= tokens == reference[(task, i)]
                    if trial >= args.warmup:
                        r = rows[(task, m)]
                        r["draft"] += draft_time
                        r["decode"] += dt
                        r["drafted"] += stats.drafted
                        r["accepted"] += stats.accepted
                        r["forwards"] += stats.forwards
                        r["generated"] += stats.generated - 1  # the first token is the prefill's
                        if cost is not None:
                            r["costs"].append(cost)
                if trial >= args.warmup:
                    rows[(task, m)]["times"].append(total_tokens / total_time)
        say(f"[{device}] trial {trial + 1}/{args.warmup + args.trials}"
            + (" (warm-up)" if trial < args.warmup else ""))
    results = []
    for (task, m), r in rows.items():
        tps = statistics.median(r["times"])
        # the ratio within each trial (methods interleaved), then the median: drift in the
        # machine's load between trials cancels
        ratio = statistics.median(a / b for a, b in zip(r["times"], rows[(task, "plain")]["times"]))
        results.append({
            "device": device, "task": task, "method": m, "decode_tps": tps, "speedup": ratio,
            "trials_tps": r["times"],
            "acceptance_rate": r["accepted"] / r["drafted"] if r["drafted"] else None,
            "tokens_per_forward": r["generated"] / r["forwards"] if r["forwards"] else None,
            "draft_share": r["draft"] / r["decode"] if r["decode"] else 0.0,
            "draft_cost": statistics.median(r["costs"]) if r["costs"] else None,
            "identical_to_plain": r["identical"],
        })
    tmp.cleanup()
    return {"device": device, "dtype": str(dtype), "layers": n_layers, "results": results,
            "model": args.random or str(model_dir)}


# ---- agreement -------------------------------------------------------------------------------------

def agreement(args) -> dict:
    """Fraction of positions where a drafter's next-token argmax equals the model's (teacher-forced:
    every position drafts from the model's own context, as the first token of a draft does)."""
    import mlx.core as mx
    import numpy as np

    import mlxeff
    from mlxeff import data
    from mlxeff.io import default_model_dir
    from mlxeff.techniques.m2r2 import M2R2, resolve_dir
    from mlxeff.techniques.m2r2_train import _SharedKV, shared_mask, slow_pass

    model_dir = args.model or default_model_dir()
    model, tok = mlxeff.load(model_dir)
    model.set_dtype(mx.float32)
    text = np.asarray(data.encode_text(
        tok, data.read_text(DATA / "gutenberg-children" / "valid.txt.gz")[:2_000_000]))
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(text) - 257, args.windows)
    t = model.transformer
    counts = {}
    for s0 in starts:
        x = mx.array(text[s0:s0 + 256][None])
        states, _, logits = slow_pass(model, x, 0)
        final = mx.argmax(logits, -1)
        for n in range(1, len(model.layers) + 1):
            same = (mx.argmax(model.logits(t.norm(states[n])), -1) == final).sum().item()
            counts[f"early-exit {n}"] = counts.get(f"early-exit {n}", 0) + same
        for name in args.m2r2:
            art = M2R2.load(resolve_dir(name, model_dir), model)
            _, kv, _ = slow_pass(model, x, art.stream.config.steps)
            h = art.stream(model, states[0], [_SharedKV(k, v) for k, v in kv], mask=shared_mask(256))
            same = (mx.argmax(model.logits(t.norm(h)), -1) == final).sum().item()
            key = f"m2r2 {Path(name).name} ({art.stream.config.steps} steps)"
            counts[key] = counts.get(key, 0) + same
    total = 256 * len(starts)
    return {"model": str(model_dir), "layers": len(model.layers), "positions": total,
            "agreement": {k: v / total for k, v in counts.items()}}


# ---- training throughput -----------------------------------------------------------------------

def train_throughput(args) -> dict:
    """Tokens/s of train-m2r2's step and of the model's own training step (``mlxeff.train``'s loop,
    compiled, float32 on the CPU), alternating ``--trials`` times after ``--warmup`` steps each."""
    import math

    import mlx.core as mx

    import mlxeff
    from mlxeff.io import default_model_dir
    from mlxeff.techniques.m2r2 import FastStream, M2R2Config
    from mlxeff.techniques.m2r2_train import M2R2LossConfig, M2R2Model, make_loss_fn
    from mlxeff.train import TrainConfig, lm_loss, train_loop

    dtype = args.dtype or ("float32" if mx.default_device() == mx.cpu else "bfloat16")
    steps = 3
    pool = [mx.random.randint(3, 8192, (args.batch_size, args.seq_len + 1), key=mx.random.key(i))
            for i in range(4)]
    mx.eval(pool)

    def timed(model, loss_fn):
        cfg = TrainConfig(steps=args.warmup + steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, warmup=1, dtype=dtype,
                          log_every=math.gcd(args.warmup, args.warmup + steps))
        stamps = {}
        with tempfile.TemporaryDirectory() as tmp:
            train_loop(model, loss_fn, lambda k: pool[k % len(pool)], cfg, out_dir=Path(tmp),
                       log=lambda rec: stamps.__setitem__(rec.get("step"), time.perf_counter()))
        return steps * cfg.tokens_per_step / (stamps[args.warmup + steps] - stamps[args.warmup])

    rates = {"model": [], "m2r2": []}
    for _ in range(args.trials):
        base, _ = mlxeff.load(args.model or default_model_dir())
        rates["model"].append(timed(base, lambda m, b: lm_loss(m, b, 1e-4)))
        base, _ = mlxeff.load(args.model or default_model_dir())
        base.set_dtype(mx.float32 if dtype == "float32" else mx.bfloat16)
        mx.random.seed(args.seed)
        stream = FastStream(base.args, M2R2Config.for_model(base.args, args.rate, args.rank))
        rates["m2r2"].append(timed(M2R2Model(base, stream), make_loss_fn(M2R2LossConfig())))
    model_tps, m2r2_tps = (statistics.median(rates[k]) for k in ("model", "m2r2"))
    return {"device": str(mx.default_device()), "dtype": dtype, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "rate": args.rate, "rank": args.rank, "trials": rates,
            "model_tokens_per_s": model_tps, "m2r2_tokens_per_s": m2r2_tps,
            "m2r2_over_model": m2r2_tps / model_tps,
            "ld_preload": os.environ.get("LD_PRELOAD", "")}


# ---- the table ---------------------------------------------------------------------------------------

def table(runs) -> str:
    devices = [r["device"] for r in runs]
    head = "| task | method | " + " | ".join(
        f"{d} tok/s | {d} x plain | {d} accepted | {d} tok/fwd | {d} draft time | {d} draft cost"
        for d in devices)
    lines = [head + " | same tokens |", "|" + "---|" * (3 + 6 * len(devices))]
    keys = [(r["task"], r["method"]) for r in runs[0]["results"]]
    index = [{(r["task"], r["method"]): r for r in run["results"]} for run in runs]
    for key in keys:
        cells = []
        same = all(ix[key]["identical_to_plain"] for ix in index if key in ix)
        for ix in index:
            r = ix.get(key)
            if r is None:
                cells += ["-"] * 6
                continue
            acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
            tpf = "-" if r["tokens_per_forward"] is None else f"{r['tokens_per_forward']:.2f}"
            cost = "-" if r.get("draft_cost") is None else f"{r['draft_cost']:.2f}"
            cells += [f"{r['decode_tps']:.1f}", f"{r['speedup']:.2f}", acc, tpf,
                      f"{100 * r['draft_share']:.0f}%", cost]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.on_device:
        print(json.dumps(run_device(args)))
        return
    if args.agreement:
        print(json.dumps(agreement(args), indent=1))
        return
    if args.train_throughput:
        print(json.dumps(train_throughput(args), indent=1))
        return
    import mlx.core as mx

    check_task_data(args.tasks)
    devices = args.devices or (["cpu", "gpu"] if mx.is_available(mx.gpu) else ["cpu"])
    runs = []
    for device in devices:
        blas_env = None
        if device == "cpu":
            sys.path.insert(0, str(REPO))
            from cli.blas import child_environment

            blas_env = child_environment()
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                 "--on-device", device]
        proc = subprocess.run(child, env=blas_env or dict(os.environ), stdout=subprocess.PIPE, text=True)
        if blas_env:
            from cli.blas import discard_child_environment

            discard_child_environment(blas_env)
        if proc.returncode != 0:
            sys.exit(f"the {device} run failed (exit {proc.returncode})")
        run = json.loads(proc.stdout)
        run["ld_preload"] = (blas_env or os.environ).get("LD_PRELOAD", "")
        runs.append(run)
    summary = {"machine": platform.node(), "command": " ".join(["python"] + sys.argv),
               "tasks": args.tasks, "prompts": args.prompts, "max_tokens": args.max_tokens,
               "trials": args.trials, "runs": runs}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(table(runs))
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "speculative_bench.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
