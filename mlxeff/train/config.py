"""``TrainConfig``: every setting of a training run, validated where it is made.

The command-line options of ``mlxeff train`` and ``mlxeff train-kv-prediction`` are generated from
these fields (``mlxeff.cli.train_options``), so a field, its default and its check live here once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

from ..errors import MlxeffError
from ..precision import DTYPES

# Fields that may change between a run and its resumption without changing the trajectory.
RESUMABLE_FIELDS = ("eval_every", "save_every", "log_every", "keep_checkpoints")

# ``save_every=None`` (automatic): a checkpoint after AUTO_SAVE_SECONDS of training, or after
# 1/AUTO_SAVE_SHARE times the last checkpoint's write time if that is longer, so writing
# checkpoints never takes more than AUTO_SAVE_SHARE of the run (after the first one).
AUTO_SAVE_SECONDS = 600.0
AUTO_SAVE_SHARE = 0.02


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 512
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # global gradient norm; 0 = off
    z_loss: float = 1e-4
    dtype: str = "float32"
    seed: int = 0
    eval_every: int = 0  # 0 = only at the end
    save_every: Optional[int] = None  # steps; None = automatic (see AUTO_SAVE_*); 0 = at the end
    log_every: int = 10
    keep_checkpoints: int = 2
    compile: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "accum", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise MlxeffError(f"{name} must be at least 1, got {getattr(self, name)}")
        non_negative = ("warmup", "eval_every", "weight_decay", "clip", "z_loss", "min_lr", "eps")
        for name in non_negative + (("save_every",) if self.save_every is not None else ()):
            if getattr(self, name) < 0:
                raise MlxeffError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise MlxeffError(f"lr must be positive, got {self.lr}")
        if self.min_lr > self.lr:
            raise MlxeffError(f"min_lr ({self.min_lr}) exceeds lr ({self.lr})")
        if self.dtype not in DTYPES:
            raise MlxeffError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.accum

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
