"""Training throughput (tokens/s) of a model shape on the current device, through ``train_loop``.

Random token batches (no data needed), ``--warmup`` untimed steps (compilation, allocation), then
``--steps`` timed optimizer steps; the clock starts after the warm-up's last loss is on the host
and stops when the last timed step's loss is. The defaults are the default model's recipe
(benchmarks/default_model.sh) on the GPU; on the CPU use ``--dtype float32`` and a smaller batch.

    python benchmarks/train_throughput.py --batch-size 256 --dtype bfloat16 --json      # H100
    python benchmarks/train_throughput.py --batch-size 8 --dtype float32 --steps 5      # CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxeff.train import TrainConfig, build_args, init_model, lm_loss, train_loop  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--layers", type=int, default=17)
    p.add_argument("--model-dim", type=int, default=192)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--qkv-mult", type=float, nargs=2, default=(0.5, 1.0))
    p.add_argument("--ffn-mult", type=float, nargs=2, default=(0.5, 4.0))
    p.add_argument("--gqa-groups", type=int, default=2)
    p.add_argument("--ffn-divisor", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--warmup", type=int, default=5, help="untimed steps")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the loop logs, and so waits for the "
                   "device, every gcd(warmup, warmup + steps) steps)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    shape = dict(config=None, layers=a.layers, model_dim=a.model_dim, head_dim=a.head_dim,
                 qkv_mult=a.qkv_mult, ffn_mult=a.ffn_mult, gqa_groups=a.gqa_groups,
                 ffn_divisor=a.ffn_divisor)
    args = build_args(shape, a.vocab_size, a.seq_len)
    model = init_model(args, seed=0)
    total = a.warmup + a.steps
    cfg = TrainConfig(steps=total, batch_size=a.batch_size, seq_len=a.seq_len, accum=a.accum,
                      warmup=1, dtype=a.dtype, log_every=math.gcd(a.warmup, total), compile=not a.no_compile)
    # A pool of distinct random batches, made before the clock starts.
    pool = [mx.random.randint(3, a.vocab_size, (a.batch_size, a.seq_len + 1), key=mx.random.key(i))
            for i in range(min(total * a.accum, 8))]
    mx.eval(pool)
    stamps = {}

    def log(rec):
        if "step" in rec and "loss" in rec:
            stamps[rec["step"]] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        train_loop(model, lambda m, b: lm_loss(m, b, 1e-4), lambda k: pool[k % len(pool)], cfg,
                   out_dir=Path(tmp), log=log)
    elapsed = stamps[total] - stamps[a.warmup]
    tokens = a.steps * cfg.tokens_per_step
    result = {
        "device": str(mx.default_device()),
        "backend": "cuda" if mx.cuda.is_available() else ("metal" if mx.metal.is_available() else "cpu"),
        "openblas_preloaded": "openblas" in os.environ.get("LD_PRELOAD", ""),
        "parameters": args.num_parameters(),
        "layers": a.layers, "model_dim": a.model_dim, "vocab_size": a.vocab_size,
        "seq_len": a.seq_len, "batch_size": a.batch_size, "accum": a.accum, "dtype": a.dtype,
        "compiled": not a.no_compile, "warmup_steps": a.warmup, "timed_steps": a.steps,
        "tokens_per_step": cfg.tokens_per_step, "seconds": elapsed,
        "ms_per_step": 1000 * elapsed / a.steps, "tokens_per_s": tokens / elapsed,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['backend']} {a.dtype}: {result['parameters']:,} parameters, "
              f"{cfg.tokens_per_step:,} tokens/step, {result['ms_per_step']:.1f} ms/step, "
              f"{result['tokens_per_s']:,.0f} tokens/s over {a.steps} steps "
              f"(peak {result['peak_memory_gb']:.2f} GB)")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        name = f"train_throughput-{result['backend']}-{a.dtype}-b{a.batch_size}.json"
        (Path(out) / name).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
