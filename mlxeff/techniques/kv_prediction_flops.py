"""Prompt-processing FLOPs of the base model vs KV Prediction (arXiv 2410.08391).

Two conventions:

- ``"paper"``: the convention behind the paper's FLOPs reductions (Table 1: OpenELM-1.1B with
  C-450M 2.36x, C-270M 3.98x, LP-0.75 1.34x, LP-0.50 1.93x, LP-0.25 3.60x; OpenELM-3B with C-1.1B
  2.81x, LP-0.75 1.34x, LP-0.50 1.97x, LP-0.25 3.84x). Each model costs ``2 x`` (its transformer
  layers' weight matrices + its output head) multiply-adds per prompt token; the base processes
  every prompt token, KV Prediction's cost is the auxiliary model's. Attention-score FLOPs
  (``QK^T``, ``AV``), the predictor's linear maps, norms, and the base's one-token step are not
  counted, so the ratio does not depend on the prompt length. This reproduces all nine published
  numbers to two decimals (``tests/test_kv_prediction_flops.py``); counting the predictor, the
  attention scores at any length from 128 to 4096, or the base's last token moves at least one of
  them. (Worked out by trying those terms; the paper does not spell the convention out.)
- ``"exact"``: what mlxeff's prefill executes for a prompt of ``T`` tokens. Base: the weight
  matmuls and causal attention (``QK^T`` and ``AV`` over the lower triangle) for all ``T`` tokens,
  and the output head for the last one. KV Prediction: the auxiliary model over ``T - 1`` tokens
  as ``kv_prediction.auxiliary_kv`` runs it (all layers but the last with their causal attention,
  the last layer's ``qkv_proj`` only, no output head), the predictor on ``T - 1`` tokens, then the
  base's layers for the last token attending to ``T`` positions plus its output head.

A multiply-add counts as 2 FLOPs. Norms, RoPE, activations and the softmax are ignored in both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence

from ..models import ModelArgs


def layer_weight_macs(args: ModelArgs) -> List[int]:
    """Multiply-adds per token of each transformer layer's weight matrices (qkv, out, FFN)."""
    d, hd = args.model_dim, args.head_dim
    return [d * (q + 2 * kv) * hd + q * hd * d + 3 * d * f  # qkv_proj, out_proj, proj_1 + proj_2
            for q, kv, f in zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims)]


def head_macs(args: ModelArgs) -> int:
    return args.model_dim * args.vocab_size


def causal_attention_macs(args: ModelArgs, n_queries: int, n_past: int = 0) -> int:
    """``QK^T`` and ``AV`` multiply-adds for ``n_queries`` new tokens after ``n_past`` cached ones."""
    # query t (0-based among the new ones) sees n_past + t + 1 keys
    pairs = n_queries * n_past + n_queries * (n_queries + 1) // 2
    return sum(2 * pairs * q * args.head_dim for q in args.num_query_heads)


def _drop_last_layer(args: ModelArgs) -> ModelArgs:
    from dataclasses import replace

    n = args.num_transformer_layers - 1
    return replace(args, num_transformer_layers=n, num_query_heads=args.num_query_heads[:n],
                   num_kv_heads=args.num_kv_heads[:n], ffn_multipliers=args.ffn_multipliers[:n])


def predictor_macs(aux: ModelArgs, base: ModelArgs, layer_map: Sequence[int]) -> int:
    """Per token: a key map and a value map per base layer, merged heads in and out."""
    a = [h * aux.head_dim for h in aux.num_kv_heads]
    b = [h * base.head_dim for h in base.num_kv_heads]
    return sum(2 * (a[j] * b[i] + b[i]) for i, j in enumerate(layer_map))


@dataclass
class PromptFlops:
    base: float
    kv_prediction: float
    convention: str
    prompt_tokens: int

    @property
    def reduction(self) -> float:
        return self.base / self.kv_prediction

    def to_dict(self) -> Dict:
        return {**asdict(self), "reduction": self.reduction}


def prompt_flops(base: ModelArgs, aux: ModelArgs, layer_map: Sequence[int], prompt_tokens: int,
                 convention: str = "paper") -> PromptFlops:
    """FLOPs to process a prompt of ``prompt_tokens`` tokens and emit the first token."""
    T = int(prompt_tokens)
    if T < 2:
        raise ValueError("KV prediction needs a prompt of at least 2 tokens")
    if len(layer_map) != base.num_transformer_layers:
        raise ValueError(f"the layer map has {len(layer_map)} entries for "
                         f"{base.num_transformer_layers} base layers")
    if convention == "paper":
        b = 2 * T * (sum(layer_weight_macs(base)) + head_macs(base))
        k = 2 * T * (sum(layer_weight_macs(aux)) + head_macs(aux))
    elif convention == "exact":
        b_layers = sum(layer_weight_macs(base))
        b = 2 * (T * b_layers + causal_attention_macs(base, T) + head_macs(base))
        # the auxiliary's last layer only needs its qkv_proj (see kv_prediction.auxiliary_kv)
        *body, _ = layer_weight_macs(aux)
        d, hd = aux.model_dim, aux.head_dim
        last_qkv = d * (aux.num_query_heads[-1] + 2 * aux.num_kv_heads[-1]) * hd
        body_attn = causal_attention_macs(_drop_last_layer(aux), T - 1) if body else 0
        k = 2 * ((T - 1) * (sum(body) + last_qkv + predictor_macs(aux, base, layer_map))
                 + body_attn
                 + b_layers + causal_attention_macs(base, 1, T - 1) + head_macs(base))
    else:
        raise ValueError(f"unknown convention {convention!r} (paper or exact)")
    return PromptFlops(float(b), float(k), convention, T)


PAPER_TABLE = [  # (base, auxiliary: OpenELM size or kept fraction, published reduction)
    ("1_1B", "450M", 2.36), ("1_1B", "270M", 3.98),
    ("1_1B", 0.75, 1.34), ("1_1B", 0.5, 1.93), ("1_1B", 0.25, 3.60),
    ("3B", "1_1B", 2.81), ("3B", 0.75, 1.34), ("3B", 0.5, 1.97), ("3B", 0.25, 3.84),
]


def paper_setting(base_name: str, aux) -> tuple:
    """(base args, auxiliary args, layer map) of one row of the paper's table."""
    from ..models import openelm_config
    from . import kv_prediction as kvp

    base = openelm_config(base_name)
    if isinstance(aux, float):
        layers = kvp.select_layers(base.num_transformer_layers, aux)
        return base, kvp.subset_args(base, layers), kvp.pruned_layer_map(
            layers, base.num_transformer_layers)
    a = openelm_config(aux)
    return base, a, kvp.contiguous_layer_map(a.num_transformer_layers, base.num_transformer_layers)


if __name__ == "__main__":  # python -m mlxeff.techniques.kv_prediction_flops [TOKENS]
    import sys

    T = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    print(f"prompt {T} tokens | paper | ours (paper convention) | exact convention")
    for b, a, want in PAPER_TABLE:
        base, aux, lmap = paper_setting(b, a)
        name = f"LP-{a:.2f}" if isinstance(a, float) else f"C-{a}"
        got = prompt_flops(base, aux, lmap, T, "paper").reduction
        exact = prompt_flops(base, aux, lmap, T, "exact").reduction
        print(f"OpenELM-{b} {name:8s} | {want:.2f}x | {got:.2f}x ({got:.4f}) | {exact:.2f}x")
