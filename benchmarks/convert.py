"""Time and peak memory of converting an OpenELM-shaped CoreNet checkpoint.

Writes a CoreNet checkpoint with random weights in the official architecture (default
OpenELM-1.1B: 28 layers, model_dim 2048, the 32128-row padded vocabulary) in the ``torch.save``
zip format (no torch needed), then runs ``mlxeff convert`` on it in a child process and reports the
child's wall time and peak resident memory (``ru_maxrss`` from ``wait4``) against the checkpoint's
size. A second child that only imports the converter measures the fixed cost of the interpreter,
MLX and transformers, so the data-dependent part is visible too.

    python benchmarks/convert.py                      # OpenELM-1.1B, bf16 storage -> float16
    python benchmarks/convert.py --size 270M --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlxeff.convert import torch_save as ts
from mlxeff.convert.corenet import source_name
from mlxeff.models import Model, openelm_config

CORENET_ROWS = 32128


def checkpoint_tensors(size: str, storage: str, seed: int = 0):
    """CoreNet name -> lazy torch_save tensor with random weights of the official shapes."""
    from mlx.utils import tree_flatten

    args = openelm_config(size)
    model = Model(args)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    shapes["transformer.token_embeddings.weight"] = (CORENET_ROWS, args.model_dim)
    tensors = {}
    for i, (name, shape) in enumerate(shapes.items()):
        def make(shape=shape, i=i):
            rng = np.random.default_rng(seed + i)
            if len(shape) == 1:
                a = np.ones(shape, np.float32) + 0.01 * rng.standard_normal(shape, dtype=np.float32)
            else:
                a = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)
            return ts.bf16_bits(a) if storage == "bfloat16" else a.astype(np.float16)

        tensors[source_name(name)] = ts.lazy_tensor(shape, storage, make)
    return args, tensors


# Linux carries a parent's peak RSS into a child's ru_maxrss across fork/exec, so the child is
# started by a bare interpreter (a few MB) rather than by this process (which holds MLX and the
# checkpoint writer's buffers); the launcher reports the child's wait4 usage.
LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0,
                  "peak_rss_bytes": usage.ru_maxrss * 1024}), file=sys.stderr)
"""


def run_child(cmd, env) -> dict:
    """Run ``cmd``; return exit code, wall seconds, peak RSS (bytes) of that child, and output."""
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True, env=env)
    *child_err, stats = proc.stderr.rstrip("\n").split("\n")
    result = json.loads(stats)
    result.update(stdout=proc.stdout, stderr="\n".join(child_err))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1_1B", choices=["270M", "450M", "1_1B", "3B"])
    ap.add_argument("--storage", default="bfloat16", choices=["bfloat16", "float16"],
                    help="dtype of the checkpoint's tensors (CoreNet trains in bf16 mixed precision)")
    ap.add_argument("--dtype", default="float16", help="output dtype of the conversion")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()

    work = Path(opts.workdir or tempfile.mkdtemp(prefix="mlxeff-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, out = work / "checkpoint_ema_best.pt", work / "converted"
    try:
        t0 = time.perf_counter()
        args, tensors = checkpoint_tensors(opts.size, opts.storage)
        ts.save(tensors, ckpt)
        write_s = time.perf_counter() - t0
        ckpt_bytes = ckpt.stat().st_size

        env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
        baseline = run_child([sys.executable, "-c", "import mlxeff.cli.main, mlxeff.convert, mlxeff.io, transformers"], env)
        conv = run_child([sys.executable, "-m", "mlxeff.cli.main", "convert", str(ckpt), "-o", str(out),
                          "--config", f"openelm-{opts.size}", "--no-tokenizer", "--dtype", opts.dtype,
                          "--json"], env)
        if conv["returncode"] != 0:
            sys.exit(f"conversion failed: {conv['stderr'].strip()}")
        summary = json.loads(conv["stdout"])
        expected = openelm_config(opts.size).num_parameters()
        if summary["parameters"] != expected:
            sys.exit(f"converted parameter count {summary['parameters']} != {expected}")
        result = {
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "backend": "CPU",
            "size": f"OpenELM-{opts.size}",
            "checkpoint_dtype": opts.storage,
            "output_dtype": opts.dtype,
            "checkpoint_bytes": ckpt_bytes,
            "output_bytes": summary["size_on_disk_bytes"],
            "parameters": summary["parameters"],
            "write_checkpoint_s": write_s,
            "convert_wall_s": conv["seconds"],
            "convert_peak_rss_bytes": conv["peak_rss_bytes"],
            "import_only_peak_rss_bytes": baseline["peak_rss_bytes"],
            "peak_rss_over_checkpoint": conv["peak_rss_bytes"] / ckpt_bytes,
            "under_2x": conv["peak_rss_bytes"] < 2 * ckpt_bytes,
        }
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    if opts.json:
        print(json.dumps(result, indent=2))
        return
    gb = 1e9
    print(f"{result['size']} CoreNet checkpoint ({opts.storage}, {CORENET_ROWS} vocabulary rows): "
          f"{ckpt_bytes / gb:.3f} GB, written in {write_s:.1f} s")
    print(f"convert -> {opts.dtype}: {result['convert_wall_s']:.1f} s wall, output {result['output_bytes'] / gb:.3f} GB")
    print(f"peak RSS of the converting process: {result['convert_peak_rss_bytes'] / gb:.3f} GB "
          f"= {result['peak_rss_over_checkpoint']:.2f}x the checkpoint "
          f"(importing the converter alone: {result['import_only_peak_rss_bytes'] / gb:.3f} GB)")
    print("under 2x the checkpoint size:", "yes" if result["under_2x"] else "NO")


if __name__ == "__main__":
    main()
