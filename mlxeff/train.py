"""A generic training loop (base models, auxiliary models, predictors, adapters).

``train_loop(model, loss_fn, batch_fn, cfg, out_dir=...)`` trains the *trainable* parameters of any
``nn.Module`` (frozen submodules stay frozen) with

- AdamW (decoupled weight decay on matrices only: norms' scales are not decayed), linear warm-up
  from 0 to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``steps``;
- gradient clipping by global norm; gradient accumulation over ``accum`` micro-batches;
- ``dtype="bfloat16"``: the model computes in bf16 while fp32 master weights and fp32 AdamW state
  live in the optimizer (each step casts the updated masters back into the model); ``"float32"``:
  everything fp32 (use this on CPU, where bf16 matmul is slow);
- ``batch_fn(k)`` returns micro-batch ``k``; optimizer step ``s`` (0-based) consumes micro-batches
  ``s*accum .. s*accum+accum-1``. Batches being a pure function of ``k`` makes resume exact;
- periodic validation through ``valid_fn(model) -> dict``;
- checkpoints ``out_dir/checkpoints/step-NNNNNNN/`` (trainable weights, optimizer state, step,
  config, history), each written to a temporary directory and renamed into place, so an interrupted
  run always leaves the last complete checkpoint; ``resume=True`` continues from the newest one and
  refuses a checkpoint written for a different configuration or model;
- the step is ``mx.compile``d (same results, run to run, on CPU and CUDA: nothing in the step is
  random).

``lm_loss`` is the language-model loss with OpenELM's z-loss (``z * mean(logsumexp(logits)^2)``),
which keeps the softmax normaliser near zero so low-precision logits stay well conditioned.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .errors import MlxeffError

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# Fields that may change between a run and its resumption without changing the trajectory.
RESUMABLE_FIELDS = ("eval_every", "save_every", "log_every", "keep_checkpoints")
CKPT_PREFIX = "step-"


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
    save_every: int = 0  # 0 = only at the end
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
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise MlxeffError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_decay", "clip", "z_loss", "min_lr", "eps"):
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


# ---------------------------------------------------------------------------------------------
# losses and schedule


def cross_entropy_terms(logits: mx.array, targets: mx.array) -> Tuple[mx.array, mx.array]:
    """Per-token negative log-likelihood and log-normaliser, computed in fp32."""
    logits = logits.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return lse - picked, lse


def lm_loss(model: nn.Module, batch: mx.array, z_loss: float = 0.0) -> Tuple[mx.array, dict]:
    """Next-token loss on a (B, L+1) batch: mean NLL + ``z_loss`` * mean(logsumexp^2)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    nll, lse = cross_entropy_terms(model(inputs), targets)
    ce = nll.mean()
    loss = ce + z_loss * mx.square(lse).mean() if z_loss else ce
    return loss, {"ce": ce}


def lr_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """Linear warm-up 0 -> lr over ``warmup`` steps, cosine lr -> min_lr over the remaining steps."""
    decay_steps = max(cfg.steps - cfg.warmup, 1)
    cosine = optim.cosine_decay(cfg.lr, decay_steps, end=cfg.min_lr)
    if cfg.warmup == 0:
        return cosine
    # The optimizer's step counter is 0 at the first update; warm up to lr at step `warmup`.
    warm = optim.linear_schedule(cfg.lr / cfg.warmup, cfg.lr, cfg.warmup - 1) if cfg.warmup > 1 \
        else (lambda step: mx.array(cfg.lr))
    return optim.join_schedules([warm, cosine], [cfg.warmup])


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    schedule = lr_schedule(cfg)
    kw = dict(learning_rate=schedule, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps)
    if cfg.weight_decay == 0:
        return optim.AdamW(weight_decay=0.0, **kw)
    # Decay matrices (projections, embeddings), not the 1-D scales of the norms.
    return optim.MultiOptimizer(
        [optim.AdamW(weight_decay=cfg.weight_decay, **kw), optim.AdamW(weight_decay=0.0, **kw)],
        [lambda path, p: p.ndim >= 2],
    )


def current_lr(cfg: TrainConfig, step: int) -> float:
    return float(lr_schedule(cfg)(mx.array(step)))


# ---------------------------------------------------------------------------------------------
# checkpoints


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


def save_checkpoint(out_dir: Path, step: int, params: dict, opt_state: dict, state: dict,
                    keep: int) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        mx.save_safetensors(str(tmp / "params.safetensors"), params)
        opt_flat = dict(tree_flatten(opt_state))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_flat)
        # Written last: a directory with state.json is complete.
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


# ---------------------------------------------------------------------------------------------
# progress


class Progress:
    """One updating line on a TTY (loss, tokens/s, ETA); plain lines otherwise."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, rec: dict) -> None:
        if "valid_loss" in rec:
            line = (f"step {rec['step']}/{self.total}  valid loss {rec['valid_loss']:.4f}  "
                    f"ppl {rec.get('valid_ppl', math.exp(rec['valid_loss'])):.2f}")
            self._line(line, final=True)
            return
        eta = rec.get("eta_s", 0.0)
        frac = rec["step"] / self.total
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        line = (f"[{bar}] {rec['step']}/{self.total}  loss {rec['loss']:.4f}  "
                f"lr {rec['lr']:.2e}  {rec['tokens_per_s']:,.0f} tok/s  "
                f"ETA {_fmt_time(eta)}")
        self._line(line, final=not self.tty)

    def _line(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------
# the loop


def _cast_tree(tree, dtype):
    return tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, tree)


def train_loop(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, mx.array], Tuple[mx.array, dict]],
    batch_fn: Callable[[int], mx.array],
    cfg: TrainConfig,
    *,
    out_dir: Path,
    valid_fn: Optional[Callable[[nn.Module], dict]] = None,
    resume: bool = False,
    log: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Train ``model``'s trainable parameters; returns the loss history and run statistics.

    ``loss_fn(model, batch) -> (loss, metrics)`` with scalar arrays as metrics. ``valid_fn(model)``
    returns a dict with at least ``"loss"`` (mean NLL); it runs every ``cfg.eval_every`` steps and
    at the end. The model is left in training precision (``cfg.dtype``) with the final weights.
    """
    out_dir = Path(out_dir)
    cfg.validate()
    compute_dtype = DTYPES[cfg.dtype]
    signature = model_signature(model)
    if not signature["trainable"]:
        raise MlxeffError("the model has no trainable parameters")
    progress = None
    if log is None:
        progress = Progress(cfg.steps)
        log = progress

    # fp32 masters for the trainable parameters; the model holds their compute-precision copy.
    master = _cast_tree(model.trainable_parameters(), mx.float32)
    optimizer = make_optimizer(cfg)
    optimizer.init(master)
    history = {"step": [], "loss": [], "valid": []}
    start_step = 0

    ckpts = list_checkpoints(out_dir)
    if resume and ckpts:
        state, params, opt_flat = read_checkpoint(ckpts[-1])
        check_compatible(state, cfg, signature, ckpts[-1])
        master = tree_unflatten(list(params.items()))
        optimizer.state = tree_unflatten(list(opt_flat.items()))
        optimizer.init(master)
        start_step = int(state["step"])
        history = state.get("history", history)
    elif ckpts and not resume:
        raise MlxeffError("already holds checkpoints; pass --resume to continue or use another --out",
                          out_dir)
    model.update(_cast_tree(master, compute_dtype))
    mx.eval(model.parameters(), master, optimizer.state)
    box = {"master": master}

    grad_fn = nn.value_and_grad(model, loss_fn)

    def grads_of(batch):
        (loss, metrics), grads = grad_fn(model, batch)
        return loss, metrics, _cast_tree(grads, mx.float32)

    def apply(grads):
        if cfg.clip > 0:
            grads, norm = optim.clip_grad_norm(grads, cfg.clip)
        else:
            norm = mx.sqrt(sum(mx.square(g).sum() for _, g in tree_flatten(grads)))
        new = optimizer.apply_gradients(grads, box["master"])
        box["master"] = new
        model.update(_cast_tree(new, compute_dtype))
        return norm

    state = [model.state, optimizer.state, box]

    def full_step(batch):
        loss, metrics, grads = grads_of(batch)
        return loss, metrics, apply(grads)

    if cfg.compile:
        full_step = partial(mx.compile, inputs=state, outputs=state)(full_step)
        grads_step = partial(mx.compile, inputs=state, outputs=state)(grads_of)
        apply_step = partial(mx.compile, inputs=state, outputs=state)(apply)
    else:
        grads_step, apply_step = grads_of, apply

    def one_step(step):
        if cfg.accum == 1:
            return full_step(batch_fn(step))
        total = None
        for m in range(cfg.accum):
            loss, metrics, grads = grads_step(batch_fn(step * cfg.accum + m))
            if total is None:
                total = [loss, metrics, grads]
            else:
                total = [total[0] + loss, tree_map(mx.add, total[1], metrics),
                         tree_map(mx.add, total[2], grads)]
            mx.eval(total)
        scale = 1.0 / cfg.accum
        loss, metrics, grads = tree_map(lambda a: a * scale, total)
        return loss, metrics, apply_step(grads)

    def run_valid(step):
        if valid_fn is None:
            return None
        model.eval()
        res = valid_fn(model)
        model.train()
        rec = {"step": step, **{k: float(v) for k, v in res.items()}}
        history["valid"].append(rec)
        log({"step": step, "valid_loss": rec["loss"],
             **({"valid_ppl": rec["ppl"]} if "ppl" in rec else {})})
        return rec

    def checkpoint(step):
        params = dict(tree_flatten(box["master"]))
        st = {"step": step, "config": cfg.to_dict(), "signature": signature, "history": history}
        save_checkpoint(out_dir, step, params, optimizer.state, st, cfg.keep_checkpoints)

    def flush(everything: bool):
        # Reading a loss waits for its step; stay one step behind unless everything is needed.
        keep = 0 if everything else 1
        while len(pending) > keep:
            s, l = pending.pop(0)
            value = l.item()
            if not math.isfinite(value):
                raise MlxeffError(f"loss became {value} at step {s + 1}; lower --lr or use "
                                  "float32", out_dir)
            history["step"].append(s + 1)
            history["loss"].append(value)

    model.train()
    tic = time.perf_counter()
    window_tic, window_tokens = tic, 0
    pending = []  # (step, loss array) awaiting host read, one step behind the device
    tokens = 0
    step = start_step
    try:
        for step in range(start_step, cfg.steps):
            loss, metrics, norm = one_step(step)
            mx.async_eval(loss, norm, box["master"], optimizer.state)
            pending.append((step, loss))
            tokens += cfg.tokens_per_step
            window_tokens += cfg.tokens_per_step
            done = step + 1
            saving = cfg.save_every and done % cfg.save_every == 0
            flush(everything=done == cfg.steps or saving)
            if done % cfg.log_every == 0 or done == cfg.steps:
                mx.eval(loss)
                now = time.perf_counter()
                tps = window_tokens / max(now - window_tic, 1e-9)
                log({"step": done, "loss": loss.item(), "grad_norm": norm.item(),
                     "lr": current_lr(cfg, step), "tokens_per_s": tps,
                     "eta_s": (cfg.steps - done) * cfg.tokens_per_step / max(tps, 1e-9),
                     **{k: float(v) for k, v in metrics.items()}})
                window_tic, window_tokens = now, 0
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                run_valid(done)
            if saving and done != cfg.steps:
                mx.eval(box["master"], optimizer.state)
                checkpoint(done)
        mx.eval(box["master"], optimizer.state)
        train_time = time.perf_counter() - tic
        final_valid = run_valid(cfg.steps)
        if start_step < cfg.steps:
            checkpoint(cfg.steps)
    finally:
        if progress is not None:
            progress.close()
    return {
        "history": history,
        "steps": cfg.steps,
        "start_step": start_step,
        "tokens": tokens,
        "tokens_seen": cfg.steps * cfg.tokens_per_step,
        "train_time_s": train_time,
        "tokens_per_s": tokens / max(train_time, 1e-9),
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "valid": final_valid,
    }


def model_parameters_summary(model: nn.Module) -> Dict[str, int]:
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {"parameters": int(total), "trainable": int(trainable)}


def valid_loss_fn(windows: np.ndarray, batch_size: int) -> Callable[[nn.Module], dict]:
    """Mean NLL and perplexity of a model over fixed (n, L+1) token windows."""

    def fn(model: nn.Module) -> dict:
        total, count = 0.0, 0
        for i in range(0, len(windows), batch_size):
            b = mx.array(windows[i:i + batch_size])
            nll, _ = cross_entropy_terms(model(b[:, :-1]), b[:, 1:])
            total += nll.sum().item()
            count += nll.size
        loss = total / count
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}

    return fn


# ---------------------------------------------------------------------------------------------
# language-model training from text files (what `mlxeff train` runs)


def build_args(shape: dict, vocab_size: int, seq_len: int):
    """ModelArgs from ``--config NAME`` or the layer-wise scaling options."""
    from .models import layerwise_config, openelm_config

    if shape.get("config"):
        args = openelm_config(shape["config"], vocab_size=vocab_size)
    else:
        for name in ("layers", "model_dim", "head_dim", "gqa_groups", "ffn_divisor"):
            if shape[name] < 1:
                raise MlxeffError(f"--{name.replace('_', '-')} must be at least 1, got {shape[name]}")
        args = layerwise_config(
            shape["layers"], shape["model_dim"], shape["head_dim"],
            qkv_multipliers=tuple(shape["qkv_mult"]), ffn_multipliers=tuple(shape["ffn_mult"]),
            num_gqa_groups=shape["gqa_groups"], ffn_dim_divisor=shape["ffn_divisor"],
            vocab_size=vocab_size,
        )
    args.max_context_length = seq_len  # the context the model is trained on
    args.bos_token_id, args.eos_token_id = 1, 2
    return args


def init_model(args, seed: int):
    """A fresh model: MLX's default init, with each residual branch's output projection scaled by
    1/sqrt(2 * layers) (GPT-2's rule) so the residual stream's variance does not grow with depth."""
    from .models import Model

    mx.random.seed(seed)
    model = Model(args)
    scale = (2 * args.num_transformer_layers) ** -0.5
    for layer in model.layers:
        layer.attn.out_proj.weight = layer.attn.out_proj.weight * scale
        layer.ffn.proj_2.weight = layer.ffn.proj_2.weight * scale
    mx.eval(model.parameters())
    return model


def _resolve_tokenizer(out: Path, tokenizer: Optional[Path], vocab_size: Optional[int],
                       files, tokenizer_chars: int, say):
    from . import data

    if tokenizer is not None and vocab_size is not None:
        raise MlxeffError("give either --tokenizer DIR or --vocab-size N, not both")
    if tokenizer is not None:
        return data.load_tokenizer(tokenizer), Path(tokenizer)
    if vocab_size is None:
        raise MlxeffError("give --tokenizer DIR (reuse one) or --vocab-size N (train one)")
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tok = data.load_tokenizer(tok_dir)
        have = len(tok._tokenizer.backend_tokenizer.get_vocab())
        if have != vocab_size:
            raise MlxeffError(f"holds a tokenizer of {have} tokens, not --vocab-size {vocab_size}",
                              tok_dir)
        say(f"reusing tokenizer {tok_dir}")
        return tok, tok_dir
    tic = time.perf_counter()
    say(f"training a {vocab_size}-token byte-level BPE on up to {tokenizer_chars:,} characters ...")
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=out))
    try:
        data.train_tokenizer(files, vocab_size, tmp, max_chars=tokenizer_chars)
        os.replace(tmp, tok_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"tokenizer trained in {time.perf_counter() - tic:.1f} s")
    return data.load_tokenizer(tok_dir), tok_dir


def run_training(cfg: TrainConfig, *, train_files, valid_files, out, tokenizer=None,
                 vocab_size=None, tokenizer_chars: int = 40_000_000, shape: dict,
                 eval_tokens: int = 262_144, save_dtype: str = "float16", cache_dir=None,
                 resume: bool = False, say=print, log=None) -> dict:
    """Tokenizer, token cache, model, ``train_loop``, and the final model in ``out/model``."""
    from . import data
    from .io import save

    wall = time.perf_counter()
    if save_dtype not in DTYPES:
        raise MlxeffError(f"--save-dtype must be one of {sorted(DTYPES)}, got {save_dtype!r}")
    if eval_tokens < 1:
        raise MlxeffError(f"--eval-tokens must be at least 1, got {eval_tokens}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MlxeffError("exists and is not a directory", out)
    files = data.expand_files(train_files, "training")
    vfiles = data.expand_files(valid_files, "validation") if valid_files else []
    # Shape errors before any slow work.
    build_args(shape, vocab_size or 512, cfg.seq_len)
    if list_checkpoints(out) and not resume:
        raise MlxeffError("already holds checkpoints; pass --resume to continue or use another --out",
                          out)
    out.mkdir(parents=True, exist_ok=True)
    tok, tok_dir = _resolve_tokenizer(out, tokenizer, vocab_size, files, tokenizer_chars, say)
    n_vocab = len(tok._tokenizer.backend_tokenizer.get_vocab())
    args = build_args(shape, n_vocab, cfg.seq_len)
    if (tok.bos_token_id, tok.eos_token_id) != (args.bos_token_id, args.eos_token_id):
        raise MlxeffError(f"the tokenizer's BOS/EOS ids are {tok.bos_token_id}/{tok.eos_token_id}, "
                          "expected 1/2 (<s>, </s>)", tok_dir)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    tic = time.perf_counter()
    train_tokens = data.tokenize_files(files, tok, cache)
    valid_tokens = data.tokenize_files(vfiles, tok, cache) if vfiles else None
    say(f"tokens: train {len(train_tokens):,} from {len(files)} file(s)"
        + (f", valid {len(valid_tokens):,}" if valid_tokens is not None else "")
        + f" ({time.perf_counter() - tic:.1f} s)")
    dataset = data.PackedDataset(train_tokens, cfg.seq_len, seed=cfg.seed)
    valid_fn = None
    if valid_tokens is not None:
        windows = data.eval_windows(valid_tokens, cfg.seq_len, eval_tokens)
        valid_fn = valid_loss_fn(windows, cfg.batch_size)

    model = init_model(args, cfg.seed)
    n_params = args.num_parameters()
    say(f"model: {args.num_transformer_layers} layers, width {args.model_dim}, "
        f"{n_params:,} parameters; {cfg.tokens_per_step:,} tokens per step, "
        f"{dataset.epochs(cfg.steps * cfg.accum, cfg.batch_size):.2f} epochs")

    def batch_fn(k: int) -> mx.array:
        return mx.array(dataset.batch(k, cfg.batch_size))

    result = train_loop(model, partial(lm_loss, z_loss=cfg.z_loss), batch_fn, cfg, out_dir=out,
                        valid_fn=valid_fn, resume=resume, log=log)
    model.set_dtype(DTYPES[save_dtype])
    model_dir = out / "model"
    save(model, tok, model_dir, force=True)
    valid = result["valid"] or {}
    summary = {
        "model_dir": str(model_dir),
        "parameters": n_params,
        "config": args.to_dict(),
        "train": cfg.to_dict(),
        "train_files": [str(f) for f in files],
        "valid_files": [str(f) for f in vfiles],
        "train_tokens_available": int(len(train_tokens)),
        "tokens_seen": result["tokens_seen"],
        "epochs": dataset.epochs(cfg.steps * cfg.accum, cfg.batch_size),
        "steps": cfg.steps,
        "resumed_from": result["start_step"],
        "train_time_s": result["train_time_s"],
        "wall_time_s": time.perf_counter() - wall,
        "tokens_per_s": result["tokens_per_s"],
        "final_loss": result["final_loss"],
        "valid_loss": valid.get("loss"),
        "valid_ppl": valid.get("ppl"),
        "device": str(mx.default_device()),
        "save_dtype": save_dtype,
        "history": result["history"],
    }
    previous = out / "summary.json"
    if result["start_step"] == cfg.steps and previous.is_file():
        # Nothing was trained now (the run was complete): keep the figures of the run that trained.
        old = json.loads(previous.read_text())
        for key in ("train_time_s", "wall_time_s", "tokens_per_s", "resumed_from", "device"):
            summary[key] = old.get(key, summary[key])
    previous.write_text(json.dumps(summary, indent=1))
    return summary
