"""KV Prediction's auxiliary models and layer maps (arXiv 2410.08391; see ``kv_prediction``).

Which base layers an LP-k auxiliary keeps, which auxiliary layer feeds each base layer, and how an
auxiliary model is built from a short specification (``lp-0.5``, ``layers:0,2,5`` or a directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxeffError
from ..models import Model, ModelArgs


# ---------------------------------------------------------------------------------------------
# layer choice and layer maps


def select_layers(num_layers: int, keep: float) -> List[int]:
    """The base layers an LP-``keep`` auxiliary model keeps (CoreNet's choice for 0.25/0.5/0.75)."""
    if not 0 < keep <= 1:
        raise MlxeffError(f"the kept fraction of layers must be in (0, 1], got {keep}")
    m = max(1, round(keep * num_layers))
    return [j * num_layers // m for j in range(m)]


def pruned_layer_map(selected: Sequence[int], num_base_layers: int) -> List[int]:
    """Base layer ``i`` reads the auxiliary layer copied from the last kept base layer ``<= i``."""
    _check_selection(selected, num_base_layers)
    out, j = [], 0
    for i in range(num_base_layers):
        while j + 1 < len(selected) and selected[j + 1] <= i:
            j += 1
        out.append(j)
    return out


def contiguous_layer_map(num_aux_layers: int, num_base_layers: int) -> List[int]:
    """Runs of ``ceil`` or ``floor(base/aux)`` base layers per auxiliary layer, longer runs first."""
    if not 1 <= num_aux_layers <= num_base_layers:
        raise MlxeffError(
            f"an auxiliary model of {num_aux_layers} layers cannot feed {num_base_layers} base "
            "layers in contiguous runs (it needs between 1 and as many layers as the base)"
        )
    q, r = divmod(num_base_layers, num_aux_layers)
    return [j for j in range(num_aux_layers) for _ in range(q + 1 if j < r else q)]


def _check_selection(selected: Sequence[int], num_layers: int) -> None:
    sel = list(selected)
    if not sel:
        raise MlxeffError("an auxiliary model needs at least one layer")
    if sel[0] != 0:
        raise MlxeffError(f"the kept layers must start at layer 0 (got {sel[0]}): base layer 0 "
                          "needs an auxiliary layer at or before it")
    if any(b <= a for a, b in zip(sel, sel[1:])):
        raise MlxeffError(f"the kept layers must be strictly increasing, got {sel}")
    if sel[-1] >= num_layers:
        raise MlxeffError(f"layer {sel[-1]} does not exist (the base has {num_layers} layers)")


def validate_layer_map(layer_map: Sequence[int], num_aux_layers: int, num_base_layers: int,
                       source=None) -> List[int]:
    lm = [int(x) for x in layer_map]
    if len(lm) != num_base_layers:
        raise MlxeffError(f"the layer map has {len(lm)} entries but the base has {num_base_layers} "
                          "layers", source)
    if any(not 0 <= x < num_aux_layers for x in lm):
        raise MlxeffError(f"the layer map {lm} refers to layers outside the auxiliary model's "
                          f"{num_aux_layers}", source)
    return lm


# ---------------------------------------------------------------------------------------------
# auxiliary models


def subset_args(args: ModelArgs, layers: Sequence[int]) -> ModelArgs:
    d = args.to_dict()
    d.pop("architectures", None)
    d["num_transformer_layers"] = len(layers)
    for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
        d[k] = [getattr(args, k)[i] for i in layers]
    return ModelArgs.from_dict(d)


def layer_pruned_model(base: Model, layers: Sequence[int]) -> Model:
    """A new model made of copies of ``base``'s ``layers`` (plus its embeddings, norm and head).
    A quantized base gives an auxiliary quantized the same way (its modules' specs follow them)."""
    from ..quant import apply_quantization_spec

    _check_selection(layers, base.args.num_transformer_layers)
    aux = Model(subset_args(base.args, layers))
    remap = {f"transformer.layers.{i}.": f"transformer.layers.{j}." for j, i in enumerate(layers)}

    def renamed(name: str):
        """``name`` in the auxiliary, or None for a layer it does not keep."""
        if not name.startswith("transformer.layers."):
            return name
        prefix = ".".join(name.split(".")[:3]) + "."
        return remap[prefix] + name[len(prefix):] if prefix in remap else None

    meta = dict(getattr(base, "mlxeff_meta", None) or {})
    specs = {renamed(k + "."): v for k, v in (meta.get("quantization") or {}).items()}
    specs = {k[:-1]: v for k, v in specs.items() if k is not None}
    if specs:
        apply_quantization_spec(aux, specs, "the base model")
        aux.mlxeff_meta = {"quantization": specs}
    weights = {}
    for name, value in tree_flatten(base.parameters()):
        if renamed(name) is not None:  # a copy: training the auxiliary must not touch the base
            weights[renamed(name)] = mx.array(value)
    aux.load_weights(list(weights.items()), strict=True)
    aux.set_dtype(_dtype(base))
    mx.eval(aux.parameters())
    return aux


def auxiliary_from_spec(base: Model, spec: str) -> Tuple[Model, List[int], Dict[str, Any]]:
    """An auxiliary model, its layer map and a description, from a short specification.

    ``lp-0.5`` (any kept fraction: ``lp-0.25``, ``lp-0.75`` ...) or ``layers:0,2,5`` prune the base;
    anything else is a model directory (a separate, smaller model with the base's vocabulary).
    """
    n = base.args.num_transformer_layers
    text = str(spec).strip()
    low = text.lower()
    if low.startswith("lp-") or low.startswith("layers:"):
        if low.startswith("lp-"):
            try:
                keep = float(low[3:])
            except ValueError:
                raise MlxeffError(f"bad auxiliary specification {spec!r} (expected lp-<fraction>, "
                                  "e.g. lp-0.5)") from None
            layers = select_layers(n, keep)
        else:
            try:
                layers = [int(x) for x in low[7:].split(",") if x.strip()]
            except ValueError:
                raise MlxeffError(f"bad layer list in {spec!r} (expected layers:0,2,4)") from None
        aux = layer_pruned_model(base, layers)
        return aux, pruned_layer_map(layers, n), {"kind": "layer_pruned", "layers": layers,
                                                   "spec": text}
    from .. import io

    aux = io.load_model(Path(text))
    if aux.args.vocab_size != base.args.vocab_size:
        raise MlxeffError(f"the auxiliary model's vocabulary ({aux.args.vocab_size}) differs from "
                          f"the base model's ({base.args.vocab_size})", text)
    aux.set_dtype(_dtype(base))
    lmap = contiguous_layer_map(aux.args.num_transformer_layers, n)
    return aux, lmap, {"kind": "separate", "source": text}


def _dtype(model: nn.Module):
    """The model's compute dtype: that of its final norm (an embedding may be quantized)."""
    return model.transformer.norm.weight.dtype
