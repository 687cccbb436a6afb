"""Read PyTorch checkpoints (``torch.save`` zip format) without torch and without running code.

The format: a zip archive (entries stored, not compressed) whose single top folder holds
``data.pkl`` (the object graph, pickle protocol 2), ``data/<key>`` (one raw storage per key),
``byteorder`` (``little`` or ``big``; absent in old files: little) and ``version``. In the pickle a
tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
and a storage is a persistent id ``('storage', torch.<Dtype>Storage, key, location, numel)``.

Safety: unpickling can call any importable function, so ``torch.load`` on an untrusted file runs
code. Here every global a pickle names is resolved through an allow-list that maps it to a small
function written for this module (never the real torch function); anything else is refused before
the pickle's first call runs. Two layers: a static scan of the opcode stream rejects a foreign
global before unpickling starts, and ``find_class`` refuses at run time whatever the scan could not
resolve (names built on the stack). Tensors come out as ``TorchTensor`` placeholders (storage,
offset, shape, stride) that are checked to lie inside their storage; data are read later, one
storage at a time, straight from the zip member into a fresh buffer (CRC checked).

Bounded work: ``data.pkl`` is at most ``MAX_PICKLE_BYTES``; the scan refuses a memo index beyond
the number of objects memoized so far (a 14-byte pickle with ``LONG_BINPUT 2**28`` would make the
unpickler's memo table grow to 4 GiB) and a length that runs past the data; sizes, strides,
offsets and storage sizes must be below 2^62 before any arithmetic on them; state-dict keys are
strings of at most ``MAX_KEY`` characters; a storage member must hold exactly ``numel * itemsize``
bytes of its declared type (a float32 storage re-declared as float16 is refused); zip members are
read by ``zip_reader`` (stored or deflate only, ratio-limited, never past the declared size).
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from mlxeff.errors import MlxeffError
from mlxeff.files import open_regular, short_repr

from .tensors import NUMPY_DTYPES, TensorRef, itemsize
from .zip_reader import ZipReader

STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}
TORCH_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                     "uint8", "bool", "double", "float", "half", "long", "int", "short")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_PICKLE_BYTES = 4 << 20  # a state dict's pickle takes ~150 bytes per tensor
MAX_KEY = 1024
MAX_INT = 1 << 62
MAX_RANK = 64


class UnsafePickle(MlxeffError):
    pass


# --- placeholders the allow-listed globals build ---------------------------------------------
# Every object a pickle can reach refuses BUILD (the opcode that sets attributes or calls
# __setstate__), so a pickle cannot rewrite a validated storage or one of the functions below.

class _Sealed:
    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}")


@dataclass(frozen=True)
class StorageType(_Sealed):
    __slots__ = ("dtype",)
    dtype: str


@dataclass(frozen=True)
class TorchDtype(_Sealed):
    __slots__ = ("name",)
    name: str


@dataclass(frozen=True)
class TypeMarker(_Sealed):
    __slots__ = ("name",)
    name: str  # torch.Tensor or torch.nn.Parameter: only usable as _rebuild_from_type_v2's type


@dataclass(frozen=True)
class Storage(_Sealed):
    __slots__ = ("key", "dtype", "numel")
    key: str
    dtype: str
    numel: int


class SafeCall(_Sealed):
    """An allow-listed global: calls ``fn``; no attribute of it can be set from a pickle."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        object.__setattr__(self, "fn", fn)

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError("allow-listed globals are read-only")

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return f"SafeCall({self.fn.__name__})"


class TorchTensor(_Sealed):
    """A tensor as the pickle describes it; no data."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: Storage, offset: int, shape: Tuple[int, ...], stride: Tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    @property
    def contiguous(self) -> bool:
        expected, acc = [], 1
        for d in reversed(self.shape):
            expected.append(acc)
            acc *= d
        return all(st == ex for d, st, ex in zip(self.shape, self.stride, reversed(expected)) if d > 1)

    def __repr__(self):
        return f"TorchTensor({self.storage.dtype}, shape={self.shape})"


def _small_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and -MAX_INT < x < MAX_INT


def _ints(v, what):
    if (not isinstance(v, (tuple, list)) or len(v) > MAX_RANK
            or not all(_small_int(x) for x in v)):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of at most {MAX_RANK} integers, "
                                     f"got {short_repr(v)}")
    return tuple(v)


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("tensor storage is not a storage reference")
    if not _small_int(storage_offset) or storage_offset < 0:
        raise pickle.UnpicklingError(f"bad storage offset {short_repr(storage_offset)}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride}")
    if math.prod(size) > 0:
        last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
        if last >= storage.numel:
            raise pickle.UnpicklingError(
                f"tensor of size {size} (offset {storage_offset}, stride {stride}) reaches element "
                f"{last} of a storage of {storage.numel}"
            )
    return TorchTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, TorchTensor):
        raise pickle.UnpicklingError("a parameter must wrap a tensor")
    return data


_REBUILDERS = {f: SafeCall(f) for f in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter)}


def _rebuild_from_type_v2(func, new_type, args, state):
    if not any(func is r for r in _REBUILDERS.values()) or not isinstance(new_type, TypeMarker) or not isinstance(args, tuple):
        raise pickle.UnpicklingError("unsupported tensor subclass reconstruction")
    return func(*args)


def _device(*args):
    return str(args[0]) if args else "cpu"


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol 2 pickles bytes as _codecs.encode(str, 'latin1').
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("unsupported _codecs.encode call")
    return obj.encode(encoding)


_NP_DTYPE_CODES = {"f8", "f4", "f2", "i8", "i4", "i2", "i1", "u8", "u4", "u2", "u1", "b1"}


class NumpyDtype:
    """``numpy.dtype(code)`` as pickled (then BUILD with its state); only the byte order is used."""

    __slots__ = ("code", "order")

    def __init__(self, code, align=False, copy=True):
        if not isinstance(code, str) or code not in _NP_DTYPE_CODES:
            raise pickle.UnpicklingError(f"unsupported numpy dtype {code!r:.40}")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        # numpy's own __setstate__ is not called on pickle data: keep the byte order, drop the rest
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "="
        if order not in ("<", ">", "=", "|"):
            raise pickle.UnpicklingError(f"bad numpy byte order {order!r:.10}")
        self.order = order

    def dtype(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.order) if self.order in "<>" else np.dtype(self.code)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype().itemsize:
        raise pickle.UnpicklingError("unsupported numpy scalar")
    return np.frombuffer(data, dtype=dtype.dtype())[0].item()


SAFE_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): _REBUILDERS[_rebuild_tensor],
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILDERS[_rebuild_tensor_v2],
    ("torch._utils", "_rebuild_parameter"): _REBUILDERS[_rebuild_parameter],
    ("torch._utils", "_rebuild_parameter_with_state"): _REBUILDERS[_rebuild_parameter],
    ("torch._tensor", "_rebuild_from_type_v2"): SafeCall(_rebuild_from_type_v2),
    ("torch", "Tensor"): TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): TypeMarker("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    ("torch", "device"): SafeCall(_device),
    ("_codecs", "encode"): SafeCall(_codecs_encode),
    ("numpy", "dtype"): NumpyDtype,
    ("numpy.core.multiarray", "scalar"): SafeCall(_np_scalar),
    ("numpy._core.multiarray", "scalar"): SafeCall(_np_scalar),
}
SAFE_GLOBALS.update({("torch", n): StorageType(d) for n, d in STORAGE_DTYPES.items()})
SAFE_GLOBALS.update({("torch", n): TorchDtype(n) for n in TORCH_DTYPE_NAMES})


def _refuse(module: str, name: str, path) -> UnsafePickle:
    return UnsafePickle(
        f"refusing to load: the pickle calls {module}.{name}, which a tensor checkpoint does not "
        "need (loading it could run code)", path,
    )


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}


def scan_globals(data: bytes, path=None, check_globals: bool = True) -> None:
    """Refuse a pickle naming any global outside the allow-list (``check_globals``), a memo index
    beyond the objects memoized so far, or a length past the data -- before anything is
    unpickled (``pickletools.genops`` reads every argument without building objects)."""
    recent = []  # the last two value-producing opcodes (memo writes do not push anything)
    memoized = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                if op.name != "MEMOIZE" and not 0 <= arg <= memoized:
                    raise MlxeffError(f"corrupt pickle in the checkpoint (memo index {short_repr(arg)} after "
                                      f"{memoized} memoized objects)", path)
                memoized += 1
                continue
            if not check_globals:
                continue
            if op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                if (module, name) not in SAFE_GLOBALS:
                    raise _refuse(module, name, path)
            elif op.name == "STACK_GLOBAL" and len(recent) == 2 and all(o in _STRING_OPS for o, _ in recent):
                module, name = recent[0][1], recent[1][1]
                if (module, name) not in SAFE_GLOBALS:
                    raise _refuse(module, name, path)
            # Names pushed any other way (e.g. fetched from the memo) are checked by find_class.
            recent = (recent + [(op.name, arg)])[-2:]
    except MlxeffError:
        raise
    except Exception as e:  # pickletools raises ValueError on a truncated or malformed stream
        raise MlxeffError(f"corrupt pickle in the checkpoint ({_one_line(e)})", path) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path=None):
        super().__init__(io.BytesIO(data))
        self.path = path
        self.storages: Dict[str, Storage] = {}

    def find_class(self, module, name):
        try:
            return SAFE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _refuse(module, name, self.path) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType):
            raise pickle.UnpicklingError("storage of an unsupported type")
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_]{1,64}", key):
            raise pickle.UnpicklingError(f"bad storage key {short_repr(key)}")
        if not _small_int(numel) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage size {short_repr(numel)}")
        storage = Storage(key, stype.dtype, numel)
        seen = self.storages.setdefault(key, storage)
        if seen != storage:
            raise pickle.UnpicklingError(f"storage {key} is described twice with different types")
        return storage


def unpickle(data: bytes, path=None, scan: bool = True):
    """Unpickle ``data`` with the allow-list; returns (object, {key: Storage})."""
    scan_globals(data, path, check_globals=scan)  # the memo and length bounds always apply
    up = RestrictedUnpickler(data, path)
    try:
        return up.load(), up.storages
    except MlxeffError:
        raise
    except Exception as e:
        raise MlxeffError(f"corrupt pickle in the checkpoint ({type(e).__name__}: {_one_line(e)})", path) from None


# --- the zip archive ------------------------------------------------------------------------

class TorchArchive:
    """A ``torch.save`` zip file: the unpickled object plus on-demand storage reads."""

    def __init__(self, path):
        self.path = Path(path)
        self._check_magic()
        self.zip = ZipReader(self.path)
        names = self.zip.names()
        pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if any(n.endswith("/constants.pkl") for n in names):
            raise MlxeffError("a TorchScript archive, not a checkpoint of tensors; save a state_dict", self.path)
        if len(pkls) != 1:
            raise MlxeffError("not a torch checkpoint (no <name>/data.pkl in the zip)", self.path)
        self.prefix = pkls[0][: -len("data.pkl")]
        self.byteorder = "little"
        if self.prefix + "byteorder" in names:
            self.byteorder = self.zip.read(self.prefix + "byteorder", 16).tobytes().decode("ascii", "replace").strip()
            if self.byteorder not in ("little", "big"):
                raise MlxeffError(f"unknown byteorder {short_repr(self.byteorder)}", self.path)
        data = self.zip.read(pkls[0], MAX_PICKLE_BYTES).tobytes()
        self.obj, self.storages = unpickle(data, self.path)
        self._cache: Dict[str, np.ndarray] = {}
        self._uses: Dict[str, int] = {}

    def _check_magic(self):
        try:
            with open_regular(self.path, "checkpoint") as f:  # a FIFO or device is refused unopened
                head = f.read(64)
        except OSError as e:
            raise MlxeffError(f"cannot read ({e.strerror or e})", self.path) from None
        if head[:4] == b"PK\x03\x04":
            return
        if head[:2] == b"\x80\x02" and head[2:3] == pickle.LONG1:
            n = head[3]
            if int.from_bytes(head[4:4 + n], "little", signed=True) == LEGACY_MAGIC:
                raise MlxeffError(
                    "legacy torch serialization (PyTorch < 1.6) is not supported; re-save it with "
                    "a current torch.save", self.path,
                )
        if not head:
            raise MlxeffError("empty file", self.path)
        raise MlxeffError("not a torch checkpoint (not a zip archive)", self.path)

    def _storage_bytes(self, storage: Storage) -> np.ndarray:
        # torch writes exactly numel * itemsize bytes per storage: any other size means the
        # declared type or size is wrong (a FloatStorage re-declared as HalfStorage).
        name = f"{self.prefix}data/{storage.key}"
        if name not in self.zip.members:
            raise MlxeffError(f"missing storage {name} (truncated checkpoint?)", self.path)
        return self.zip.read(name, storage.numel * itemsize(storage.dtype), exact=True)

    def storage_array(self, storage: Storage) -> np.ndarray:
        """The storage as a flat array of its dtype (bfloat16 as uint16), native byte order."""
        if storage.key in self._cache:
            arr = self._cache[storage.key]
        else:
            arr = self._storage_bytes(storage).view(NUMPY_DTYPES[storage.dtype])
            if self.byteorder != ("little" if np.little_endian else "big"):
                arr = arr.byteswap()
        left = self._uses.get(storage.key, 1) - 1
        self._uses[storage.key] = left
        if left > 0:
            self._cache[storage.key] = arr
        else:
            self._cache.pop(storage.key, None)
        return arr

    def tensor_array(self, t: TorchTensor) -> np.ndarray:
        flat = self.storage_array(t.storage)
        n = math.prod(t.shape)
        if t.contiguous:
            return flat[t.offset: t.offset + n].reshape(t.shape)
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset:], shape=t.shape, strides=[s * flat.itemsize for s in t.stride], writeable=False
        )
        return np.ascontiguousarray(view)

    def refs(self, tensors: Dict[str, TorchTensor]) -> Dict[str, TensorRef]:
        """TensorRefs for ``tensors`` (name -> placeholder); shared storages are read once."""
        self._uses = {}
        for t in tensors.values():
            self._uses[t.storage.key] = self._uses.get(t.storage.key, 0) + 1
        return {
            name: TensorRef(name, t.storage.dtype, t.shape, self.path, self._reader(t))
            for name, t in tensors.items()
        }

    def _reader(self, t: TorchTensor):
        return lambda: self.tensor_array(t)

    def close(self):
        self.zip.close()


def load_archive(path) -> TorchArchive:
    return TorchArchive(path)


def tensors_in(obj) -> Dict[str, TorchTensor]:
    """The ``name -> tensor`` entries of a state dict; non-tensor entries are an error."""
    if not isinstance(obj, dict):
        raise TypeError("not a dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not 0 < len(k) <= MAX_KEY:
            raise TypeError(f"key {short_repr(k)} is not a string of 1 to {MAX_KEY} characters")
        if isinstance(v, TorchTensor):
            out[k] = v
        else:
            raise TypeError(f"entry {short_repr(k)} is a {type(v).__name__}, not a tensor")
    return out


def find_state_dict(obj, path, keys=("model_state_dict", "state_dict", "model")) -> Tuple[str, Dict[str, TorchTensor]]:
    """A flat state dict, or the first of ``keys`` holding one (a training checkpoint)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, TorchTensor) for v in obj.values()):
        try:
            return "", tensors_in(obj)
        except TypeError as e:
            raise MlxeffError(f"not a state dict of tensors ({e})", path) from None
    if isinstance(obj, dict):
        for k in keys:
            if k in obj:
                try:
                    return k, tensors_in(obj[k])
                except TypeError as e:
                    raise MlxeffError(f"'{k}' is not a state dict of tensors ({e})", path) from None
    what = (f"a dict with keys {[short_repr(k) for k in list(obj)[:6]]}" if isinstance(obj, dict)
            else type(obj).__name__)
    raise MlxeffError(f"no state dict of tensors found (the checkpoint holds {what})", path)


def read_state_dict(path, keys=("model_state_dict", "state_dict", "model")) -> Tuple[TorchArchive, Dict[str, TensorRef]]:
    """Open a torch checkpoint and return its archive and the model's lazy tensors."""
    archive = load_archive(path)
    _, tensors = find_state_dict(archive.obj, archive.path, keys)
    return archive, archive.refs(tensors)
