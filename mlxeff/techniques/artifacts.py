"""Trained technique artifacts (KV Prediction, M2R2): a directory with a JSON metadata file that
names its kind and format version beside the weights. Reading the metadata, finding the directory
and loading the frozen base a trainer adapts are the same for every kind; what the metadata holds
is each technique's own."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

from ..errors import MlxeffError
from ..files import read_json
from ..quant.affine import dequantize_affine


def read_meta(path, *, kind: str, label: str, meta_file: str, format_version: int,
              article: str = "a") -> Tuple[dict, Path]:
    """The metadata of the artifact directory ``path`` (``meta_file`` inside it, read strictly by
    ``files.read_json``) and that file's path, after checking that it is a JSON object of this
    ``kind`` (its ``mlxeff_artifact``) and ``format_version``; ``label`` names the kind in
    messages ("KV prediction")."""
    path = Path(path)
    if not path.is_dir():
        raise MlxeffError(f"no such {label} directory", path)
    file = path / meta_file
    if not file.is_file():
        raise MlxeffError(f"missing {meta_file} (is this {article} {label} directory?)", path)
    meta = read_json(file, expect=None)  # strict and bounded, as every loader reads JSON
    if not isinstance(meta, dict) or meta.get("mlxeff_artifact") != kind:
        raise MlxeffError(f"not {article} {label} artifact (mlxeff_artifact != {kind})", file)
    if meta.get("format_version") != format_version:
        raise MlxeffError(f"unsupported format_version {meta.get('format_version')!r}", file)
    return meta, file


def resolve_dir(path, model_dir, subdir: str) -> Path:
    """``path`` itself, or ``MODEL/<subdir>/<path>`` when only that exists (artifacts saved
    beside the model they were trained for)."""
    p = Path(path)
    if p.is_dir() or model_dir is None:
        return p
    alt = Path(model_dir) / subdir / str(path)
    return alt if alt.is_dir() else p


def load_frozen_base(base_dir, dtype) -> tuple:
    """``(model, tokenizer, disk_dtype)`` for a trainer: the model in ``base_dir`` (its tokenizer
    required), computing in ``dtype``, and the float dtype its weights are stored in -- the final
    norm's, since a quantized vocabulary matrix is packed uint32 -- for saving what was trained.

    Affine 4/8-bit layers are dequantized on every device: a trainer's batches (thousands of
    rows) are compute-bound, where a dense matmul is the fast one, and the frozen weights are
    exactly ``mx.dequantize`` of the stored ones. Measured: on the CPU, validating 1,024 tokens on
    the quantized default model v2 took about 3 minutes. On an H200 (MLX 0.32.4 CUDA, bfloat16)
    with the base left quantized, a probe stopped after 100 s (start-up included) had not finished
    validating 8,192 tokens, and a run stopped after 300 s (start-up and a 65,536-token
    validation included) had not finished its first 64 x 512-token step, where the same model,
    unquantized, trained at 434,000-493,000 tokens/s on an H100 (batches of 32,768 tokens).
    Dequantized, M2R2 then trained at 630,000-693,000 tokens/s on an H100, though one compiled
    probe there still stalled for 70 s before its first step: the quantized matmuls were not the
    whole cause of that stall (``benchmarks/RESULTS.md``, "M2R2 trained on the GPU")."""
    from .. import io

    base, tok = io.load(base_dir)
    if tok is None:
        raise MlxeffError("the base model has no tokenizer files", base_dir)
    disk_dtype = base.transformer.norm.weight.dtype
    dequantize_affine(base)
    base.set_dtype(dtype)
    return base, tok, disk_dtype
