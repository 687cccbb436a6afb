"""Write files in the ``torch.save`` zip format without torch.

The inverse of ``torch_pickle``: a zip archive ``<name>/data.pkl`` (pickle protocol 2 with
``torch._utils._rebuild_tensor_v2`` calls and ``('storage', torch.<Dtype>Storage, key, 'cpu',
numel)`` persistent ids), ``<name>/byteorder``, one ``<name>/data/<key>`` entry per storage (stored,
64-byte aligned as torch aligns them), ``<name>/version`` and ``<name>/.data/serialization_id``.
``torch.load`` reads what this writes. Used for test fixtures and benchmarks (a CoreNet-shaped
checkpoint without torch), and usable as a torch-free export.

Storages may be shared by several tensors, with offsets and arbitrary strides; data may be given
lazily (a callable returning the flat array), so a multi-gigabyte file is written holding one
storage in memory at a time.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np

from .torch_pickle import STORAGE_DTYPES
from .tensors import NUMPY_DTYPES

STORAGE_CLASS = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
ALIGNMENT = 64


class _Global:
    """Pickles as a reference to ``module.name`` without that module existing here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self.__name__ = name

    def __call__(self, *args):  # pickle insists that a reduce function is callable
        raise RuntimeError("placeholder")


_GLOBALS = {}


def _global(module: str, name: str) -> _Global:
    # One object per name, so the pickle memo turns repeats into BINGETs, as torch's files have.
    return _GLOBALS.setdefault((module, name), _Global(module, name))


@dataclass(eq=False)
class Storage:
    """A flat buffer of ``numel`` elements of ``dtype`` (``bfloat16`` given as uint16 bits)."""

    dtype: str
    numel: int
    data: Union[np.ndarray, Callable[[], np.ndarray]]

    def array(self) -> np.ndarray:
        arr = self.data() if callable(self.data) else self.data
        arr = np.ascontiguousarray(arr).reshape(-1)
        if arr.dtype != np.dtype(NUMPY_DTYPES[self.dtype]) or arr.size != self.numel:
            raise ValueError(f"storage data: expected {self.numel} x {self.dtype}, got {arr.size} x {arr.dtype}")
        return arr


@dataclass(eq=False)
class Tensor:
    storage: Storage
    shape: Tuple[int, ...]
    stride: Optional[Tuple[int, ...]] = None  # None: contiguous
    offset: int = 0
    requires_grad: bool = False
    _hooks: OrderedDict = field(default_factory=OrderedDict)

    def __reduce__(self):
        stride = self.stride
        if stride is None:
            stride, acc = [], 1
            for d in reversed(self.shape):
                stride.append(acc)
                acc *= d
            stride = tuple(reversed(stride))
        args = (self.storage, self.offset, tuple(self.shape), tuple(stride), self.requires_grad, self._hooks)
        return _global("torch._utils", "_rebuild_tensor_v2"), args


def tensor(arr: np.ndarray, dtype: Optional[str] = None) -> Tensor:
    """A contiguous tensor holding ``arr`` (pass ``dtype='bfloat16'`` with uint16 bits)."""
    dtype = dtype or np.dtype(arr.dtype).name
    return Tensor(Storage(dtype, arr.size, arr), tuple(arr.shape))


def lazy_tensor(shape, dtype: str, make: Callable[[], np.ndarray]) -> Tensor:
    """A contiguous tensor whose data ``make()`` produces only when the file is written."""
    return Tensor(Storage(dtype, math.prod(shape), make), tuple(shape))


def bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, f, storages: "OrderedDict[int, Tuple[str, Storage]]"):
        super().__init__(f, protocol=2)
        self.storages = storages

    def save_placeholder_global(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = save_placeholder_global

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        if id(obj) not in self.storages:
            self.storages[id(obj)] = (str(len(self.storages)), obj)
        key, _ = self.storages[id(obj)]
        return ("storage", _global("torch", STORAGE_CLASS[obj.dtype]), key, "cpu", obj.numel)


def _aligned_info(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = zf.fp.tell() + 30 + len(name.encode()) + 4  # local header + name + extra-field header
    pad = (-start) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def save(obj, path, *, archive_name: Optional[str] = None, byteorder: str = "little") -> Path:
    """Write ``obj`` (dicts, lists, numbers, strings and ``Tensor``s) as ``torch.save`` would."""
    path = Path(path)
    name = archive_name or path.name.split(".")[0] or "archive"
    storages: "OrderedDict[int, Tuple[str, Storage]]" = OrderedDict()
    buf = io.BytesIO()
    _Pickler(buf, storages).dump(obj)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr(_aligned_info(zf, f"{name}/data.pkl"), buf.getvalue())
            zf.writestr(_aligned_info(zf, f"{name}/byteorder"), byteorder)
            for key, storage in storages.values():
                arr = storage.array()
                if byteorder != ("little" if np.little_endian else "big"):
                    arr = arr.byteswap()
                info = _aligned_info(zf, f"{name}/data/{key}")
                info.file_size = arr.nbytes
                with zf.open(info, "w", force_zip64=arr.nbytes >= 1 << 31) as w:
                    w.write(memoryview(arr).cast("B"))
                del arr
            zf.writestr(_aligned_info(zf, f"{name}/version"), "3\n")
            zf.writestr(_aligned_info(zf, f"{name}/.data/serialization_id"), "0" * 40)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
