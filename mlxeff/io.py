"""The mlxeff model format: a directory.

- ``config.json``: the Hugging Face OpenELM fields (so ``mlx_lm.load`` reads an uncompressed
  directory as it is) plus an ``mlxeff`` section: ``format_version``, the per-layer quantization
  spec (``quantization``: module path -> spec) and technique artifacts (``artifacts``).
- ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json`` above ``MAX_SHARD_BYTES``.
- tokenizer files as the tokenizer's ``save_pretrained`` writes them.

Every write goes to a temporary sibling directory that is renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MlxeffError
from .models import ConfigError, Model, ModelArgs, config_from_hf
from .quant import apply_quantization_spec, validate_quantized

FORMAT_VERSION = 1
MAX_SHARD_BYTES = 2 << 30


@contextmanager
def atomic_directory(path, force: bool = False):
    """Yield a temporary directory that becomes ``path`` only if the block completes.

    An existing ``path`` is refused unless ``force``; with ``force`` it is replaced only after the
    new content is complete.
    """
    path = Path(path)
    if path.exists() and not force:
        raise MlxeffError("output already exists (use --force to replace it)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, path)


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
    with atomic_directory(path, force=force) as tmp:
        write_weights(dict(tree_flatten(model.parameters())), tmp)
        config = model_config_dict(model, mlxeff_extra)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return path


def save_tokenizer(tokenizer, directory: Path) -> None:
    # mlx-lm's TokenizerWrapper forwards attribute access, so save_pretrained reaches the HF tokenizer.
    inner = tokenizer
    if hasattr(inner, "save_pretrained"):
        inner.save_pretrained(str(directory))
    else:
        raise MlxeffError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")
    portable_tokenizer_config(Path(directory))


def portable_tokenizer_config(directory: Path) -> None:
    """transformers 5 writes ``tokenizer_class: TokenizersBackend``, which transformers 4 cannot
    load; ``PreTrainedTokenizerFast`` names the same tokenizer.json-backed class in both."""
    file = Path(directory) / "tokenizer_config.json"
    if not file.is_file():
        return
    config = json.loads(file.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.pop("backend", None)
        file.write_text(json.dumps(config, indent=2))


def read_config(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise MlxeffError("no such model directory", path)
    if not path.is_dir():
        raise MlxeffError("not a directory (a model is a directory with config.json)", path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MlxeffError("missing config.json (is this a model directory?)", path)
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxeffError(f"invalid JSON ({e})", cfg_file) from None
    if not isinstance(config, dict):
        raise MlxeffError("expected a JSON object", cfg_file)
    return config


def weight_files(path: Path):
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise MlxeffError("no model*.safetensors weights found", path)
    return files


def read_safetensors(file: Path) -> Dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except Exception as e:  # mlx raises RuntimeError/ValueError with terse text on corrupt files
        raise MlxeffError(f"truncated or corrupt safetensors file ({e})", file) from None


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
        if tuple(v.shape) != tuple(expected[k].shape):
            raise MlxeffError(
                f"{k} has shape {tuple(v.shape)} but the config implies {tuple(expected[k].shape)}",
                source,
            )
    model.load_weights(list(weights.items()), strict=True)


def _short(names, n=3):
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def build_model(config: dict, source="config.json") -> Model:
    try:
        args = config_from_hf(config)
    except ConfigError as e:
        raise MlxeffError(str(e), source) from None
    model = Model(args)
    section = config.get("mlxeff") or {}
    apply_quantization_spec(model, section.get("quantization") or {}, str(source))
    model.mlxeff_meta = {k: v for k, v in section.items() if k != "format_version"}
    return model


def load_model(path, lazy: bool = False) -> Model:
    path = Path(path)
    config = read_config(path)
    model = build_model(config, path / "config.json")
    weights = {}
    files = weight_files(path)
    for f in files:
        weights.update(read_safetensors(f))
    weights = model.sanitize(weights)
    load_weights_into(model, weights, path)
    validate_quantized(model, files[0] if len(files) == 1 else path)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load_tokenizer(path):
    """The directory's tokenizer through mlx-lm's wrapper, or None if it has none."""
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from mlx_lm.tokenizer_utils import load as load_tok

    config = read_config(path)
    try:
        from transformers.utils import logging as hf_logging

        # transformers warns that it does not know model_type "openelm"; the tokenizer needs no model.
        hf_logging.set_verbosity_error()
        return load_tok(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:
        raise MlxeffError(f"cannot load the tokenizer ({e})", path) from None


def load(path, lazy: bool = False) -> Tuple[Model, Any]:
    """Load an mlxeff directory: ``(model, tokenizer)``; the tokenizer is None if absent."""
    model = load_model(path, lazy=lazy)
    return model, load_tokenizer(path)


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
