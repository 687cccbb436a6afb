"""Two-model speculative decoding: a smaller model with the same vocabulary drafts, the model verifies.

Leviathan et al., "Fast Inference from Transformers via Speculative Decoding", arXiv 2211.17192;
Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling", arXiv
2302.01318. mlx-lm offers the same as ``mlx_lm.generate --draft-model``.

Algorithm. The draft model keeps its own KV cache of the context. After the prefill it reads the
prompt; to propose ``k`` tokens it first catches up with the tokens accepted since its last
proposal (one forward over them and the context's last token), then decodes ``k - 1`` more tokens
one at a time (greedy, or sampled from its own distribution when ``sampling`` is set: see
``mlxeff.techniques.early_exit``). The engine verifies the draft in one forward of the model; the
drafter's ``feedback`` trims its own cache over the rejected tokens, so it always holds a prefix of
the accepted context. The draft length adapts to the acceptance rate (``early_exit.DraftLength``,
with the draft model's weight-read ratio as the cost of a drafted token).

Choices:

- **Same vocabulary, checked**: the draft model's vocabulary size must equal the model's, and when
  both directories carry a ``tokenizer.json`` the files must be identical (a different tokenizer
  with the same size would draft nonsense, losslessly but slowly); anything else is refused in one
  line.
- **Precision**: the draft model computes in the model's compute dtype (that of its final norm),
  as ``mlxeff generate --dtype`` chose it.
- **Prompt caches**: only the new prompt is given to the draft model; a model cache that already
  held earlier context (a saved prompt cache) leaves the draft model without that context, which
  costs acceptance, never correctness.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..engine import Draft, Drafter
from ..errors import MlxeffError
from ..sampling import SamplingConfig
from .early_exit import DRAFT_OPTION, DraftLength, Timer, draw, follow_engine_sampling
from .kv_prediction_flops import head_macs, layer_weight_macs
from .registry import Option, Technique, register


def compute_dtype(model: nn.Module):
    """The model's compute dtype: that of its final norm (a quantized embedding's is uint32)."""
    return model.transformer.norm.weight.dtype


def check_vocabulary(draft: nn.Module, model: nn.Module, draft_dir=None, model_dir=None) -> None:
    """Refuse a draft model whose vocabulary differs from the model's (one line)."""
    if draft.args.vocab_size != model.args.vocab_size:
        raise MlxeffError(f"the draft model's vocabulary ({draft.args.vocab_size} tokens) differs "
                          f"from the model's ({model.args.vocab_size})", draft_dir)
    if draft_dir is not None and model_dir is not None:
        a, b = Path(draft_dir) / "tokenizer.json", Path(model_dir) / "tokenizer.json"
        if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
            raise MlxeffError("the draft model's tokenizer.json differs from the model's (the "
                              "draft model must use the same tokenizer)", draft_dir)


class DraftModelDrafter(Drafter):
    """Drafts with a separate model on its own cache (see the module docstring)."""

    def __init__(self, draft_model: nn.Module, draft: int = 8,
                 sampling: Optional[SamplingConfig] = None, policy: Optional[DraftLength] = None,
                 step_size: int = 512):
        self.draft_model = draft_model
        self.sampling = sampling
        self.policy = policy or DraftLength(max_draft=draft)
        self.step_size = step_size
        self.cache: Optional[list] = None
        self.timer = Timer()
        self._checked: Optional[nn.Module] = None

    @property
    def max_draft(self) -> int:  # type: ignore[override]
        return self.policy.max_draft

    def start(self, model, prompt, cache, sampling: Optional[SamplingConfig] = None) -> None:
        follow_engine_sampling(self, sampling)
        if self._checked is not model:
            check_vocabulary(self.draft_model, model)
            self.draft_model.set_dtype(compute_dtype(model))
            d, m = self.draft_model.args, model.args
            self.policy.prior_cost = (sum(layer_weight_macs(d)) + head_macs(d)) / \
                (sum(layer_weight_macs(m)) + head_macs(m))
            self._checked = model
        self.cache = self.draft_model.make_cache()
        tokens = mx.array(list(prompt), dtype=mx.uint32)
        for start in range(0, tokens.size, self.step_size):
            self.draft_model(tokens[start:start + self.step_size][None], cache=self.cache)
            mx.eval([c.state for c in self.cache])

    def propose(self, context: Sequence[int], k: int) -> Draft:
        started = time.perf_counter()
        k = min(k, self.policy.length())
        self._written = 0
        if k <= 0:
            self.timer.drafted(started)
            return Draft([])
        cached = self.cache[0].offset
        pending = mx.array(list(context[cached:]), dtype=mx.uint32)[None]  # accepted since, and y
        tokens: List[mx.array] = []
        probs: List[mx.array] = []
        for _ in range(k):
            logits = self.draft_model(pending, cache=self.cache)[:, -1, :]
            pending, p = draw(logits, self.sampling)
            tokens.append(pending)
            if p is not None:
                probs.append(p)
        mx.eval(tokens, probs)
        self.timer.drafted(started)
        self._written = self.cache[0].offset - cached  # the catch-up tokens and k - 1 drafts
        self._catch_up = len(context) - cached
        out = [int(x) for x in mx.concatenate(tokens, axis=1)[0].tolist()]
        return Draft(out, mx.stack(probs) if probs else None)

    def feedback(self, proposed: int, accepted: int) -> None:
        self.timer.verified(self.policy, proposed)
        self.policy.update(proposed, accepted)
        if proposed:
            # keep the catch-up tokens and the accepted drafts the cache holds (the last draft
            # was never run through the draft model)
            keep = self._catch_up + min(accepted, proposed - 1)
            extra = self._written - keep
            if extra > 0:
                for c in self.cache:
                    c.trim(extra)


def load_draft_model(path, model: nn.Module, model_dir=None) -> nn.Module:
    from .. import io

    path = Path(path)
    if not path.is_dir():
        raise MlxeffError("no such draft model directory", path)
    draft = io.load_model(path)
    check_vocabulary(draft, model, path, model_dir)
    draft.set_dtype(compute_dtype(model))
    mx.eval(draft.parameters())
    return draft


def _build(ctx, o) -> dict:
    draft = load_draft_model(o["path"], ctx.model, ctx.model_dir)
    return {"drafter": DraftModelDrafter(draft, o["draft"], step_size=ctx.step_size)}


register(Technique(
    name="draft-model",
    title="Draft-model speculative decoding (arXiv 2211.17192)",
    summary="A smaller model directory with the same tokenizer drafts the next tokens; one forward "
    "of the model verifies them (greedy output is identical to plain decoding).",
    hooks=("drafter",),
    value=Option("path", Path, None, "The draft model directory (mlxeff format).", metavar="DIR"),
    options=(DRAFT_OPTION,),
    build=_build,
))
