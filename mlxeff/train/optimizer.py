"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule.

Linear warm-up from ``lr/warmup`` to ``lr`` over ``warmup`` steps, then cosine decay to
``min_lr`` at ``steps`` (OpenELM, arXiv 2404.14619, trains with warm-up then cosine decay).
Choice: norm scales (1-D parameters) are not decayed, only matrices.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim

from .config import TrainConfig


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
