"""Reading files that may come from strangers: regular files only, bounded sizes, strict JSON.

Every reader of a model directory goes through these functions, so that a symlink to
``/dev/zero``, a FIFO or a device is refused before a byte is read (it would be read until memory
runs out, or block forever), a file is never read past a size limit chosen for its kind, and JSON
is parsed strictly: no ``NaN``/``Infinity`` (not JSON), no float that overflows to infinity, no
duplicate keys (two readers could pick different values), no nesting deeper than ``MAX_DEPTH``,
and every failure is one ``MlxeffError`` naming the file.

Choices: symlinks to regular files are followed (the Hugging Face cache is made of them);
integers of more than 4,300 digits are refused by Python's own limit on int conversion, which
``json`` raises as ``ValueError`` and which is reported here like any other syntax error.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Optional

from .errors import MlxeffError

MAX_JSON_BYTES = 16 << 20  # config.json, index files: real ones are a few KB to a few MB
MAX_DEPTH = 64


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, what: str = "file"):
    """Open ``path`` for reading in binary mode if it is (or links to) a regular file.

    The type is checked before opening (opening a FIFO blocks, opening a device may act) and
    again on the open descriptor (the path could have changed in between).
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MlxeffError(f"no such {what}", path) from None
    except OSError as e:
        raise MlxeffError(f"cannot read ({e.strerror or e})", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise MlxeffError(f"expected a regular file, found {_kind(st.st_mode)}", path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MlxeffError(f"cannot read ({e.strerror or e})", path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MlxeffError("expected a regular file (it changed while being opened)", path)
    return os.fdopen(fd, "rb")


def check_regular(path, limit: int, what: str = "file") -> int:
    """The size of ``path`` if it is a regular file of at most ``limit`` bytes; raise otherwise."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
    if size > limit:
        raise MlxeffError(f"{what} of {size:,} bytes exceeds the limit of {limit:,}", path)
    return size


def read_bounded(path, limit: int, what: str = "file") -> bytes:
    """All bytes of a regular file of at most ``limit`` bytes."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise MlxeffError(f"{what} of {size:,} bytes exceeds the limit of {limit:,}", path)
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise MlxeffError(f"cannot read ({e.strerror or e})", path) from None
    if len(data) > limit:
        raise MlxeffError(f"{what} grew beyond the limit of {limit:,} bytes while being read", path)
    return data


def _pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


def _constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _float(text):
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of range")
    return v


def _depth(obj) -> int:
    """Nesting depth of decoded JSON, iteratively (no recursion on hostile input)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def parse_json(data: bytes, path, what: str = "JSON") -> Any:
    """Strict JSON from bytes (UTF-8, no BOM); one ``MlxeffError`` naming ``path`` on any fault."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlxeffError(f"invalid {what}: not UTF-8 (byte {e.start})", path) from None
    if text.startswith("\ufeff"):
        raise MlxeffError(f"invalid {what}: starts with a byte-order mark", path)
    try:
        obj = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)
    except RecursionError:
        raise MlxeffError(f"invalid {what}: nested too deeply", path) from None
    except ValueError as e:  # JSONDecodeError, duplicate keys, NaN, overflow, >4300-digit integers
        raise MlxeffError(f"invalid {what} ({str(e).splitlines()[0][:200]})", path) from None
    if _depth(obj) > MAX_DEPTH:
        raise MlxeffError(f"invalid {what}: nested deeper than {MAX_DEPTH} levels", path)
    return obj


def read_json(path, limit: int = MAX_JSON_BYTES, what: str = "JSON file", expect: Optional[type] = dict) -> Any:
    """A strict JSON file of at most ``limit`` bytes, which must decode to ``expect`` (if given)."""
    obj = parse_json(read_bounded(path, limit, what), path, "JSON")
    if expect is not None and not isinstance(obj, expect):
        raise MlxeffError(f"expected a JSON {'object' if expect is dict else expect.__name__}, "
                          f"found {type(obj).__name__}", path)
    return obj


def printable(name: str, limit: int = 200) -> str:
    """A name from a file as it can go into a one-line message: itself if printable, else its repr."""
    text = name[:limit] if isinstance(name, str) else str(name)
    try:
        text.encode("utf-8")
        ok = text.isprintable()
    except UnicodeEncodeError:
        ok = False
    return (text if ok else repr(text)) + ("..." if isinstance(name, str) and len(name) > limit else "")


def short_repr(value, limit: int = 60) -> str:
    """``repr`` for error messages that never fails or explodes (huge ints, deep nesting)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<integer of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes)):
        r = repr(value[:limit])
        return r if len(value) <= limit else r + "..."
    if isinstance(value, (int, float, bool)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)) and len(value) <= 8 and all(
            v is None or isinstance(v, (int, float, str)) for v in value):
        inner = ", ".join(short_repr(v, 20) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"
