"""Training the M2R2 fast stream (arXiv 2502.02040) on a frozen model: adapters and router only.

For a batch of packed sequences (inputs ``x``, next tokens ``y``; notation of ``m2r2``):

1. the slow stream (the frozen model, no gradient) reads ``x`` layer by layer, keeping every state
   ``h_0..h_N``, the keys and values of layers ``0..m-1`` as its cache would hold them (after
   qk-norm and RoPE), and its logits;
2. the fast stream reads ``x`` from ``h_0``: step ``j`` is block ``j`` with adapters, its attention
   reading ``[K_slow_j ; K_fast_j]`` and ``[V_slow_j ; V_fast_j]`` under a (T, 2T) mask (slow keys of
   earlier positions, its own key at the position itself) -- what drafting on the model's cache
   shows the first drafted token;
3. ``loss = w_align * align + w_lm * CE + w_kd * KL + w_router * BCE`` (``m2r2`` gives the terms);
   ``agree`` (not optimised) is the fraction of positions where the fast argmax equals the slow
   argmax: the greedy acceptance rate of a one-token draft.

The training loop is ``mlxeff.train.train_loop`` (AdamW, warm-up + cosine, clipping, checkpoints,
resume); the base is held outside the module tree, so only the fast stream is trained and saved.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxeffError
from .artifacts import load_frozen_base
from .m2r2 import M2R2, FastStream, M2R2Config


class _Ref:
    """Holds the frozen base outside the module tree: its weights are neither trained nor saved."""

    def __init__(self, model):
        self.model = model


class M2R2Model(nn.Module):
    """The fast stream (trainable) with a reference to the frozen base."""

    def __init__(self, base: nn.Module, stream: FastStream):
        super().__init__()
        base.freeze()
        self._ref = _Ref(base)
        self.stream = stream

    @property
    def base(self) -> nn.Module:
        return self._ref.model


@dataclass
class M2R2LossConfig:
    align_weight: float = 1.0
    lm_weight: float = 1.0
    kd_weight: float = 1.0
    router_weight: float = 0.1

    def check(self) -> None:
        for name, v in vars(self).items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise MlxeffError(f"--{name.replace('_weight', '')}-weight must be a finite number "
                                  f">= 0, got {v}")


class _Recorder:
    """A one-forward cache stand-in that keeps the keys and values the layer attends to."""

    offset = next_position = 0
    attend_index = raw_sink = None
    want_scores = False

    def update_and_fetch(self, keys, values, positions=None):
        self.keys, self.values = keys, values
        return keys, values


class _SharedKV(_Recorder):
    """The fast stream's stand-in: slow keys/values of every position, then its own."""

    def __init__(self, keys, values):
        self.slow = (keys, values)

    def update_and_fetch(self, keys, values, positions=None):
        k, v = self.slow
        return mx.concatenate([k, keys], axis=2), mx.concatenate([v, values], axis=2)


def shared_mask(T: int) -> mx.array:
    """(T, 2T) boolean: query t sees slow keys s < t and its own fast key."""
    i = mx.arange(T)
    return mx.concatenate([i[None, :] < i[:, None], i[None, :] == i[:, None]], axis=1)


def slow_pass(base: nn.Module, inputs: mx.array, cached_layers: int):
    """States ``h_0..h_N``, the first ``cached_layers`` layers' attended keys and values, and the
    logits of the frozen model, without gradient."""
    t = base.transformer
    h = t.token_embeddings(inputs)
    states, kv = [h], []
    for i in range(len(base.layers)):
        rec = _Recorder() if i < cached_layers else None
        h = t.forward_layers(h, i, i + 1, [rec] * (i + 1), mask="causal")
        states.append(h)
        if rec is not None:
            kv.append((rec.keys, rec.values))
    logits = base.logits(t.norm(h))
    return ([mx.stop_gradient(s) for s in states],
            [(mx.stop_gradient(k), mx.stop_gradient(v)) for k, v in kv], mx.stop_gradient(logits))


def _rms(x: mx.array) -> mx.array:
    return mx.fast.rms_norm(x.astype(mx.float32), None, 1e-6)


def m2r2_terms(model: M2R2Model, batch: mx.array) -> Dict[str, mx.array]:
    """Every loss term for ``batch`` (B, T+1) plus ``agree`` (see the module docstring)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    base, stream = model.base, model.stream
    cfg = stream.config
    states, kv, slow_logits = slow_pass(base, inputs, cfg.steps)
    caches = [_SharedKV(k, v) for k, v in kv]
    fast_states: List[mx.array] = []
    final = stream(base, states[0], caches, mask=shared_mask(inputs.shape[1]), states=fast_states)
    align = sum(((_rms(p) - _rms(states[d])) ** 2).mean() for p, d in zip(fast_states, cfg.targets))
    align = align / cfg.steps
    normed = base.transformer.norm(final)
    logits = base.logits(normed).astype(mx.float32)
    fast_lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    slow = slow_logits.astype(mx.float32)
    slow_lp = slow - mx.logsumexp(slow, axis=-1, keepdims=True)
    ce = -mx.take_along_axis(fast_lp, targets[..., None], axis=-1).mean()
    kd = (mx.exp(slow_lp) * (slow_lp - fast_lp)).sum(axis=-1).mean()
    agree = mx.stop_gradient((fast_lp.argmax(-1) == slow_lp.argmax(-1)).astype(mx.float32))
    trust = stream.router(mx.stop_gradient(normed), mx.stop_gradient(logits))
    router = nn.losses.binary_cross_entropy(trust, agree, with_logits=True, reduction="mean")
    return {"align": align, "ce": ce, "kd": kd, "router": router, "agree": agree.mean()}


def make_loss_fn(cfg: M2R2LossConfig) -> Callable:
    """``loss_fn(model, batch) -> (loss, metrics)`` for the training loop."""

    def loss_fn(model: M2R2Model, batch: mx.array):
        t = m2r2_terms(model, batch)
        loss = (cfg.align_weight * t["align"] + cfg.lm_weight * t["ce"] + cfg.kd_weight * t["kd"]
                + cfg.router_weight * t["router"])
        return loss, t

    return loss_fn


def evaluate(model: M2R2Model, batches: Sequence[mx.array]) -> Dict[str, float]:
    """Mean terms over ``batches``, and the base's own cross-entropy (``ce_base``)."""
    sums: Dict[str, float] = {}
    for b in batches:
        t = m2r2_terms(model, b)
        logits = model.base(b[:, :-1]).astype(mx.float32)
        t["ce_base"] = nn.losses.cross_entropy(logits, b[:, 1:], reduction="mean")
        mx.eval(t)
        for k, v in t.items():
            sums[k] = sums.get(k, 0.0) + v.item()
    return {k: v / max(len(batches), 1) for k, v in sums.items()}


def valid_fn_for(windows, batch_size: int, loss_cfg: M2R2LossConfig) -> Callable:
    """Validation for the training loop: ``loss`` is the training objective on held-out text,
    ``ppl`` the fast stream's perplexity."""

    def fn(model: M2R2Model) -> dict:
        batches = [mx.array(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
        r = evaluate(model, batches)
        loss = (loss_cfg.align_weight * r["align"] + loss_cfg.lm_weight * r["ce"]
                + loss_cfg.kd_weight * r["kd"] + loss_cfg.router_weight * r["router"])
        return {"loss": loss, "ppl": math.exp(min(r["ce"], 700.0)), **r}

    return fn


def run_m2r2_training(cfg, *, base_dir, rate: float, rank: int, train_files, valid_files, out,
                      loss_cfg: Optional[M2R2LossConfig] = None, work=None,
                      eval_tokens: int = 65_536, cache_dir=None, resume: bool = False,
                      keep_work: bool = False, force: bool = False, say=print, log=None) -> dict:
    """Train a fast stream for the model in ``base_dir`` and save the artifact to ``out``
    (``m2r2``). Checkpoints live in ``work`` (default: a hidden sibling of ``out``) and are removed
    after success unless ``keep_work``."""
    from .. import data
    from ..train import DTYPES, LogRecorder, train_loop

    wall = time.perf_counter()
    loss_cfg = loss_cfg or M2R2LossConfig()
    loss_cfg.check()
    out = Path(out)
    if out.exists() and not force:
        raise MlxeffError("output already exists (use --force to replace it)", out)
    work = Path(work) if work is not None else out.parent / f".{out.name}.train"
    files = data.expand_files(train_files, "training")
    vfiles = data.expand_files(valid_files, "validation") if valid_files else []

    base, tok, disk_dtype = load_frozen_base(base_dir, DTYPES[cfg.dtype])
    config = M2R2Config.for_model(base.args, rate, rank)
    mx.random.seed(cfg.seed)
    stream = FastStream(base.args, config)
    stream.set_dtype(DTYPES[cfg.dtype])
    model = M2R2Model(base, stream)

    work.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else work / "cache"
    tic = time.perf_counter()
    train_tokens = data.tokenize_files(files, tok, cache)
    valid_tokens = data.tokenize_files(vfiles, tok, cache) if vfiles else None
    say(f"tokens: train {len(train_tokens):,}" + (f", valid {len(valid_tokens):,}"
        if valid_tokens is not None else "") + f" ({time.perf_counter() - tic:.1f} s)")
    dataset = data.PackedDataset(train_tokens, cfg.seq_len, seed=cfg.seed)
    valid_fn, initial = None, None
    if valid_tokens is not None:
        windows = data.eval_windows(valid_tokens, cfg.seq_len, eval_tokens)
        valid_fn = valid_fn_for(windows, cfg.batch_size, loss_cfg)
        if not resume or not (work / "checkpoints").is_dir():
            initial = valid_fn(model)
            say(f"before training: agreement {initial['agree']:.4f}  align {initial['align']:.4f}  "
                f"CE {initial['ce']:.4f}  KL {initial['kd']:.4f}  (base's CE {initial['ce_base']:.4f})")
    n_params = sum(v.size for _, v in tree_flatten(stream.parameters()))
    say(f"fast stream: {config.steps}/{len(base.layers)} steps, targets {config.targets}, rank "
        f"{rank}, {n_params:,} parameters; {cfg.tokens_per_step:,} tokens per step")

    log_fn = LogRecorder(log)
    result = train_loop(model, make_loss_fn(loss_cfg),
                        lambda k: mx.array(dataset.batch(k, cfg.batch_size)), cfg, out_dir=work,
                        valid_fn=valid_fn, resume=resume, log=log_fn, say=say)
    stream.set_dtype(disk_dtype)
    training = {
        "rate": rate, "loss": vars(loss_cfg), "config": cfg.to_dict(),
        "train_files": [str(f) for f in files], "valid_files": [str(f) for f in vfiles],
        "tokens_seen": result["tokens_seen"], "train_time_s": result["train_time_s"],
        "device": str(mx.default_device()), "valid_initial": initial, "valid_final": result["valid"],
    }
    summary = {"out": str(out), "base": str(base_dir), "steps": config.steps,
               "targets": config.targets, "rank": rank, "parameters": int(n_params), **training,
               "history": result["history"],
               "train_log": log_fn.train_log}
    summary["wall_time_s"] = time.perf_counter() - wall
    M2R2(stream, {"training": training}).save(
        out, force=force, base=base, extra_files={"summary.json": json.dumps(summary, indent=1)})
    if not keep_work:
        import shutil

        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    return summary
