"""The data side every training run shares: text files -> token stream (cached) -> packed batches
(``batch_fn(k)``, a pure function of ``k``) and validation windows."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .. import data
from ..errors import MlxeffError
from .config import TrainConfig


@dataclass
class CorpusFiles:
    train: List[Path]
    valid: List[Path]

    @classmethod
    def expand(cls, train: Sequence[str], valid: Sequence[str] = ()) -> "CorpusFiles":
        """The files the patterns name; fails (before anything is written) when one matches none."""
        return cls(data.expand_files(train, "training"),
                   data.expand_files(valid, "validation") if valid else [])

    def describe(self) -> dict:
        return {"train_files": [str(f) for f in self.train],
                "valid_files": [str(f) for f in self.valid]}


def check_eval_tokens(eval_tokens: int, seq_len: int) -> None:
    if eval_tokens < seq_len:
        raise MlxeffError(f"--eval-tokens ({eval_tokens}) must cover one sequence (--seq-len "
                          f"{seq_len})")


@dataclass
class Corpus:
    files: CorpusFiles
    train_tokens: np.ndarray
    valid_tokens: Optional[np.ndarray]
    dataset: data.PackedDataset

    def batch_fn(self, batch_size: int) -> Callable[[int], mx.array]:
        return lambda k: mx.array(self.dataset.batch(k, batch_size))

    def valid_windows(self, seq_len: int, eval_tokens: int) -> Optional[np.ndarray]:
        if self.valid_tokens is None:
            return None
        return data.eval_windows(self.valid_tokens, seq_len, eval_tokens)

    def epochs(self, cfg: TrainConfig) -> float:
        return self.dataset.epochs(cfg.steps * cfg.accum, cfg.batch_size)


def load_corpus(files: CorpusFiles, tokenizer, cache: Path, cfg: TrainConfig,
                say: Callable[[str], None]) -> Corpus:
    """Tokenize (or read from ``cache``) the training and validation files."""
    tic = time.perf_counter()
    train_tokens = data.tokenize_files(files.train, tokenizer, cache)
    valid_tokens = data.tokenize_files(files.valid, tokenizer, cache) if files.valid else None
    say(f"tokens: train {len(train_tokens):,} from {len(files.train)} file(s)"
        + (f", valid {len(valid_tokens):,}" if valid_tokens is not None else "")
        + f" ({time.perf_counter() - tic:.1f} s)")
    return Corpus(files, train_tokens, valid_tokens,
                  data.PackedDataset(train_tokens, cfg.seq_len, seed=cfg.seed))
