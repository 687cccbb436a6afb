"""Language-model losses: next-token cross-entropy with OpenELM's z-loss, and validation NLL.

The z-loss (``z * mean(logsumexp(logits)^2)``, as in OpenELM, arXiv 2404.14619, after PaLM,
arXiv 2204.02311) keeps the softmax normaliser near zero so low-precision logits stay well
conditioned. Every term is computed in float32 whatever the model's precision.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np


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
