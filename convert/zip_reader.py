"""Bounded reads of zip members (the container of ``torch.save`` files).

Python's ``zipfile`` parses the central directory well but reads members with every method it
knows (bzip2, lzma, ...), inflates them to whatever size the directory declares, and raises a zoo
of exception types on damaged input. Here ``zipfile`` only lists the members (its whole parse
wrapped, the central directory bounded first); each member is then read by this module:

- only ``stored`` (what ``torch.save`` writes) and ``deflate`` members, not encrypted;
- the size the caller expects is the most that is read or inflated, and a deflated member may not
  declare more than ``MAX_RATIO`` times its compressed size (a zip bomb's 7.6 MB file holding
  5 GB of zeros is refused from its directory entry, before a byte is inflated);
- the local header must agree with the directory (signature, name) and the data must lie inside
  the file; the CRC-32 is checked.

Every failure is one ``MlxeffError`` naming the file.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Dict

import numpy as np

from mlxeff.errors import MlxeffError

from .tensors import read_exact

MAX_CENTRAL_DIRECTORY = 16 << 20  # bytes; a checkpoint's directory holds ~100 bytes per tensor
MAX_RATIO = 64  # deflate reaches ~1.1x on weights and ~10x on a pickle; a bomb needs ~1000x
_EOCD, _EOCD64_LOCATOR, _EOCD64 = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"


def central_directory_size(f, size: int) -> int:
    """The central directory's size as the end records declare it (found as ``zipfile`` finds
    them: the last 22 bytes, else the last end-record signature in the final 64 KiB)."""
    tail_len = min(size, (1 << 16) + 22)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = len(tail) - 22 if tail[-22:-18] == _EOCD else tail.rfind(_EOCD)
    if pos < 0 or len(tail) - pos < 22:
        raise zipfile.BadZipFile("no end of central directory record")
    cd_size = struct.unpack("<I", tail[pos + 12:pos + 16])[0]
    locator = pos - 20
    if locator >= 0 and tail[locator:locator + 4] == _EOCD64_LOCATOR:
        (offset,) = struct.unpack("<Q", tail[locator + 8:locator + 16])
        if offset > size - 56:
            raise zipfile.BadZipFile("zip64 end record outside the file")
        f.seek(offset)
        record = f.read(56)
        if record[:4] != _EOCD64:
            raise zipfile.BadZipFile("corrupt zip64 end record")
        cd_size = struct.unpack("<Q", record[40:48])[0]
    return cd_size


class ZipReader:
    """The members of a zip file, read with the bounds of the module docstring."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                cd = central_directory_size(f, self.size)
            if cd > min(MAX_CENTRAL_DIRECTORY, self.size):
                raise zipfile.BadZipFile(f"central directory of {cd:,} bytes")
            self.zip = zipfile.ZipFile(self.path)
            self.members: Dict[str, zipfile.ZipInfo] = {i.filename: i for i in self.zip.infolist()}
        except OSError as e:
            raise MlxeffError(f"cannot read ({e.strerror or e})", self.path) from None
        except Exception as e:  # zipfile raises BadZipFile, ValueError, struct.error, UnicodeDecodeError, ...
            text = " ".join(str(e).split())[:160]
            raise MlxeffError(f"not a readable torch checkpoint (truncated or corrupt zip: {text})",
                              self.path) from None

    def names(self):
        return list(self.members)

    def file_size(self, name: str) -> int:
        return self.members[name].file_size

    def read(self, name: str, limit: int, exact: bool = False) -> np.ndarray:
        """Member ``name`` as a fresh uint8 array; more than ``limit`` bytes (or, with ``exact``,
        any other size) is an error before anything is read."""
        info = self.members.get(name)
        if info is None:
            raise MlxeffError(f"missing zip member {name} (truncated checkpoint?)", self.path)
        method, n, packed = info.compress_type, info.file_size, info.compress_size
        if info.flag_bits & 0x1:
            raise MlxeffError(f"zip member {name} is encrypted", self.path)
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise MlxeffError(f"zip member {name} uses compression method {method}; only stored (as torch.save "
                              "writes) and deflate are read", self.path)
        if n > limit or (exact and n != limit):
            raise MlxeffError(f"zip member {name} holds {n:,} bytes, {'expected' if exact else 'the limit is'} "
                              f"{limit:,}", self.path)
        if method == zipfile.ZIP_STORED and packed != n:
            raise MlxeffError(f"zip member {name}: stored with {packed:,} bytes for {n:,}", self.path)
        if method == zipfile.ZIP_DEFLATED and n > MAX_RATIO * packed + 4096:
            raise MlxeffError(f"zip member {name} declares {n:,} bytes from {packed:,} compressed (more than "
                              f"{MAX_RATIO}x: a zip bomb?)", self.path)
        with open(self.path, "rb") as f:
            start = self._data_start(f, info)
            if start + packed > self.size:
                raise MlxeffError(f"zip member {name} extends past the end of the file (truncated?)", self.path)
            raw = read_exact(f, start, packed, self.path)
        data = raw if method == zipfile.ZIP_STORED else self._inflate(name, raw, n)
        if zlib.crc32(data) != info.CRC:
            raise MlxeffError(f"zip member {name} is corrupt (CRC mismatch)", self.path)
        return data

    def _data_start(self, f, info: zipfile.ZipInfo) -> int:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise MlxeffError(f"corrupt zip entry {info.filename} (no local header)", self.path)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        name = f.read(name_len)
        if name.decode("utf-8", "replace") != info.orig_filename and name.decode("cp437", "replace") != info.orig_filename:
            raise MlxeffError(f"corrupt zip entry {info.filename} (its local header names another file)", self.path)
        return info.header_offset + 30 + name_len + extra_len

    def _inflate(self, name: str, raw: np.ndarray, n: int) -> np.ndarray:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(raw.tobytes(), n + 1)
        except zlib.error as e:
            raise MlxeffError(f"zip member {name} is corrupt ({e})", self.path) from None
        if len(out) != n or not d.eof:
            raise MlxeffError(f"zip member {name} inflates to other than its declared {n:,} bytes", self.path)
        return np.frombuffer(out, dtype=np.uint8)

    def close(self):
        self.zip.close()
