"""The layer-wise scaled decoder (OpenELM; Llama-family configs fit the same class).

Parameter names follow the Hugging Face / mlx-lm OpenELM layout (``transformer.layers.N.attn.qkv_proj``
...), so weights move between mlxeff, mlx-lm and the converters without renaming. The module follows
mlx-lm's model contract: ``Model(args)``, ``model(inputs, cache=...) -> logits``, ``layers``,
``make_cache`` and ``sanitize``.

Beyond that contract the model takes explicit ``positions`` (B, T) and a ``mask`` (see
``mlxeff.models.attention`` for their rules) and runs any range of its layers on any set of rows
(``Transformer.forward_layers``), so a technique computes with the model's own attention, RoPE and
blocks instead of a copy of them. Without ``positions`` and ``mask`` the computation is exactly
mlx-lm's. An attention function installed with ``Model.set_attention`` replaces
``mlxeff.models.attention.attend`` in every layer (it returns the one it replaced).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask

from ..cache import PositionedKVCache
from .attention import as_positions, attend, rope_at, rope_tokens
from .config import ModelArgs

AttentionFn = Callable[..., mx.array]


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
        self.attention_fn: AttentionFn = attend

    def _qkv(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        return self.qkv_proj(x).reshape(B, L, self.n_heads + 2 * self.n_kv_heads, self.head_dim)

    def project_raw(self, x: mx.array):
        """Queries, keys and values (B, heads, L, head_dim) straight from ``qkv_proj`` (one
        transpose, then the split: mlx-lm's OpenELM graph, op for op)."""
        qkv = self._qkv(x).transpose(0, 2, 1, 3)
        return mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)

    def project_tokens(self, x: mx.array):
        """Queries, keys and values in the projection's own token-major layout (B, L, heads,
        head_dim)."""
        return mx.split(self._qkv(x), [self.n_heads, self.n_heads + self.n_kv_heads], axis=2)

    def project(self, x: mx.array):
        """Queries, keys and values (B, heads, L, head_dim) after qk-norm, before RoPE."""
        q, k, v = self.project_raw(x)
        if self.normalize_qk:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def rotate(self, x: mx.array, positions: Optional[mx.array] = None, offset: int = 0) -> mx.array:
        """RoPE for queries or keys (B, heads, L, head_dim): at ``positions`` (B, L) when given,
        else at ``offset, offset + 1, ...``."""
        return self.rope(x, offset=offset) if positions is None else rope_at(x, positions, self.rope)

    def cache_keys(self, raw_keys: mx.array, positions: Optional[mx.array] = None,
                   offset: int = 0) -> mx.array:
        """What this layer writes to its cache for keys straight from ``qkv_proj``: qk-norm,
        then RoPE (KV Prediction writes predicted keys this way)."""
        k = self.k_norm(raw_keys) if self.normalize_qk else raw_keys
        return self.rotate(k, positions, offset)

    def __call__(self, x: mx.array, mask=None, cache: Optional[Any] = None,
                 positions: Optional[mx.array] = None) -> mx.array:
        B, L, _ = x.shape
        sink = getattr(cache, "raw_sink", None)
        if positions is None:
            q, k, v = self.project_raw(x)
            if sink is not None:
                sink.append((k, v))
            if self.normalize_qk:
                q, k = self.q_norm(q), self.k_norm(k)
            offset = 0 if cache is None else getattr(cache, "next_position", cache.offset)
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        else:
            # token-major until RoPE: each token is its own RoPE batch entry there, so the
            # projection's layout needs no transposed copy (``rope_tokens``)
            q, k, v = self.project_tokens(x)
            v = v.transpose(0, 2, 1, 3)
            if sink is not None:
                sink.append((k.transpose(0, 2, 1, 3), v))
            if self.normalize_qk:
                q, k = self.q_norm(q), self.k_norm(k)
            positions = as_positions(positions)
            q, k = rope_tokens(q, positions.device, self.rope), rope_tokens(k, positions.device, self.rope)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v, positions=positions)
        if positions is None:  # an installed attention function need not know about positions
            out = self.attention_fn(q, k, v, scale=self.scale, mask=mask, cache=cache)
        else:
            out = self.attention_fn(q, k, v, scale=self.scale, mask=mask, cache=cache,
                                    positions=positions.device)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.hidden_dim = args.ffn_dims[layer_id]
        self.proj_1 = nn.Linear(args.model_dim, 2 * self.hidden_dim, bias=False)
        self.proj_2 = nn.Linear(self.hidden_dim, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.proj_1(x), 2, axis=-1)
        # mlx-lm's compiled swiglu: silu and the product in one kernel (``nn.silu(gate) * up`` is
        # two), so a decode step launches what mlx-lm's OpenELM launches, one kernel per layer fewer
        return self.proj_2(swiglu(gate, up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn = Attention(args, layer_id)
        self.ffn = FeedForward(args, layer_id)
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None, positions: Optional[mx.array] = None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache, positions)
        return h + self.ffn(self.ffn_norm(h))

    def raw_kv(self, x: mx.array):
        """This block's keys and values for input ``x`` straight from ``qkv_proj`` (nothing else
        of the block is computed)."""
        _, k, v = self.attn.project_raw(self.attn_norm(x))
        return k, v


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None,
                 positions: Optional[mx.array] = None, mask=None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.token_embeddings(inputs)
        return self.norm(self.forward_layers(h, 0, len(self.layers), cache, positions, mask))

    def forward_layers(self, h: mx.array, start: int, stop: int, cache: Optional[Sequence] = None,
                       positions: Optional[mx.array] = None, mask=None) -> mx.array:
        """Run layers ``start..stop-1`` on the rows ``h`` (B, T, d). ``cache`` is the whole
        model's cache list (or None); ``positions`` and ``mask`` as in ``mlxeff.models.attention``
        (without either, the causal mask is built from layer ``start``'s cache, as mlx-lm does)."""
        layers = self.layers[start:stop]
        caches = [None] * len(layers) if cache is None else cache[start:stop]
        positions = as_positions(positions)  # once for every layer: one device copy, one host copy
        if mask is None and positions is None:
            mask = create_attention_mask(h, caches[0] if caches else None)
        for layer, c in zip(layers, caches):
            h = layer(h, mask, c, positions)
        return h


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = "openelm"
        self.transformer = Transformer(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None,
                 positions: Optional[mx.array] = None, mask=None) -> mx.array:
        return self.logits(self.transformer(inputs, cache, input_embeddings, positions, mask))

    def logits(self, hidden: mx.array) -> mx.array:
        """The output head on final-normed hidden states."""
        if self.args.share_input_output_layers:
            return self.transformer.token_embeddings.as_linear(hidden)
        return self.lm_head(hidden)

    @property
    def layers(self) -> List[TransformerBlock]:
        return self.transformer.layers

    def make_cache(self) -> List[PositionedKVCache]:
        return [PositionedKVCache() for _ in self.layers]

    def set_attention(self, fn: Optional[AttentionFn]) -> Optional[AttentionFn]:
        """Use ``fn`` for every layer's attention (None: the default ``attend``); returns the
        function layer 0 used before, so a caller can restore it."""
        previous = self.layers[0].attn.attention_fn if self.layers else None
        for layer in self.layers:
            layer.attn.attention_fn = fn or attend
        return previous

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.share_input_output_layers:
            weights.pop("lm_head.weight", None)
        return weights
