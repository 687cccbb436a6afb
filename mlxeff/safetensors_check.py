"""A strict safetensors header reader: the format's rules, checked before any tensor is read.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian ``N``, then ``N``
bytes of UTF-8 JSON, then the data. The JSON maps tensor names to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the data) and may hold ``__metadata__``, a
map of strings to strings. MLX's ``mx.load`` accepts headers the format forbids and reads them
wrongly (a dimension of 2^32 + 192 loads as 192, a fractional dimension or offset is truncated,
overlapping tensors share bytes), so every loader in this package validates the header here
first. Refused, as the reference implementation refuses them:

- a header larger than ``MAX_HEADER`` or than the file, not UTF-8, or not starting with ``{``
  (a byte-order mark or leading blank); trailing blanks (padding) are allowed;
- invalid JSON, duplicate keys, ``NaN``/``Infinity``, entries that are not objects with exactly
  ``dtype``, ``shape`` and ``data_offsets``, a ``__metadata__`` that is not strings to strings (or null);
- an unknown dtype, a dimension or offset that is not an exact non-negative integer (``2.0``,
  ``true``, ``-1``), a byte span that differs from ``prod(shape) * itemsize``;
- offsets that overlap, leave a gap, or do not cover the data exactly to the end of the file.

Deviation: dimensions must be below 2^31, since MLX's shapes are 32-bit (the reference allows 64
bits). ``MAX_HEADER`` is 16 MiB (the reference: 100 MB): real headers are kilobytes (tens of
thousands of tensors fit in 16 MiB) and a parsed header costs several times its size in memory.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Tuple

from .errors import MlxeffError
from .files import open_regular, parse_json, short_repr

MAX_HEADER = 16 << 20
MAX_DIM = (1 << 31) - 1
MAX_RANK = 16
MAX_NAME = 1024

# safetensors dtype code -> (item size in bytes, dtype name as this package spells it)
DTYPES = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"),
    "U64": (8, "uint64"), "U32": (4, "uint32"), "U16": (2, "uint16"), "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
# What mx.load reads faithfully (it has no float64 and reads F8 codes as uint8).
MLX_DTYPES = frozenset(DTYPES) - {"F64"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # this package's name: float16, bfloat16, uint32, ...
    shape: Tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    path: Path
    file_size: int
    data_start: int
    tensors: Dict[str, TensorInfo] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start


def _exact_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path, dtypes: Iterable[str] = MLX_DTYPES) -> Header:
    """Validate ``path``'s safetensors header (see the module docstring); raise one MlxeffError."""
    path = Path(path)
    with open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise MlxeffError(f"truncated or corrupt safetensors file ({size} bytes, no header)", path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise MlxeffError(f"corrupt safetensors file: header of {n:,} bytes exceeds the limit of "
                              f"{MAX_HEADER:,}", path)
        if 8 + n > size:
            raise MlxeffError(f"truncated or corrupt safetensors file (header of {n:,} bytes, file of "
                              f"{size:,})", path)
        raw = f.read(n)
    if len(raw) != n:
        raise MlxeffError("the file changed while its header was read", path)
    if not raw.startswith(b"{"):
        raise MlxeffError("corrupt safetensors header: does not start with '{' "
                          f"(starts with {raw[:4]!r})", path)
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise MlxeffError("corrupt safetensors header: not a JSON object", path)
    out = Header(path, size, 8 + n)
    allowed = set(dtypes)
    for name, info in header.items():
        if name == "__metadata__":  # null (as MLX writes it) or strings to strings
            if info is not None and (not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values())):
                raise MlxeffError("corrupt safetensors header: __metadata__ must map strings to strings", path)
            out.metadata = info or {}
            continue
        out.tensors[name] = _entry(name, info, allowed, out.data_start, path)
    _check_layout(out)
    return out


def _entry(name: str, info, allowed, data_start: int, path) -> TensorInfo:
    label = short_repr(name, 80)
    if not name or len(name) > MAX_NAME:
        raise MlxeffError(f"corrupt safetensors header: tensor name {label} is empty or too long", path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape: valid JSON, not Unicode
        raise MlxeffError(f"corrupt safetensors header: tensor name {label} is not valid Unicode", path) from None
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        keys = sorted(info)[:5] if isinstance(info, dict) else type(info).__name__
        raise MlxeffError(f"corrupt safetensors entry {label}: expected dtype, shape and data_offsets, "
                          f"found {short_repr(keys)}", path)
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise MlxeffError(f"corrupt safetensors entry {label}: unknown dtype {short_repr(code)}", path)
    if code not in allowed:
        raise MlxeffError(f"tensor {label} has dtype {code}, which this reader does not support "
                          f"(supported: {', '.join(sorted(allowed))})", path)
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(_exact_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        raise MlxeffError(f"corrupt safetensors entry {label}: shape {short_repr(shape)} is not a list of "
                          f"at most {MAX_RANK} integers in [0, 2^31)", path)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_exact_int(o) and o >= 0 for o in offsets):
        raise MlxeffError(f"corrupt safetensors entry {label}: data_offsets must be two non-negative "
                          "integers", path)
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    itemsize = DTYPES[code][0]
    if end < begin or end - begin != numel * itemsize:
        raise MlxeffError(f"corrupt safetensors entry {label}: data_offsets [{begin}, {end}] hold "
                          f"{end - begin} bytes, {code} {tuple(shape)} needs {numel * itemsize}", path)
    return TensorInfo(name, DTYPES[code][1], tuple(shape), data_start + begin, data_start + end)


def _check_layout(h: Header) -> None:
    """Byte spans must tile the data exactly: sorted, contiguous, no overlap, no gap, no tail."""
    pos = h.data_start
    for t in sorted(h.tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else "leaves a gap before it"
            raise MlxeffError(f"corrupt safetensors header: tensor {short_repr(t.name, 80)} at data offset "
                              f"{t.begin - h.data_start} {what}", h.path)
        pos = t.end
    if pos != h.file_size:
        if pos > h.file_size:
            raise MlxeffError(f"truncated safetensors file: the tensors need {pos:,} bytes, the file has "
                              f"{h.file_size:,}", h.path)
        raise MlxeffError(f"corrupt safetensors file: {h.file_size - pos:,} bytes after the last tensor", h.path)


def read_index(path) -> Tuple[Dict[str, str], dict]:
    """A ``*.safetensors.index.json``: its ``weight_map`` (tensor name -> shard file name) and
    ``metadata``."""
    from .files import read_json

    path = Path(path)
    index = read_json(path, what="weight index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MlxeffError("invalid weight index: no weight_map object", path)
    metadata = index.get("metadata", {})
    if not isinstance(metadata, dict):
        raise MlxeffError("invalid weight index: metadata is not an object", path)
    for name, file in weight_map.items():
        if not _plain_file_name(file):
            raise MlxeffError(f"invalid weight index: {short_repr(name)} maps to {short_repr(file)}, "
                              "not a file name in this directory", path)
    return weight_map, metadata


def _plain_file_name(name) -> bool:
    """A name of a file in the same directory that every filesystem call accepts."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
        return False
    try:
        return len(name.encode("utf-8")) <= 255  # lone surrogates do not encode
    except UnicodeEncodeError:
        return False


def check_shards(index_path, weight_map: Dict[str, str], headers: Dict[str, Header]) -> None:
    """Every tensor the index names lies in the shard it names, and every shard tensor is indexed."""
    for name, file in weight_map.items():
        h = headers.get(file)
        if h is None or name not in h.tensors:
            raise MlxeffError(f"the index places {short_repr(name)} in {file}, which does not hold it", index_path)
    for file, h in headers.items():
        for name in h.tensors:
            if weight_map.get(name) != file:
                raise MlxeffError(f"{short_repr(name)} is in {file} but the index says "
                                  f"{short_repr(weight_map.get(name))}", index_path)
