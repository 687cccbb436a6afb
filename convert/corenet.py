"""CoreNet OpenELM checkpoints (``checkpoint*.pt``) -> a conversion plan.

A CoreNet ``.pt`` holds either a flat state dict (``checkpoint_ema_best.pt``, ...) or a training
checkpoint whose ``model_state_dict`` is one. Its keys are the Hugging Face OpenELM names without
the ``transformer.`` prefix, and an untied output head is ``classifier``. The file carries no
architecture: it comes from ``--config`` (an official name such as ``openelm-270M``, a CoreNet yaml
with ``model.language_modeling.general_gpt.model_name`` and/or explicit fields, or a Hugging Face
OpenELM ``config.json``), or, when absent, from matching the checkpoint's layer count and widths to
the official sizes.

CoreNet pads the vocabulary to 32128 rows (32000 Llama-2 pieces, one padding token, rounded up);
for the official architectures the output keeps the first 32000 rows, as the Hugging Face
OpenELM configs say; ``vocab_size`` chooses another count.

The yaml is read with PyYAML's ``safe_load`` (PyYAML is a dependency of mlx-lm, transformers and
huggingface-hub, so it is always installed with mlxeff).
"""

from __future__ import annotations

import re
from numbers import Number
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from mlxeff.errors import MlxeffError
from mlxeff.files import read_bounded, read_json, short_repr
from mlxeff.models import ConfigError, Model, ModelArgs, config_from_hf, make_divisible
from mlxeff.models.config import OPENELM_SIZES, check_bool, check_float, check_int, rounded_linspace

from .plan import Plan, build_entries, check_fits, expected_shapes
from .torch_pickle import read_state_dict

HF_VOCAB = 32000
MAX_YAML_BYTES = 1 << 20

# CoreNet's GPT defaults (GPTConfig) and its named configurations (gpt_configs).
GPT_DEFAULTS = dict(
    vocab_size=32000, max_context_length=2048, num_transformer_layers=12, model_dim=2048, head_dim=128,
    qkv_multipliers=1.0, num_gqa_groups=1, ffn_multipliers=4.0, ffn_with_glu=True, ffn_dim_divisor=256,
    activation_fn_name="swish", normalization_layer_name="rms_norm", normalize_qk_projections=False,
    share_input_output_layers=False, rope_freq_constant=10000,
)
NAMED = {
    f"OpenELM-{size}": dict(
        num_transformer_layers=layers, model_dim=dim, head_dim=hd, num_gqa_groups=4,
        normalize_qk_projections=True, share_input_output_layers=True,
        ffn_multipliers=(0.5, 4.0), qkv_multipliers=(0.5, 1.0),
    )
    for size, (layers, dim, hd) in OPENELM_SIZES.items()
}
NAMED["gpt-test"] = dict(num_transformer_layers=1, model_dim=128, head_dim=64, num_gqa_groups=1,
                         normalize_qk_projections=True, share_input_output_layers=True,
                         ffn_multipliers=(0.25, 0.75), qkv_multipliers=(0.25, 0.5))
NAMED["gpt-1_3B"] = dict(num_transformer_layers=24, model_dim=2048, head_dim=64, ffn_multipliers=3.0,
                         num_gqa_groups=4, normalize_qk_projections=True, share_input_output_layers=True)
OFFICIAL = {n for n in NAMED if n.startswith("OpenELM-")}
YAML_KEYS = set(GPT_DEFAULTS) | {"model_name", "padding_index"}


def canonical_name(name: str) -> Optional[str]:
    """'openelm-270M', '270m', 'OpenELM-1.1B', '1_1B' ... -> 'OpenELM-270M' ...; None if unknown."""
    key = name.strip()
    if key in NAMED:
        return key
    k = re.sub(r"^openelm[-_]?", "", key, flags=re.I).replace(".", "_").upper()
    for size in OPENELM_SIZES:
        if k == size.upper():
            return f"OpenELM-{size}"
    return None


def gpt_args(fields: Dict[str, Any], vocab_size: int) -> ModelArgs:
    """CoreNet's GPTConfig rule: per-layer query heads and FFN multipliers from the fields."""
    f = {**GPT_DEFAULTS, **fields}
    if f["activation_fn_name"] != "swish" or f["normalization_layer_name"] != "rms_norm":
        raise ConfigError("only swish activation with rms_norm is supported")
    if not f["ffn_with_glu"]:
        raise ConfigError("only gated FFNs (ffn_with_glu: true) are supported")
    n = check_int("num_transformer_layers", f["num_transformer_layers"])  # before any per-layer list
    dim, hd = check_int("model_dim", f["model_dim"]), check_int("head_dim", f["head_dim"])
    groups = check_int("num_gqa_groups", f["num_gqa_groups"], "num_kv_heads")

    def per_layer(m, what):
        if isinstance(m, Number) and not isinstance(m, bool):
            return [check_float(what, m, "ffn_multipliers")] * n  # CoreNet does not round a single multiplier
        if isinstance(m, (list, tuple)) and len(m) == 2:
            lo, hi = (check_float(f"{what}[{i}]", x, "ffn_multipliers") for i, x in enumerate(m))
            return rounded_linspace(lo, hi, n)
        raise ConfigError(f"{what} must be a number or a pair of numbers, got {short_repr(m)}")

    qkv = per_layer(f["qkv_multipliers"], "qkv_multipliers")
    ffn = per_layer(f["ffn_multipliers"], "ffn_multipliers")
    q_dims = [make_divisible(dim * m, divisor=hd * groups) for m in qkv]
    q_heads = [qd // hd for qd in q_dims]
    return ModelArgs(
        vocab_size=vocab_size, model_dim=dim, head_dim=hd, num_transformer_layers=n,
        num_query_heads=q_heads, num_kv_heads=[q // groups for q in q_heads],
        ffn_multipliers=[float(m) for m in ffn], ffn_dim_divisor=check_int("ffn_dim_divisor", f["ffn_dim_divisor"]),
        normalize_qk_projections=check_bool("normalize_qk_projections", f["normalize_qk_projections"]),
        share_input_output_layers=check_bool("share_input_output_layers", f["share_input_output_layers"]),
        rope_freq_constant=check_float("rope_freq_constant", f["rope_freq_constant"]),
        max_context_length=check_int("max_context_length", f["max_context_length"]),
    )


def read_yaml(path: Path) -> Dict[str, Any]:
    """The ``model.language_modeling.general_gpt`` section of a CoreNet yaml."""
    import yaml

    raw = read_bounded(path, MAX_YAML_BYTES, "yaml config")
    try:
        doc = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MlxeffError(f"cannot read ({e})", path) from None
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise MlxeffError(f"invalid yaml ({(str(e).splitlines() or [type(e).__name__])[0][:200]})", path) from None
    section: Any = doc
    for key in ("model", "language_modeling"):
        section = section.get(key) if isinstance(section, dict) else None
    if not isinstance(section, dict):
        raise MlxeffError("no model.language_modeling section (is this a CoreNet language model yaml?)", path)
    name = section.get("name", "general_gpt")
    if name != "general_gpt":
        raise MlxeffError(f"model.language_modeling.name is {name!r}; only general_gpt is supported", path)
    gpt = section.get("general_gpt")
    if not isinstance(gpt, dict):
        raise MlxeffError("no model.language_modeling.general_gpt section", path)
    unknown = sorted(set(gpt) - YAML_KEYS)
    if unknown:
        raise MlxeffError(f"unsupported general_gpt fields: {', '.join(unknown)}", path)
    return gpt


def _check_rank(refs, path) -> None:
    """The tensors whose shapes name the architecture must have the rank the model gives them."""
    for name, rank in (("token_embeddings.weight", 2), ("layers.0.attn.q_norm.weight", 1)):
        ref = refs.get(name)
        if ref is not None and len(ref.shape) != rank:
            raise MlxeffError(f"{name} has shape {tuple(ref.shape)}, expected {rank} dimensions", path)


def resolve_architecture(config, refs, vocab_size: Optional[int], path) -> Tuple[ModelArgs, str]:
    """ModelArgs and a description, from ``config`` or, if None, from the checkpoint's shapes."""
    _check_rank(refs, path)
    rows = refs["token_embeddings.weight"].shape[0] if "token_embeddings.weight" in refs else None

    def vocab(default):
        v = vocab_size if vocab_size is not None else default
        if v is None:
            v = rows
        if rows is not None and v > rows:
            raise MlxeffError(f"vocab_size {v} exceeds the checkpoint's {rows} embedding rows", path)
        return v

    try:
        if config is None:
            name = infer_name(refs, path)
            return gpt_args(NAMED[name], vocab(HF_VOCAB)), f"{name} (inferred from the tensor shapes)"
        if isinstance(config, ModelArgs):
            return ModelArgs.from_dict({**config.to_dict(), "vocab_size": vocab(config.vocab_size)}), "given ModelArgs"
        cfg = str(config)
        p = Path(cfg)
        if p.suffix.lower() in (".yaml", ".yml"):
            if not p.is_file():
                raise MlxeffError("no such config file", p)
            gpt = read_yaml(p)
            fields = {}
            model_name = gpt.get("model_name")
            if model_name is not None:
                if not isinstance(model_name, str) or model_name not in NAMED:
                    raise MlxeffError(f"unknown model_name {short_repr(model_name)} (known: {', '.join(sorted(NAMED))})", p)
                fields.update(NAMED[model_name])
            fields.update({k: v for k, v in gpt.items() if k in GPT_DEFAULTS and k != "vocab_size"})
            default = HF_VOCAB if model_name in OFFICIAL else gpt.get("vocab_size")
            return gpt_args(fields, vocab(default)), f"{model_name or 'explicit fields'} from {p.name}"
        if p.suffix.lower() == ".json":
            args = config_from_hf(read_json(p, what="JSON config"))
            return ModelArgs.from_dict({**args.to_dict(), "vocab_size": vocab(args.vocab_size)}), f"config {p.name}"
        name = canonical_name(cfg)
        if name is None:
            choices = "openelm-270M, openelm-450M, openelm-1_1B, openelm-3B"
            raise MlxeffError(f"unknown config {cfg!r}: give one of {choices}, a CoreNet .yaml or a config.json")
        return gpt_args(NAMED[name], vocab(HF_VOCAB if name in OFFICIAL else None)), name
    except ConfigError as e:
        raise MlxeffError(f"invalid architecture: {e}", path) from None


def infer_name(refs, path) -> str:
    layers = {int(m.group(1)) for k in refs for m in [re.match(r"layers\.(\d+)\.", k)] if m}
    emb = refs.get("token_embeddings.weight")
    qn = refs.get("layers.0.attn.q_norm.weight")
    if emb is not None and len(emb.shape) == 2 and qn is not None and layers:
        shape = (max(layers) + 1, emb.shape[1], qn.shape[0])
        for size, official in OPENELM_SIZES.items():
            if official == shape:
                return f"OpenELM-{size}"
    raise MlxeffError(
        "the checkpoint does not match an official OpenELM size; pass --config "
        "(openelm-270M|openelm-450M|openelm-1_1B|openelm-3B, or a CoreNet .yaml)", path,
    )


def _strip_prefix(refs):
    # DistributedDataParallel wraps the model as `module`.
    if refs and all(k.startswith("module.") for k in refs):
        return {k[len("module."):]: v for k, v in refs.items()}
    return refs


def source_name(name: str) -> str:
    """mlxeff parameter name -> CoreNet state-dict key."""
    if name == "lm_head.weight":
        return "classifier.weight"
    return name.removeprefix("transformer.")


def plan(path, config=None, vocab_size: Optional[int] = None) -> Plan:
    path = Path(path)
    archive, refs = read_state_dict(path)
    refs = _strip_prefix(refs)
    try:
        args, desc = resolve_architecture(config, refs, vocab_size, path)
        check_fits(args, refs, path)
        model = Model(args)
        vocab_rows = {"transformer.token_embeddings.weight": args.vocab_size, "lm_head.weight": args.vocab_size}
        entries = build_entries(expected_shapes(model), refs, lambda n: [source_name(n)], path, rows=vocab_rows)
    except BaseException:
        archive.close()
        raise
    p = Plan(args, model, entries, path, f"CoreNet checkpoint, {desc}", closers=[archive.close])
    rows = refs["token_embeddings.weight"].shape[0]
    if rows != args.vocab_size:
        p.notes.append(f"vocabulary: kept {args.vocab_size} of {rows} embedding rows")
    return p
