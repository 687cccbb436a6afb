"""Tensors read lazily from checkpoint files, and a strict safetensors reader.

A ``TensorRef`` knows a tensor's name, dtype and shape without reading its data, so a conversion
checks every name and shape against the model before it reads a byte, then reads one tensor at a
time (peak memory: the output model plus one tensor). Data come back as NumPy arrays; bfloat16,
which NumPy lacks, travels as its uint16 bit pattern and becomes ``mx.bfloat16`` in ``to_mlx``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from mlxeff.errors import MlxeffError

# dtype name -> NumPy dtype of the stored bits (bfloat16 as uint16)
NUMPY_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "bool": np.bool_,
}
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def itemsize(dtype: str) -> int:
    return np.dtype(NUMPY_DTYPES[dtype]).itemsize


@dataclass
class TensorRef:
    """A tensor in a file: metadata now, data on ``read()``."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: Path
    reader: Callable[[], np.ndarray]

    def read(self) -> np.ndarray:
        """The data as a C-contiguous NumPy array of ``shape`` (bfloat16 as uint16 bits)."""
        arr = self.reader()
        if tuple(arr.shape) != tuple(self.shape):
            raise MlxeffError(f"{self.name}: read shape {arr.shape}, expected {self.shape}", self.file)
        return arr


def to_mlx(arr: np.ndarray, dtype: str, target: Optional[mx.Dtype] = None, name=None, path=None) -> mx.array:
    """NumPy data of source ``dtype`` -> an evaluated MLX array, cast to ``target`` if given."""
    if dtype not in FLOAT_DTYPES:
        raise MlxeffError(f"weights must be floating point, got {dtype}")
    if dtype == "float64":
        # MLX has no float64 on every backend; float32 is the nearest it can hold.
        arr = arr.astype(np.float32)
    a = mx.array(np.ascontiguousarray(arr))
    if dtype == "bfloat16":
        a = a.view(mx.bfloat16)
    if target is not None and a.dtype != target:
        a = a.astype(target)
        if target == mx.float16 and mx.any(mx.isinf(a)).item():
            # float16 tops out at 65504; bf16 and fp32 checkpoints can hold larger values
            raise MlxeffError(f"{name or 'a tensor'} has values beyond float16's range; use --dtype "
                              "bfloat16 or float32", path)
    mx.eval(a)
    return a


def read_exact(f, offset: int, nbytes: int, path) -> np.ndarray:
    """``nbytes`` bytes at ``offset`` into a fresh uint8 array (no second copy)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    f.seek(offset)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise MlxeffError(f"file ends {nbytes - got} bytes early (truncated?)", path)
        got += n
    return buf


# --- safetensors -----------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
MAX_HEADER = 100 << 20


def safetensors_refs(path) -> Dict[str, TensorRef]:
    """Parse and validate a safetensors header; every tensor must lie inside the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MlxeffError("truncated safetensors file (no header)", path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise MlxeffError(
                    f"truncated or corrupt safetensors file (header of {n} bytes, file of {size})", path
                )
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxeffError(f"corrupt safetensors header ({e})", path) from None
    except OSError as e:
        raise MlxeffError(f"cannot read ({e.strerror or e})", path) from None
    if not isinstance(header, dict):
        raise MlxeffError("corrupt safetensors header (not a JSON object)", path)
    data_start, data_size = 8 + n, size - 8 - n
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MlxeffError(f"corrupt safetensors entry for {name!r}: {info!r:.120}", path) from None
        need = math.prod(shape) * itemsize(dtype)
        if min(shape, default=0) < 0 or begin < 0 or end - begin != need:
            raise MlxeffError(f"corrupt safetensors entry for {name!r} (size does not match shape)", path)
        if end > data_size:
            raise MlxeffError(
                f"truncated safetensors file: {name} needs bytes up to {data_start + end}, "
                f"the file has {size}", path,
            )
        refs[name] = TensorRef(name, dtype, shape, path, _safetensors_reader(path, data_start + begin, need, dtype, shape))
    return refs


def _safetensors_reader(path, offset, nbytes, dtype, shape):
    def read():
        with open(path, "rb") as f:
            buf = read_exact(f, offset, nbytes, path)
        arr = buf.view(NUMPY_DTYPES[dtype]).reshape(shape)
        return arr if np.little_endian else arr.byteswap()

    return read
