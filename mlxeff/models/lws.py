"""The layer-wise scaled decoder (OpenELM; Llama-family configs fit the same class).

Parameter names follow the Hugging Face / mlx-lm OpenELM layout (``transformer.layers.N.attn.qkv_proj``
...), so weights move between mlxeff, mlx-lm and the converters without renaming. The module follows
mlx-lm's model contract: ``Model(args)``, ``model(inputs, cache=...) -> logits``, ``layers``,
``make_cache`` and ``sanitize``.

Attention is pluggable: every ``Attention`` calls ``self.attention_fn`` (default: mlx-lm's
``scaled_dot_product_attention``), which a technique may replace for the whole model with
``Model.set_attention``.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

from .config import ModelArgs

AttentionFn = Callable[..., mx.array]


def default_attention(queries, keys, values, *, scale, mask, cache=None):
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = hd = args.head_dim
        self.n_heads = args.num_query_heads[layer_id]
        self.n_kv_heads = args.num_kv_heads[layer_id]
        self.scale = hd**-0.5
        self.qkv_proj = nn.Linear(args.model_dim, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, args.model_dim, bias=False)
        self.normalize_qk = args.normalize_qk_projections
        if self.normalize_qk:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = nn.RoPE(hd, traditional=False, base=args.rope_freq_constant)
        self.attention_fn: AttentionFn = default_attention

    def project(self, x: mx.array):
        """Queries, keys and values (B, heads, L, head_dim) after qk-norm, before RoPE."""
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qkv = qkv.transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)
        if self.normalize_qk:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def __call__(self, x: mx.array, mask=None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.project(x)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = self.attention_fn(q, k, v, scale=self.scale, mask=mask, cache=cache)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.hidden_dim = args.ffn_dims[layer_id]
        self.proj_1 = nn.Linear(args.model_dim, 2 * self.hidden_dim, bias=False)
        self.proj_2 = nn.Linear(self.hidden_dim, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.proj_1(x), 2, axis=-1)
        return self.proj_2(nn.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn = Attention(args, layer_id)
        self.ffn = FeedForward(args, layer_id)
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.token_embeddings(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = "openelm"
        self.transformer = Transformer(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        return self.logits(self.transformer(inputs, cache, input_embeddings))

    def logits(self, hidden: mx.array) -> mx.array:
        """The output head on final-normed hidden states."""
        if self.args.share_input_output_layers:
            return self.transformer.token_embeddings.as_linear(hidden)
        return self.lm_head(hidden)

    @property
    def layers(self) -> List[TransformerBlock]:
        return self.transformer.layers

    def make_cache(self) -> List[KVCache]:
        return [KVCache() for _ in self.layers]

    def set_attention(self, fn: Optional[AttentionFn]) -> None:
        """Use ``fn`` for every layer's attention (None restores the default)."""
        for layer in self.layers:
            layer.attn.attention_fn = fn or default_attention

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.share_input_output_layers:
            weights.pop("lm_head.weight", None)
        return weights
