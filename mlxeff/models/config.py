"""Configuration of the layer-wise scaled decoder.

OpenELM (arXiv 2404.14619) allocates parameters per layer: layer i gets
``num_query_heads[i]`` query heads (``num_kv_heads[i]`` KV heads) and an FFN of width
``make_divisible(ffn_multipliers[i] * model_dim, ffn_dim_divisor)``. The multipliers are linear
interpolations rounded to two decimals. The model class takes the per-layer lists, so a Llama-family
model is the same class with constant lists and no qk-norm.

``ModelArgs`` uses the field names of the Hugging Face OpenELM ``config.json`` so that a saved
directory loads in ``mlx_lm.load`` unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` (CoreNet's rule), never dropping more than 10%."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def rounded_linspace(start: float, stop: float, num: int) -> List[float]:
    """``np.linspace`` rounded to two decimals, as CoreNet builds its per-layer multipliers."""
    return [round(float(v), 2) for v in np.linspace(start, stop, num=num, dtype=float)]


@dataclass
class ModelArgs:
    model_type: str = "openelm"
    vocab_size: int = 32000
    model_dim: int = 1280
    head_dim: int = 64
    num_transformer_layers: int = 16
    num_query_heads: List[int] = field(default_factory=list)
    num_kv_heads: List[int] = field(default_factory=list)
    ffn_multipliers: List[float] = field(default_factory=list)
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rms_norm_eps: float = 1e-6
    rope_freq_constant: float = 10000.0
    max_context_length: int = 2048
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2

    def __post_init__(self):
        self.validate()

    @property
    def ffn_dims(self) -> List[int]:
        return [
            make_divisible(m * self.model_dim, divisor=self.ffn_dim_divisor)
            for m in self.ffn_multipliers
        ]

    def validate(self) -> None:
        n = self.num_transformer_layers
        if n < 1:
            raise ConfigError(f"num_transformer_layers must be >= 1, got {n}")
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            got = len(getattr(self, name))
            if got != n:
                raise ConfigError(f"{name} has {got} entries but the model has {n} layers")
        if self.model_dim < 1 or self.head_dim < 1 or self.vocab_size < 1:
            raise ConfigError("model_dim, head_dim and vocab_size must be positive")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if q < 1 or kv < 1 or q % kv:
                raise ConfigError(
                    f"layer {i}: {q} query heads do not split into groups of {kv} KV heads"
                )
        if not self.ffn_with_glu:
            raise ConfigError("only gated (SwiGLU) FFNs are supported (ffn_with_glu=true)")

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "ModelArgs":
        names = inspect.signature(cls).parameters
        args = {k: v for k, v in params.items() if k in names}
        args["num_query_heads"] = [int(v) for v in args.get("num_query_heads", [])]
        args["num_kv_heads"] = [int(v) for v in args.get("num_kv_heads", [])]
        args["ffn_multipliers"] = [float(v) for v in args.get("ffn_multipliers", [])]
        return cls(**args)

    def to_dict(self) -> Dict[str, Any]:
        """Hugging Face OpenELM ``config.json`` fields (readable by ``mlx_lm.load``)."""
        d = asdict(self)
        d["model_type"] = "openelm"
        d["architectures"] = ["OpenELMForCausalLM"]
        return d

    def num_parameters(self) -> int:
        d, hd = self.model_dim, self.head_dim
        total = self.vocab_size * d * (1 if self.share_input_output_layers else 2) + d
        for q, kv, f in zip(self.num_query_heads, self.num_kv_heads, self.ffn_dims):
            total += d * (q + 2 * kv) * hd + q * hd * d  # qkv_proj, out_proj
            total += d * 2 * f + f * d  # proj_1 (gate | up), proj_2
            total += 2 * d + (2 * hd if self.normalize_qk_projections else 0)
        return total


OPENELM_SIZES = {
    # name: (layers, model_dim, head_dim); qkv multipliers (0.5, 1.0), ffn (0.5, 4.0), 4 GQA groups
    "270M": (16, 1280, 64),
    "450M": (20, 1536, 64),
    "1_1B": (28, 2048, 64),
    "3B": (36, 3072, 128),
}


def layerwise_config(
    num_layers: int,
    model_dim: int,
    head_dim: int,
    *,
    qkv_multipliers: tuple = (0.5, 1.0),
    ffn_multipliers: tuple = (0.5, 4.0),
    num_gqa_groups: int = 4,
    ffn_dim_divisor: int = 256,
    vocab_size: int = 32000,
    **kwargs,
) -> ModelArgs:
    """The OpenELM layer-wise scaling rule for any size.

    Query dims are ``make_divisible(model_dim * qkv_mult, head_dim * num_gqa_groups)``, so every
    layer's query heads split evenly into KV groups.
    """
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    if model_dim % head_dim:
        raise ConfigError(f"model_dim {model_dim} is not a multiple of head_dim {head_dim}")
    qkv = rounded_linspace(*qkv_multipliers, num_layers)
    q_dims = [make_divisible(model_dim * m, divisor=head_dim * num_gqa_groups) for m in qkv]
    q_heads = [qd // head_dim for qd in q_dims]
    return ModelArgs(
        vocab_size=vocab_size,
        model_dim=model_dim,
        head_dim=head_dim,
        num_transformer_layers=num_layers,
        num_query_heads=q_heads,
        num_kv_heads=[q // num_gqa_groups for q in q_heads],
        ffn_multipliers=rounded_linspace(*ffn_multipliers, num_layers),
        ffn_dim_divisor=ffn_dim_divisor,
        **kwargs,
    )


def openelm_config(name: str, vocab_size: int = 32000) -> ModelArgs:
    """The official OpenELM architectures: ``"270M"``, ``"450M"``, ``"1_1B"`` or ``"3B"``."""
    key = name.removeprefix("OpenELM-").removeprefix("openelm-").replace("1.1B", "1_1B")
    if key not in OPENELM_SIZES:
        raise ConfigError(f"unknown OpenELM size {name!r}; choose one of {sorted(OPENELM_SIZES)}")
    layers, dim, head_dim = OPENELM_SIZES[key]
    return layerwise_config(layers, dim, head_dim, vocab_size=vocab_size)


def llama_config(params: Dict[str, Any]) -> ModelArgs:
    """A Llama-family Hugging Face config as constant per-layer lists without qk-norm."""
    for unsupported in ("attention_bias", "mlp_bias"):
        if params.get(unsupported):
            raise ConfigError(f"{unsupported}=true is not supported")
    if params.get("rope_scaling"):
        raise ConfigError("rope_scaling is not supported")
    act = params.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only silu)")
    try:
        n = int(params["num_hidden_layers"])
        dim = int(params["hidden_size"])
        heads = int(params["num_attention_heads"])
        inter = int(params["intermediate_size"])
        vocab = int(params["vocab_size"])
    except KeyError as e:
        raise ConfigError(f"llama config lacks {e.args[0]!r}") from None
    kv = int(params.get("num_key_value_heads") or heads)
    head_dim = int(params.get("head_dim") or dim // heads)
    # divisor 1 makes make_divisible the identity on integers: the FFN width is stored exactly.
    return ModelArgs(
        vocab_size=vocab,
        model_dim=dim,
        head_dim=head_dim,
        num_transformer_layers=n,
        num_query_heads=[heads] * n,
        num_kv_heads=[kv] * n,
        ffn_multipliers=[inter / dim] * n,
        ffn_dim_divisor=1,
        normalize_qk_projections=False,
        share_input_output_layers=bool(params.get("tie_word_embeddings", False)),
        rms_norm_eps=float(params.get("rms_norm_eps", 1e-6)),
        rope_freq_constant=float(params.get("rope_theta", 10000.0)),
        max_context_length=int(params.get("max_position_embeddings", 2048)),
        bos_token_id=params.get("bos_token_id", 1),
        eos_token_id=_first(params.get("eos_token_id", 2)),
    )


def _first(v):
    return v[0] if isinstance(v, list) and v else v


def config_from_hf(params: Dict[str, Any]) -> ModelArgs:
    """Build ``ModelArgs`` from a Hugging Face ``config.json`` dict (``openelm`` or ``llama``)."""
    model_type = params.get("model_type")
    if model_type == "openelm":
        missing = [k for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers", "model_dim",
                               "head_dim", "num_transformer_layers", "vocab_size") if k not in params]
        if missing:
            raise ConfigError(f"openelm config lacks {', '.join(missing)}")
        p = dict(params)
        p["eos_token_id"] = _first(p.get("eos_token_id", 2))
        return ModelArgs.from_dict(p)
    if model_type == "llama":
        return llama_config(params)
    raise ConfigError(f"unknown model_type {model_type!r} (supported: openelm, llama)")
