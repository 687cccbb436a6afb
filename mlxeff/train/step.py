"""One optimizer step: gradients of the loss (accumulated over micro-batches), clipping, AdamW on
float32 master weights, and the compute-precision copy written back into the model.

``dtype="bfloat16"``: the model computes in bf16 while fp32 master weights and fp32 AdamW state
live in the optimizer (each step casts the updated masters back into the model); ``"float32"``:
everything fp32 (use this on CPU, where bf16 matmul is slow). The step is ``mx.compile``d: the
same results run to run, on CPU and CUDA, since nothing in the step is random.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .config import DTYPES, TrainConfig


def cast_tree(tree, dtype):
    return tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, tree)


def make_step(model: nn.Module, loss_fn, batch_fn: Callable[[int], mx.array],
              optimizer: optim.Optimizer, box: dict, cfg: TrainConfig
              ) -> Callable[[int], Tuple[mx.array, dict, mx.array]]:
    """``step(s) -> (loss, metrics, grad_norm)`` for optimizer step ``s`` (0-based), which consumes
    micro-batches ``s*accum .. s*accum+accum-1``. ``box["master"]`` holds the fp32 masters."""
    compute_dtype = DTYPES[cfg.dtype]
    grad_fn = nn.value_and_grad(model, loss_fn)

    def grads_of(batch):
        (loss, metrics), grads = grad_fn(model, batch)
        return loss, metrics, cast_tree(grads, mx.float32)

    def apply(grads):
        if cfg.clip > 0:
            grads, norm = optim.clip_grad_norm(grads, cfg.clip)
        else:
            norm = mx.sqrt(sum(mx.square(g).sum() for _, g in tree_flatten(grads)))
        new = optimizer.apply_gradients(grads, box["master"])
        box["master"] = new
        model.update(cast_tree(new, compute_dtype))
        return norm

    def full_step(batch):
        loss, metrics, grads = grads_of(batch)
        return loss, metrics, apply(grads)

    if cfg.compile:
        state = [model.state, optimizer.state, box]
        compiled = partial(mx.compile, inputs=state, outputs=state)
        full_step, grads_step, apply_step = compiled(full_step), compiled(grads_of), compiled(apply)
    else:
        grads_step, apply_step = grads_of, apply

    def step(s: int):
        if cfg.accum == 1:
            return full_step(batch_fn(s))
        total = None
        for m in range(cfg.accum):
            loss, metrics, grads = grads_step(batch_fn(s * cfg.accum + m))
            if total is None:
                total = [loss, metrics, grads]
            else:
                total = [total[0] + loss, tree_map(mx.add, total[1], metrics),
                         tree_map(mx.add, total[2], grads)]
            mx.eval(total)
        scale = 1.0 / cfg.accum
        loss, metrics, grads = tree_map(lambda a: a * scale, total)
        return loss, metrics, apply_step(grads)

    return step
