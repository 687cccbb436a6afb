"""Output directories that appear complete or not at all; cleaning what killed runs left behind.

Writing: the content goes into a sibling ``.NAME.tmp-PID-XXXXXXXX`` created like any directory
(mode 0777 minus the user's umask; ``tempfile.mkdtemp``'s 0700 is meant for secrets), which
becomes ``NAME`` only when complete.

Replacing an existing ``NAME`` (``force``): where the system has an atomic exchange of two names --
Linux ``renameat2(RENAME_EXCHANGE)`` (kernel 3.15, glibc 2.28; ext4, xfs, btrfs, tmpfs and most
local filesystems) or macOS ``renamex_np(RENAME_SWAP)`` (10.12; APFS, HFS+) -- the new directory
and the old one swap names in one step and the old content, now under the temporary name, is
deleted: a kill at any moment leaves either the old or the new complete ``NAME``. Elsewhere (a
filesystem that refuses the exchange, e.g. some network filesystems, or another system) the old
directory moves to ``.NAME.old-PID-XXXXXXXX`` and the new one into place; a kill between those two
renames leaves no ``NAME``, and the next write to the same ``NAME`` (``recover``) restores the old
one from its ``.old-`` folder before doing anything else.

Cleaning: before each write, ``.NAME.tmp-*`` and ``.NAME.old-*`` siblings (and ``mlxeff-*``
scratch folders in the system temporary directory, see ``scratch_directory``) are deleted when
they belong to the current user, were last changed before this process started, and the process
whose id their name carries is no longer running. Folders written by earlier versions, whose names
carry no process id, count as stale an hour after their last change. (A process id is only known
on this machine: on a filesystem shared between machines a live writer elsewhere is protected only
by the age test.)
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import secrets
import shutil
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import MlxeffError

RUN_START = time.time()
LEGACY_AGE = 3600.0  # seconds: folders without a process id in their name
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


# --- the exchange primitive -----------------------------------------------------------------

def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _linux_exchange(a: bytes, b: bytes) -> int:
    libc, AT_FDCWD, RENAME_EXCHANGE = _libc(), -100, 2
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    nr = {"x86_64": 316, "aarch64": 276, "arm64": 276}.get(platform.machine())  # glibc < 2.28
    if nr is None:
        ctypes.set_errno(errno.ENOSYS)
        return -1
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(nr), ctypes.c_long(AT_FDCWD), ctypes.c_char_p(a),
                        ctypes.c_long(AT_FDCWD), ctypes.c_char_p(b), ctypes.c_long(RENAME_EXCHANGE))


def _macos_exchange(a: bytes, b: bytes) -> int:
    fn = _libc().renamex_np
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(a, b, 0x2)  # RENAME_SWAP


def exchange(a, b) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False where the system or filesystem cannot."""
    impl = {"linux": _linux_exchange, "darwin": _macos_exchange}.get(sys.platform)
    if impl is None:
        return False
    try:
        rc = impl(os.fsencode(a), os.fsencode(b))
    except (AttributeError, OSError):  # no such symbol in this libc
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# --- temporary names, staleness and recovery ---------------------------------------------------

def _new_name(parent: Path, prefix: str) -> Path:
    return parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"


def make_directory(parent: Path, prefix: str, mode: int = 0o777) -> Path:
    """A new, empty directory ``parent/prefixPID-XXXXXXXX`` (``mode`` minus the umask)."""
    while True:
        path = _new_name(parent, prefix)
        try:
            os.mkdir(path, mode)
            return path
        except FileExistsError:
            continue


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process (or an impossible id: not running)
    return True


def _is_stale(entry: Path, suffix: str) -> bool:
    """``suffix``: the part of the name after the prefix (``PID-XXXXXXXX``, or older forms)."""
    try:
        st = os.lstat(entry)
    except OSError:
        return False
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return False
    m = re.fullmatch(r"(\d{1,10})(-[0-9a-f]{8})?", suffix)
    if m is None:  # an earlier version's random name: no process id
        return st.st_mtime < RUN_START - LEGACY_AGE
    return st.st_mtime < RUN_START and not _pid_running(int(m.group(1)))


def _remove(entry: Path) -> None:
    try:
        if stat.S_ISDIR(os.lstat(entry).st_mode):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink()
    except OSError:
        pass


def recover(path) -> None:
    """Restore ``path`` from a killed replacement's ``.old-`` folder; delete stale temporaries."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    pattern = re.compile(re.escape(f".{path.name}.") + r"(tmp|old)-(.+)")
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return
    stale = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and _is_stale(entry, m.group(2)):
            stale.append((m.group(1), entry))
    for kind, entry in sorted(stale, key=lambda e: e[0] != "old"):
        if kind == "old" and not os.path.lexists(path):
            try:
                os.rename(entry, path)
                continue
            except OSError:
                pass
        _remove(entry)


def clean_scratch(prefix: str, directory=None) -> None:
    """Delete stale ``prefix*`` folders (see the module docstring) in the temporary directory."""
    directory = Path(directory or tempfile.gettempdir())
    try:
        entries = [e for e in directory.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        if _is_stale(entry, entry.name[len(prefix):]):
            _remove(entry)


@contextmanager
def scratch_directory(prefix: str):
    """A private scratch folder ``<tmp>/prefixPID-XXXXXXXX``, removed afterwards; stale ones of
    killed runs are removed first."""
    clean_scratch(prefix)
    path = make_directory(Path(tempfile.gettempdir()), prefix, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- the public context manager ------------------------------------------------------------------

def replace(new: Path, path: Path) -> None:
    """Move the complete directory ``new`` to ``path``, replacing what is there (see docstring)."""
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    if exchange(new, path):
        _remove(new)  # holds the old content now
        return
    old = _new_name(path.parent, f".{path.name}.old-")
    os.rename(path, old)
    os.rename(new, path)
    _remove(old)


@contextmanager
def atomic_directory(path, force: bool = False):
    """Yield a temporary directory that becomes ``path`` only if the block completes.

    An existing ``path`` is refused unless ``force``; with ``force`` it is replaced only once the
    new content is complete, atomically where the system allows (see the module docstring).
    """
    path = Path(path)
    recover(path)
    if os.path.lexists(path) and not force:
        raise MlxeffError("output already exists (use --force to replace it)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_directory(path.parent, f".{path.name}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace(tmp, path)
