"""Prefill FLOPs per question: naive prompting vs superposition prompting (arXiv 2404.06910).

Counted as mlxeff executes each method (the ``"exact"`` convention of
``mlxeff.techniques.kv_prediction_flops``, whose helpers this reuses): for every token run through
the model, 2 x the multiply-adds of the layers' weight matrices; the causal attention (``QK^T`` and
``AV``) over the keys each token sees; the output head wherever logits are computed. A
multiply-add is 2 FLOPs; norms, RoPE, activations and softmaxes are ignored, and so is the padding
of batched paths (work a tighter batching would not do).

- naive: the classical prompt (preamble, every document, the query once, the response prefix) as
  the engine's prefill runs it: all tokens causally, the head on the last one.
- superposition: the preamble (causal), each document after it, with the head on the document's
  tokens but the last (its score term), each query copy after the preamble and its document (the
  head on the copy's tokens but the last for the Bayesian score; the last token's attention row
  recomputed in every layer for attention scoring), the response prefix after the preamble and
  the kept paths, with the head on its last token. With path caching the preamble and the
  documents are precomputed: a question costs the query copies and the response.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Sequence

from ..models import ModelArgs
from .kv_prediction_flops import causal_attention_macs, head_macs, layer_weight_macs


@dataclass(frozen=True)
class PromptShape:
    """Token counts of a fork-join prompt."""

    preamble: int
    documents: Sequence[int]
    query: int
    response: int

    @property
    def classical_tokens(self) -> int:
        return self.preamble + sum(self.documents) + self.query + self.response


@dataclass
class PrefillFlops:
    preamble: float = 0.0
    documents: float = 0.0
    queries: float = 0.0
    response: float = 0.0

    @property
    def total(self) -> float:
        return self.preamble + self.documents + self.queries + self.response

    def to_dict(self) -> Dict[str, float]:
        return {**asdict(self), "total": self.total}


def naive_flops(args: ModelArgs, shape: PromptShape) -> PrefillFlops:
    """The classical prompt through the plain prefill (all in ``response`` for simplicity of the
    breakdown: one causal pass)."""
    T = shape.classical_tokens
    W = sum(layer_weight_macs(args))
    return PrefillFlops(response=float(2 * (T * W + causal_attention_macs(args, T) + head_macs(args))))


def superposition_flops(args: ModelArgs, shape: PromptShape, kept: Sequence[int], *,
                        cached: bool = False, scoring: str = "bayesian") -> PrefillFlops:
    """One question's prefill; ``cached``: the preamble and the documents come from the path cache."""
    W = sum(layer_weight_macs(args))
    head = head_macs(args)
    P, m, t = shape.preamble, shape.query, shape.response
    out = PrefillFlops()
    if not cached:
        out.preamble = 2.0 * (P * W + causal_attention_macs(args, P))
        out.documents = 2.0 * sum(l * W + causal_attention_macs(args, l, P) + (l - 1) * head
                                  for l in shape.documents)
    q = 0
    for l in shape.documents:
        q += m * W + causal_attention_macs(args, m, P + l)
        if scoring == "bayesian":
            q += (m - 1) * head
        else:  # the last row's attention weights, recomputed in every layer (QK^T only)
            q += sum(h * args.head_dim * (P + l + m) for h in args.num_query_heads)
    out.queries = 2.0 * q
    seen = P + sum(shape.documents[i] + m for i in kept)
    out.response = 2.0 * (t * W + causal_attention_macs(args, t, seen) + head)
    return out
