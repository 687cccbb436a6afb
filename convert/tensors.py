"""Tensors read lazily from checkpoint files, and a strict safetensors reader.

A ``TensorRef`` knows a tensor's name, dtype and shape without reading its data, so a conversion
checks every name and shape against the model before it reads a byte, then reads one tensor at a
time (peak memory: the output model plus one tensor). Data come back as NumPy arrays; bfloat16,
which NumPy lacks, travels as its uint16 bit pattern and becomes ``mx.bfloat16`` in ``to_mlx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from mlxeff.errors import MlxeffError
from mlxeff.values import VALUE_LIMIT, within_value_limit
from mlxeff.safetensors_check import DTYPES, read_header

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


def to_mlx(arr: np.ndarray, dtype: str, target: Optional[mx.Dtype], name: str, path) -> mx.array:
    """NumPy data of source ``dtype`` -> an evaluated MLX array, cast to ``target`` if given.

    Values must be finite and within ``mlxeff.values.VALUE_LIMIT`` (what ``mlxeff.load`` accepts), and
    still finite after the cast (float16 tops out at 65504)."""
    if dtype not in FLOAT_DTYPES:
        raise MlxeffError(f"{name}: weights must be floating point, got {dtype}", path)
    if dtype == "float64":
        # MLX has no float64 on every backend; float32 is the nearest it can hold.
        arr = arr.astype(np.float32)
    a = mx.array(np.ascontiguousarray(arr))
    if dtype == "bfloat16":
        a = a.view(mx.bfloat16)
    if not within_value_limit(a).item():
        raise MlxeffError(f"{name} holds NaN, infinite or out-of-range values (beyond +-{VALUE_LIMIT:g})", path)
    if target is not None and a.dtype != target:
        a = a.astype(target)
        if target == mx.float16 and mx.any(mx.isinf(a)).item():
            # float16 tops out at 65504; bf16 and fp32 checkpoints can hold larger values
            raise MlxeffError(f"{name} has values beyond float16's range; use --dtype "
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

def safetensors_refs(path) -> Dict[str, TensorRef]:
    """Lazy tensors of a safetensors file whose header ``mlxeff.safetensors_check`` validated."""
    path = Path(path)
    header = read_header(path, dtypes=[code for code, (_, name) in DTYPES.items() if name in NUMPY_DTYPES])
    return {
        name: TensorRef(name, t.dtype, t.shape, path, _safetensors_reader(path, t.begin, t.nbytes, t.dtype, t.shape))
        for name, t in header.tensors.items()
    }


def _safetensors_reader(path, offset, nbytes, dtype, shape):
    def read():
        with open(path, "rb") as f:
            buf = read_exact(f, offset, nbytes, path)
        arr = buf.view(NUMPY_DTYPES[dtype]).reshape(shape)
        return arr if np.little_endian else arr.byteswap()

    return read
