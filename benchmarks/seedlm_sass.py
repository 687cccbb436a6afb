"""Instruction counts of the SeedLM bits matvec's main loop, from the compiled CUDA kernel.

For each launch (the same ``W:R:G:B:J[:L]`` form as ``benchmarks/seedlm_kernels.py
--bits-launches``), the kernel MLX would build for an n x n 4-bit matvec is compiled with nvcc for
sm_90 and disassembled with nvdisasm (CUDA's own tools; no GPU needed). The main loop is the
longest backward branch; the loop body is split at its barrier into the *chunk* part (the next
chunk's loads and the table build, shared by a warp's R rows) and the *row* part (a lane's R x L
blocks: stream, lookups, multiply-adds). Reported per loop iteration and per (row, block) pair of
a lane, with opcode counts, registers and shared memory, and what the counts imply for an n x n
matvec on an H100 at perfect issue (132 SMs x 4 schedulers x 1.755 GHz, one warp-instruction per
scheduler per cycle) and at one shared-memory wavefront per SM per cycle (table reads conflict-
free by layout; jump-table reads counted at the ~3.5-way conflicts of 32 random addresses).

Static counts: the chunk part also holds the path that loads a partial last chunk (taken once per
row), so it is an upper bound of what a full chunk executes.

    python benchmarks/seedlm_sass.py [--size 8192] [--launches 8:8:0:2:0,8:4:0:2:0:2] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from seedlm_kernels import BITS_SWEEP, launch_plan, parse_launches  # noqa: E402

from mlxeff.kernels import cuda_translation_unit  # noqa: E402
from mlxeff.quant import seedlm_bits_kernels as bk  # noqa: E402

H100 = dict(sms=132, schedulers=4, ghz=1.755, shared_kib=228)
JUMP_CONFLICT = 3.5  # the mean busiest-bank load of 32 random 4-byte addresses over 32 banks
INPUTS = [mx.float16, mx.uint16, mx.uint8, mx.int32, mx.uint32, mx.int32]
_INS = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def parse_sass(text: str):
    """[(address, instruction)] and {label: address} of nvdisasm's output."""
    lines = text.splitlines()
    ins, labels = [], {}
    pending = []
    for line in lines:
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            ins.append((addr, m.group(2)))
    return ins, labels


def main_loop(ins, labels):
    """The body of the longest backward branch, split at its first barrier."""
    best = None
    for addr, text in ins:
        m = re.search(r"BRA .*`\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), addr + 1) < addr:
            span = (addr - labels[m.group(1)], labels[m.group(1)], addr)
            best = max(best or span, span)
    if best is None:
        raise SystemExit("error: no loop found in the disassembly")
    _, lo, hi = best
    body = [(a, t) for a, t in ins if lo <= a <= hi]
    bar = next((a for a, t in body if "BAR.SYNC" in t), hi + 1)
    return [t for a, t in body if a < bar], [t for a, t in body if a >= bar]


def analyse(n: int, cfg: tuple, nvcc: str, nvdisasm: str, workdir: Path) -> dict:
    w, r, _, b, j, lb = cfg
    plan = launch_plan(n, cfg, backend="cuda")
    ints = dict(plan["spec"].defines)
    C, G = int(ints["SLB_C"]), int(ints["SLB_G"])
    src = workdir / "k.cu"
    src.write_text(cuda_translation_unit(plan, INPUTS))
    cubin = workdir / "k.cubin"
    log = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", str(src), "-o", str(cubin)],
                         capture_output=True, text=True)
    if log.returncode:
        raise SystemExit(f"error: nvcc failed for launch {cfg}:\n{log.stderr[-2000:]}")
    regs = int(re.search(r"Used (\d+) registers", log.stderr).group(1))
    sass = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    chunk, rows = main_loop(*parse_sass(sass))
    per = r * lb  # (row, block) pairs a lane covers per iteration
    ops = collections.Counter(opcode(t) for t in chunk + rows)
    shared = b * bk.buffer_bytes(C, G, lb) + (32 if j else 1) * bk.JUMP_BYTES
    groups = plan["grid"][0] // plan["threadgroup"][0]
    # threadgroups an SM can hold: shared memory, registers (64 K a SM), 64 warps, 32 groups
    per_sm = max(1, min(H100["shared_kib"] * 1024 // shared, 65536 // (regs * 32 * w), 64 // w, 32))
    warps_per_sm = w * min(per_sm, groups / H100["sms"])
    nb = plan["dims"][1]
    iterations = (n // r) * -(-nb // (32 * lb))  # warp-iterations over the whole matvec
    issue_us = iterations * (len(chunk) + len(rows)) / (H100["sms"] * H100["schedulers"] * H100["ghz"] * 1e3)
    lds_rows = sum(1 for t in rows if opcode(t) == "LDS")
    jump_reads = 2 * per  # two jump-table reads a block (SLB_STREAM, 32 bits each, 48 stream bits)
    wavefronts = (lds_rows - jump_reads) + jump_reads * (1 if j else JUMP_CONFLICT) + ops["STS"]
    shared_us = iterations * wavefronts / (H100["sms"] * H100["ghz"] * 1e3)
    return {"launch": "W{}xR{} G{} B{} J{} L{}".format(w, r, G, b, int(j), lb),
            "registers": regs, "shared_bytes": shared, "threadgroups": groups,
            "threadgroups_per_sm_limit": per_sm,
            "warps_per_sm": warps_per_sm, "loop_chunk": len(chunk), "loop_rows": len(rows),
            "per_block": (len(chunk) + len(rows)) / per, "per_block_chunk": len(chunk) / per,
            "per_block_rows": len(rows) / per, "lds_per_block": lds_rows / per, "sts_per_iteration": ops["STS"],
            "ffma_per_block": ops["FFMA"] / per, "opcodes": dict(ops.most_common(12)),
            "h100_issue_bound_us": issue_us, "h100_shared_bound_us": shared_us}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="n of the n x n matvec")
    ap.add_argument("--launches", type=parse_launches, default=None,
                    help="W:R:G:B:J[:L], comma-separated (default: the launch sweep's list)")
    ap.add_argument("--nvcc", default=shutil.which("nvcc"))
    ap.add_argument("--nvdisasm", default=shutil.which("nvdisasm"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.size < 8:
        raise SystemExit(f"error: --size must be at least 8, got {args.size}")
    if not args.nvcc or not args.nvdisasm:
        raise SystemExit("error: needs nvcc and nvdisasm (CUDA toolkit) on PATH or through --nvcc/--nvdisasm")
    bk.cuda_shared_memory_limit = lambda: 227 * 1024  # an H100's opt-in limit; no GPU needed here
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in args.launches or BITS_SWEEP:
            print(f"compiling launch {cfg}", file=sys.stderr, flush=True)
            out.append(analyse(args.size, cfg, args.nvcc, args.nvdisasm, Path(tmp)))
    if args.json:
        print(json.dumps({"size": args.size, "launches": out}, indent=1))
        return
    print(f"{args.size}x{args.size} 4-bit bits matvec, sm_90 SASS of the main loop:")
    print("launch                 regs  shared  TGs  TG/SM  warps/SM  chunk  rows  per block (chunk+rows)  LDS/blk  "
          "issue-bound  shared-bound")
    for r in out:
        print(f"{r['launch']:22s} {r['registers']:4d} {r['shared_bytes'] // 1024:5d}K {r['threadgroups']:4d} "
              f"{r['threadgroups_per_sm_limit']:6d} {r['warps_per_sm']:8.1f} {r['loop_chunk']:6d} {r['loop_rows']:5d}  "
              f"{r['per_block']:6.1f} ({r['per_block_chunk']:.1f}+{r['per_block_rows']:.1f})        "
              f"{r['lds_per_block']:5.1f}  {r['h100_issue_bound_us']:8.1f} us  {r['h100_shared_bound_us']:8.1f} us")


if __name__ == "__main__":
    main()
