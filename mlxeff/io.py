"""The mlxeff model format: a directory.

- ``config.json``: the Hugging Face OpenELM fields (so ``mlx_lm.load`` reads an uncompressed
  directory as it is) plus an ``mlxeff`` section: ``format_version``, the per-layer quantization
  spec (``quantization``: module path -> spec) and technique artifacts (``artifacts``).
- ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json`` above ``MAX_SHARD_BYTES``.
- tokenizer files as the tokenizer's ``save_pretrained`` writes them.

Every write goes to a temporary sibling directory that is renamed into place when complete
(``mlxeff.atomic``: an existing directory is replaced by an atomic exchange where the system has
one). ``save`` refuses a model whose floating-point weights have several dtypes.

Loading validates before it allocates (SECURITY.md lists the promises): ``config.json`` is read
strictly (``mlxeff.files``), every field typed and range-checked (``mlxeff.models.config`` and
``check_section``); every safetensors header and the index are validated
(``mlxeff.safetensors_check``); the model the config describes must fit the weight files (layers
at most the tensors, ``num_parameters`` at its most compact storage at most the files' bytes)
before a module is built; names, shapes and dtypes must match the model before tensor data is
read; and as the weights are evaluated every floating-point value must be finite and within
``VALUE_LIMIT`` (``mlxeff.values``: one read-only pass over the weights in memory, not a second
read of the files). In a directory with an ``mlxeff`` section all floating-point weights share one dtype,
which catches a header whose dtype was changed to another of the same width (F16 <-> BF16).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .atomic import atomic_directory
from .errors import MlxeffError
from .files import printable, read_json, short_repr
from .models import ConfigError, Model, ModelArgs, config_from_hf
from .quant import apply_quantization_spec, validate_quantized
from .safetensors_check import Header, check_shards, read_header, read_index
from .tokenizer import check_vocabulary, load_tokenizer as _load_tokenizer
from .tokenizer import portable_tokenizer_config, save_tokenizer  # noqa: F401  (re-exported)
from .values import VALUE_LIMIT, check_weights  # noqa: F401  (VALUE_LIMIT re-exported)

__all__ = ["atomic_directory", "load", "load_model", "load_tokenizer", "save"]

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MAX_SHARD_BYTES = 2 << 30
FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
SEEDLM_LIMITS = {"C": (1, 256), "P": (1, 16), "K": (1, 64)}


def model_config_dict(model: Model, mlxeff_extra: Optional[Dict[str, Any]] = None) -> dict:
    config = model.args.to_dict()
    section = {"format_version": FORMAT_VERSION, "quantization": {}, "artifacts": {}}
    section.update(getattr(model, "mlxeff_meta", None) or {})
    section.update(mlxeff_extra or {})
    config["mlxeff"] = section
    mlx_lm_quantization = _mlx_lm_quantization(section["quantization"])
    if mlx_lm_quantization:
        config["quantization"] = mlx_lm_quantization
    return config


def _mlx_lm_quantization(specs: Dict[str, dict]) -> Optional[dict]:
    """mlx-lm's ``quantization`` entry (defaults plus one entry per layer) when every quantized
    layer is affine, so that ``mlx_lm.load`` reads the directory too; None otherwise (SeedLM
    layers are mlxeff's own). mlxeff itself reads only its ``mlxeff.quantization`` section."""
    if not specs or any(s.get("method") != "affine" for s in specs.values()):
        return None
    layers = {p: {"group_size": s["group_size"], "bits": s["bits"]} for p, s in specs.items()}
    (group_size, bits), _ = Counter((s["group_size"], s["bits"]) for s in layers.values()).most_common(1)[0]
    return {"group_size": group_size, "bits": bits, **layers}


def write_weights(weights: Dict[str, mx.array], directory: Path) -> None:
    shards, current, size = [], {}, 0
    for k, v in weights.items():
        if current and size + v.nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += v.nbytes
    shards.append(current)
    if len(shards) == 1:
        mx.save_safetensors(str(directory / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save(model: Model, tokenizer, path, *, force: bool = False,
         mlxeff_extra: Optional[Dict[str, Any]] = None) -> Path:
    """Save ``model`` (and ``tokenizer``, if given) as an mlxeff directory at ``path``."""
    path = Path(path)
    kinds = float_dtypes(model)
    if len(kinds) > 1:
        raise MlxeffError("the model's floating-point weights have several dtypes "
                          f"({', '.join(str(k).split('.')[-1] for k in kinds)}); cast it to one "
                          "(model.set_dtype) before saving")
    with atomic_directory(path, force=force) as tmp:
        write_weights(dict(tree_flatten(model.parameters())), tmp)
        config = model_config_dict(model, mlxeff_extra)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return path


def float_dtypes(model: nn.Module) -> List[mx.Dtype]:
    return sorted({v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)},
                  key=str)


# ---------------------------------------------------------------------------------------------
# loading: config


def read_config(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise MlxeffError("no such model directory", path)
    if not path.is_dir():
        raise MlxeffError("not a directory (a model is a directory with config.json)", path)
    cfg_file = path / "config.json"
    if not (cfg_file.exists() or cfg_file.is_symlink()):
        raise MlxeffError("missing config.json (is this a model directory?)", path)
    return read_json(cfg_file, what="config.json")


def _int_in(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_section(config: dict, source) -> dict:
    """The ``mlxeff`` section, validated: ``{}`` when absent (a Hugging Face directory)."""
    if "mlxeff" not in config:
        return {}
    section = config["mlxeff"]
    if not isinstance(section, dict):
        raise MlxeffError(f"mlxeff must be an object, got {short_repr(section)}", source)
    version = section.get("format_version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version in SUPPORTED_FORMAT_VERSIONS):
        raise MlxeffError(f"mlxeff.format_version {short_repr(version)} is not supported (this version of "
                          f"mlxeff reads {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))})", source)
    for key in ("quantization", "artifacts"):
        if not isinstance(section.get(key, {}), dict):
            raise MlxeffError(f"mlxeff.{key} must be an object, got {short_repr(section[key])}", source)
    for path, spec in section.get("quantization", {}).items():
        _check_spec(path, spec, source)
    return section


def _check_spec(path: str, spec, source) -> None:
    from .quant.affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

    where = f"mlxeff.quantization[{short_repr(path)}]"
    if not isinstance(spec, dict):
        raise MlxeffError(f"{where} must be an object, got {short_repr(spec)}", source)
    method = spec.get("method")
    if method == "affine":
        if spec.get("bits") not in SUPPORTED_BITS or not _int_in(spec.get("bits"), 1, 64):
            raise MlxeffError(f"{where}.bits must be one of {SUPPORTED_BITS}, got {short_repr(spec.get('bits'))}", source)
        if spec.get("group_size") not in SUPPORTED_GROUP_SIZES or not _int_in(spec.get("group_size"), 1, 1 << 20):
            raise MlxeffError(f"{where}.group_size must be one of {SUPPORTED_GROUP_SIZES}, got "
                              f"{short_repr(spec.get('group_size'))}", source)
    elif method == "seedlm":
        from .quant.seedlm import K_DEFAULT, check_config

        try:  # SeedLM's own rule first (its messages), then bounds that keep the sizes sane
            check_config(spec.get("C"), spec.get("P"), spec.get("K", K_DEFAULT))
        except MlxeffError as e:
            raise MlxeffError(f"{where}: {e}", source) from None
        for key, (lo, hi) in SEEDLM_LIMITS.items():
            if not _int_in(spec.get(key, K_DEFAULT), lo, hi):
                raise MlxeffError(f"{where}.{key} must be an integer in [{lo}, {hi}], got "
                                  f"{short_repr(spec.get(key))}", source)
        for key in ("in_features", "out_features"):
            if not _int_in(spec.get(key), 1, 1 << 24):
                raise MlxeffError(f"{where}.{key} must be a positive integer, got {short_repr(spec.get(key))}", source)
        bits = spec.get("bits")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float))):
            raise MlxeffError(f"{where}.bits must be a number, got {short_repr(bits)}", source)
        if not isinstance(spec.get("bias", False), bool):
            raise MlxeffError(f"{where}.bias must be true or false", source)
    else:
        raise MlxeffError(f"{where}: unknown quantization method {short_repr(method)}", source)


def _min_bits(specs: Dict[str, dict]) -> float:
    """The fewest bits any stored weight can take: 16 (a floating-point weight) or a spec's."""
    bits = [16.0]
    for spec in specs.values():
        if spec["method"] == "affine":
            bits.append(float(spec["bits"]))
        else:
            bits.append((spec.get("K", 16) + 4 + 4 * spec["P"]) / spec["C"])
    return min(bits)


# ---------------------------------------------------------------------------------------------
# loading: weight files


def weight_headers(path: Path, check_total: bool = True) -> Dict[Path, Header]:
    """The validated headers of the directory's weight files (the index's shards, if it has one).

    ``check_total``: the index's ``metadata.total_size`` must equal the shards' data bytes (as
    ``save`` writes it; Hugging Face writers do not all count it so)."""
    files = sorted(path.glob("model*.safetensors"))
    index_file = path / "model.safetensors.index.json"
    if index_file.exists() or index_file.is_symlink():
        weight_map, metadata = read_index(index_file)
        listed = sorted(set(weight_map.values()))
        stray = sorted(f.name for f in files if f.name not in listed)
        if stray:
            raise MlxeffError(f"{stray[0]} is not listed in the index", index_file)
        headers = {}
        for name in listed:
            if not (path / name).exists():
                raise MlxeffError(f"the index names {name}, which is missing", index_file)
            headers[name] = read_header(path / name)
        check_shards(index_file, weight_map, headers)
        total = metadata.get("total_size")
        stored = sum(h.data_size for h in headers.values())
        if check_total and total is not None and total != stored:
            raise MlxeffError(f"metadata.total_size says {short_repr(total)} bytes, the shards hold {stored}",
                              index_file)
        return {path / name: h for name, h in headers.items()}
    if not files:
        raise MlxeffError("no model*.safetensors weights found", path)
    headers = {f: read_header(f) for f in files}
    seen: Dict[str, Path] = {}
    for f, h in headers.items():
        for name in h.tensors:
            if name in seen:
                raise MlxeffError(f"{short_repr(name)} is in both {seen[name].name} and {f.name}", path)
            seen[name] = f
    return headers


def weight_files(path: Path) -> List[Path]:
    return list(weight_headers(Path(path)))


def check_fits(args: ModelArgs, specs: Dict[str, dict], headers: Dict[Path, Header], source) -> None:
    """Refuse a config that describes more model than the weight files can hold, before building it
    (a config of 10^4 layers next to a 100 kB file must fail at once, not after minutes)."""
    tensors = sum(len(h.tensors) for h in headers.values())
    stored = sum(h.data_size for h in headers.values())
    if args.num_transformer_layers > tensors:
        raise MlxeffError(f"describes {args.num_transformer_layers} layers but the weight files hold "
                          f"{tensors} tensors", source)
    least = args.num_parameters() * _min_bits(specs) / 8
    if least > stored:
        raise MlxeffError(f"describes {args.num_parameters():,} parameters (at least {least:,.0f} bytes) but "
                          f"the weight files hold {stored:,} bytes", source)


def read_safetensors(file: Path, header: Optional[Header] = None) -> Dict[str, mx.array]:
    """A safetensors file through ``mx.load``, after its header is validated."""
    header = header or read_header(file)
    try:
        arrays = mx.load(str(file))
    except Exception as e:  # mlx raises RuntimeError/ValueError with terse text on corrupt files
        raise MlxeffError(f"truncated or corrupt safetensors file ({' '.join(str(e).split())[:200]})", file) from None
    if set(arrays) != set(header.tensors):
        raise MlxeffError("mx.load read other tensors than the header lists", file)
    for name, info in header.tensors.items():
        a = arrays[name]
        if tuple(a.shape) != info.shape or str(a.dtype).split(".")[-1] != info.dtype:
            raise MlxeffError(f"{printable(name)}: read as {a.dtype} {tuple(a.shape)}, the header says {info.dtype} "
                              f"{info.shape}", file)
    return arrays


def load_weights_into(model: nn.Module, weights: Dict[str, mx.array], source) -> None:
    """Load with explicit checks so a mismatch names the tensor, not a traceback."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise MlxeffError(f"missing weights: {_short(missing)}", source)
    if unexpected:
        raise MlxeffError(f"unexpected weights: {_short(unexpected)}", source)
    for k, v in weights.items():
        want = expected[k]
        if tuple(v.shape) != tuple(want.shape):
            raise MlxeffError(
                f"{printable(k)} has shape {tuple(v.shape)} but the config implies {tuple(want.shape)}", source,
            )
        floating = mx.issubdtype(want.dtype, mx.floating)
        if (v.dtype not in FLOAT_DTYPES) if floating else (v.dtype != want.dtype):
            need = "float16, bfloat16 or float32" if floating else str(want.dtype).split(".")[-1]
            raise MlxeffError(f"{printable(k)} has dtype {str(v.dtype).split('.')[-1]}, the model needs {need}", source)
    model.load_weights(list(weights.items()), strict=True)


def _short(names, n=3):
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(printable(x, 120) for x in names[:n]) + more


def build_model(config: dict, source="config.json") -> Model:
    section = check_section(config, source)
    return _build(_args(config, source), section, source)


def _args(config: dict, source) -> ModelArgs:
    try:
        return config_from_hf(config)
    except ConfigError as e:
        raise MlxeffError(str(e), source) from None


def _build(args: ModelArgs, section: dict, source) -> Model:
    model = Model(args)
    apply_quantization_spec(model, section.get("quantization") or {}, str(source))
    model.mlxeff_meta = {k: v for k, v in section.items() if k != "format_version"}
    return model


def check_directory(path: Path) -> Tuple[dict, dict, ModelArgs, Dict[Path, Header]]:
    """What loading validates before it builds a module or reads a tensor: ``(config, mlxeff
    section, ModelArgs, weight headers)``, the config checked against the weight files' size."""
    config = read_config(path)
    cfg_file = path / "config.json"
    section = check_section(config, cfg_file)
    args = _args(config, cfg_file)
    headers = weight_headers(path, check_total=bool(section))
    check_fits(args, section.get("quantization") or {}, headers, cfg_file)
    return config, section, args, headers


def load_model(path, lazy: bool = False, check_values: bool = True) -> Model:
    """Load an mlxeff (or Hugging Face OpenELM/Llama safetensors) directory's model.

    ``lazy``: leave the weights unevaluated (they are read when first used); the value check,
    which needs the data, is then the caller's (``mlxeff.values.check_weights``).
    ``check_values=False`` skips the value check (a read-only pass over the weights in memory;
    SECURITY.md gives its cost).
    """
    path = Path(path)
    _, section, args, headers = check_directory(path)
    model = _build(args, section, path / "config.json")
    weights = {}
    for f, h in headers.items():
        weights.update(read_safetensors(f, h))
    weights = model.sanitize(weights)
    files = list(headers)
    source = files[0] if len(files) == 1 else path
    load_weights_into(model, weights, source)
    del weights
    if section:
        kinds = float_dtypes(model)
        if len(kinds) > 1:
            raise MlxeffError("floating-point weights of several dtypes "
                              f"({', '.join(str(k).split('.')[-1] for k in kinds)}): a tensor's dtype was "
                              "changed", source)
    validate_quantized(model, source)
    if not lazy:
        mx.eval(model.parameters())
        if check_values:
            check_weights(model, source)
    model.eval()
    return model


def load_tokenizer(path, config: Optional[dict] = None, vocab_size: Optional[int] = None):
    """The directory's tokenizer through mlx-lm's wrapper, or None if it has none; with
    ``vocab_size``, one that can produce an id beyond the model's vocabulary is refused."""
    path = Path(path)
    if config is None and (path / "config.json").exists():
        config = read_config(path)
    tok = _load_tokenizer(path, required=False, eos_token_ids=(config or {}).get("eos_token_id"))
    if tok is not None and vocab_size is not None:
        check_vocabulary(tok, vocab_size, path)
    return tok


def load(path, lazy: bool = False, check_values: bool = True) -> Tuple[Model, Any]:
    """Load an mlxeff directory: ``(model, tokenizer)``; the tokenizer is None if absent."""
    model = load_model(path, lazy=lazy, check_values=check_values)
    return model, load_tokenizer(path, vocab_size=model.args.vocab_size)


def default_model_dir() -> Path:
    """The model shipped inside the package (``mlxeff/assets/default``)."""
    return Path(__file__).parent / "assets" / "default"


def resolve_model_dir(model) -> Path:
    if model is not None:
        return Path(model)
    path = default_model_dir()
    if not (path / "config.json").is_file():
        raise MlxeffError("the embedded default model is not installed; pass --model DIR", path)
    return path
