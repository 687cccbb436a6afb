"""Training objective for KV Prediction (arXiv 2410.08391): base frozen, auxiliary + predictor learn.

For a batch of packed token sequences (inputs ``x``, next-token targets ``y``):

1. the auxiliary model reads ``x``: its logits give ``CE_aux`` and its raw keys and values (before
   k_norm/RoPE) go through the predictor, giving a predicted KV cache for every base layer;
2. the base model reads ``x`` with its attention's keys and values *replaced* by the prediction
   (base k_norm and RoPE applied to the predicted keys): every base query at position ``t`` attends
   to the predicted keys/values at positions ``0..t``. Its cross-entropy is ``CE_base`` — the loss
   of generating from the predicted cache. Gradients reach the predictor and the auxiliary model
   through the predicted cache only; the base's weights are frozen;
3. the base model also reads ``x`` normally (no gradient) for its own cache; the consistency loss
   is, per base layer, the mean absolute error of the predicted keys (after the base's k_norm,
   before RoPE) and of the predicted values against the base's own, summed over layers.

``loss = CE_base + CE_aux + lambda * sum_layers (L1_K + L1_V)``, ``lambda = 1 / n_base_layers``
by default (configurable; 0 switches the consistency loss off, which is the ablation).

Matches CoreNet's ``KVPredictionLLM`` training forward (``concat_kvs=False``: the base uses only
predicted KVs, including at the query's own position) and ``CrossEntropyForKVPrediction``.
Deviations: no z-loss (CoreNet's configs add one with weight 1e-4), no label smoothing, and no
ignore-index (packed sequences have no padding). CoreNet's released configs weight the
consistency term with 1 rather than ``1/n_layers``; ``--kv-weight 1`` reproduces that.
At inference the base's last prompt position uses its own KV, not a predicted one (as in CoreNet).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxeffError

from ..models import Model
from ..cache import PassThroughCache
from .artifacts import load_frozen_base
from .kv_prediction import KVPrediction, KVPredictor, base_view_keys, sink_kv


class _Ref:
    """Holds the frozen base outside the module tree: its weights are neither trained nor saved."""

    def __init__(self, model):
        self.model = model


class KVPredictionModel(nn.Module):
    """Auxiliary model + predictor (trainable) with a reference to the frozen base."""

    def __init__(self, base: Model, auxiliary: Model, predictor: KVPredictor):
        super().__init__()
        base.freeze()
        self._ref = _Ref(base)
        self.auxiliary = auxiliary
        self.predictor = predictor

    @property
    def base(self) -> Model:
        return self._ref.model

    def artifact(self, info: Optional[dict] = None) -> KVPrediction:
        return KVPrediction(self.auxiliary, self.predictor, dict(info or {}))


@dataclass
class KVLossConfig:
    kv_weight: Optional[float] = None  # lambda; None -> 1 / number of base layers
    base_weight: float = 1.0
    aux_weight: float = 1.0

    def resolved_kv_weight(self, num_base_layers: int) -> float:
        return 1.0 / num_base_layers if self.kv_weight is None else float(self.kv_weight)


def predicted_caches(base: Model, keys: Sequence[mx.array], values: Sequence[mx.array]) -> list:
    """Caches that make every base attention use the given keys (base view, before RoPE; the
    base's RoPE is applied here) and values instead of its own."""
    return [PassThroughCache(replace=(layer.attn.rotate(k), v.astype(k.dtype)))
            for layer, k, v in zip(base.layers, keys, values)]


def recording_caches(model: Model) -> list:
    """Caches that record each layer's raw keys and values during one full forward."""
    return [PassThroughCache(record=True) for _ in model.layers]


def base_kv(base: Model, inputs: mx.array) -> Tuple[List[mx.array], List[mx.array]]:
    """The base's own keys (after k_norm, before RoPE) and values, without gradient."""
    caches = recording_caches(base)
    base.transformer(inputs, cache=caches)
    keys, values = sink_kv([c.raw_sink for c in caches])
    keys = base_view_keys(base, keys)
    return [mx.stop_gradient(k) for k in keys], [mx.stop_gradient(v) for v in values]


def _ce(logits: mx.array, targets: mx.array) -> mx.array:
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")


def kv_prediction_terms(model: KVPredictionModel, batch: mx.array) -> Dict[str, mx.array]:
    """All loss terms for ``batch`` (B, L+1): ce_base, ce_aux, k_l1, v_l1 (sums over layers)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    base, aux = model.base, model.auxiliary
    true_k, true_v = base_kv(base, inputs)
    aux_caches = recording_caches(aux)
    aux_logits = aux(inputs, cache=aux_caches)
    pred_k, pred_v = model.predictor(*sink_kv([c.raw_sink for c in aux_caches]))
    pred_k = base_view_keys(base, pred_k)
    base_logits = base(inputs, cache=predicted_caches(base, pred_k, pred_v))
    k_l1 = sum(mx.abs(p.astype(mx.float32) - t.astype(mx.float32)).mean()
               for p, t in zip(pred_k, true_k))
    v_l1 = sum(mx.abs(p.astype(mx.float32) - t.astype(mx.float32)).mean()
               for p, t in zip(pred_v, true_v))
    return {"ce_base": _ce(base_logits, targets), "ce_aux": _ce(aux_logits, targets),
            "k_l1": k_l1, "v_l1": v_l1}


def make_loss_fn(cfg: KVLossConfig) -> Callable[[KVPredictionModel, mx.array], tuple]:
    """``loss_fn(model, batch) -> (loss, metrics)`` for the training loop."""

    def loss_fn(model: KVPredictionModel, batch: mx.array):
        t = kv_prediction_terms(model, batch)
        lam = cfg.resolved_kv_weight(model.base.args.num_transformer_layers)
        kv = t["k_l1"] + t["v_l1"]
        loss = cfg.base_weight * t["ce_base"] + cfg.aux_weight * t["ce_aux"] + lam * kv
        return loss, {**t, "kv_l1": kv}

    return loss_fn


def base_ce(base: Model, batch: mx.array) -> mx.array:
    """The base's own cross-entropy on ``batch`` (the floor ``ce_base`` approaches)."""
    return _ce(base(batch[:, :-1]), batch[:, 1:])


def evaluate(model: KVPredictionModel, batches: Sequence[mx.array]) -> Dict[str, float]:
    """Mean loss terms over ``batches`` plus the base's own cross-entropy."""
    sums: Dict[str, float] = {}
    for b in batches:
        t = kv_prediction_terms(model, b)
        t["kv_l1"] = t["k_l1"] + t["v_l1"]
        t["ce_base_own"] = base_ce(model.base, b)
        mx.eval(t)
        for k, v in t.items():
            sums[k] = sums.get(k, 0.0) + v.item()
    return {k: v / max(len(batches), 1) for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------
# a training run from text files (what `mlxeff train-kv-prediction` runs)


def valid_fn_for(windows, batch_size: int) -> Callable[[KVPredictionModel], dict]:
    """Validation for the training loop: ``loss`` is CE_base from the predicted cache."""

    def fn(model: KVPredictionModel) -> dict:
        batches = [mx.array(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
        res = evaluate(model, batches)
        return {"loss": res["ce_base"], "ppl": math.exp(min(res["ce_base"], 700.0)), **res}

    return fn


def default_work_dir(out: Path, base_dir: Path) -> Path:
    """Checkpoints and token cache when no ``work`` is given: a hidden folder next to ``out``, or,
    when ``out`` lies inside the base model's folder (the default ``BASE/kv_prediction/NAME``), a
    folder in the system's temporary directory named after ``out`` (so ``--resume`` finds it): the
    base model's folder receives the final artifact only."""
    import hashlib
    import tempfile

    target, base = Path(out).resolve(), Path(base_dir).resolve()
    if target == base or base in target.parents:
        key = hashlib.sha256(str(target).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"mlxeff-kv-prediction-{target.name}-{key}"
    return Path(out).parent / f".{Path(out).name}.train"


def _check_run_options(cfg, out: Path, loss_cfg: KVLossConfig, save_dtype: str, force: bool,
                       eval_tokens: int) -> None:
    from ..train import DTYPES
    from ..train.corpus import check_eval_tokens

    if out.exists() and not force:
        raise MlxeffError("output already exists (use --force to replace it)", out)
    if save_dtype != "base" and save_dtype not in DTYPES:
        raise MlxeffError(f"--save-dtype must be base or one of {sorted(DTYPES)}, got {save_dtype!r}")
    if loss_cfg.kv_weight is not None and loss_cfg.kv_weight < 0:
        raise MlxeffError(f"--kv-weight must be >= 0, got {loss_cfg.kv_weight}")
    check_eval_tokens(eval_tokens, cfg.seq_len)


def run_kv_training(cfg, *, base_dir, aux_spec: str, train_files, valid_files, out,
                    loss_cfg: Optional[KVLossConfig] = None, predictor_init: str = "identity",
                    work=None, eval_tokens: int = 65_536, cache_dir=None, resume: bool = False,
                    keep_work: bool = False, force: bool = False, save_dtype: str = "base",
                    say=print, log=None) -> dict:
    """Train an auxiliary model + predictor for the model in ``base_dir`` through ``train_loop``;
    save the artifact to ``out`` (see ``kv_prediction``).

    Checkpoints and the token cache live in ``work`` (default: ``default_work_dir``). After
    success the default work folder is removed (a given ``work`` keeps its token cache), unless
    ``keep_work``; a failed run removes a work folder it created unless it holds a checkpoint
    (Ctrl-C always writes one), kept for ``resume``.
    """
    import shutil

    from ..train import DTYPES, LogRecorder, list_checkpoints, train_loop
    from ..train.checkpoints import run_folder
    from ..train.corpus import CorpusFiles, load_corpus
    from .kv_prediction import auxiliary_from_spec, base_signature

    wall = time.perf_counter()
    loss_cfg = loss_cfg or KVLossConfig()
    out = Path(out)
    _check_run_options(cfg, out, loss_cfg, save_dtype, force, eval_tokens)
    files = CorpusFiles.expand(train_files, valid_files)
    own_work = work is None
    work = default_work_dir(out, base_dir) if own_work else Path(work)

    base, tok, disk_dtype = load_frozen_base(base_dir, DTYPES[cfg.dtype])
    aux, layer_map, aux_info = auxiliary_from_spec(base, aux_spec)
    predictor = KVPredictor.for_models(aux, base, layer_map, init=predictor_init)
    model = KVPredictionModel(base, aux, predictor)
    n_base = base.args.num_transformer_layers
    lam = loss_cfg.resolved_kv_weight(n_base)
    if cfg.seq_len > base.args.max_context_length:
        say(f"note: --seq-len {cfg.seq_len} exceeds the base's max_context_length "
            f"{base.args.max_context_length}")

    log_fn = LogRecorder(log)
    with run_folder(work, say):
        corpus = load_corpus(files, tok, Path(cache_dir) if cache_dir else work / "cache", cfg, say)
        windows = corpus.valid_windows(cfg.seq_len, eval_tokens)
        valid_fn = None if windows is None else valid_fn_for(windows, cfg.batch_size)
        initial = None
        if valid_fn is not None and not (resume and list_checkpoints(work)):
            initial = valid_fn(model)
            say(f"before training: CE_base(predicted) {initial['ce_base']:.4f}  CE_aux "
                f"{initial['ce_aux']:.4f}  KV L1 {initial['kv_l1']:.4f}  "
                f"(base's own CE {initial['ce_base_own']:.4f})")
        n_aux = sum(v.size for _, v in tree_flatten(aux.parameters()))
        n_pred = sum(v.size for _, v in tree_flatten(predictor.parameters()))
        say(f"auxiliary: {aux_info.get('spec', aux_info.get('source'))}, "
            f"{aux.args.num_transformer_layers}/{n_base} layers, {n_aux:,} parameters; predictor "
            f"{n_pred:,} parameters; lambda {lam:.4g}; {cfg.tokens_per_step:,} tokens per step")
        result = train_loop(model, make_loss_fn(loss_cfg), corpus.batch_fn(cfg.batch_size), cfg,
                            out_dir=work, valid_fn=valid_fn, resume=resume, log=log_fn, say=say)

    save_as = disk_dtype if save_dtype == "base" else DTYPES[save_dtype]
    aux.set_dtype(save_as)
    predictor.set_dtype(save_as)
    train_log = log_fn.train_log
    training = {
        "aux_spec": aux_spec, "kv_weight": lam, "base_weight": loss_cfg.base_weight,
        "aux_weight": loss_cfg.aux_weight, "predictor_init": predictor_init,
        "config": cfg.to_dict(), **files.describe(), "tokens_seen": result["tokens_seen"],
        "train_time_s": result["train_time_s"], "device": str(mx.default_device()),
        "valid_initial": initial, "valid_final": result["valid"],
    }
    summary = {
        "out": str(out), **training, "base": str(base_dir), "base_signature": base_signature(base),
        "layer_map": layer_map, "aux_parameters": int(n_aux), "predictor_parameters": int(n_pred),
        "history": result["history"], "train_log": train_log,
    }
    summary["wall_time_s"] = time.perf_counter() - wall
    artifact = model.artifact({"auxiliary": aux_info, "training": training})
    artifact.save(out, force=force, base=base,
                  extra_files={"summary.json": json.dumps(summary, indent=1)})
    if not keep_work:
        shutil.rmtree(work if own_work else work / "checkpoints", ignore_errors=True)
    return summary
