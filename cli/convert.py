"""``mlxeff convert``: CoreNet / Hugging Face / mlxeff checkpoints -> an mlxeff directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import fail, print_json


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
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A SentencePiece tokenizer.model or a "
                                             "tokenizer directory (default: the source's own)."),
    no_tokenizer: bool = typer.Option(False, "--no-tokenizer", help="Write the weights only (the output "
                                      "loads but cannot generate text)."),
    dtype: str = typer.Option("float16", "--dtype", help="float16, bfloat16 or float32."),
    quantize: Optional[str] = typer.Option(None, "--quantize", "-q", help="affine (MLX group-wise) or seedlm."),
    bits: int = typer.Option(4, "--bits", help="Bits per weight for --quantize (affine: 2, 3, 4, 5, 6, 8)."),
    group_size: int = typer.Option(64, "--group-size", help="Affine group size: 32, 64 or 128."),
    embedding_bits: int = typer.Option(8, "--embedding-bits", help="Affine bits of the vocabulary matrices "
                                       "(embedding / output head); 0 keeps them in floating point."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is complete)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
):
    """Convert a checkpoint into the mlxeff format, optionally quantized. Nothing from the
    checkpoint is executed (torch files are read with a restricted unpickler), and OUT appears
    only when complete. Prints parameters, bits per weight, size and time at the end."""
    from mlxeff.convert import convert as run

    if no_tokenizer and tokenizer is not None:
        fail("--tokenizer and --no-tokenizer exclude each other")
    summary = run(
        src, out, source=source, config=config, vocab_size=vocab_size,
        tokenizer=False if no_tokenizer else tokenizer, dtype=dtype, quantize=quantize, bits=bits,
        group_size=group_size, embedding_bits=embedding_bits or None, force=force, progress=not json_output,
    )
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
    print(f"time          {s['seconds']:.2f} s")
