"""The one progress utility: a tqdm bar on stderr for every long operation.

Training, SeedLM encoding, conversion, evaluation and long prompts all report through ``bar``.
A bar shows itself only when stderr is a terminal, unless the caller says otherwise; the command
line turns every bar off for ``--json`` output with ``silenced()``. tqdm (which
mlx-lm's own tools use) gives the rate and the ETA, and on an exception -- Ctrl-C included -- its
context manager closes the bar with a newline, so the next line starts clean.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Optional

from tqdm.auto import tqdm

_enabled: Optional[bool] = None  # None: show bars when stderr is a terminal


def configure(enabled: Optional[bool]) -> Optional[bool]:
    """Force every later bar on (True) or off (False); None restores the terminal check. Returns
    the previous setting."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


@contextmanager
def silenced(quiet: bool = True):
    """No bars inside the block when ``quiet`` (e.g. for ``--json`` output); the setting before
    the block comes back afterwards, also for a command run in-process."""
    previous = configure(False) if quiet else _enabled
    try:
        yield
    finally:
        configure(previous)


def enabled(requested: Optional[bool] = None) -> bool:
    """Whether a bar would be shown: an explicit request (False always wins), then ``configure``,
    then whether stderr is a terminal."""
    if requested is False or _enabled is False:
        return False
    if requested is True or _enabled is True:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(total: Optional[float] = None, desc: str = "", unit: str = "it", *, show: Optional[bool] = None,
        unit_scale: bool = False, leave: bool = True, **kwargs) -> tqdm:
    """A progress bar (use it as a context manager, call ``update(n)``); disabled bars cost nothing.

    The bar follows the terminal's size. A terminal that reports none (0 x 0: a pseudo-terminal
    nobody sized, as some container and CI runners give) gets ``FALLBACK_SIZE``: tqdm would take
    its 0 rows to mean that the bar lies below the screen and print nothing at all."""
    sized = (dict(ncols=FALLBACK_SIZE[0], nrows=FALLBACK_SIZE[1]) if _unsized_terminal()
             else dict(dynamic_ncols=True))  # a file or pipe: no width limit, as before
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave,
                disable=not enabled(show), file=sys.stderr, **{**sized, **kwargs})


FALLBACK_SIZE = (80, 24)  # columns, rows


def _unsized_terminal() -> bool:
    """Whether stderr is a terminal that reports 0 columns or 0 rows."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # not a terminal (a file, a pipe, a capture)
        return False
    return size.columns <= 0 or size.lines <= 0
