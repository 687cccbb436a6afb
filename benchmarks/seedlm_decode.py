"""SeedLM end to end: decode speed of OpenELM-shaped models in float16, affine 4-bit and SeedLM.

For each of ``--shapes`` (the official OpenELM-270M, -1.1B and -3B tables from
``mlxeff.models.openelm_config``; ``tiny`` is a 2-layer, width-128 smoke shape) every format of
``--formats`` is built with random weights (fixed seed) and run through the engine ``mlxeff
generate`` uses (``mlxeff.stream_generate``, greedy, a random ``--prompt-tokens`` prompt of token
ids, ``--max-tokens`` new tokens, batch 1), side by side in one process:

- ``fp16``: the model as built, float16;
- ``affine4``: every Linear of the transformer blocks at 4 bits, group 64, through the project's
  path (``mlxeff.quant.affine.quantize_affine`` with ``embedding_bits=None``);
- ``seedlm4-<basis>`` / ``seedlm3-<basis>``: every Linear of the blocks replaced by ``SeedLMLinear``
  from its spec entry (``seedlm_format.spec_entry`` + ``apply_quantization_spec``, as on load),
  its packed arrays filled with random seeds (1..65535) and codes (nothing is encoded: the work
  does not depend on the values) and ``exp_base = EXP_BASE``; one format per ``--bases`` entry.

Token embeddings and the tied output head stay float16 in every format, so the formats differ in
the block weights only. Each model is prepared for the device as the CLI prepares it
(``mlxeff.precision.apply_compute_dtype(model, "auto")``: on the CPU float32, affine layers
dequantized; on a GPU the stored precision). Detokenizing is left out (a tokenizer with no text and
no end-of-sequence token, so every run yields exactly ``--max-tokens`` tokens).

Protocol per shape: build every format (``build_s``); then each format's first generation in this
process, which pays any custom-kernel builds (``first_call``: seconds to its first token and in
all; the first format's also pays MLX's own one-time work, so ``--fresh-first`` times each in
isolation); one warm-up run each; then ``--trials`` rounds in which every format runs once, in an order
rotated per round. Medians are reported: TTFT, prefill tokens/s (prompt / TTFT), decode tokens/s
(tokens 2..N over the time between the first and the last token) and ms per decode token, with
decode speed relative to fp16 and to affine4. ``--fresh-first`` also starts a new Python process
per format that builds only that model and generates once: the seconds from spawning it to its
first token, as a new user's first ``mlxeff generate`` sees them (less the disk read).

Bytes: ``stored`` is the exact size of the arrays in the model as built (block Linear layers,
vocabulary matrix, norms), with the block layers' bits per weight. ``read`` is what one decode
token reads on this device as the layers run: every block layer's arrays (a SeedLM layer without a
kernel here computes from its dense reconstruction, counted at that size), the whole vocabulary
matrix (the tied head) plus one embedding row, the norms, and the KV cache at the mean decode
context. ``floor_ms`` is read / ``--bandwidth-gbs`` (default 3350 GB/s, an H100 SXM's HBM3):
what a token would take if memory traffic were all; ``ms_per_token - floor_ms`` is kernel
inefficiency plus host/launch time.

Results go to stdout (a table per shape; ``--json`` for one JSON object) and, if ``$OUT`` is set,
to ``$OUT/seedlm_decode.json``.

    python benchmarks/seedlm_decode.py --shapes 270M --fresh-first     # on the GPU machine
    python benchmarks/seedlm_decode.py --shapes tiny --max-tokens 8 --prompt-tokens 32 --cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm.tokenizer_utils import TokenizerWrapper  # noqa: E402

from mlxeff.generate import stream_generate  # noqa: E402
from mlxeff.kernels import gpu_backend  # noqa: E402
from mlxeff.models import Model, layerwise_config, openelm_config  # noqa: E402
from mlxeff.precision import apply_compute_dtype  # noqa: E402
from mlxeff.quant import apply_quantization_spec, seedlm_format  # noqa: E402
from mlxeff.quant import seedlm as sl  # noqa: E402
from mlxeff.quant.affine import quantize_affine  # noqa: E402
from mlxeff.quant.seedlm_format import SeedLMConfig, spec_entry  # noqa: E402

FORMATS = ("fp16", "affine4", "seedlm4", "seedlm3")
EXP_BASE = -21  # random codes: 2^(e + EXP_BASE) with e uniform in 0..15 gives weights of rms ~0.02
SEED = 0


class _NoText:
    """A detokenizer that keeps no text (the engine's loop without the tokenizer's cost)."""

    last_segment = ""

    def reset(self):
        pass

    def add_token(self, token):
        pass

    def finalize(self):
        pass


class NoTextTokenizer(TokenizerWrapper):
    """What ``stream_generate`` needs of a tokenizer, with no end-of-sequence token."""

    def __init__(self):
        self._tokenizer, self._detokenizer, self._eos_token_ids = None, _NoText(), set()


def model_config(shape: str):
    if shape == "tiny":
        return layerwise_config(2, 128, 32, vocab_size=512, ffn_dim_divisor=32)
    return openelm_config(shape)


def format_list(formats: str, bases: str) -> list:
    """(name, kind, bits, basis) per format; ``seedlmB`` expands to one format per basis of
    ``bases`` (of ``seedlm_format.BASES``)."""
    have = seedlm_format.BASES
    bases = bases.split(",")
    for b in bases:
        if b not in have:
            raise SystemExit(f"--bases: unknown SeedLM basis {b!r} (one of {', '.join(have)})")
    out = []
    for f in formats.split(","):
        kind, _, basis = f.partition("-")
        if kind not in FORMATS:
            raise SystemExit(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
        if kind.startswith("seedlm"):
            if basis and basis not in have:
                raise SystemExit(f"{f}: SeedLM has no basis {basis!r} here (it has {', '.join(have)})")
            out += [(f"{kind}-{b}", "seedlm", int(kind[-1]), b) for b in ([basis] if basis else bases)]
        else:
            out.append((kind, kind, 16 if kind == "fp16" else 4, None))
    return out


def build(args, fmt) -> Model:
    """A model of ``args`` in format ``fmt`` with random weights, evaluated."""
    _, kind, bits, basis = fmt
    mx.random.seed(SEED)
    model = Model(args)  # parameters are lazy: replaced layers are never computed
    if kind == "seedlm":
        cfg = SeedLMConfig.for_bits(bits)
        specs = {p: spec_entry(*m.weight.shape, cfg.C, cfg.P, basis=basis)
                 for p, m in sl.quantizable_modules(model)}
        apply_quantization_spec(model, specs, source="seedlm_decode")
    model.set_dtype(mx.float16)
    if kind == "affine4":
        quantize_affine(model, bits=4, group_size=64, embedding_bits=None)
    if kind == "seedlm":
        key = mx.random.key(SEED + 1)
        for path, m in model.named_modules():
            if isinstance(m, sl.SeedLMLinear):
                key, k1, k2 = mx.random.split(key, 3)
                seeds = mx.random.randint(1, 1 << 16, m.seeds.shape, key=k1).astype(mx.uint16)
                codes = mx.random.randint(0, 256, m.codes.shape, key=k2).astype(mx.uint8)
                m.set_packed(seeds, codes, EXP_BASE)
                mx.eval(m.seeds, m.codes)
                m.validate_packed(path, "seedlm_decode")
    mx.eval(model.parameters())
    return model


def _uses_kernel(m) -> bool:
    return sl.KERNELS[m.basis].kernel_available(m.C, m.P)


def _part(path: str) -> str:
    leaf = path.rsplit(".", 2)[-2] if path.count(".") else path
    if "token_embeddings" in path or path.startswith("lm_head"):
        return "vocab"
    return "norms" if leaf.endswith("norm") else "blocks"


def stored_bytes(model) -> dict:
    out = {"blocks": 0, "vocab": 0, "norms": 0}
    for path, a in tree_flatten(model.parameters()):
        out[_part(path)] += a.nbytes
    weights = sum(rows * cols for rows, cols in map(weight_shape, (m for _, m in block_modules(model))))
    out["total"] = out["blocks"] + out["vocab"] + out["norms"]
    out["block_weights"] = weights
    out["block_bits_per_weight"] = 8 * out["blocks"] / weights
    return out


def weight_shape(m) -> tuple:
    """(out, in) of a dense, affine-quantized or SeedLM Linear."""
    if "seeds" in m:
        return m.out_features, m.in_features
    rows, cols = m.weight.shape
    return (rows, cols * 32 // m.bits) if "scales" in m else (rows, cols)


def block_modules(model) -> list:
    """The Linear-like leaf modules of the transformer blocks (dense, affine or SeedLM)."""
    return [(p, m) for p, m in model.named_modules()
            if ".layers." in f".{p}" and ("weight" in m or "seeds" in m) and "norm" not in p.rsplit(".", 1)[-1]]


def read_bytes(model, args, prompt_tokens: int, max_tokens: int) -> dict:
    """Bytes one decode token reads on this device, as the layers run (see the docstring)."""
    itemsize = model.transformer.token_embeddings.weight.dtype.size
    blocks = 0
    for _, m in block_modules(model):
        if "seeds" in m and not _uses_kernel(m):
            rows, cols = weight_shape(m)
            blocks += rows * cols * itemsize + (m.bias.nbytes if "bias" in m else 0)
        else:
            blocks += sum(a.nbytes for _, a in tree_flatten(m.parameters()))
    vocab = sum(a.nbytes for p, a in tree_flatten(model.parameters()) if _part(p) == "vocab")
    vocab += vocab // args.vocab_size if args.share_input_output_layers else 0  # + the looked-up row
    norms = sum(a.nbytes for p, a in tree_flatten(model.parameters()) if _part(p) == "norms")
    context = prompt_tokens + max_tokens / 2  # mean context of the decode forwards
    kv = sum(2 * kv_heads * args.head_dim * itemsize for kv_heads in args.num_kv_heads) * context
    return {"blocks": blocks, "vocab": vocab, "norms": norms, "kv": int(kv),
            "total": int(blocks + vocab + norms + kv)}


def generate_once(model, prompt: mx.array, max_tokens: int) -> dict:
    """One generation through the engine: times of the first and every later token."""
    times, first_wall = [], None
    tic = time.perf_counter()
    for _ in stream_generate(model, NoTextTokenizer(), prompt, max_tokens=max_tokens):
        times.append(time.perf_counter())
        first_wall = first_wall or time.time()
    ttft = times[0] - tic
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"ttft_s": ttft, "total_s": times[-1] - tic, "tokens": len(times),
            "prefill_tps": prompt.size / ttft, "decode_tps": decode, "first_token_wall": first_wall}


def prepared(args, fmt) -> tuple:
    t0 = time.perf_counter()
    model = build(args, fmt)
    stored = stored_bytes(model)
    compute = apply_compute_dtype(model, "auto")
    mx.eval(model.parameters())
    return model, stored, compute or "stored (float16)", time.perf_counter() - t0


def fresh_first(shape: str, fmt, opts) -> dict:
    """Spawn a new process that builds one format and generates once; seconds to its first token."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{shape}:{fmt[0]}",
           "--prompt-tokens", str(opts.prompt_tokens), "--max-tokens", str(opts.max_tokens)]
    cmd += ["--cpu"] if opts.cpu else []
    start = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        return {"error": (run.stderr or run.stdout).strip().splitlines()[-1:]}
    child = json.loads(run.stdout.strip().splitlines()[-1])
    return {"to_first_token_s": child["first_token_wall"] - start, "build_s": child["build_s"],
            "ttft_s": child["ttft_s"]}


def child(spec: str, opts) -> None:
    shape, name = spec.split(":")
    fmt = next(f for f in format_list(name, name.partition("-")[2] or "states") if f[0] == name)
    args = model_config(shape)
    model, _, _, build_s = prepared(args, fmt)
    run = generate_once(model, random_prompt(args, opts.prompt_tokens), opts.max_tokens)
    print(json.dumps({"build_s": build_s, **run}))


def random_prompt(args, n: int) -> mx.array:
    return mx.array(np.random.default_rng(SEED).integers(0, args.vocab_size, n), dtype=mx.uint32)


def bench_shape(shape: str, fmts: list, opts) -> dict:
    args = model_config(shape)
    prompt = random_prompt(args, opts.prompt_tokens)
    models, rows = {}, {}
    for fmt in fmts:
        model, stored, compute, build_s = prepared(args, fmt)
        models[fmt[0]] = model
        rows[fmt[0]] = {"format": fmt[0], "basis": fmt[3], "compute_dtype": compute, "build_s": build_s,
                        "stored_bytes": stored,
                        "read_bytes_per_token": read_bytes(model, args, opts.prompt_tokens, opts.max_tokens)}
    for name, model in models.items():  # the first generation of each format in this process
        first = generate_once(model, prompt, opts.max_tokens)
        rows[name]["first_call"] = {k: first[k] for k in ("ttft_s", "total_s", "decode_tps", "tokens")}
        rows[name]["build_to_first_token_s"] = rows[name]["build_s"] + first["ttft_s"]
    for model in models.values():
        generate_once(model, prompt, opts.max_tokens)
    runs = {name: [] for name in models}
    names = list(models)
    for t in range(opts.trials):
        for name in names[t % len(names):] + names[: t % len(names)]:
            runs[name].append(generate_once(models[name], prompt, opts.max_tokens))
    del models, model  # the loops above leave the last model bound to `model`
    gc.collect()
    mx.clear_cache()
    for name, row in rows.items():
        med = {k: statistics.median(r[k] for r in runs[name]) for k in ("ttft_s", "prefill_tps", "decode_tps")}
        row.update(med, decode_tps_trials=[r["decode_tps"] for r in runs[name]],
                   ms_per_token=1e3 / med["decode_tps"])
        row["floor_ms"] = row["read_bytes_per_token"]["total"] / (opts.bandwidth_gbs * 1e9) * 1e3
        row["above_floor_ms"] = row["ms_per_token"] - row["floor_ms"]
        row["first_call_extra_s"] = row["first_call"]["ttft_s"] - row["ttft_s"]
    for name, row in rows.items():
        for base in ("fp16", "affine4"):
            if base in rows and name != base:
                row[f"decode_vs_{base}"] = row["decode_tps"] / rows[base]["decode_tps"]
    if opts.fresh_first:
        for fmt in fmts:
            rows[fmt[0]]["fresh_first"] = fresh_first(shape, fmt, opts)
    return {"shape": shape, "layers": args.num_transformer_layers, "model_dim": args.model_dim,
            "vocab_size": args.vocab_size, "parameters": args.num_parameters(), "formats": list(rows.values())}


def print_shape(s: dict) -> None:
    print(f"\n{s['shape']}: {s['layers']} layers, width {s['model_dim']}, vocabulary {s['vocab_size']}, "
          f"{s['parameters'] / 1e6:.1f} M parameters")
    print(f"  {'format':15s} {'b/w':>6s} {'stored MB':>9s} {'read MB':>8s} {'floor ms':>8s} {'ms/tok':>7s} "
          f"{'dec tok/s':>9s} {'pre tok/s':>9s} {'TTFT ms':>8s} {'1st TTFT s':>10s} {'build s':>7s} "
          f"{'vs fp16':>7s} {'vs aff4':>7s}")
    for r in s["formats"]:
        st, rd = r["stored_bytes"], r["read_bytes_per_token"]
        rel = [f"{r[k]:7.2f}" if k in r else f"{'':7s}" for k in ("decode_vs_fp16", "decode_vs_affine4")]
        print(f"  {r['format']:15s} {st['block_bits_per_weight']:6.3f} {st['total'] / 1e6:9.1f} "
              f"{rd['total'] / 1e6:8.1f} {r['floor_ms']:8.3f} {r['ms_per_token']:7.3f} {r['decode_tps']:9.1f} "
              f"{r['prefill_tps']:9.1f} {r['ttft_s'] * 1e3:8.1f} {r['first_call']['ttft_s']:10.2f} "
              f"{r['build_s']:7.2f} {' '.join(rel)}")
    for r in s["formats"]:
        if "fresh_first" in r:
            f = r["fresh_first"]
            text = (f"failed: {f['error']}" if "error" in f else f"first token after {f['to_first_token_s']:.2f} s "
                    f"(build {f['build_s']:.2f} s, TTFT {f['ttft_s']:.2f} s)")
            print(f"  new process, {r['format']}: {text}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--shapes", default="270M,1_1B,3B", help="OpenELM shapes (270M, 450M, 1_1B, 3B) or tiny")
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help="fp16, affine4, seedlm4, seedlm3 (seedlmB expands over --bases; seedlm4-bits names one)")
    ap.add_argument("--bases", default="bits,states", help="SeedLM bases to run (comma-separated: bits, states)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per run (at least 2)")
    ap.add_argument("--trials", type=int, default=3, help="timed rounds (every format once per round)")
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="memory bandwidth for the floor")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU")
    ap.add_argument("--fresh-first", action="store_true",
                    help="also time each format's first token in a new process")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.max_tokens < 2 or opts.prompt_tokens < 1 or opts.trials < 1:
        ap.error("need --max-tokens >= 2, --prompt-tokens >= 1 and --trials >= 1")
    if opts.cpu:
        mx.set_default_device(mx.cpu)
    if opts.child:
        return child(opts.child, opts)
    fmts = format_list(opts.formats, opts.bases)
    info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    result = {
        "command": "python benchmarks/seedlm_decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "mlx": mx.__version__, "platform": platform.platform(), "device": str(mx.default_device()),
        "device_info": info, "backend": (gpu_backend() or "cpu") if not opts.cpu else "cpu",
        "exp_base": EXP_BASE,
        "settings": {k: getattr(opts, k) for k in ("prompt_tokens", "max_tokens", "trials", "bandwidth_gbs")},
        "shapes": [],
    }
    for shape in opts.shapes.split(","):
        result["shapes"].append(bench_shape(shape, fmts, opts))
        if not opts.json:
            print_shape(result["shapes"][-1])
    text = json.dumps(result, indent=1)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "seedlm_decode.json").write_text(text)
    if opts.json:
        print(text)
    return result


if __name__ == "__main__":
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark(on_cpu="--cpu" in sys.argv)  # the device is chosen by the flag here
    main()
