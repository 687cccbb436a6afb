"""llama2.c ``tokenizer.bin`` files: a bounded reader and the reference encoder.

The format (karpathy/llama2.c, ``tokenizer.py``'s export of a SentencePiece model): an int32
``max_token_length``, then for each id in order a float32 merge score, an int32 byte length and
the piece's UTF-8 bytes, until the end of the file. SentencePiece's "▁" is written as a space,
BOS as ``"\\n<s>\\n"``, EOS as ``"\\n</s>\\n"``, byte pieces as ``<0xNN>``.

llama2.c encodes by prepending a space (its dummy prefix) to non-empty text, splitting it into
characters (a character without a piece becomes its UTF-8 bytes' byte pieces), then repeatedly
merging the adjacent pair whose concatenation is a piece with the highest score (the leftmost
on ties) -- SentencePiece's BPE. ``encode`` implements exactly that; the converter builds a
Hugging Face tokenizer from the same pieces and scores and refuses it unless it agrees with
``encode`` on sample text.

Reading is bounded: the file is at most ``MAX_BYTES``, every length is checked against
``max_token_length`` and the bytes left, scores must be finite, pieces valid UTF-8 and unique.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from mlxeff.errors import MlxeffError
from mlxeff.files import read_bounded

MAX_BYTES = 64 << 20
MAX_PIECE_BYTES = 1024
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
SPECIAL = {"<unk>": "unknown", "\n<s>\n": "bos", "\n</s>\n": "eos"}


@dataclass
class Llama2cVocab:
    pieces: List[str]  # as stored (spaces, "\n<s>\n", ...)
    scores: List[float]

    def kind(self, i: int) -> str:
        p = self.pieces[i]
        if p in SPECIAL:
            return SPECIAL[p]
        return "byte" if BYTE_PIECE.fullmatch(p) else "normal"

    def id_of(self, kind: str) -> int:
        ids = [i for i in range(len(self.pieces)) if self.kind(i) == kind]
        return ids[0] if ids else -1


def looks_like_llama2c(path) -> bool:
    """A cheap test of the first record (a SentencePiece model is a protobuf, it fails this)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    if len(head) < 12:
        return False
    max_len, _, n = struct.unpack("<ifi", head)
    return 1 <= max_len <= MAX_PIECE_BYTES and 0 <= n <= max_len


def read_vocab(path) -> Llama2cVocab:
    path = Path(path)
    data = read_bounded(path, MAX_BYTES, "llama2.c tokenizer")
    if len(data) < 4:
        raise MlxeffError("not a llama2.c tokenizer (shorter than its 4-byte header)", path)
    (max_len,) = struct.unpack_from("<i", data)
    if not 1 <= max_len <= MAX_PIECE_BYTES:
        raise MlxeffError(f"not a llama2.c tokenizer (max_token_length {max_len} is outside 1..{MAX_PIECE_BYTES})",
                          path)
    pieces, scores, pos, seen = [], [], 4, set()
    while pos < len(data):
        i = len(pieces)
        if pos + 8 > len(data):
            raise MlxeffError(f"llama2.c tokenizer: record {i} is truncated", path)
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if not 0 <= n <= max_len or pos + n > len(data):
            raise MlxeffError(f"llama2.c tokenizer: record {i} has length {n} (max_token_length {max_len}, "
                              f"{len(data) - pos} bytes left)", path)
        if not math.isfinite(score):
            raise MlxeffError(f"llama2.c tokenizer: record {i} has score {score}", path)
        try:
            piece = data[pos:pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise MlxeffError(f"llama2.c tokenizer: piece {i} is not UTF-8", path) from None
        pos += n
        if piece in seen or not piece:
            raise MlxeffError(f"llama2.c tokenizer: piece {i} ({piece!r:.40}) is empty or repeated", path)
        seen.add(piece)
        pieces.append(piece)
        scores.append(score)
    vocab = Llama2cVocab(pieces, scores)
    for kind in ("bos", "eos"):
        if vocab.id_of(kind) < 0:
            raise MlxeffError(f"llama2.c tokenizer: no {kind.upper()} piece ({'<s>' if kind == 'bos' else '</s>'})",
                              path)
    return vocab


def encode(vocab: Llama2cVocab, text: str, bos: bool = True) -> List[int]:
    """llama2.c's ``encode`` (see the module docstring)."""
    ids: Dict[str, int] = {p: i for i, p in enumerate(vocab.pieces) if vocab.kind(i) == "normal"}
    byte_ids = {p: i for i, p in enumerate(vocab.pieces) if vocab.kind(i) == "byte"}
    tokens: List[int] = []
    for ch in (" " + text) if text else "":
        if ch in ids:
            tokens.append(ids[ch])
        else:
            for b in ch.encode("utf-8"):
                piece = f"<0x{b:02X}>"
                if piece not in byte_ids:
                    raise ValueError(f"no piece for byte {b:#04x}")
                tokens.append(byte_ids[piece])
    while True:
        best, best_score = -1, -math.inf
        for k in range(len(tokens) - 1):
            merged = vocab.pieces[tokens[k]] + vocab.pieces[tokens[k + 1]]
            j = ids.get(merged)
            if j is not None and vocab.scores[j] > best_score:
                best, best_score = k, vocab.scores[j]
        if best < 0:
            break
        tokens[best:best + 2] = [ids[vocab.pieces[tokens[best]] + vocab.pieces[tokens[best + 1]]]]
    return ([vocab.id_of("bos")] if bos else []) + tokens
