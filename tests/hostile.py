"""Builders for hostile-file tests: tiny models in every format, and byte-level editors."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import mlx.core as mx

TOKENS = [[1, 5, 9, 33, 2, 7]]


def tiny_model(seed: int = 0, vocab: int = 64):
    from conftest import make_model, tiny_args

    return make_model(tiny_args(vocab_size=vocab), seed=seed)


def mlxeff_dir(path: Path, *, tokenizer=None, quantize=None, dtype=mx.float32, vocab: int = 64) -> Path:
    """A saved mlxeff directory of the tiny model (optionally affine-quantized / another dtype)."""
    import mlxeff

    model = tiny_model(vocab=vocab)
    model.set_dtype(dtype)
    if quantize == "affine":
        from mlxeff.quant.affine import quantize_affine

        quantize_affine(model, bits=4, group_size=32, embedding_bits=8)
    mlxeff.save(model, tokenizer, path)
    return path


def read_st(path: Path):
    """(header bytes, data bytes) of a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n], raw[8 + n:]


def write_st(path: Path, header: bytes, data: bytes, length=None) -> None:
    Path(path).write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


def edit_header(path: Path, fn) -> None:
    """Rewrite a safetensors header through ``fn(dict) -> dict | bytes`` (data unchanged)."""
    header, data = read_st(path)
    new = fn(json.loads(header))
    write_st(path, new if isinstance(new, bytes) else json.dumps(new).encode(), data)


def first_tensor(header: dict, dtype: str = None) -> str:
    names = sorted((v["data_offsets"][0], k) for k, v in header.items()
                   if k != "__metadata__" and (dtype is None or v["dtype"] == dtype))
    return names[0][1]


def corenet_file(path: Path, model=None, **kw) -> Path:
    from conftest import write_corenet

    return write_corenet(model or tiny_model(), path, **kw)


def rezip(src: Path, dst: Path, *, member_fn=None, compress=zipfile.ZIP_STORED, extra=()) -> Path:
    """Copy a zip, rewriting members through ``member_fn(name, bytes) -> bytes`` and compressing
    them with ``compress``; ``extra``: (name, bytes, compress_type) members to add."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if member_fn is not None:
                data = member_fn(info.filename, data)
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data,
                          compress_type=compress)
        for name, data, ctype in extra:
            zout.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=ctype)
    return dst


def logits_finite(model) -> bool:
    out = model(mx.array(TOKENS))
    return bool(mx.all(mx.isfinite(out)).item())


def state_with(obj_fn, path: Path) -> Path:
    """A torch file whose object is ``obj_fn(state)`` for the tiny model's CoreNet state dict."""
    from conftest import corenet_state

    from mlxeff.convert import torch_save as ts

    state = corenet_state(tiny_model())
    return ts.save(obj_fn(state), path)


def pickle_member(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return next(n for n in z.namelist() if n.endswith("/data.pkl"))
