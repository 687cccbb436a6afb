"""Hugging Face checkpoints (a local directory or a hub id) -> a conversion plan.

Supported: ``model_type`` ``openelm`` (apple/OpenELM-*: the parameter names are mlxeff's) and
``llama`` (Llama-family: GQA, tied or untied head, ``rope_theta``, ``rms_norm_eps``). Weights come
from ``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``
(read with the restricted unpickler; never ``torch.load``). ``auto_map``/remote code in a config is
ignored: nothing from the repository is executed.

Llama names map onto the OpenELM layout: ``q_proj``, ``k_proj``, ``v_proj`` are stacked into
``qkv_proj`` ([q | k | v] rows, which is how ``Attention.project`` splits them), ``gate_proj`` and
``up_proj`` into ``proj_1`` ([gate | up]), ``down_proj`` -> ``proj_2``, ``o_proj`` -> ``out_proj``,
``input_layernorm`` -> ``attn_norm``, ``post_attention_layernorm`` -> ``ffn_norm``. Both use the
rotate-half RoPE layout, so no row permutation is needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mlxeff.errors import MlxeffError
from mlxeff.files import printable, read_json, short_repr
from mlxeff.safetensors_check import read_index
from mlxeff.tokenizer import has_tokenizer
from mlxeff.models import ConfigError, Model, ModelArgs, config_from_hf

from .plan import Plan, build_entries, check_fits, expected_shapes
from .tensors import TensorRef, safetensors_refs
from .torch_pickle import read_state_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

LLAMA_LAYER = {
    "attn.qkv_proj.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.out_proj.weight": ["self_attn.o_proj.weight"],
    "ffn.proj_1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "ffn.proj_2.weight": ["mlp.down_proj.weight"],
    "attn_norm.weight": ["input_layernorm.weight"],
    "ffn_norm.weight": ["post_attention_layernorm.weight"],
}
LLAMA_TOP = {
    "transformer.token_embeddings.weight": ["model.embed_tokens.weight"],
    "transformer.norm.weight": ["model.norm.weight"],
    "lm_head.weight": ["lm_head.weight"],
}


def llama_sources(name: str) -> List[str]:
    """mlxeff parameter name -> the Hugging Face Llama tensors that make it."""
    if name in LLAMA_TOP:
        return LLAMA_TOP[name]
    m = re.fullmatch(r"transformer\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in LLAMA_LAYER:
        return [f"model.layers.{m.group(1)}.{s}" for s in LLAMA_LAYER[m.group(2)]]
    raise KeyError(name)


def is_hub_id(src: str) -> bool:
    return bool(HUB_ID.match(src)) and not Path(src).exists()


def fetch_hub(repo_id: str) -> Path:
    """Download config, weights and tokenizer files of ``repo_id`` (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
        ))
        if not list(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "pytorch_model*.bin"]))
    except Exception as e:  # network, authentication, missing repo: one line for the user
        raise MlxeffError(f"cannot fetch from the Hugging Face hub ({type(e).__name__}: {e})", repo_id) from None
    return path


def read_config(d: Path) -> dict:
    f = d / "config.json"
    if not (f.exists() or f.is_symlink()):
        raise MlxeffError("no config.json (is this a Hugging Face model directory?)", d)
    return read_json(f, what="config.json")


def _index_files(index: Path) -> Tuple[List[Path], Dict[str, str]]:
    weight_map, _ = read_index(index)
    paths = [index.parent / f for f in sorted(set(weight_map.values()))]
    for p in paths:
        if not (p.exists() or p.is_symlink()):
            raise MlxeffError(f"the index names {p.name}, which is missing", index)
    return paths, weight_map


def weight_refs(d: Path):
    """All tensors of the directory's weight files: (name -> TensorRef, closers)."""
    index, weight_map = None, None
    if _present(d / "model.safetensors.index.json"):
        index, kind = d / "model.safetensors.index.json", "safetensors"
    elif _present(d / "model.safetensors"):
        files, kind = [d / "model.safetensors"], "safetensors"
    elif list(d.glob("*.safetensors")):
        files, kind = sorted(d.glob("*.safetensors")), "safetensors"
    elif _present(d / "pytorch_model.bin.index.json"):
        index, kind = d / "pytorch_model.bin.index.json", "torch"
    elif _present(d / "pytorch_model.bin"):
        files, kind = [d / "pytorch_model.bin"], "torch"
    else:
        raise MlxeffError("no weights (model.safetensors, its index, or pytorch_model.bin)", d)
    if index is not None:
        files, weight_map = _index_files(index)
    refs: Dict[str, TensorRef] = {}
    closers = []
    try:
        for f in files:
            if kind == "safetensors":
                part = safetensors_refs(f)
            else:
                archive, part = read_state_dict(f, keys=("state_dict",))
                closers.append(archive.close)
            dup = sorted(set(part) & set(refs))
            if dup:
                raise MlxeffError(f"{printable(dup[0])} appears in more than one weight file", f)
            if weight_map is not None:
                wrong = [n for n in part if weight_map.get(n) != f.name]
                if wrong:
                    raise MlxeffError(f"{printable(wrong[0])} is in {f.name} but the index says "
                                      f"{short_repr(weight_map.get(wrong[0]))}", index)
            refs.update(part)
        if weight_map is not None:
            absent = [n for n in weight_map if n not in refs]
            if absent:
                raise MlxeffError(f"the index lists {printable(absent[0])}, which no shard holds", index)
    except BaseException:
        for c in closers:
            c()
        raise
    return refs, closers


def _present(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def plan(src, vocab_size: Optional[int] = None) -> Plan:
    d = Path(src)
    if not d.exists() and is_hub_id(str(src)):
        d = fetch_hub(str(src))
    if not d.is_dir():
        raise MlxeffError("not a Hugging Face model directory", d)
    cfg = read_config(d)
    try:
        args = config_from_hf(cfg)
    except ConfigError as e:
        raise MlxeffError(str(e), d / "config.json") from None
    model_type = cfg.get("model_type")
    if vocab_size is not None:
        if vocab_size > args.vocab_size:
            raise MlxeffError(f"vocab_size {vocab_size} exceeds the config's {args.vocab_size}", d / "config.json")
        args = ModelArgs.from_dict({**args.to_dict(), "vocab_size": vocab_size})
    refs, closers = weight_refs(d)
    try:
        check_fits(args, refs, d / "config.json")
    except BaseException:
        for c in closers:
            c()
        raise
    model = Model(args)
    tied = args.share_input_output_layers
    ignore = (lambda n: n == "lm_head.weight") if tied else (lambda n: False)
    sources = llama_sources if model_type == "llama" else (lambda n: [n])
    rows = None
    if vocab_size is not None:
        rows = {"transformer.token_embeddings.weight": vocab_size, "lm_head.weight": vocab_size}
    try:
        entries = build_entries(expected_shapes(model), refs, sources, d, ignore=ignore, rows=rows)
    except BaseException:
        for c in closers:
            c()
        raise
    has_tok = has_tokenizer(d)
    desc = f"Hugging Face {model_type} ({'tied' if tied else 'untied'} head)"
    return Plan(args, model, entries, d, desc, tokenizer_dir=d if has_tok else None, closers=closers)
