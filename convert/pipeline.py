"""``convert``: a CoreNet, Hugging Face or mlxeff checkpoint -> an mlxeff directory.

Order of work, so that bad input fails fast and costs nothing: options and the output path are
checked first; then the source's config, tensor names and shapes (no tensor data read); then the
tokenizer (loaded as ``mlxeff.load`` will load it); only then are tensors read, one at a time,
each cast to the output dtype as it arrives (peak memory: the output model plus one tensor).
Quantization follows, then ``mlxeff.io.save`` writes everything into a temporary directory that is
renamed to ``out`` only when complete.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from mlxeff.errors import MlxeffError
from mlxeff.atomic import recover
from mlxeff.io import load_model, load_weights_into, model_config_dict, save
from mlxeff.progress import bar
from mlxeff.tokenizer import has_tokenizer
from mlxeff.values import check_weights

from . import corenet, hf
from . import tokenizer as tok
from .source import detect
from .tensors import MX_DTYPES

QUANTIZE = (None, "affine", "seedlm")


def _check_options(dtype, quantize, bits, group_size, embedding_bits):
    if dtype not in MX_DTYPES:
        raise MlxeffError(f"unknown dtype {dtype!r} (choose float16, bfloat16 or float32)")
    if quantize not in QUANTIZE:
        raise MlxeffError(f"unknown quantization {quantize!r} (choose affine or seedlm)")
    if quantize == "affine":
        from mlxeff.quant.affine import check_settings

        check_settings(bits, group_size, embedding_bits)


def _seedlm():
    import importlib

    try:
        seedlm = importlib.import_module("mlxeff.quant.seedlm")
    except ModuleNotFoundError as e:
        if e.name in ("mlxeff.quant.seedlm",):
            raise MlxeffError("SeedLM quantization is not available in this installation "
                              "(mlxeff.quant.seedlm is missing)") from None
        raise
    if not hasattr(seedlm, "quantize_model"):
        raise MlxeffError("SeedLM quantization is not available (mlxeff.quant.seedlm has no quantize_model)")
    return seedlm.quantize_model


def convert(
    src,
    out,
    *,
    source: Optional[str] = None,
    config=None,
    vocab_size: Optional[int] = None,
    tokenizer: Union[None, bool, str, Path, object] = None,
    dtype: str = "float16",
    quantize: Optional[str] = None,
    bits: int = 4,
    group_size: int = 64,
    embedding_bits: Optional[int] = 8,
    force: bool = False,
    progress: bool = True,
    seedlm_basis: Optional[str] = None,
) -> dict:
    """Convert ``src`` into the mlxeff directory ``out`` and return a summary dict.

    ``source``: ``'corenet'`` (a ``.pt``), ``'hf'`` (a directory or hub id), ``'mlxeff'`` (an
    mlxeff directory, e.g. to compress a converted model) or None to detect. ``config`` (CoreNet
    only): an OpenELM name, a CoreNet yaml or a config.json; None infers an official size from the
    shapes. ``tokenizer``: None uses the source's own and fails if it has none; a path (a
    SentencePiece ``tokenizer.model`` or a tokenizer directory) or a tokenizer object; ``False``
    writes the weights only (the result loads but cannot generate text). ``quantize``:
    ``'affine'`` (MLX ``bits``/``group_size``, vocabulary matrices at ``embedding_bits``) or
    ``'seedlm'`` (``mlxeff.quant.seedlm.quantize_model``, in ``seedlm_basis`` if given: "states"
    or "bits", ``mlxeff.quant.seedlm_format``). ``progress``: progress bars on a
    terminal (``mlxeff.progress``); False: none.

    Under ``mlx.launch`` (an ``mx.distributed`` group of several ranks) every rank reads the
    source and SeedLM encoding is shared out between them; only rank 0 writes ``out`` (the same
    bytes as a single process writes), and the other ranks return ``{"written": False, ...}``.
    """
    t0 = time.perf_counter()
    _check_options(dtype, quantize, bits, group_size, embedding_bits)
    seedlm_quantize = _seedlm() if quantize == "seedlm" else None
    out = Path(out)
    group = mx.distributed.init()
    writer = group.rank() == 0
    if writer:
        recover(out)  # a replacement killed between its two renames left OUT aside: put it back first
    if out.exists() and not force:
        raise MlxeffError("output already exists (use --force to replace it)", out)
    kind = detect(src, source)
    target = MX_DTYPES[dtype]
    notes = []

    if kind == "mlxeff":
        if config is not None or vocab_size is not None:
            raise MlxeffError("config and vocab_size apply to CoreNet and Hugging Face sources only", src)
        model = load_model(src, lazy=True)
        if quantize and (getattr(model, "mlxeff_meta", None) or {}).get("quantization"):
            raise MlxeffError("the model is already quantized; convert from an unquantized one", src)
        tokenizer_obj = tok.resolve(tokenizer, Path(src) if has_tokenizer(src) else None, src)
        description = "mlxeff directory"
        tok_count = tok.check(tokenizer_obj, model_config_dict(model), model.args.vocab_size, src) if tokenizer_obj else None
        model.set_dtype(target)
        mx.eval(model.parameters())
        check_weights(model, src)  # loaded lazily: checked once cast
    else:
        if kind == "corenet":
            plan = corenet.plan(src, config, vocab_size)
        else:
            if config is not None:
                raise MlxeffError("config applies to CoreNet checkpoints (a Hugging Face source has config.json)", src)
            plan = hf.plan(src, vocab_size)
        try:
            model = plan.model
            notes += plan.notes
            description = plan.description
            tokenizer_obj = tok.resolve(tokenizer, plan.tokenizer_dir, src)
            tok_count = (tok.check(tokenizer_obj, model_config_dict(model), plan.args.vocab_size, src)
                         if tokenizer_obj is not None else None)
            weights = {}
            with bar(sum(e.nbytes for e in plan.entries.values()), "reading", "B", unit_scale=True,
                     show=None if progress else False) as reading:
                for name, entry in plan.entries.items():
                    weights[name] = entry.load(target)
                    reading.update(entry.nbytes)
        finally:
            plan.close()

        load_weights_into(model, weights, plan.source)
        del weights
        mx.eval(model.parameters())
    model.eval()

    if quantize == "affine":
        from mlxeff.quant.affine import quantize_affine

        quantize_affine(model, bits=bits, group_size=group_size, embedding_bits=embedding_bits)
    elif quantize == "seedlm":
        basis = {"basis": seedlm_basis} if seedlm_basis else {}
        seedlm_quantize(model, bits=bits, progress=progress, **basis)  # shared by the ranks of mx.distributed

    if writer:
        save(model, tokenizer_obj, out, force=force)
    del model
    gc.collect()
    mx.clear_cache()
    if not writer:
        return {"written": False, "rank": group.rank(), "ranks": group.size(), "output": str(out)}

    from mlxeff.summary import model_summary

    s = model_summary(out)
    return {
        "source": str(src),
        "source_kind": kind,
        "description": description,
        "output": str(out),
        "dtype": dtype,
        "quantization": quantize and {"method": quantize, "bits": bits,
                                      **({"group_size": group_size, "embedding_bits": embedding_bits}
                                         if quantize == "affine" else {})},
        "tokenizer": tok_count is not None,
        "tokenizer_size": tok_count,
        "parameters": s["parameters"],
        "bits_per_weight": s["bits_per_weight"],
        "linear_bits_per_weight": s["linear_bits_per_weight"],
        "size_on_disk_bytes": s["size_on_disk_bytes"],
        "vocab_size": s["vocab_size"],
        "num_layers": s["num_layers"],
        "notes": notes,
        "ranks": group.size(),
        "seconds": time.perf_counter() - t0,
    }
