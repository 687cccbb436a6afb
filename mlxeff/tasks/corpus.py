"""The book splits task items are drawn from, and passages drawn from them.

A corpus directory holds ``train-*.txt.gz`` (the training split) and ``valid.txt.gz`` (the held-out
split: other books), as the Gutenberg children's corpus does. Training-mixture items come from the
training split only, evaluation items from the held-out split only. Text is whitespace-normalized
(every run of whitespace becomes one space: the hard line wraps of Gutenberg files mean nothing
in a passage), and the files of a split are joined by ``"\\n"``, which no normalized text contains,
so a passage never spans two files.

The held-out split is additionally cleaned of text that also occurs in the training split
(``overlap``: 15% of random 700-character held-out passages share text with training books): a
held-out passage that shares a sampled 64-character window with the training split is drawn again.
That check needs the training shards beside ``valid.txt.gz``; its result (the shared windows'
offsets, about 0.5 MB) is cached under ``cache_dir`` keyed by the bytes of every file involved.

Passages are runs of whole words cut to a token budget (the tokenizer counts); they are drawn at
random offsets (the files mark no book boundaries, so passages of one item are kept at least
``min_gap`` characters apart -- books average about 360,000 characters here -- rather than proven
to come from different books) and must look like prose: at least 75% letters among the non-space
characters and no Project Gutenberg boilerplate.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MlxeffError
from . import overlap

TRAIN_PATTERN = "train-*.txt.gz"
HELDOUT_FILE = "valid.txt.gz"
SPLITS = ("train", "heldout")
CHARS_PER_TOKEN = 3.83  # normalized held-out text, default 8192-token BPE (measured)
MIN_PASSAGE_WORDS = 8
_JUNK = re.compile(r"gutenberg|https?:|www\.|transcriber|e-?text|ebook|\[illustration", re.IGNORECASE)
_CACHE_VERSION = 1

CountTokens = Callable[[str], int]


def token_counter(tokenizer) -> CountTokens:
    """``count(text)``: tokens of ``text`` without special tokens."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def default_cache_dir() -> Path:
    """``$MLXEFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlxeff``, else ``~/.cache/mlxeff``."""
    if os.environ.get("MLXEFF_CACHE_DIR"):
        return Path(os.environ["MLXEFF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlxeff"


def normalize(text: str) -> str:
    """Every run of whitespace becomes one space; no leading or trailing space."""
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class BookSplit:
    """The normalized text of one split's files, joined by newlines."""

    name: str
    files: List[Path]
    text: str
    shared: Optional[np.ndarray] = None  # offsets of windows also in the training split

    @classmethod
    def from_texts(cls, name: str, texts: Sequence[str], files: Sequence[Path] = (),
                   exclude: Optional[Sequence[str]] = None) -> "BookSplit":
        """A split from raw texts; ``exclude``: raw texts whose shared windows disqualify passages."""
        text = "\n".join(normalize(t) for t in texts)
        shared = None
        if exclude is not None:
            shared = overlap.shared_windows(text, overlap.sampled_keys(normalize(t) for t in exclude))
        return cls(name, [Path(f) for f in files], text, shared)

    def clean(self, start: int, end: int) -> bool:
        """Whether ``text[start:end]`` looks like prose and (held-out) shares nothing with training."""
        passage = self.text[start:end]
        nonspace = len(passage) - passage.count(" ")
        letters = sum(c.isalpha() for c in passage)
        if nonspace == 0 or letters < 0.75 * nonspace or _JUNK.search(passage):
            return False
        return self.shared is None or not overlap.overlaps(self.shared, start, end)


def split_files(data_dir, split: str) -> List[Path]:
    """The files of ``split`` ("train" or "heldout") in a corpus directory."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise MlxeffError(f"unknown split {split!r} (train or heldout)")
    if not data_dir.is_dir():
        raise MlxeffError("no such corpus directory (expected train-*.txt.gz and valid.txt.gz)",
                          data_dir)
    if split == "heldout":
        f = data_dir / HELDOUT_FILE
        if not f.is_file():
            raise MlxeffError(f"no {HELDOUT_FILE} (the held-out books)", data_dir)
        return [f]
    files = sorted(data_dir.glob(TRAIN_PATTERN))
    if not files:
        raise MlxeffError(f"no {TRAIN_PATTERN} (the training books)", data_dir)
    return files


def load_split(data_dir, split: str, cache_dir: Optional[Path] = None) -> BookSplit:
    """The ``train`` or ``heldout`` split of a corpus directory (held-out: cleaned of text shared
    with the training split, which must be present)."""
    from ..data import read_text

    files = split_files(data_dir, split)
    texts = [read_text(f) for f in files]
    if split == "train":
        return BookSplit.from_texts(split, texts, files)
    train = split_files(data_dir, "train")
    text = "\n".join(normalize(t) for t in texts)
    key = _cache_key(train + files)
    cached = Path(cache_dir) / f"heldout-shared-{key}.npy" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            return BookSplit(split, files, text, np.load(cached))
        except (OSError, ValueError):
            pass  # unreadable cache: compute again
    keys = overlap.sampled_keys(normalize(read_text(f)) for f in train)
    shared = overlap.shared_windows(text, keys)
    if cached is not None:
        _save_atomic(cached, shared)
    return BookSplit(split, files, text, shared)


def _cache_key(files: Sequence[Path]) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}:{overlap.WIDTH}:{overlap.SAMPLE}".encode())
    for f in files:
        h.update(Path(f).name.encode())
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()[:24]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


# ---------------------------------------------------------------------------------------------
# passages


def fit_words(words: Sequence[str], budget: int, count: CountTokens) -> int:
    """The largest ``w`` such that ``" ".join(words[:w])`` has at most ``budget`` tokens.

    Byte-level BPE pre-tokenizes at spaces, so the count only grows with ``w`` (binary search).
    """
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def draw_passage(split: BookSplit, rng: np.random.Generator, budget: int, count: CountTokens, *,
                 taken: Sequence[int] = (), min_gap: int = 0, tries: int = 400) -> Tuple[int, str]:
    """A clean passage of at most ``budget`` tokens (whole words) at a random offset at least
    ``min_gap`` characters from every offset in ``taken``: ``(offset, passage)``."""
    text = split.text
    span = int(budget * CHARS_PER_TOKEN * 1.5) + 64
    if len(text) < 2 * span:
        raise MlxeffError(f"the {split.name} books hold {len(text):,} characters, too few for "
                          f"passages of {budget} tokens", split.files[0] if split.files else None)
    for _ in range(tries):
        at = int(rng.integers(0, len(text) - span))
        if any(abs(at - t) < min_gap for t in taken):
            continue
        start = text.find(" ", at) + 1
        if start <= 0:
            continue
        window = text[start:start + span]
        if "\n" in window:  # crosses a file boundary
            continue
        words = window.split(" ")[:-1]  # the last word may be cut
        n = fit_words(words, budget, count)
        if n < MIN_PASSAGE_WORDS:
            continue
        passage = " ".join(words[:n])
        if split.clean(start, start + len(passage)):
            return start, passage
    raise MlxeffError(f"found no clean passage of {budget} tokens in {tries} tries in the "
                      f"{split.name} books", split.files[0] if split.files else None)


def draw_passages(split: BookSplit, rng: np.random.Generator, k: int, budget: int,
                  count: CountTokens, min_gap: Optional[int] = None) -> List[Tuple[int, str]]:
    """``k`` passages far apart (``min_gap`` default: the split's length / 4k, at most 100,000)."""
    span = int(budget * CHARS_PER_TOKEN * 1.5) + 64
    if k * span * 4 > len(split.text):
        raise MlxeffError(f"{k} passages of {budget} tokens need more text than the {split.name} "
                          f"books hold ({len(split.text):,} characters)",
                          split.files[0] if split.files else None)
    gap = min(100_000, len(split.text) // (4 * k)) if min_gap is None else min_gap
    out: List[Tuple[int, str]] = []
    for _ in range(k):
        out.append(draw_passage(split, rng, budget, count, taken=[s for s, _ in out], min_gap=gap))
    return out
