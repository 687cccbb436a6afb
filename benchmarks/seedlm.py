"""SeedLM benchmarks: (a) quality, (b) encoding speed. (Kernel timing: benchmarks/seedlm_kernels.py.)

(a) quality
    python benchmarks/seedlm.py quality [--blocks 16384] [--model DIR --valid FILE] [--json]
  Relative Frobenius error ||W - W_hat|| / ||W|| on iid N(0, 1) weights for SeedLM 4-bit (C=8, P=3)
  and 3-bit (C=12, P=4) at several candidate counts, beside MLX affine quantization (group 64 and
  128) of the same matrix. With ``--model`` and ``--valid``: the model's validation perplexity in
  float (as loaded, computed in float32 on the CPU), SeedLM 4- and 3-bit, and MLX affine 4- and 3-bit
  at group size 64, each with the bits per weight stored for the quantized layers (the Linear
  layers of the transformer blocks; embeddings/output head are left in float for every method).
  MLX's affine quantization skips a Linear whose input width the group size does not divide; the
  rows "g64 (g32 where 64 does not divide)" quantize every block Linear, as SeedLM does, and are
  the like-for-like comparison. ``--seedlm-configs`` with no value skips SeedLM.
  ``--seedlm-configs`` adds other CxP configurations (e.g. 12x7 at 4.0 bpw, 8x4 at 4.5 bpw);
  ``--noise-draws N`` adds a control: Gaussian noise with each method's relative error in every
  8-weight block of every block Linear, N draws per level (how much a perplexity change varies
  between error patterns of one size).
  ``--cache DIR`` keeps the SeedLM-encoded models there and reuses them on the next run;
  ``--llama2c-vocab FILE`` tokenizes with a llama2.c vocabulary (for stories260K, which ships no
  Hugging Face tokenizer).

(b) encoding speed
    python benchmarks/seedlm.py speed [--blocks 8192] [--ranks 1 2] [--trials 3] [--backend ring|nccl] [--json]
  Encodes the same random matrix with 1 rank (plain process) and n ranks of the ring backend
  (started by ``mlx.launch -n N --backend ring`` and directly with the environment it sets up,
  MLX_RANK and MLX_HOSTFILE, without its I/O relay), alternating trials, each worker timing one warm encode after a warm-up; each
  rank gets cpu_count / n BLAS threads. ``--backend nccl`` starts the ranks with
  ``mlx.launch --backend nccl`` instead (one CUDA GPU per rank; not yet run on a multi-GPU machine).
    python benchmarks/seedlm.py model [--size 270M] [--bits 4] [--layers N] [--json]
  Encodes every Linear of the transformer blocks of an OpenELM-shaped model with random weights
  (``quantize_model``), reporting wall time, blocks/s and the projected time for OpenELM-3B at the
  same blocks/s. On the GPU machine this runs on the GPU (MLX CUDA); ``--layers`` limits the number
  of blocks encoded (a projection from a prefix of the model) for the CPU.

Results are printed; with ``--json`` as JSON; if ``$OUT`` is set they are also written there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten


def emit(name: str, result: dict, as_json: bool) -> None:
    text = json.dumps(result, indent=2)
    if as_json:
        print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(text + "\n")


def device_name() -> str:
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


# ------------------------------------------------------------------------------------------------
# (a) quality


def affine_rel_error(W: np.ndarray, bits: int, group_size: int) -> float:
    w = mx.array(W)
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    r = mx.dequantize(q, s, b, group_size=group_size, bits=bits)
    return float(mx.sqrt(mx.square(r - w).sum() / mx.square(w).sum()).item())


def parse_config(text: str):
    C, P = (int(v) for v in text.lower().split("x"))
    return C, P


def gaussian_quality(blocks: int, candidates, extra_configs, seed: int = 0, bases=("bits", "states")) -> list:
    from mlxeff.quant.seedlm_encoder import EncoderConfig, encode_matrix
    from mlxeff.quant.seedlm_format import CONFIGS

    # rows of 5760 weights: a multiple of every C up to 16 used here and of 64/128 (no padding)
    width = 5760
    rows = []
    runs = [(C, P, k) for _, (C, P) in sorted(CONFIGS.items(), reverse=True) for k in candidates]
    runs += [(C, P, 16) for C, P in extra_configs if (C, P, 16) not in runs]
    for (C, P, k), basis in ((r, b) for r in runs for b in bases):
        W = np.random.default_rng(seed).standard_normal((max(1, blocks * C // width), width)).astype(np.float32)
        t0 = time.perf_counter()
        enc = encode_matrix(W, C, P, config=EncoderConfig(candidates=k), basis=basis)
        rows.append({"method": "seedlm", "basis": basis, "C": C, "P": P, "candidates": k,
                     "bits_per_weight": (16 + 4 + 4 * P) / C, "blocks": W.size // C,
                     "rel_error": float(np.sqrt(enc.sq_error / enc.sq_norm)),
                     "seconds": time.perf_counter() - t0})
    W = np.random.default_rng(seed).standard_normal((max(1, blocks * 8 // width), width)).astype(np.float32)
    for bits in (4, 3):
        for g in (64, 128):
            rows.append({"method": "affine", "bits": bits, "group_size": g,
                         "bits_per_weight": bits + 32 / g, "weights": W.size,
                         "rel_error": affine_rel_error(W, bits, g)})
    return rows


def quantized_bits(model: nn.Module) -> dict:
    """Stored bits per weight over the quantized layers, from the arrays themselves."""
    from mlxeff.quant.seedlm import _SeedLMBase

    stored = weights = 0
    for _, m in model.named_modules():
        if isinstance(m, _SeedLMBase):
            rows, cols = m._packed_rows_cols()
            stored += 8 * (m.seeds.nbytes + m.codes.nbytes + m.exp_base.nbytes)
            weights += rows * cols
        elif isinstance(m, nn.QuantizedLinear):
            stored += 8 * (m.weight.nbytes + m.scales.nbytes + (m.biases.nbytes if m.biases is not None else 0))
            weights += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
    return {"bits_per_weight": stored / weights if weights else None, "quantized_weights": weights}


def float_linear_bits(model: nn.Module) -> dict:
    from mlxeff.quant.seedlm import quantizable_modules

    mods = quantizable_modules(model)
    n = sum(m.weight.size for _, m in mods)
    return {"bits_per_weight": 8 * sum(m.weight.nbytes for _, m in mods) / n if n else None,
            "quantized_weights": n}


def llama2c_encode(vocab_file: Path, text: str) -> np.ndarray:
    """Token ids of ``text`` under a llama2.c ``tokenizer.bin`` vocabulary (for models that ship no
    Hugging Face tokenizer, e.g. shared/data/models/stories260K): each line is encoded on its own
    the way llama2.c's ``encode`` does it (a dummy-prefix space, one piece per UTF-8 character or
    byte fallback <0xNN> = id byte + 3, then greedy merges of the adjacent pair with the highest
    score), lines joined with the newline piece."""
    import struct

    data = Path(vocab_file).read_bytes()
    pos, pieces, scores = 4, [], []
    while pos < len(data):
        score, n = struct.unpack_from("<fi", data, pos)
        pieces.append(data[pos + 8:pos + 8 + n].decode("utf-8", "replace"))
        scores.append(score)
        pos += 8 + n
    index = {p: i for i, p in enumerate(pieces)}

    def encode_line(line: str):
        ids = []
        for ch in " " + line:
            if ch in index:
                ids.append(index[ch])
            else:
                ids.extend(b + 3 for b in ch.encode("utf-8"))
        while True:
            best, at = -1e30, -1
            for i in range(len(ids) - 1):
                j = index.get(pieces[ids[i]] + pieces[ids[i + 1]])
                if j is not None and scores[j] > best:
                    best, at, merged = scores[j], i, j
            if at < 0:
                return ids
            ids[at:at + 2] = [merged]

    newline = index.get("\n", ord("\n") + 3)
    out = []
    for line in text.split("\n"):
        if line.strip():
            out.extend(encode_line(line))
            out.append(newline)
    return np.asarray(out, dtype=np.int64)


def block_linear_error(model: nn.Module, reference: dict) -> float:
    """Relative Frobenius error, over all Linear layers of the transformer blocks, of the model's
    (possibly quantized) weights against ``reference`` (path -> original float32 weight)."""
    from mlxeff.quant.seedlm import _SeedLMBase

    err = ref = 0.0
    mods = dict(model.named_modules())
    for path, W in reference.items():
        m = mods[path]
        if isinstance(m, _SeedLMBase):
            R = m.dense_weight()
        elif isinstance(m, nn.QuantizedLinear):
            R = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
        else:
            R = m.weight
        err += float(mx.square(R.astype(mx.float32) - W).sum().item())
        ref += float(mx.square(W).sum().item())
    return float(np.sqrt(err / ref))


def blockwise_noise(W: mx.array, r: float, block: int = 8) -> mx.array:
    """W plus iid Gaussian noise scaled so that every block of ``block`` consecutive weights of a
    row has relative error exactly r (as a block quantizer's error follows the block's size)."""
    out, inp = W.shape
    pad = -inp % block
    Wp = mx.pad(W, [(0, 0), (0, pad)]).reshape(out, -1, block)
    valid = (mx.arange(inp + pad) < inp).reshape(1, -1, block)
    n = mx.random.normal(Wp.shape) * valid
    wn = mx.sqrt(mx.square(Wp).sum(-1, keepdims=True))
    nn_ = mx.sqrt(mx.square(n).sum(-1, keepdims=True))
    return (Wp + n * (r * wn / mx.maximum(nn_, 1e-30))).reshape(out, -1)[:, :inp]


def model_quality(args) -> list:
    import mlxeff
    from mlxeff.data import encode_text, read_text
    from mlxeff.eval import perplexity
    from mlxeff.quant import apply_quantization_spec
    from mlxeff.quant.affine import affine_spec, quantize_affine
    from mlxeff.quant.seedlm import quantize_model

    model_dir = Path(args.model)
    tokenizer = mlxeff.io.load_tokenizer(model_dir)
    text = read_text(Path(args.valid))
    if args.llama2c_vocab:
        # llama2.c merges are quadratic per line: encode only about enough text
        tokens = llama2c_encode(Path(args.llama2c_vocab), text[: args.tokens * 8])[: args.tokens]
    elif tokenizer is None:
        raise SystemExit(f"{model_dir}: the model directory has no tokenizer (see --llama2c-vocab)")
    else:
        tokens = encode_text(tokenizer, text)[: args.tokens]
    if len(tokens) < args.tokens:
        raise SystemExit(f"{args.valid}: only {len(tokens)} tokens, fewer than --tokens {args.tokens}")

    def fresh():
        m = mlxeff.io.load_model(model_dir)
        stored = {str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(m.parameters())
                  if mx.issubdtype(v.dtype, mx.floating)}
        return m, ",".join(sorted(stored))

    def compute_dtype(m):
        # after quantizing, so affine scales keep the stored dtype's values (exact in float32)
        if device_name() == "cpu":
            m.set_dtype(mx.float32)  # fp16/bf16 matmul is slow on the CPU backend
        return m

    def ppl(m):
        t0 = time.perf_counter()
        r = perplexity(m, tokens, window=args.window, stride=args.stride)
        return r["ppl"], time.perf_counter() - t0

    from mlxeff.quant.seedlm import quantizable_modules

    rows = []
    base, stored = fresh()
    reference = {p: m.weight.astype(mx.float32) for p, m in quantizable_modules(base)}
    mx.eval(reference)
    bits_row = float_linear_bits(base)
    p, dt = ppl(compute_dtype(base))
    rows.append({"method": f"float ({stored} stored)", **bits_row, "rel_error": 0.0, "ppl": p, "eval_seconds": dt})
    del base
    variants = [(f"seedlm-{basis}", C, P) for C, P in args.seedlm_configs for basis in args.bases]
    variants += [("affine", b, 64) for b in (4, 3)] + [("affine-all", b, 64) for b in (4, 3)]
    for method, a, b in variants:
        t0 = time.perf_counter()
        if method == "affine":
            m, _ = fresh()
            quantize_affine(m, bits=a, group_size=b, embedding_bits=None)
            row = {"method": f"affine {a}-bit g{b}", "C": None, "P": None}
        elif method == "affine-all":
            # MLX quantizes a Linear only when the group size divides its input width; layers that
            # g64 leaves in float get g32 here, so that every block Linear is quantized, as SeedLM's are.
            m, _ = fresh()
            spec = {**affine_spec(m, a, 32, None), **affine_spec(m, a, b, None)}
            apply_quantization_spec(m, spec)
            mx.eval(m.parameters())
            row = {"method": f"affine {a}-bit g{b} (g32 where {b} does not divide)", "C": None, "P": None}
        else:
            basis = method.removeprefix("seedlm-")
            cache = Path(args.cache) / f"seedlm_{basis}_C{a}_P{b}" if args.cache else None
            enc_s = None
            if cache is not None and (cache / "config.json").is_file():
                m = mlxeff.io.load_model(cache)
            else:
                m, _ = fresh()
                quantize_model(m, C=a, P=b, progress=not args.json, basis=basis)
                enc_s = time.perf_counter() - t0
                if cache is not None:
                    mlxeff.save(m, tokenizer, cache, force=True)
            row = {"method": f"seedlm C={a} P={b} basis={basis}", "C": a, "P": b, "encode_seconds": enc_s}
        row.update(quantized_bits(m))
        row["float_linear_weights_left"] = float_linear_bits(m)["quantized_weights"]
        row["rel_error"] = block_linear_error(m, reference)
        row["ppl"], row["eval_seconds"] = ppl(compute_dtype(m))
        rows.append(row)
        del m
    # control: Gaussian noise of the same relative error in every 8-weight block (several draws)
    for r in sorted({round(x["rel_error"], 3) for x in rows[1:]}) if args.noise_draws else []:
        for draw in range(args.noise_draws):
            m, _ = fresh()
            mx.random.seed(draw)
            for path, mod in quantizable_modules(m):
                mod.weight = blockwise_noise(reference[path], r).astype(mod.weight.dtype)
            p, dt = ppl(compute_dtype(m))
            rows.append({"method": f"noise rel {r:.3f} draw {draw}", "C": None, "P": None,
                         "bits_per_weight": None, "rel_error": r, "ppl": p, "eval_seconds": dt})
            del m
    f = rows[0]["ppl"]
    for r in rows:
        r["ppl_increase"] = r["ppl"] - f
    return rows


def cmd_quality(args) -> None:
    result = {"device": device_name(),
              "gaussian": (gaussian_quality(args.blocks, args.candidates, args.gaussian_configs, bases=args.bases)
                           if args.blocks else [])}
    if not args.json and result["gaussian"]:
        print(f"iid N(0,1) weights ({device_name()}):")
        for r in result["gaussian"]:
            what = (f"SeedLM {r['basis']} C={r['C']} P={r['P']} k={r['candidates']}" if r["method"] == "seedlm"
                    else f"affine {r['bits']}-bit g{r['group_size']}")
            print(f"  {what:<32} {r['bits_per_weight']:.3f} bpw  rel error {r['rel_error']:.4f}")
    if args.model:
        if not args.valid:
            raise SystemExit("--model needs --valid FILE")
        result["model"] = str(args.model)
        result["valid"] = str(args.valid)
        result["perplexity"] = model_quality(args)
        if not args.json:
            print(f"{args.model}: validation perplexity on {args.tokens} tokens of {args.valid} "
                  f"(window {args.window}, stride {args.stride}):")
            for r in result["perplexity"]:
                left = r.get("float_linear_weights_left")
                note = f"  [{left:,} block-linear weights left in float]" if left else ""
                bpw = f"{r['bits_per_weight']:.3f} bpw" if r.get("bits_per_weight") else "    -    "
                rel = f"rel err {r['rel_error']:.4f}" if r.get("rel_error") is not None else ""
                print(f"  {r['method']:<30} {bpw}  {rel:<15} ppl {r['ppl']:.4f}  "
                      f"({r['ppl_increase']:+.4f}){note}")
    emit("seedlm_quality", result, args.json)


# ------------------------------------------------------------------------------------------------
# (b) encoding speed


def cmd_worker(args) -> None:
    """One timed encode in this process's distributed group (rank 0 writes the result)."""
    from mlxeff.quant.seedlm_encoder import EncoderConfig, encode_matrix
    from mlxeff.quant.seedlm_format import CONFIGS

    group = mx.distributed.init()
    C, P = CONFIGS[args.bits]
    cfg = EncoderConfig(batch=args.batch)
    warm = np.random.default_rng(1).standard_normal((4, 96 * C)).astype(np.float32)
    encode_matrix(warm, C, P, config=cfg, group=group)  # tables, compilation
    W = np.random.default_rng(0).standard_normal((args.blocks // 96, 96 * C)).astype(np.float32)
    t0 = time.perf_counter()
    enc = encode_matrix(W, C, P, config=cfg, group=group)
    dt = time.perf_counter() - t0
    if group.rank() == 0:
        Path(args.result).write_text(json.dumps({
            "ranks": group.size(), "bits": args.bits, "blocks": int(W.size // C), "seconds": dt,
            "blocks_per_s": W.size / C / dt, "rel_error": float(np.sqrt(enc.sq_error / enc.sq_norm)),
            "seeds_sha": int(np.asarray(enc.seeds, np.int64).sum())}))


def _free_ports(n: int):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sk in socks:
        sk.bind(("127.0.0.1", 0))
    ports = [sk.getsockname()[1] for sk in socks]
    for sk in socks:
        sk.close()
    return ports


def run_ranks(worker, n: int, launcher: str, tmp: Path, backend: str = "ring") -> None:
    """Run ``worker`` on n local ranks of ``backend``: the ring backend through ``mlx.launch`` or
    directly (the same MLX_RANK / MLX_HOSTFILE environment mlx.launch sets up, without its I/O
    relay); NCCL (one GPU per rank) through ``mlx.launch`` only."""
    # the cores are shared out between the ranks (no BLAS oversubscription)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
    if n == 1:
        subprocess.run(worker, check=True, env=env)
    elif launcher == "mlx.launch" or backend != "ring":
        exe = Path(sys.executable).parent / "mlx.launch"
        subprocess.run([str(exe), "-n", str(n), "--backend", backend, "--"] + worker, check=True, env=env)
    else:
        hostfile = tmp / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
        procs = [subprocess.Popen(worker, env=dict(env, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)))
                 for r in range(n)]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a rank failed")


def cmd_speed(args) -> None:
    launchers = args.launchers if args.backend == "ring" else ["mlx.launch"]
    configs = [(n, "-" if n == 1 else lau) for n in args.ranks for lau in launchers]
    configs = list(dict.fromkeys(configs))
    runs = {(b, n, lau): [] for b in args.bits for n, lau in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(args.trials):
            for bits in args.bits:
                for n, lau in configs:
                    res = Path(tmp) / f"r{trial}-{bits}-{n}.json"
                    worker = [sys.executable, __file__, "worker", "--bits", str(bits), "--blocks",
                              str(args.blocks), "--batch", str(args.batch), "--result", str(res)]
                    run_ranks(worker, n, lau, Path(tmp), args.backend)
                    runs[(bits, n, lau)].append(json.loads(res.read_text()))
    rows = []
    for (bits, n, lau), rs in runs.items():
        rates = [r["blocks_per_s"] for r in rs]
        first = runs[(bits,) + configs[0]]
        rows.append({"bits": bits, "ranks": n, "launcher": lau, "blocks": rs[0]["blocks"], "trials": len(rs),
                     "blocks_per_s_median": statistics.median(rates), "blocks_per_s": rates,
                     "identical_result": len({r["seeds_sha"] for r in first + rs}) == 1})
    for r in rows:
        one = next(x for x in rows if x["bits"] == r["bits"] and (x["ranks"], x["launcher"]) == configs[0])
        r["speedup_vs_first"] = r["blocks_per_s_median"] / one["blocks_per_s_median"]
    result = {"device": device_name(), "backend": args.backend, "cpu_count": os.cpu_count(),
              "loadavg_1min_after": os.getloadavg()[0],
              "blas_preload": os.environ.get("LD_PRELOAD", ""), "rows": rows}
    if not args.json:
        for r in rows:
            how = "" if r["ranks"] == 1 else f" via {r['launcher']}"
            print(f"{r['bits']}-bit ranks={r['ranks']}{how}: {r['blocks_per_s_median']:,.0f} blocks/s "
                  f"(median of {r['trials']}; x{r['speedup_vs_first']:.2f}; same result: {r['identical_result']})")
    emit("seedlm_speed", result, args.json)


def linear_blocks(args_model, C: int) -> int:
    from mlxeff.models import Model
    from mlxeff.quant.seedlm import quantizable_modules
    from mlxeff.quant.seedlm_format import num_blocks

    # shapes only: build under a lazy graph, never evaluated
    model = Model(args_model)
    return sum(m.weight.shape[0] * num_blocks(m.weight.shape[1], C) for _, m in quantizable_modules(model))


def cmd_model(args) -> None:
    from mlxeff.models import Model, openelm_config
    from mlxeff.quant.seedlm import quantizable_modules, quantize_model
    from mlxeff.quant.seedlm_format import CONFIGS, num_blocks

    C, P = CONFIGS[args.bits]
    cfg = openelm_config(args.size)
    if args.layers:  # the first N layers of the real model (the scaling rule is not re-run)
        cfg = dataclasses.replace(cfg, num_transformer_layers=args.layers,
                                  **{k: getattr(cfg, k)[: args.layers]
                                     for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers")})
    mx.random.seed(0)
    model = Model(cfg)
    # random weights at a realistic scale (std 0.02), float32; only the encoded layers matter
    for _, m in quantizable_modules(model):
        m.weight = 0.02 * mx.random.normal(m.weight.shape)
    mx.eval(model.parameters())
    blocks = sum(m.weight.shape[0] * num_blocks(m.weight.shape[1], C) for _, m in quantizable_modules(model))
    report = []
    group = mx.distributed.init()
    t0 = time.perf_counter()
    quantize_model(model, bits=args.bits, progress=not args.json, group=group, report=report)
    dt = time.perf_counter() - t0
    rate = blocks / dt
    full = {name: linear_blocks(openelm_config(name), C) for name in (args.size, "3B")}
    rel = float(np.sqrt(sum(r["sq_error"] for r in report) / sum(r["sq_norm"] for r in report)))
    result = {"device": device_name(), "ranks": group.size(), "size": args.size, "bits": args.bits,
              "layers": cfg.num_transformer_layers, "blocks": blocks, "seconds": dt, "blocks_per_s": rate,
              "linear_blocks_full_model": full[args.size], "projected_seconds_full_model": full[args.size] / rate,
              "linear_blocks_3B": full["3B"], "projected_seconds_3B": full["3B"] / rate,
              "rel_error": rel}
    if group.rank() == 0:
        if not args.json:
            print(f"OpenELM-{args.size}-shaped ({cfg.num_transformer_layers} layers), {args.bits}-bit, "
                  f"{device_name()}, {group.size()} rank(s): {blocks:,} blocks in {dt:.1f} s = {rate:,.0f} blocks/s; "
                  f"rel error {rel:.4f}")
            print(f"  projected: full {args.size} {full[args.size]:,} blocks -> {full[args.size] / rate:,.0f} s; "
                  f"OpenELM-3B {full['3B']:,} blocks -> {full['3B'] / rate:,.0f} s")
        emit(f"seedlm_model_{args.size}_{args.bits}bit", result, args.json)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality", help="(a) relative error on Gaussian weights; perplexity of a model")
    q.add_argument("--blocks", type=int, default=16384, help="Gaussian blocks per configuration (0: skip)")
    q.add_argument("--candidates", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="candidate counts tried for the 4- and 3-bit presets (Gaussian part)")
    q.add_argument("--gaussian-configs", type=parse_config, nargs="*",
                   default=[(9, 4), (10, 5), (12, 7), (16, 7), (8, 4)],
                   help="further CxP configurations for the Gaussian part (k=16)")
    q.add_argument("--seedlm-configs", type=parse_config, nargs="*", default=[(8, 3), (12, 4)],
                   help="SeedLM CxP configurations for the perplexity part (none: affine only)")
    q.add_argument("--bases", nargs="+", default=["bits", "states"], choices=["bits", "states"],
                   help="SeedLM bases to compare (mlxeff.quant.seedlm_format), side by side")
    q.add_argument("--model", help="mlxeff model directory (e.g. mlxeff/assets/default)")
    q.add_argument("--valid", help="validation text file (.txt or .txt.gz)")
    q.add_argument("--tokens", type=int, default=65536, help="validation tokens to score")
    q.add_argument("--window", type=int, default=512)
    q.add_argument("--stride", type=int, default=256)
    q.add_argument("--cache", help="directory to keep/reuse the SeedLM-encoded models")
    q.add_argument("--noise-draws", type=int, default=0,
                   help="control: perplexity with Gaussian noise of each method's relative error in "
                        "every 8-weight block of the block Linears, this many draws per error level")
    q.add_argument("--llama2c-vocab", help="tokenize --valid with this llama2.c tokenizer.bin instead")
    q.add_argument("--json", action="store_true")
    s = sub.add_parser("speed", help="(b) blocks/s with 1 and several ranks (mlx.launch, ring)")
    s.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    s.add_argument("--blocks", type=int, default=8192)
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    s.add_argument("--trials", type=int, default=3)
    s.add_argument("--launchers", nargs="+", default=["direct", "mlx.launch"], choices=["direct", "mlx.launch"],
                   help="how ranks > 1 start: directly with the ring backend's environment, or mlx.launch")
    s.add_argument("--backend", choices=["ring", "nccl"], default="ring",
                   help="ring: CPU processes; nccl: one CUDA GPU per rank (started by mlx.launch)")
    s.add_argument("--json", action="store_true")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("--bits", type=int, required=True)
    w.add_argument("--blocks", type=int, required=True)
    w.add_argument("--batch", type=int, required=True)
    w.add_argument("--result", required=True)
    m = sub.add_parser("model", help="(b) encode an OpenELM-shaped random model; project OpenELM-3B")
    m.add_argument("--size", default="270M")
    m.add_argument("--bits", type=int, default=4)
    m.add_argument("--layers", type=int, default=None, help="encode only the first N blocks' layers")
    m.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    {"quality": cmd_quality, "speed": cmd_speed, "worker": cmd_worker, "model": cmd_model}[args.cmd](args)


if __name__ == "__main__":
    main()
