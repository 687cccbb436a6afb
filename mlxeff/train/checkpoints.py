"""Training checkpoints: ``OUT/checkpoints/step-NNNNNNN/`` with the trainable weights (fp32
masters), the optimizer state, and ``state.json`` (step, config, model signature, history).

Each checkpoint is written into a temporary directory and renamed into place
(``io.atomic_directory``); ``state.json`` is written last, so a directory that has it is complete
and an interrupted write leaves the previous checkpoint as the newest. Only the newest ``keep``
checkpoints stay. ``run_folder`` makes a run's folder and removes it again when the run fails
before it saved anything.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxeffError
from ..io import atomic_directory
from .config import RESUMABLE_FIELDS, TrainConfig

CKPT_PREFIX = "step-"


def model_signature(model: nn.Module) -> dict:
    """What a checkpoint must agree on: trainable tensor shapes and, if present, the model config."""
    sig = {"trainable": {k: list(v.shape) for k, v in tree_flatten(model.trainable_parameters())}}
    args = getattr(model, "args", None)
    if args is not None and hasattr(args, "to_dict"):
        sig["model"] = args.to_dict()
    return sig


def list_checkpoints(out_dir: Path):
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "state.json").is_file():
            try:
                found.append((int(p.name[len(CKPT_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def refuse_existing(out_dir: Path) -> None:
    """A fresh run must not mix with an earlier run's checkpoints."""
    if list_checkpoints(out_dir):
        raise MlxeffError("already holds checkpoints; pass --resume to continue or use another --out",
                          out_dir)


@contextmanager
def run_folder(path: Path, say: Optional[Callable[[str], None]] = None):
    """Create ``path`` (if missing) for the block. If the block fails, a folder that holds a
    checkpoint stays, for ``--resume`` (``say`` tells where when this run wrote one and the failure
    was not an interrupt, which the loop reports itself); one without is removed if this run
    created it, so a failed start leaves nothing behind."""
    path = Path(path)
    created = not path.exists()
    before = list_checkpoints(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException as e:
        now = list_checkpoints(path)
        if now:
            if say is not None and now != before and not isinstance(e, KeyboardInterrupt):
                say(f"checkpoints kept in {path} (continue with --resume)")
        elif created:
            shutil.rmtree(path, ignore_errors=True)
        raise


def save_checkpoint(out_dir: Path, step: int, params: dict, opt_state: dict, state: dict,
                    keep: int) -> Path:
    final = Path(out_dir) / "checkpoints" / f"{CKPT_PREFIX}{step:07d}"
    with atomic_directory(final, force=True) as tmp:
        mx.save_safetensors(str(tmp / "params.safetensors"), params)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt_state)))
        # Written last: a directory with state.json is complete.
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path):
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        params = mx.load(str(path / "params.safetensors"))
        opt_flat = mx.load(str(path / "optimizer.safetensors"))
    except Exception as e:
        raise MlxeffError(f"unreadable checkpoint ({e})", path) from None
    return state, params, opt_flat


def check_compatible(ckpt_state: dict, cfg: TrainConfig, signature: dict, path: Path) -> None:
    old = ckpt_state.get("config", {})
    new = cfg.to_dict()
    diff = [k for k in new if k not in RESUMABLE_FIELDS and old.get(k) != new[k]]
    if diff:
        k = diff[0]
        raise MlxeffError(
            f"checkpoint was written with a different training config ({k}={old.get(k)!r}, "
            f"now {new[k]!r}); use another --out or the same settings", path)
    old_sig = ckpt_state.get("signature", {})
    if old_sig.get("model") != signature.get("model"):
        o, n = old_sig.get("model") or {}, signature.get("model") or {}
        k = next((k for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)), "model")
        raise MlxeffError(
            f"checkpoint is for a different model ({k}={o.get(k)!r}, now {n.get(k)!r})", path)
    if old_sig.get("trainable") != signature.get("trainable"):
        raise MlxeffError("checkpoint's trainable tensors differ from this model's", path)
