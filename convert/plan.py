"""A conversion plan: which source tensors make each mlxeff parameter, checked before any read.

Each source family (CoreNet, Hugging Face OpenELM, Hugging Face Llama) says, for every parameter
of the model its config describes, which source tensors make it (several are concatenated along
rows: Llama's q|k|v and gate|up) and how many rows to keep (CoreNet's padded vocabulary). The plan
reports missing and unexpected source tensors and contradicting shapes by their source names,
all before a byte of tensor data is read; loading then reads one tensor at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxeff.errors import MlxeffError
from mlxeff.files import printable
from mlxeff.models import Model, ModelArgs

from .tensors import TensorRef, itemsize, to_mlx

# Buffers some checkpoints carry that the model recomputes.
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq", "pos_embedding.inv_freq", "_cached_cos", "_cached_sin")


def _short(names, n=3):
    names = list(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(printable(x, 120) for x in names[:n]) + more


@dataclass
class Entry:
    """One mlxeff parameter: ``parts`` concatenated along rows, the first ``rows`` rows kept."""

    parts: List[TensorRef]
    rows: Optional[int] = None

    @property
    def names(self) -> str:
        return " + ".join(p.name for p in self.parts)

    @property
    def source_shape(self) -> Tuple[int, ...]:
        first = self.parts[0].shape
        if len(self.parts) == 1:
            return tuple(first)
        return (sum(p.shape[0] for p in self.parts),) + tuple(first[1:])

    @property
    def shape(self) -> Tuple[int, ...]:
        s = self.source_shape
        if self.rows is not None and s and self.rows <= s[0]:
            return (self.rows,) + s[1:]
        return s

    @property
    def nbytes(self) -> int:
        return sum(math.prod(p.shape) * itemsize(p.dtype) for p in self.parts)

    def load(self, target: Optional[mx.Dtype]) -> mx.array:
        dtypes = {p.dtype for p in self.parts}
        if len(dtypes) != 1:
            raise MlxeffError(f"{self.names}: parts have different dtypes {sorted(dtypes)}", self.parts[0].file)
        arrays = [p.read() for p in self.parts]
        arr = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        del arrays
        if self.rows is not None:
            arr = arr[: self.rows]
        return to_mlx(arr, self.parts[0].dtype, target, self.names, self.parts[0].file)


@dataclass
class Plan:
    args: ModelArgs
    model: Model  # built from args, parameters not yet loaded
    entries: Dict[str, Entry]
    source: Path
    description: str
    tokenizer_dir: Optional[Path] = None
    notes: List[str] = field(default_factory=list)
    closers: List[Callable[[], None]] = field(default_factory=list)

    def close(self):
        for c in self.closers:
            c()


def check_fits(args: ModelArgs, refs: Dict[str, TensorRef], source) -> None:
    """Refuse an architecture larger than the checkpoint before building it: at most one layer per
    tensor, and at least two bytes per parameter (float16/bfloat16, the most compact storage a
    checkpoint's weights have here)."""
    if args.num_transformer_layers > len(refs):
        raise MlxeffError(f"the architecture has {args.num_transformer_layers} layers but the checkpoint "
                          f"holds {len(refs)} tensors", source)
    stored = sum(math.prod(r.shape) * itemsize(r.dtype) for r in refs.values())
    if 2 * args.num_parameters() > stored:
        raise MlxeffError(f"the architecture has {args.num_parameters():,} parameters but the checkpoint "
                          f"holds {stored:,} bytes of tensors", source)


def expected_shapes(model: Model) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def build_entries(
    expected: Dict[str, Tuple[int, ...]],
    refs: Dict[str, TensorRef],
    sources_for: Callable[[str], List[str]],
    path,
    ignore: Callable[[str], bool] = lambda name: False,
    rows: Optional[Dict[str, int]] = None,
) -> Dict[str, Entry]:
    """Match ``refs`` to the model's parameters; raise on missing, unexpected or misshapen ones."""
    rows = rows or {}
    wanted = {name: sources_for(name) for name in expected}
    missing = [s for srcs in wanted.values() for s in srcs if s not in refs]
    if missing:
        raise MlxeffError(f"missing weights: {_short(missing)}", path)
    used = {s for srcs in wanted.values() for s in srcs}
    unexpected = [
        n for n in refs
        if n not in used and not ignore(n) and not n.endswith(RECOMPUTED_SUFFIXES)
    ]
    if unexpected:
        raise MlxeffError(f"unexpected weights: {_short(unexpected)}", path)
    entries = {}
    for name, srcs in wanted.items():
        parts = [refs[s] for s in srcs]
        if len(parts) > 1 and len({tuple(p.shape[1:]) for p in parts}) != 1:
            desc = ", ".join(f"{p.name} {tuple(p.shape)}" for p in parts)
            raise MlxeffError(f"cannot stack {desc}: their shapes disagree", path)
        entry = Entry(parts, rows.get(name))
        if entry.shape != expected[name]:
            raise MlxeffError(
                f"{entry.names} has shape {entry.source_shape} but the config implies {expected[name]}", path
            )
        entries[name] = entry
    return entries
