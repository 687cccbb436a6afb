"""Configuration of the layer-wise scaled decoder.

OpenELM (arXiv 2404.14619) allocates parameters per layer: layer i gets
``num_query_heads[i]`` query heads (``num_kv_heads[i]`` KV heads) and an FFN of width
``make_divisible(ffn_multipliers[i] * model_dim, ffn_dim_divisor)``. The multipliers are linear
interpolations rounded to two decimals. The model class takes the per-layer lists, so a Llama-family
model is the same class with constant lists and no qk-norm.

``ModelArgs`` uses the field names of the Hugging Face OpenELM ``config.json`` so that a saved
directory loads in ``mlx_lm.load`` unchanged.

Validation. A config comes from a file a stranger may have written, so every field is typed and
range-checked before a module is built (``ModelArgs.validate``; ``from_dict`` and
``config_from_hf`` additionally demand the JSON types: an integer field takes only an integer,
not ``4.0`` or ``"4"`` or ``true``). The bounds (``LIMITS``) are far above any published model
(OpenELM-3B: 36 layers, width 3072; Llama-3-405B: 126 layers, width 16384, FFN 53248, vocabulary
128256) and far below what overflows a 32-bit shape: at most 1024 layers, width 65536, head
dimension 1024, 1024 heads per layer, FFN width 2^20, vocabulary 2^24. ``rms_norm_eps`` must be
finite in (0, 1]; ``rope_freq_constant`` finite in [1, 1e10] (a base below 1 or beyond float32's
range makes RoPE's frequencies overflow to inf and the logits NaN). The total size is checked
against the weight files by the loader (``num_parameters``), before the model is built.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from typing import Any, Dict, List, Optional

import numpy as np


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


LIMITS = {
    "num_transformer_layers": (1, 1024),
    "model_dim": (1, 1 << 16),
    "head_dim": (2, 1024),
    "vocab_size": (1, 1 << 24),
    "num_query_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "ffn_dim": (1, 1 << 20),
    "ffn_dim_divisor": (1, 1 << 16),
    "max_context_length": (1, 1 << 24),
    "token_id": (0, (1 << 31) - 1),
}
FLOAT_LIMITS = {
    "ffn_multipliers": (0.0, 1024.0),  # exclusive lower bound
    "rms_norm_eps": (0.0, 1.0),  # exclusive lower bound
    "rope_freq_constant": (1.0, 1e10),
}


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def check_int(name: str, v, limit: Optional[str] = None) -> int:
    lo, hi = LIMITS[limit or name]
    if not _is_int(v):
        raise ConfigError(f"{name} must be an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {_show(v)}")
    return int(v)


def check_float(name: str, v, limit: Optional[str] = None) -> float:
    lo, hi = FLOAT_LIMITS[limit or name]
    if not _is_real(v):
        raise ConfigError(f"{name} must be a number, got {_show(v)}")
    f = float(v) if abs(v) < 1e300 else math.inf
    inclusive = (limit or name) == "rope_freq_constant"
    if not math.isfinite(f) or not (lo <= f if inclusive else lo < f) or f > hi:
        raise ConfigError(f"{name} must be a finite number in {'[' if inclusive else '('}{lo:g}, {hi:g}], got {_show(v)}")
    return f


def check_bool(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ConfigError(f"{name} must be true or false, got {_show(v)}")
    return bool(v)


def _show(v) -> str:
    """A short, always-printable rendering of a (possibly hostile) config value."""
    if _is_int(v) and int(v).bit_length() > 64:
        return f"an integer of {int(v).bit_length()} bits"
    if isinstance(v, str):
        return repr(v[:40]) + ("..." if len(v) > 40 else "")
    if isinstance(v, (list, tuple, dict)):
        return f"a {type(v).__name__} of {len(v)}"
    if v is None or isinstance(v, (bool, Real)):
        return repr(v)
    return f"a {type(v).__name__}"


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
        """Types and ranges of every field (see the module docstring); raises ``ConfigError``."""
        if self.model_type not in ("openelm", "llama"):
            raise ConfigError(f"model_type must be openelm or llama, got {_show(self.model_type)}")
        n = check_int("num_transformer_layers", self.num_transformer_layers)
        check_int("vocab_size", self.vocab_size)
        check_int("model_dim", self.model_dim)
        check_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        check_int("ffn_dim_divisor", self.ffn_dim_divisor)
        check_int("max_context_length", self.max_context_length)
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)):
                raise ConfigError(f"{name} must be a list, got {_show(v)}")
            if len(v) != n:
                raise ConfigError(f"{name} has {len(v)} entries but the model has {n} layers")
        for i, (q, kv, m) in enumerate(zip(self.num_query_heads, self.num_kv_heads, self.ffn_multipliers)):
            check_int(f"num_query_heads[{i}]", q, "num_query_heads")
            check_int(f"num_kv_heads[{i}]", kv, "num_kv_heads")
            check_float(f"ffn_multipliers[{i}]", m, "ffn_multipliers")
            if q % kv:
                raise ConfigError(f"layer {i}: {q} query heads do not split into groups of {kv} KV heads")
        for i, f in enumerate(self.ffn_dims):
            check_int(f"FFN width of layer {i} (ffn_multipliers[{i}] x model_dim)", f, "ffn_dim")
        for name in ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers"):
            check_bool(name, getattr(self, name))
        check_float("rms_norm_eps", self.rms_norm_eps)
        check_float("rope_freq_constant", self.rope_freq_constant)
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), "token_id")
        if not self.ffn_with_glu:
            raise ConfigError("only gated (SwiGLU) FFNs are supported (ffn_with_glu=true)")

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "ModelArgs":
        """``ModelArgs`` from decoded JSON: the known fields, each of its exact JSON type."""
        if not isinstance(params, dict):
            raise ConfigError(f"a config must be an object, got {_show(params)}")
        names = inspect.signature(cls).parameters
        args = {k: v for k, v in params.items() if k in names}
        most = LIMITS["num_transformer_layers"][1]
        for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            if k in args and not isinstance(args[k], list):
                raise ConfigError(f"{k} must be a list, got {_show(args[k])}")
            if len(args.get(k, [])) > most:  # before looking at each entry
                raise ConfigError(f"{k} has {len(args[k])} entries, more than the limit of {most} layers")
        for k in ("vocab_size", "model_dim", "head_dim", "num_transformer_layers", "ffn_dim_divisor",
                  "max_context_length"):
            if k in args and not _is_int(args[k]):
                raise ConfigError(f"{k} must be an integer, got {_show(args[k])}")
        for k in ("num_query_heads", "num_kv_heads"):
            for i, v in enumerate(args.get(k, [])):
                if not _is_int(v):
                    raise ConfigError(f"{k}[{i}] must be an integer, got {_show(v)}")
        for k in ("rms_norm_eps", "rope_freq_constant"):
            if k in args:
                args[k] = check_float(k, args[k])
        args["ffn_multipliers"] = [check_float(f"ffn_multipliers[{i}]", v, "ffn_multipliers")
                                   for i, v in enumerate(args.get("ffn_multipliers", []))]
        args["num_query_heads"] = list(args.get("num_query_heads", []))
        args["num_kv_heads"] = list(args.get("num_kv_heads", []))
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
        raise ConfigError(f"hidden_act {_show(act)} is not supported (only silu)")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in params]
    if missing:
        raise ConfigError(f"llama config lacks {', '.join(repr(k) for k in missing)}")
    n = check_int("num_hidden_layers", params["num_hidden_layers"], "num_transformer_layers")
    dim = check_int("hidden_size", params["hidden_size"], "model_dim")
    heads = check_int("num_attention_heads", params["num_attention_heads"], "num_query_heads")
    inter = check_int("intermediate_size", params["intermediate_size"], "ffn_dim")
    vocab = check_int("vocab_size", params["vocab_size"])
    kv = params.get("num_key_value_heads")
    kv = heads if kv is None else check_int("num_key_value_heads", kv, "num_kv_heads")
    head_dim = params.get("head_dim")
    if head_dim is None:
        if dim % heads:
            raise ConfigError(f"hidden_size {dim} is not a multiple of num_attention_heads {heads}")
        head_dim = dim // heads
    head_dim = check_int("head_dim", head_dim)
    tie = params.get("tie_word_embeddings", False)
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
        share_input_output_layers=check_bool("tie_word_embeddings", tie),
        rms_norm_eps=check_float("rms_norm_eps", params.get("rms_norm_eps", 1e-6)),
        rope_freq_constant=check_float("rope_theta", params.get("rope_theta", 10000.0), "rope_freq_constant"),
        max_context_length=check_int("max_position_embeddings", params.get("max_position_embeddings", 2048),
                                      "max_context_length"),
        bos_token_id=_token_id("bos_token_id", params.get("bos_token_id", 1)),
        eos_token_id=_token_id("eos_token_id", params.get("eos_token_id", 2)),
    )


def _token_id(name: str, v):
    """A token id field: null, an integer, or (eos in Hugging Face configs) a list whose first entry counts."""
    if isinstance(v, list):
        for i, x in enumerate(v):
            check_int(f"{name}[{i}]", x, "token_id")
        return v[0] if v else None
    return None if v is None else check_int(name, v, "token_id")


def config_from_hf(params: Dict[str, Any]) -> ModelArgs:
    """Build ``ModelArgs`` from a Hugging Face ``config.json`` dict (``openelm`` or ``llama``)."""
    if not isinstance(params, dict):
        raise ConfigError(f"a config must be an object, got {_show(params)}")
    model_type = params.get("model_type")
    if model_type == "openelm":
        missing = [k for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers", "model_dim",
                               "head_dim", "num_transformer_layers", "vocab_size") if k not in params]
        if missing:
            raise ConfigError(f"openelm config lacks {', '.join(missing)}")
        p = dict(params)
        p["eos_token_id"] = _token_id("eos_token_id", p.get("eos_token_id", 2))
        p["bos_token_id"] = _token_id("bos_token_id", p.get("bos_token_id", 1))
        return ModelArgs.from_dict(p)
    if model_type == "llama":
        return llama_config(params)
    raise ConfigError(f"unknown model_type {_show(model_type)} (supported: openelm, llama)")
