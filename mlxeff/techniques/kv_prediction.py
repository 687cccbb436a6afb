"""KV Prediction: a small auxiliary model predicts the base model's KV cache (arXiv 2410.08391).

Horton et al., "KV Prediction for Improved Time to First Token". Algorithm:

1. An auxiliary model processes the prompt except its last token, ``prompt[:-1]``.
2. A predictor maps the auxiliary KV cache to the base model's: base layer ``i`` reads auxiliary
   layer ``layer_map[i]``, and one ``Linear`` with bias per base layer for keys and one for values
   maps the auxiliary layer's merged heads (``kv_heads * head_dim``) to the base layer's merged heads.
3. The predicted keys and values fill the base model's cache; the base model processes the last
   prompt token attending to them, emits the first token, and alone continues generating.

The auxiliary model is either the base with layers removed ("layer-pruned", LP-k) or a separate,
smaller model ("C-<size>" in the paper); the predictor and the auxiliary model are trained with
the base frozen (``kv_prediction_train``).

Choices made where the paper leaves room, and deviations:

- **Layer choice for LP-k** (CoreNet's ``OpenELM-*-0.25l/0.50l/0.75l`` configs): keep
  ``m = round(k * n)`` layers at ``floor(j * n / m)``, j = 0..m-1: every 4th layer for 0.25, every
  other for 0.5, all but every 4th (``i % 4 != 3``) for 0.75. The auxiliary layers start as copies
  of the base's layers and embeddings.
- **Layer map** (CoreNet's ``auxkv_num_layers_to_basekv_num_layers``): each auxiliary layer feeds a
  contiguous run of base layers. For LP, base layer ``i`` reads the last kept layer ``<= i`` (the
  layer it was copied from starts the run). For a separate model of ``a`` layers and a base of
  ``b >= a`` layers, runs have length ``ceil(b/a)`` or ``floor(b/a)``, the longer runs first — this
  reproduces every map in CoreNet's released configs (1.1B with 270M/450M, 3B with 270M/450M/1.1B).
- **Where the prediction happens relative to k_norm and RoPE.** CoreNet writes the auxiliary keys
  to its cache *before* k_norm (``apply_k_norm_before_cache_write=False``) and its caches hold keys
  before RoPE (RoPE is applied to the whole key sequence at every step). So the predictor maps raw
  auxiliary keys (after ``qkv_proj``, before the auxiliary k_norm and RoPE) to raw base keys; the
  *base's* k_norm is applied to the prediction, then RoPE. The mlx-lm cache used here stores keys
  after k_norm and after RoPE, so the predicted keys are written as
  ``RoPE(base.k_norm(predicted_raw_k), positions 0..T-2)``; values are never normalised or rotated.
  With auxiliary = base and an identity predictor this makes the cache equal to the base's own.
  The raw auxiliary keys and values are what each auxiliary layer hands its cache's ``raw_sink``
  (``mlxeff.cache``); the base writes predicted keys through ``Attention.cache_keys`` (its own
  k_norm and RoPE). The model's code is used, never copied.
- **Only the auxiliary KV cache is computed at inference**: the auxiliary output head is skipped,
  and so are its last layer's attention, output projection and FFN (they would only feed the head;
  the layer's ``qkv_proj`` gives its keys and values). The paper's FLOPs convention counts the
  whole auxiliary model including its head (see ``kv_prediction_flops``).
- **Predictor initialisation**: CoreNet uses PyTorch's default ``Linear`` init. Here a square map is
  initialised to the identity (the auxiliary layer's keys are then the starting guess for the base
  layer's keys), which shortens short training runs; ``init="random"`` gives MLX's default init.
- **One-token prompts** have nothing to predict: by default the base processes the prompt itself
  (plain prefill); ``short_prompt="error"`` raises instead.
- **Only a fresh cache** is filled (no prompt-cache continuation): the auxiliary model would need the
  earlier context too.

Artifact format (a self-describing directory, typically ``BASE/kv_prediction/<name>/``; ``mlxeff
generate --kv-prediction DIR`` also resolves a bare name against ``MODEL/kv_prediction/``):

- ``kv_prediction.json``: ``{"mlxeff_artifact": "kv_prediction", "format_version": 1, "layer_map",
  "auxiliary": {"kind": "layer_pruned", "layers": [...]} | {"kind": "separate"}, "base": {the
  base's shape signature}, "training": {...}}``
- ``auxiliary/``: the auxiliary model as an mlxeff model directory (it loads and generates on its
  own, which is how the "auxiliary alone" baseline is run);
- ``predictor.safetensors``: ``k_proj.{i}.weight/bias``, ``v_proj.{i}.weight/bias`` per base layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxeffError
from ..engine import ChunkedPrefill, PrefillStrategy
from .kv_prediction_aux import (  # noqa: F401  (part of this module's API)
    _dtype, auxiliary_from_spec, contiguous_layer_map, layer_pruned_model,
    pruned_layer_map, select_layers, subset_args, validate_layer_map,
)
from . import artifacts
from .registry import Option, Technique, register
from ..models import Model

ARTIFACT = "kv_prediction"
FORMAT_VERSION = 1
META_FILE = "kv_prediction.json"
PREDICTOR_FILE = "predictor.safetensors"
AUX_DIR = "auxiliary"


# ---------------------------------------------------------------------------------------------
# the predictor


def _kv_dims(model: Model) -> List[int]:
    return [h * model.args.head_dim for h in model.args.num_kv_heads]


class KVPredictor(nn.Module):
    """Per base layer, ``Linear(aux_kv_dim -> base_kv_dim)`` with bias for keys and for values.

    Works on merged heads: (B, heads, L, head_dim) -> (B, L, heads * head_dim) -> Linear -> split.
    """

    def __init__(self, aux_kv_dims: Sequence[int], base_kv_heads: Sequence[int], base_head_dim: int,
                 layer_map: Sequence[int], init: str = "identity"):
        super().__init__()
        self._layer_map = validate_layer_map(layer_map, len(aux_kv_dims), len(base_kv_heads))
        self._base_kv_heads = [int(h) for h in base_kv_heads]
        self._head_dim = int(base_head_dim)
        self._aux_kv_dims = [int(d) for d in aux_kv_dims]
        ins = [aux_kv_dims[j] for j in self._layer_map]
        outs = [h * base_head_dim for h in base_kv_heads]
        self.k_proj = [nn.Linear(i, o) for i, o in zip(ins, outs)]
        self.v_proj = [nn.Linear(i, o) for i, o in zip(ins, outs)]
        if init == "identity":
            self.set_identity(strict=False)
        elif init != "random":
            raise MlxeffError(f"unknown predictor init {init!r} (identity or random)")

    @classmethod
    def for_models(cls, aux: Model, base: Model, layer_map: Sequence[int],
                   init: str = "identity") -> "KVPredictor":
        pred = cls(_kv_dims(aux), base.args.num_kv_heads, base.args.head_dim, layer_map, init)
        pred.set_dtype(_dtype(base))
        return pred

    @property
    def layer_map(self) -> List[int]:
        return list(self._layer_map)

    def set_identity(self, strict: bool = True) -> None:
        """Identity weights and zero bias wherever the map is square (everywhere if ``strict``)."""
        for lin in list(self.k_proj) + list(self.v_proj):
            o, i = lin.weight.shape
            if o == i:
                lin.weight = mx.eye(o, dtype=lin.weight.dtype)
                lin.bias = mx.zeros((o,), dtype=lin.bias.dtype)
            elif strict:
                raise MlxeffError(f"an identity predictor needs square maps, got {o}x{i}")

    def __call__(self, aux_keys: Sequence[mx.array], aux_values: Sequence[mx.array]
                 ) -> Tuple[List[mx.array], List[mx.array]]:
        keys, values = [], []
        for i, j in enumerate(self._layer_map):
            h = self._base_kv_heads[i]
            keys.append(_merged_map(self.k_proj[i], aux_keys[j], h))
            values.append(_merged_map(self.v_proj[i], aux_values[j], h))
        return keys, values

    def signature(self) -> Dict[str, Any]:
        return {"aux_kv_dims": self._aux_kv_dims, "base_kv_heads": self._base_kv_heads,
                "head_dim": self._head_dim, "layer_map": self._layer_map}


def _merged_map(linear: nn.Linear, x: mx.array, out_heads: int) -> mx.array:
    B, H, L, D = x.shape
    y = linear(x.transpose(0, 2, 1, 3).reshape(B, L, H * D))
    return y.reshape(B, L, out_heads, -1).transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# raw keys and values


def sink_kv(sinks: Sequence[list]) -> Tuple[List[mx.array], List[mx.array]]:
    """Per layer, the raw keys and values its cache's ``raw_sink`` received (calls concatenated)."""
    return [_cat([k for k, _ in s]) for s in sinks], [_cat([v for _, v in s]) for s in sinks]


def base_view_keys(base: Model, raw_keys: Sequence[mx.array]) -> List[mx.array]:
    """Apply the base layers' k_norm (where the base has one) to raw keys, before RoPE."""
    out = []
    for layer, k in zip(base.layers, raw_keys):
        out.append(layer.attn.k_norm(k) if layer.attn.normalize_qk else k)
    return out


# ---------------------------------------------------------------------------------------------
# the artifact: auxiliary model + predictor


def base_signature(base: Model) -> Dict[str, Any]:
    a = base.args
    return {"num_transformer_layers": a.num_transformer_layers, "model_dim": a.model_dim,
            "head_dim": a.head_dim, "num_kv_heads": list(a.num_kv_heads),
            "vocab_size": a.vocab_size, "normalize_qk_projections": a.normalize_qk_projections}


@dataclass
class KVPrediction:
    """An auxiliary model and a predictor for one base model."""

    auxiliary: Model
    predictor: KVPredictor
    info: Dict[str, Any] = field(default_factory=dict)

    def check(self, base: Model, source=None) -> None:
        """Refuse a base whose layers or KV shapes the predictor does not produce."""
        lm, b = self.predictor.layer_map, base.args
        if len(lm) != b.num_transformer_layers:
            raise MlxeffError(f"the predictor predicts {len(lm)} layers but the base model has "
                              f"{b.num_transformer_layers} layers", source)
        sig = self.predictor.signature()
        if sig["head_dim"] != b.head_dim or sig["base_kv_heads"] != list(b.num_kv_heads):
            raise MlxeffError(
                f"the predictor produces {sig['base_kv_heads']} KV heads of size {sig['head_dim']} "
                f"per layer but the base model has {list(b.num_kv_heads)} of size {b.head_dim}",
                source)
        if _kv_dims(self.auxiliary) != sig["aux_kv_dims"]:
            raise MlxeffError(f"the predictor reads KV widths {sig['aux_kv_dims']} but the "
                              f"auxiliary model has {_kv_dims(self.auxiliary)}", source)
        if self.auxiliary.args.vocab_size != b.vocab_size:
            raise MlxeffError(f"the auxiliary model's vocabulary ({self.auxiliary.args.vocab_size}) "
                              f"differs from the base model's ({b.vocab_size})", source)

    def prefill(self, step_size: int = 512, short_prompt: str = "base") -> "KVPredictionPrefill":
        return KVPredictionPrefill(self, step_size=step_size, short_prompt=short_prompt)

    def save(self, path, *, force: bool = False, base: Optional[Model] = None,
             extra_files: Optional[Dict[str, str]] = None) -> Path:
        from .. import io

        path = Path(path)
        meta = {"mlxeff_artifact": ARTIFACT, "format_version": FORMAT_VERSION,
                "layer_map": self.predictor.layer_map, **self.info}
        if base is not None:
            meta["base"] = base_signature(base)
        with io.atomic_directory(path, force=force) as tmp:
            io.save(self.auxiliary, None, tmp / AUX_DIR)
            weights = dict(tree_flatten(self.predictor.parameters()))
            mx.save_safetensors(str(tmp / PREDICTOR_FILE), weights, metadata={"format": "mlx"})
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        return path

    @classmethod
    def load(cls, path, base: Optional[Model] = None) -> "KVPrediction":
        from .. import io

        path = Path(path)
        meta, meta_file = artifacts.read_meta(path, kind=ARTIFACT, label="KV prediction",
                                              meta_file=META_FILE, format_version=FORMAT_VERSION)
        aux = io.load_model(path / AUX_DIR)
        layer_map = meta.get("layer_map")
        if not isinstance(layer_map, list):
            raise MlxeffError("layer_map must be a list", meta_file)
        sig = meta.get("base") or {}
        if base is not None:
            heads, hd = list(base.args.num_kv_heads), base.args.head_dim
        elif sig:
            heads, hd = sig.get("num_kv_heads"), sig.get("head_dim")
        else:
            raise MlxeffError("the base model's shapes are unknown (no 'base' entry); pass the base",
                              meta_file)
        if base is not None and len(layer_map) != len(heads):
            raise MlxeffError(f"the predictor predicts {len(layer_map)} layers but the base model "
                              f"has {len(heads)} layers", meta_file)
        pred = KVPredictor(_kv_dims(aux), heads, hd,
                           validate_layer_map(layer_map, aux.args.num_transformer_layers,
                                              len(heads), meta_file), init="random")
        weights = io.read_safetensors(path / PREDICTOR_FILE) if (path / PREDICTOR_FILE).is_file() \
            else None
        if weights is None:
            raise MlxeffError(f"missing {PREDICTOR_FILE}", path)
        io.load_weights_into(pred, weights, path / PREDICTOR_FILE)
        mx.eval(pred.parameters())
        info = {k: v for k, v in meta.items()
                if k not in ("mlxeff_artifact", "format_version", "layer_map")}
        art = cls(aux, pred, info)
        if base is not None:
            art.check(base, path)
        return art


def resolve_dir(path, model_dir=None) -> Path:
    """``path`` itself, or ``MODEL/kv_prediction/<path>`` when only that exists."""
    return artifacts.resolve_dir(path, model_dir, "kv_prediction")


# ---------------------------------------------------------------------------------------------
# inference


def fill_base_cache(base: Model, cache: list, keys: Sequence[mx.array],
                    values: Sequence[mx.array]) -> None:
    """Write predicted raw keys (given the base's k_norm and RoPE here) and values at 0..T-1."""
    dtype = _dtype(base)
    for layer, c, k, v in zip(base.layers, cache, keys, values):
        c.update_and_fetch(layer.attn.cache_keys(k, offset=c.offset).astype(dtype), v.astype(dtype))


def auxiliary_kv(aux: Model, tokens: mx.array, step_size: int = 512
                 ) -> Tuple[List[mx.array], List[mx.array]]:
    """Raw keys and values of every auxiliary layer for ``tokens`` (1-D), in chunks.

    Only the KV cache is wanted, so the output head is skipped and the last layer stops after its
    ``qkv_proj`` (its attention, output projection and FFN would only feed the head).
    """
    t = aux.transformer
    body = len(t.layers) - 1
    cache = aux.make_cache()[:body]
    for c in cache:
        c.raw_sink = []
    last = []
    for start in range(0, tokens.size, step_size):
        h = t.forward_layers(t.token_embeddings(tokens[start:start + step_size][None]), 0, body, cache)
        last.append(t.layers[-1].raw_kv(h))
        mx.eval([(c.keys, c.values, c.raw_sink[-1]) for c in cache], last[-1])
    keys, values = sink_kv([c.raw_sink for c in cache] + [last])
    return keys, values


def _cat(parts: List[mx.array]) -> mx.array:
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


@dataclass
class KVPredictionPrefill(PrefillStrategy):
    """Prefill strategy: the auxiliary model reads ``prompt[:-1]``, the base the last token."""

    kvp: KVPrediction
    step_size: int = 512
    short_prompt: str = "base"  # "base": plain prefill of a one-token prompt; "error": refuse

    def __post_init__(self):
        if self.step_size < 1:
            raise MlxeffError("the prefill step size must be at least 1")
        if self.short_prompt not in ("base", "error"):
            raise MlxeffError(f"short_prompt must be 'base' or 'error', got {self.short_prompt!r}")
        self._checked = None

    def __call__(self, model, prompt, cache):
        if self._checked is not model:
            self.kvp.check(model)
            self._checked = model
        if any(c.offset for c in cache):
            raise MlxeffError("KV prediction fills an empty cache; it cannot continue a prompt cache")
        if prompt.size < 2:
            if self.short_prompt == "error":
                raise MlxeffError("a one-token prompt has no context for KV prediction")
            return ChunkedPrefill(self.step_size)(model, prompt, cache)
        keys, values = auxiliary_kv(self.kvp.auxiliary, prompt[:-1], self.step_size)
        pk, pv = self.kvp.predictor(keys, values)
        fill_base_cache(model, cache, pk, pv)
        return model(prompt[-1:][None], cache=cache)[:, -1, :]


# ---------------------------------------------------------------------------------------------
# the registry entry


def _build(ctx, o) -> dict:
    kvp = KVPrediction.load(resolve_dir(o["path"], ctx.model_dir), base=ctx.model)
    dtype = _dtype(ctx.model)  # compute as the base does (the command line may have cast it)
    kvp.auxiliary.set_dtype(dtype)
    kvp.predictor.set_dtype(dtype)
    return {"prefill": kvp.prefill(ctx.step_size)}


register(Technique(
    name="kv-prediction",
    title="KV Prediction (arXiv 2410.08391)",
    summary="An auxiliary model + predictor directory (from train-kv-prediction; a bare NAME means "
    "MODEL/kv_prediction/NAME) that processes the prompt in place of the model.",
    hooks=("prefill",),
    value=Option("path", Path, None, "The KV prediction directory.", metavar="DIR"),
    build=_build,
))
