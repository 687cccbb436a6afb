"""Training data: corpus reading, tokenizer training, a token cache, packing and batches.

- Corpus files are ``.txt`` or ``.txt.gz``, read as strict UTF-8. Each file is one document; the
  token stream is every file's ids followed by EOS, in the order given. No BOS is inserted: packed
  sequences start anywhere in the stream, so a prompt without BOS is what the model sees in
  training (the tokenizer therefore adds no special tokens when encoding).
- The tokenizer is a byte-level BPE (Hugging Face ``tokenizers``) with ``<unk>``=0, ``<s>``=1,
  ``</s>``=2, matching ``ModelArgs.bos_token_id``/``eos_token_id``; it is saved with
  ``save_pretrained`` so ``mlx_lm.tokenizer_utils.load`` wraps it (streaming BPE detokenizer).
- Text is tokenized once in parallel (``encode_batch`` on chunks cut just before a newline that
  follows a non-space character: the byte-level pre-tokenizer never joins across such a point, so
  chunked encoding equals encoding the whole text) and cached as ``.npy`` (uint16 when the vocabulary
  fits) under a key hashing the files' bytes and the tokenizer.
- Packing: sequence ``i`` is ``tokens[i*L : i*L + L + 1]`` (inputs and shifted targets). Each epoch
  visits every sequence once in an order fixed by ``(seed, epoch)``; the micro-batch for index ``k``
  is a pure function of ``k``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

from .errors import MlxeffError
from .progress import bar
from .tokenizer import fast_backend as _backend  # noqa: F401  (the one tokenizer loader lives there)
from .tokenizer import load_tokenizer, portable_tokenizer_config, special_ids, tokenizer_fingerprint  # noqa: F401

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [UNK, BOS, EOS]  # ids 0, 1, 2
CHUNK_CHARS = 1 << 16
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# corpus files


def expand_files(patterns: Sequence[str], what: str = "corpus") -> List[Path]:
    """Expand files and glob patterns (sorted per pattern, in the order given); refuse nothing found."""
    files: List[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [str(pattern)]
        if not matches:
            raise MlxeffError(f"no {what} files match this pattern", pattern)
        for m in matches:
            p = Path(m)
            if not p.is_file():
                raise MlxeffError(f"no such {what} file", p)
            if not (p.name.endswith(".txt") or p.name.endswith(".txt.gz")):
                raise MlxeffError("expected a .txt or .txt.gz file", p)
            if p not in files:
                files.append(p)
    if not files:
        raise MlxeffError(f"no {what} files given")
    return files


def read_bytes(path: Path) -> bytes:
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise MlxeffError(f"cannot read ({e})", path) from None


def decode_text(data: bytes, path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlxeffError(f"not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r})", path) from None


def read_text(path: Path) -> str:
    return decode_text(read_bytes(path), path)


def split_chunks(text: str, size: int = CHUNK_CHARS) -> List[str]:
    """Cut ``text`` into pieces of about ``size`` characters at points that do not change its BPE.

    A cut goes just before a ``\\n`` whose previous character is not whitespace: the byte-level
    pre-tokenizer's pieces never span such a point, so the pieces' encodings concatenate to the
    whole text's encoding. Text without such points stays one piece.
    """
    chunks, start, n = [], 0, len(text)
    while n - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


# ---------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(files: Sequence[Path], vocab_size: int, out_dir: Path,
                    max_chars: Optional[int] = None) -> Path:
    """Train a byte-level BPE tokenizer on ``files`` and save it (HF layout) into ``out_dir``.

    ``max_chars`` bounds the text the trainer sees, taken as an equal prefix share of every file
    (BPE merges converge long before a 165 M-character corpus is exhausted).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise MlxeffError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                          f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    share = None if max_chars is None else max(1, max_chars // len(files))

    def texts() -> Iterator[str]:
        for f in files:
            t = read_text(f)
            yield from split_chunks(t if share is None else t[:share])

    total = 0
    for f in files:  # fail on empty/undecodable input before the trainer swallows the error
        total += len(read_text(f).strip())
    if total == 0:
        raise MlxeffError("the corpus is empty (no text in any file)", files[0])
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        model_max_length=1 << 30, clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    portable_tokenizer_config(out_dir)
    return out_dir


def encode_text(tokenizer, text: str, limit: Optional[int] = None) -> np.ndarray:
    """Token ids of ``text`` without special tokens, encoded in parallel chunks.

    With ``limit``, encoding stops once at least ``limit`` ids are there (all of them if the text
    has fewer): a prefix of the whole text's ids, since the chunks' ids concatenate to them
    (``split_chunks``). ``mlxeff eval --max-tokens 20000`` on a 3 MB file encoded all of it first
    (6-15 s on the CPU box, against 1-2 minutes of scoring with OpenBLAS)."""
    return _encode(tokenizer, text, limit)[0]


def _encode(tokenizer, text: str, limit: Optional[int]):
    """``encode_text``'s ids and whether they are the whole text's."""
    backend = _backend(tokenizer)
    chunks = split_chunks(text)
    out, have, i = [], 0, 0
    while i < len(chunks) and (limit is None or have < limit):
        # with a limit, about the chunks still needed at 8 characters a token (more than English
        # text takes), so that one batch usually suffices
        n = 256 if limit is None else min(256, max(1, -(-(limit - have) * 8 // CHUNK_CHARS)))
        encs = backend.encode_batch(chunks[i:i + n], add_special_tokens=False)
        out.extend(np.asarray(e.ids, dtype=np.int64) for e in encs)
        have += sum(len(e.ids) for e in encs)
        i += n
    ids = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return ids, i >= len(chunks)


# ---------------------------------------------------------------------------------------------
# token cache


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenize_files(files: Sequence[Path], tokenizer, cache_dir: Optional[Path] = None,
                   progress: Optional[bool] = None, limit: Optional[int] = None) -> np.ndarray:
    """The token stream of ``files`` (each followed by EOS), cached under ``cache_dir``.

    Returns a read-only memory map when cached. The key hashes every file's bytes, the order of the
    files and the tokenizer, so a changed file or tokenizer never reuses a stale cache.
    ``progress``: a bar over the files' bytes (``mlxeff.progress``; None: on a terminal).
    ``limit``: stop once at least that many tokens are there (the stream's first tokens; such a
    partial stream is not cached).
    """
    if limit is not None:
        cache_dir = None
    files = [Path(f) for f in files]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MlxeffError("the tokenizer has no EOS token")
    vocab = len(_backend(tokenizer).get_vocab())
    raw = [read_bytes(f) for f in files]
    h = hashlib.sha256(f"v{CACHE_VERSION}:{tokenizer_fingerprint(tokenizer)}".encode())
    for data in raw:
        h.update(hashlib.sha256(data).digest())
    key = h.hexdigest()[:24]
    cache_file = Path(cache_dir) / f"tokens-{key}.npy" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        return np.load(cache_file, mmap_mode="r")
    parts = []
    total_chars = 0
    with bar(sum(len(d) for d in raw), "tokenizing", "B", unit_scale=True, show=progress) as done:
        have = 0
        for f, data in zip(files, raw):
            if limit is not None and have >= limit:
                break
            text = decode_text(data, f)
            total_chars += len(text.strip())
            ids, whole = _encode(tokenizer, text, None if limit is None else limit - have)
            parts.append(ids)
            if whole:  # a file cut short by the limit has no end yet
                parts.append(np.array([eos]))
            have += ids.size + int(whole)
            done.update(len(data))
    if total_chars == 0:
        raise MlxeffError("the corpus is empty (no text in any file)", files[0])
    tokens = np.concatenate(parts).astype(token_dtype(vocab))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tokens-", suffix=".npy", dir=cache_file.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, tokens)
            os.replace(tmp, cache_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        (cache_file.parent / f"tokens-{key}.json").write_text(json.dumps(
            {"files": [str(f) for f in files], "tokens": int(tokens.size)}, indent=1))
    return tokens


# ---------------------------------------------------------------------------------------------
# packing and batches


@dataclass
class PackedDataset:
    """Fixed-length sequences over a token stream, shuffled per epoch by ``(seed, epoch)``."""

    tokens: np.ndarray
    seq_len: int
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        self.num_sequences = (len(self.tokens) - 1) // self.seq_len
        if self.num_sequences < 1:
            raise MlxeffError(
                f"the corpus has {len(self.tokens)} tokens, fewer than one sequence of "
                f"{self.seq_len + 1}; use more text or a shorter --seq-len"
            )
        self._order = lru_cache(maxsize=4)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_sequences)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)

    def sequence(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1])

    def samples(self, start: int, count: int) -> np.ndarray:
        """Samples ``start .. start+count-1`` of the endless epoch-by-epoch stream, (count, L+1)."""
        out = np.empty((count, self.seq_len + 1), dtype=np.int32)
        for j in range(count):
            epoch, pos = divmod(start + j, self.num_sequences)
            out[j] = self.sequence(int(self._order(epoch)[pos]))
        return out

    def batch(self, index: int, batch_size: int) -> np.ndarray:
        """Micro-batch ``index``: a pure function of ``index`` (and the seed)."""
        return self.samples(index * batch_size, batch_size)

    def epochs(self, micro_batches: int, batch_size: int) -> float:
        return micro_batches * batch_size / self.num_sequences


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: Optional[int] = None) -> np.ndarray:
    """Non-overlapping (n, seq_len+1) windows from the start of ``tokens`` (for quick validation)."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    count = (n - 1) // seq_len
    if count < 1:
        raise MlxeffError(f"the validation text has {len(tokens)} tokens, fewer than one "
                          f"sequence of {seq_len + 1}")
    return np.stack([np.asarray(tokens[i * seq_len: i * seq_len + seq_len + 1]) for i in range(count)]
                    ).astype(np.int32)


def iter_jsonl(path: Path) -> Iterable[dict]:
    """Rows of a ``.jsonl`` or ``.jsonl.gz`` file."""
    text = read_text(path)
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise MlxeffError(f"line {n}: invalid JSON ({e})", path) from None
