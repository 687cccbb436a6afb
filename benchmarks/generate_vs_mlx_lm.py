"""mlxeff's generation engine vs mlx-lm's, side by side on the same model and prompt.

Both load the same directory: mlxeff through ``mlxeff.load`` (its own model class and engine),
mlx-lm through ``mlx_lm.load`` (mlx-lm's OpenELM class and ``stream_generate``). Runs are
interleaved (the order alternates per trial) after a warm-up of each; medians are reported with the
ratio mlxeff / mlx-lm, and beside it the median of the per-trial ratios (each trial's two runs are
back to back, so a machine whose speed drifts between trials -- seen on the H100, where trials of
both engines fell into two regimes near 320 and 450 tokens/s -- moves both runs of a pair alike,
while the per-engine medians can land in different regimes).

    python benchmarks/generate_vs_mlx_lm.py --random 270M --prompt-tokens 512 --gen-tokens 64

On the CPU it re-launches itself with OpenBLAS preloaded, as the ``mlxeff`` command does (a
preload given by the user, e.g. ``LD_PRELOAD=.../libopenblas.so.0``, is kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlxeff.bench import blas_in_use


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer covering every id, so both engines detokenize at equal cost."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def make_random_model_dir(size: str, dtype: str, root: Path) -> Path:
    import mlxeff
    from mlxeff.models import Model, openelm_config

    mx.random.seed(0)
    model = Model(openelm_config(size))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    path = root / f"openelm-{size}-random"
    mlxeff.save(model, word_tokenizer(model.args.vocab_size), path)
    return path


def run_once(engine: str, model, tokenizer, prompt: mx.array, gen_tokens: int) -> dict:
    mx.clear_cache()
    mx.reset_peak_memory()
    if engine == "mlxeff":
        import mlxeff

        stream = mlxeff.stream_generate(model, tokenizer, prompt, max_tokens=gen_tokens)
    else:
        from mlx_lm import stream_generate

        stream = stream_generate(model, tokenizer, prompt, max_tokens=gen_tokens)
    tic = time.perf_counter()
    ttft, last = None, None
    for last in stream:
        if ttft is None:
            ttft = time.perf_counter() - tic
    return {
        "prompt_tps": last.prompt_tps,
        "generation_tps": last.generation_tps,
        "generation_tokens": last.generation_tokens,
        "ttft_s": ttft,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def _preload(path: Path) -> list:
    """Every weight file of ``path`` read into memory (kept by the caller)."""
    arrays = [mx.load(str(f)) for f in sorted(path.glob("*.safetensors"))]
    mx.eval(arrays)
    return arrays


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="an mlxeff model directory")
    src.add_argument("--random", metavar="SIZE", help="a random-weight OpenELM of this size (270M, ...)")
    ap.add_argument("--dtype", default="float32", help="weights dtype for --random (default float32)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-preload", action="store_true",
                    help="skip the throwaway first load of the weights (see below)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import mlx_lm
    import mlxeff

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or make_random_model_dir(args.random, args.dtype, Path(tmp))
        # The first model loaded in a process decodes about 3% slower than the second on the CPU
        # box, whichever engine loads it (random OpenELM-270M float32, one decode step over 512
        # cached tokens, 35 interleaved timings: loaded first 1.026-1.032x the time of the other,
        # four runs swapping the order); with the weights read once beforehand and kept, the two
        # engines are within 1%. So a throwaway copy of the weights is loaded first and held.
        preload = None if args.no_preload else _preload(Path(path))
        models = {"mlxeff": mlxeff.load(path), "mlx_lm": mlx_lm.load(str(path))}
        vocab = models["mlxeff"][0].args.vocab_size
        mx.random.seed(args.seed)
        prompt = mx.random.randint(3, vocab, (args.prompt_tokens,)).astype(mx.uint32)
        runs = {k: [] for k in models}
        order = list(models)
        for trial in range(args.warmup + args.trials):
            for engine in order if trial % 2 == 0 else order[::-1]:
                model, tok = models[engine]
                r = run_once(engine, model, tok, prompt, args.gen_tokens)
                if trial >= args.warmup:
                    runs[engine].append(r)

    keys = ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_gb")
    med = {e: {k: statistics.median(r[k] for r in rs) for k in keys} for e, rs in runs.items()}
    ratio = {k: med["mlxeff"][k] / med["mlx_lm"][k] for k in keys}
    paired = {k: statistics.median(a[k] / b[k] for a, b in zip(runs["mlxeff"], runs["mlx_lm"]))
              for k in keys}
    result = {
        "model": str(args.model or f"random OpenELM-{args.random} ({args.dtype})"),
        "device": str(mx.default_device()),
        "blas": blas_in_use() if mx.default_device() == mx.cpu else None,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "trials": args.trials,
        "median": med,
        "ratio_mlxeff_over_mlx_lm": ratio,
        "paired_ratio_median": paired,
        "preloaded": preload is not None,
        "trials_raw": runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']} on {result['device']}: {args.prompt_tokens}-token prompt, "
          f"{args.gen_tokens} generated, median of {args.trials} interleaved trials")
    print(f"{'':16}{'mlxeff':>12}{'mlx-lm':>12}{'ratio':>9}{'paired':>9}")
    for k, label in zip(keys, ("prompt tok/s", "gen tok/s", "TTFT (s)", "peak mem (GB)")):
        print(f"{label:16}{med['mlxeff'][k]:>12.3f}{med['mlx_lm'][k]:>12.3f}{ratio[k]:>9.3f}"
              f"{paired[k]:>9.3f}")


if __name__ == "__main__":
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark()
    main()
