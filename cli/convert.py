"""``mlxeff convert``: CoreNet / Hugging Face / mlxeff checkpoints -> an mlxeff directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import check_at_least, choices, fail, print_json


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)


def convert(
    src: str = typer.Argument(..., help="A CoreNet .pt file, a Hugging Face directory or hub id "
                              "(owner/name), or an mlxeff directory."),
    out: Path = typer.Option(..., "--out", "-o", help="The output directory (must not exist unless --force)."),
    source: Optional[str] = typer.Option(None, "--from", help="Source kind: corenet, hf or mlxeff "
                                         "(default: detected)."),
    config: Optional[str] = typer.Option(None, "--config", help="CoreNet only: openelm-270M, openelm-450M, "
                                         "openelm-1_1B, openelm-3B, a CoreNet .yaml or a config.json "
                                         "(default: inferred from the tensor shapes)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Rows of the vocabulary to keep "
                                             "(CoreNet's 32128 become 32000 by default for the official sizes)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A SentencePiece tokenizer.model, a "
                                             "llama2.c tokenizer.bin or a tokenizer directory "
                                             "(default: the source's own)."),
    no_tokenizer: bool = typer.Option(False, "--no-tokenizer", help="Write the weights only (the output "
                                      "loads but cannot generate text)."),
    dtype: str = typer.Option("float16", "--dtype", help="float16, bfloat16 or float32."),
    quantize: Optional[str] = typer.Option(None, "--quantize", "-q", help="affine (MLX group-wise) or seedlm."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Bits per weight for --quantize (default 4; "
                                       "affine: 2, 3, 4, 5, 6 or 8; seedlm: 3 or 4)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="--quantize affine: group size, "
                                             "32, 64 or 128 (default 64)."),
    embedding_bits: Optional[int] = typer.Option(None, "--embedding-bits", help="--quantize affine: bits of "
                                                 "the vocabulary matrices (embedding / output head), 2, 3, 4, "
                                                 "5, 6 or 8 (default 8); 0 keeps them in floating point."),
    seedlm_basis: Optional[str] = typer.Option(None, "--seedlm-basis", help="--quantize seedlm: the basis, "
                                               "states (the paper's register states; default) or bits (two "
                                               "bits of the register stream per entry: lower error, decode "
                                               "kernel slower today; benchmarks/RESULTS.md)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is complete)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
):
    """Convert a checkpoint into the mlxeff format, optionally quantized. Nothing from the
    checkpoint is executed (torch files are read with a restricted unpickler), and OUT appears
    only when complete. Prints parameters, bits per weight, size and time at the end."""
    from mlxeff.convert import convert as run

    if no_tokenizer and tokenizer is not None:
        fail("--tokenizer and --no-tokenizer exclude each other")
    bits, group_size, embedding_bits = check_options(source, vocab_size, dtype, quantize, bits, group_size,
                                                     embedding_bits)
    if seedlm_basis is not None and quantize != "seedlm":
        fail("--seedlm-basis applies to --quantize seedlm only")
    if seedlm_basis is not None:
        from mlxeff.quant.lfsr import BASES

        if seedlm_basis not in BASES:
            fail(f"--seedlm-basis: unknown basis {seedlm_basis!r} (choose {' or '.join(BASES)})")
    summary = run(
        src, out, source=source, config=config, vocab_size=vocab_size,
        tokenizer=False if no_tokenizer else tokenizer, dtype=dtype, quantize=quantize, bits=bits,
        group_size=group_size, embedding_bits=embedding_bits, force=force, progress=not json_output,
        seedlm_basis=seedlm_basis,
    )
    if not summary.get("written", True):
        return  # another rank of an mlx.launch run: rank 0 writes and reports
    if json_output:
        print_json(summary)
        return
    s = summary
    q = s["quantization"]
    qdesc = "none" if not q else f"{q['method']} {q['bits']}-bit" + (
        f", group {q['group_size']}, vocabulary at {q['embedding_bits'] or 'float'}"
        + (" bits" if q["embedding_bits"] else "") if q["method"] == "affine" else "")
    print(f"converted     {s['source']} ({s['description']})")
    print(f"into          {s['output']}")
    for note in s["notes"]:
        print(f"note          {note}")
    print(f"parameters    {s['parameters']:,} ({s['num_layers']} layers, vocabulary {s['vocab_size']:,})")
    print(f"dtype         {s['dtype']}; quantization {qdesc}")
    print(f"bits/weight   {s['bits_per_weight']:.3f} overall, {s['linear_bits_per_weight']:.3f} in the blocks' linear layers")
    print(f"size          {s['size_on_disk_bytes'] / 1e6:,.2f} MB")
    print(f"tokenizer     {s['tokenizer_size']:,} tokens" if s["tokenizer"] else "tokenizer     none (weights only)")
    ranks = f" on {s['ranks']} ranks" if s.get("ranks", 1) > 1 else ""
    print(f"time          {s['seconds']:.2f} s{ranks}")


def check_options(source, vocab_size, dtype, quantize, bits, group_size, embedding_bits):
    """One line naming the option for every value ``convert`` cannot use, before any work; returns
    ``(bits, group_size, embedding_bits)`` with the defaults filled in (embedding bits None: float)."""
    from mlxeff.convert.pipeline import QUANTIZE
    from mlxeff.convert.source import KINDS as SOURCES
    from mlxeff.quant.affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
    from mlxeff.train import DTYPES

    try:  # the SeedLM presets (bits -> C, P) live with the format once it has its own module
        from mlxeff.quant.seedlm_format import CONFIGS as SEEDLM_BITS
    except ImportError:
        from mlxeff.quant.seedlm import CONFIGS as SEEDLM_BITS

    QUANTIZERS = [q for q in QUANTIZE if q]
    if source is not None and source not in SOURCES:
        fail(f"--from: unknown source kind {source!r} (choose {choices(SOURCES)})")
    check_at_least("--vocab-size", vocab_size, 1)
    if dtype not in DTYPES:
        fail(f"--dtype: unknown dtype {dtype!r} (choose {choices(DTYPES)})")
    if quantize is not None and quantize not in QUANTIZERS:
        fail(f"--quantize: unknown quantization {quantize!r} (choose {choices(QUANTIZERS)})")
    if quantize is None and bits is not None:
        fail("--bits applies to quantization; add --quantize affine or --quantize seedlm")
    for option, value in (("--group-size", group_size), ("--embedding-bits", embedding_bits)):
        if value is not None and quantize != "affine":
            fail(f"{option} applies to --quantize affine only")
    bits = 4 if bits is None else bits
    if quantize == "seedlm" and bits not in SEEDLM_BITS:
        fail(f"--bits: SeedLM supports bits {choices(sorted(SEEDLM_BITS))} per weight, not {bits}")
    if quantize == "affine" and bits not in SUPPORTED_BITS:
        fail(f"--bits: affine quantization supports bits {choices(SUPPORTED_BITS)}, not {bits}")
    group_size = 64 if group_size is None else group_size
    if group_size not in SUPPORTED_GROUP_SIZES:
        fail(f"--group-size: affine quantization supports group sizes {choices(SUPPORTED_GROUP_SIZES)}, "
             f"not {group_size}")
    embedding_bits = 8 if embedding_bits is None else embedding_bits
    if embedding_bits != 0 and embedding_bits not in SUPPORTED_BITS:
        fail(f"--embedding-bits: affine quantization supports bits {choices(SUPPORTED_BITS)} "
             f"(or 0 for floating point), not {embedding_bits}")
    return bits, group_size, embedding_bits or None
