"""The Python steps of ``benchmarks/default_model_v2.sh`` (see its header for the recipe).

    python benchmarks/default_model_v2.py prepare --data DATA --dest DEST --tokens N --seq-len L
    python benchmarks/default_model_v2.py plan --dest DEST --budget SECONDS --tokens-per-step N N
    python benchmarks/default_model_v2.py status --dest DEST
    python benchmarks/default_model_v2.py finish --data DATA --dest DEST [--out DIR]

- ``prepare``: the task mixture from the training books (``mlxeff.tasks.mixture``) into
  DEST/tasks/tasks.txt.gz, then the token streams both training runs read (mixture first, then the
  books; and the validation file) into the shared cache DEST/cache, so the two parallel runs do not
  tokenize the corpus twice.
- ``plan``: reads the probe runs' logs (tokens/s of the last logged window, both models training
  side by side as they will), and writes DEST/plan.json: steps per model so both fill ``budget``
  seconds, checkpoint intervals of about 45 s.
- ``status``: the newest checkpoint step of each run and whether its model is saved.
- ``finish``: the candidates (small float16; large affine 4-bit g32 with 8-bit vocabulary, SeedLM
  4-bit, float16), their sizes, perplexity on the held-out books and the three tasks on held-out
  items, greedy continuations. Each measurement is cached in DEST/evals/, and none starts after
  ``--seconds``: call it again to go on. Writes DEST/summary-v2.json and, with ``--out``, that
  summary (partial until "done"), the shippable candidates as tars (when complete) and the logs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlxeff.errors import MlxeffError  # noqa: E402

LIMIT_BYTES = 16_000_000  # the shipped directory, tokenizer included
MODELS = ("small", "large")  # the shapes the recipe knows; --models picks those trained
PROMPTS = ("Once upon a time", "The little girl looked at the", "\"Where are you going?\" asked the")


def _tokenizer(path):
    from mlxeff.data import load_tokenizer

    return load_tokenizer(path)


def prepare(args) -> None:
    from mlxeff import data
    from mlxeff.tasks import mixture

    dest = Path(args.dest)
    mix = dest / "tasks" / "tasks.txt.gz"
    tok = _tokenizer(args.tokenizer)
    settings = {"tokens": args.tokens, "seq_len": args.seq_len, "seed": args.seed}
    summary = mix.with_name("tasks.json")
    old = json.loads(summary.read_text()) if summary.is_file() else {}
    if mix.is_file() and old.get("seq_len") == args.seq_len and old.get("seed") == args.seed \
            and old.get("tokens", 0) >= args.tokens:
        print(f"== mixture {mix} exists", file=sys.stderr)
    else:
        tic = time.perf_counter()
        stats = mixture.build(args.data, tok, mix, tokens=args.tokens, seq_len=args.seq_len,
                              seed=args.seed, progress=False, workers=args.workers)
        stats.pop("places")
        print(f"== mixture: {stats['tokens']:,} tokens ({time.perf_counter() - tic:.0f} s): "
              f"{json.dumps({k: stats[k] for k in ('items', 'item_tokens', 'filler_tokens')})}",
              file=sys.stderr)
    # The same file lists, in the same order, as the training command's --train/--valid.
    train = data.expand_files([str(mix), str(Path(args.data) / "train-*.txt.gz")], "training")
    tic = time.perf_counter()
    stream = data.tokenize_files(train, tok, dest / "cache")
    valid = data.tokenize_files([Path(args.data) / "valid.txt.gz"], tok, dest / "cache")
    task_tokens = json.loads(summary.read_text())
    books = int(stream.size) - task_tokens["tokens"] - 1  # the mixture's EOS
    share = sum(task_tokens["item_tokens"].values()) / stream.size
    info = {**settings, "stream_tokens": int(stream.size), "book_tokens": books,
            "mixture_tokens": task_tokens["tokens"], "item_tokens": task_tokens["item_tokens"],
            "filler_tokens": task_tokens["filler_tokens"], "items": task_tokens["items"],
            "item_share_of_stream": share, "valid_tokens": int(valid.size)}
    (dest / "mixture.json").write_text(json.dumps(info, indent=1))
    print(f"== tokens: {stream.size:,} in the training stream (books {books:,}, task file "
          f"{task_tokens['tokens']:,}; task items {100 * share:.1f}% of the stream), valid "
          f"{valid.size:,} ({time.perf_counter() - tic:.0f} s)", file=sys.stderr)


def _log_tps(log: Path) -> float:
    found = re.findall(r"([\d,]+) tok/s", log.read_text()) if log.is_file() else []
    if not found:
        raise MlxeffError("no tokens/s in the probe's log", log)
    return float(found[-1].replace(",", ""))


def plan(args) -> None:
    dest = Path(args.dest)
    out = {"budget_s": args.budget}
    tps_step = args.tokens_per_step
    for name in args.models:
        tps = _log_tps(dest / f"probe-{name}" / "train.log")
        steps = max(1, int(args.budget * tps / tps_step))
        out[name] = {"probe_tokens_per_s": tps, "tokens_per_step": tps_step, "steps": steps,
                     "save_every": max(1, int(45 * tps / tps_step)),
                     "tokens": steps * tps_step}
        print(f"== {name}: {tps:,.0f} tokens/s side by side -> {steps} steps "
              f"({steps * tps_step / 1e6:.0f} M tokens) in {args.budget} s", file=sys.stderr)
    (dest / "plan.json").write_text(json.dumps(out, indent=1))
    print(" ".join(f"{n.upper()}_STEPS={out[n]['steps']} {n.upper()}_SAVE={out[n]['save_every']}"
                   for n in args.models))


def _newest_step(run: Path) -> int:
    steps = [int(p.name[5:]) for p in (run / "checkpoints").glob("step-*")
             if (p / "state.json").is_file()] if (run / "checkpoints").is_dir() else []
    return max(steps, default=0)


def status(args) -> None:
    dest = Path(args.dest)
    done = True
    for name in args.models:
        run = dest / name
        saved = (run / "model" / "config.json").is_file() and (run / "summary.json").is_file()
        step = _newest_step(run)
        total = json.loads((dest / "plan.json").read_text())[name]["steps"] \
            if (dest / "plan.json").is_file() else "?"
        print(f"== {name}: {'done' if saved else 'not done'}, newest checkpoint step {step} of {total}",
              file=sys.stderr)
        done &= saved
    print("done" if done else "incomplete")


# ---------------------------------------------------------------------------------------------
# finish


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def _convert(cli, src: Path, out: Path, *extra) -> None:
    if (out / "config.json").is_file():
        return
    cmd = cli + ["convert", str(src), "-o", str(out), *extra, "--json"]
    print("== " + " ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode:
        raise MlxeffError(f"convert failed (exit {r.returncode})", out)
    (out.parent / f"{out.name}.convert.json").write_text(r.stdout)


UNITS = ("perplexity", "multidoc-qa", "kv-retrieval", "copy", "continuations")
CANDIDATES = ("small-fp16", "large-affine4", "large-seedlm4", "large-fp16")  # in evaluation order


def measure(unit: str, path: Path, model, tok, data: Path, split, args) -> dict:
    """One measurement of one candidate (a unit of ``finish``'s resumable work)."""
    from mlxeff import data as mdata
    from mlxeff.eval import perplexity
    from mlxeff.generate import generate
    from mlxeff.tasks.runner import evaluate_task

    tic = time.perf_counter()
    if unit == "perplexity":
        valid = Path(data) / "valid.txt.gz"
        tokens = mdata.tokenize_files([valid], tok, Path(args.dest) / "cache")[:args.ppl_tokens]
        r = perplexity(model, tokens, window=512, stride=256, batch_size=64, progress=False)
        r.update(max_tokens=args.ppl_tokens, command=f"mlxeff eval {path} --perplexity {valid} "
                 f"--window 512 --stride 256 --max-tokens {args.ppl_tokens}")
    elif unit == "continuations":
        r = {"texts": [{"prompt": p, "text": generate(model, tok, p, max_tokens=60)} for p in PROMPTS]}
    else:
        kw = {"multidoc-qa": dict(docs=args.docs, context_tokens=args.context_tokens),
              "kv-retrieval": dict(docs=args.pairs), "copy": dict(context_tokens=args.copy_tokens)}[unit]
        r = evaluate_task(model, tok, unit, data=data, limit=args.items, split=split, progress=False, **kw)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in kw.items())
        r["command"] = f"mlxeff eval {path} --task {unit} --data {data} {flags} --limit {args.items}"
    r["seconds"] = time.perf_counter() - tic
    return r


def evaluate_candidates(candidates: dict, args, deadline: float) -> dict:
    """Every unit of every candidate, each cached in DEST/evals/; a unit starts only before
    ``deadline`` (time.monotonic()), so a call stays within its limit and the next one goes on."""
    import mlx.core as mx

    import mlxeff
    from mlxeff.summary import model_summary
    from mlxeff.tasks.corpus import load_split

    evals = Path(args.dest) / "evals"
    evals.mkdir(exist_ok=True)
    split, out = None, {}
    for name, path in candidates.items():
        size = _size(path)
        info = model_summary(path)
        res = {"path": str(path), "bytes": size, "fits": size <= LIMIT_BYTES,
               "parameters": info["parameters"], "bits_per_weight": info["bits_per_weight"]}
        model = tok = None
        for unit in UNITS:
            cached = evals / f"{name}.{unit}.json"
            if not cached.is_file():
                if time.monotonic() > deadline:
                    continue
                if model is None:
                    model, tok = mlxeff.load(path)
                    if mx.default_device() == mx.cpu:
                        model.set_dtype(mx.float32)  # as `mlxeff eval --dtype auto` on the CPU
                if split is None and unit in ("multidoc-qa", "copy"):
                    split = load_split(args.data, "heldout", Path(args.dest) / "cache")
                r = measure(unit, path, model, tok, Path(args.data), split, args)
                cached.write_text(json.dumps(r, indent=1))
                key = r.get("accuracy", r.get("ppl"))
                print(f"== {name} {unit}: {key if key is None else round(key, 4)} ({r['seconds']:.0f} s)",
                      file=sys.stderr)
            res[unit] = json.loads(cached.read_text())
        out[name] = res
    return out


def finish(args) -> None:
    dest = Path(args.dest)
    deadline = time.monotonic() + args.seconds
    cli = args.cli.split()
    for name in args.models:
        if not (dest / name / "model" / "config.json").is_file():
            raise MlxeffError(f"the {name} model is not trained yet (run PHASE=train)", dest / name)
    cand = dest / "candidates"
    cand.mkdir(exist_ok=True)
    if "large" in args.models:
        _convert(cli, dest / "large" / "model", cand / "large-affine4", "--quantize", "affine",
                 "--bits", "4", "--group-size", "32")
        _convert(cli, dest / "large" / "model", cand / "large-seedlm4", "--quantize", "seedlm",
                 "--bits", "4")
    paths = {"small-fp16": dest / "small" / "model", "large-fp16": dest / "large" / "model",
             "large-affine4": cand / "large-affine4", "large-seedlm4": cand / "large-seedlm4"}
    candidates = {n: paths[n] for n in CANDIDATES if n.split("-")[0] in args.models}
    summary = {"data": str(args.data), "settings": {k: getattr(args, k) for k in (
        "items", "docs", "context_tokens", "pairs", "copy_tokens", "ppl_tokens")},
        "limit_bytes": LIMIT_BYTES}
    for f in ("plan.json", "mixture.json"):
        if (dest / f).is_file():
            summary[f[:-5]] = json.loads((dest / f).read_text())
    for name in args.models:
        s = json.loads((dest / name / "summary.json").read_text())
        s.pop("history", None)
        summary[f"train_{name}"] = s
    summary["candidates"] = evaluate_candidates(candidates, args, deadline)
    missing = [f"{n}.{u}" for n, c in summary["candidates"].items() for u in UNITS if u not in c]
    summary["complete"] = not missing
    (dest / "summary-v2.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({n: {"bytes": c["bytes"], **{u: round(c[u].get("accuracy", c[u].get("ppl", 0)), 4)
                                                  for u in UNITS[:4] if u in c}}
                      for n, c in summary["candidates"].items()}, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(dest / "summary-v2.json", out / "summary-v2.json")
        if not missing:
            for name, path in candidates.items():
                if summary["candidates"][name]["fits"]:
                    with tarfile.open(out / f"{name}.tar", "w") as tar:
                        tar.add(path, arcname=name)
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for name in args.models:
                for f in ("train.log", "summary.json"):
                    if (dest / name / f).is_file():
                        tar.add(dest / name / f, arcname=f"{name}/{f}")
            for f in ("plan.json", "mixture.json", "tasks/tasks.json"):
                if (dest / f).is_file():
                    tar.add(dest / f, arcname=f)
        print(f"== copied to {out}: {sorted(p.name for p in out.iterdir())}", file=sys.stderr)
    if missing:
        print(f"== incomplete ({len(missing)} measurements left, e.g. {missing[0]}): run PHASE=finish "
              "again", file=sys.stderr)
    print("done" if not missing else "incomplete")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--tokenizer", default=str(REPO / "mlxeff" / "assets" / "default"))
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes drawing the mixture's items (default: every core)")
    p = sub.add_parser("plan")
    p.add_argument("--dest", required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--tokens-per-step", type=int, required=True)
    p = sub.add_parser("status")
    p.add_argument("--dest", required=True)
    p = sub.add_parser("finish")
    p.add_argument("--data", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--cli", default=f"{sys.executable} -m mlxeff.cli.main")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--docs", type=int, default=10)
    p.add_argument("--context-tokens", type=int, default=2000)
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--copy-tokens", type=int, default=200)
    p.add_argument("--ppl-tokens", type=int, default=262144)
    p.add_argument("--seconds", type=float, default=1e9, help="start no measurement after this many "
                   "seconds (the next call goes on)")
    for name in ("plan", "status", "finish"):
        sub.choices[name].add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                                       help="the models this run trains")
    args = ap.parse_args(argv)
    try:
        {"prepare": prepare, "plan": plan, "status": status, "finish": finish}[args.command](args)
    except MlxeffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
