"""M2R2: an accelerated residual stream on a frozen model drafts for self-speculative decoding.

Bhendawade, Najibi, Naik, Belousova, "M2R2: Mixture of Multi-Rate Residuals for Efficient
Transformer Inference", arXiv 2502.02040. The model's own residual stream (the *slow* stream)
advances one block per layer. A second, *fast* stream runs the same blocks with small trainable
accelerator adapters and is trained so that after ``k`` of its steps it is where the slow stream
is after ``r * k`` layers: its first ``N / r`` steps already predict what the whole depth will say.
Drafting with those steps and verifying with the whole model is lossless self-speculative
decoding.

What is implemented (N layers, fast steps ``m = ceil(N / r)``, ``h_i`` the slow state entering
layer ``i``, ``h_0`` the token embedding, ``p_k`` the fast state after ``k`` steps, ``p_0 = h_0``):

- fast step ``j`` (0-based) is base block ``j`` with every weight matrix ``W`` (``qkv_proj``,
  ``out_proj``, ``proj_1``, ``proj_2``) replaced by ``W + s B_j A_j`` (rank ``R``; ``A`` uniform in
  ``+-1/sqrt(fan_in)``, ``B = 0`` at initialisation, so an untrained fast stream *is* the slow
  stream; ``s = 1``): ``p_{j+1} = Block_j^{A,B}(p_j)``. The model's block code runs, with its
  linear modules swapped for adapted ones during the fast step (``swapped``). For
  drafting with a float model the adapter is folded into a copy of the weight (``W + s B A``, the
  first ``m`` blocks' matrices duplicated), so a fast step launches what a plain block launches;
  quantized layers (affine, SeedLM) keep the adapter beside them.
- targets: step ``k`` (1-based) is aligned with slow depth ``d_k = floor(k N / m + 1/2)``, so
  ``d_m = N`` (the last fast state is read by the final norm and the shared head) and the depths
  are spread evenly at rate ``N / m`` (the paper's ``r * k``; ``N`` need not be a multiple of r);
- **shared KV cache**: the fast stream's attention at step ``j`` reads the slow stream's keys and
  values of layer ``j`` for every earlier position and its own (adapted) key and value for the
  position itself. At inference that is the model's cache plus the drafted tokens' own entries; in
  training the keys are ``[K_slow_j ; K_fast_j]`` with a (T, 2T) mask (slow keys ``s < t``, the fast
  key ``s = t``), so the first drafted token sees exactly what training showed it. Later tokens of a
  multi-token draft see the earlier drafts' fast entries (no slow ones exist for them yet): a
  train/inference mismatch accepted here;
- loss (``m2r2_train``): ``w_align * 1/m sum_k mean_t |rms(p_k) - rms(h_{d_k})|^2 / d
  + w_lm * CE(head(norm(p_m)), next token) + w_kd * KL(softmax(slow logits) || softmax(fast
  logits)) + w_router * BCE(router, agree)``, with ``rms(x) = x / sqrt(mean(x^2) + eps)`` (the
  alignment is scale-free: residual norms grow with depth and the head reads them through a norm);
- **router** (the paper's ARLA, simplified): instead of attention over the fast stream's latent
  states across steps, a logistic probe on the fast stream's final normed state, its head's top
  log-probability and its entropy, trained (on stopped gradients, so it does not shape the
  stream) to predict whether the fast argmax equals the slow argmax. While drafting, a token the
  router trusts less than ``threshold`` is proposed but ends the draft (its verify row is nearly
  free; the next draft step is not). ``threshold = 0`` turns the router off.

What follows the paper and what is this implementation's choice. From the paper: a slow and a
rate-accelerated residual stream, accelerator adapters on the frozen model, alignment of the fast
stream's k-th state with the slow stream's at depth ``r k``, the LM loss through the shared head, a
shared KV cache, a router deciding when the fast prediction can be trusted, self-speculative
decoding with a lossless verify. Chosen here, where the paper leaves the detail open or this
engine differs:

- adapter placement and size: low-rank adapters on all four weight matrices of each fast block,
  rank 8 by default (``--rank``), ``B = 0`` initialisation (exactness at rate 1);
- the alignment distance: the mean squared error of RMS-normalised states (above); the KL
  distillation term is an addition (``--kd-weight 0`` drops it): what a drafter needs is agreement
  with the slow stream's argmax, not with the data;
- ``N`` not a multiple of ``r``: ``ceil(N / r)`` steps with evenly spread targets ending at ``N``;
- drafting: the fast stream drafts token by token on the model's cache (as ``early_exit`` does;
  its writes are undone before the verify), and the verify is the engine's one forward over
  ``[y] + draft``; no overlap of the fast and slow computations;
- the router: a logistic probe (above) rather than ARLA's attention over latent states -- the
  same input (the fast stream) and the same decision (trust the fast prediction or not).

Artifact (``MODEL/m2r2/NAME/``; ``mlxeff generate --m2r2 NAME`` resolves a bare name there):
``m2r2.json`` (``{"mlxeff_artifact": "m2r2", "format_version": 1, "steps", "targets", "rank",
"scale", "base": {shape signature}, "training": {...}}``) and ``adapters.safetensors``
(``steps.J.NAME.a/b`` per fast step and weight matrix, ``router.proj.weight/bias``).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxeffError
from ..sampling import SamplingConfig
from . import artifacts
from .early_exit import DRAFT_OPTION, DraftLength, LayerDrafter, weight_share
from .kv_prediction import base_signature
from .registry import Option, Technique, register

ARTIFACT = "m2r2"
FORMAT_VERSION = 1
META_FILE = "m2r2.json"
WEIGHTS_FILE = "adapters.safetensors"
LINEARS = ("qkv_proj", "out_proj", "proj_1", "proj_2")


# ---- shape of the fast stream -------------------------------------------------------------------

def fast_steps(num_layers: int, rate: float) -> int:
    if not rate >= 1:
        raise MlxeffError(f"the rate must be at least 1, got {rate}")
    return max(1, math.ceil(num_layers / rate - 1e-9))


def target_depths(num_layers: int, steps: int) -> List[int]:
    """The slow depth each fast step is aligned with: ``floor(k N / m + 1/2)``, k = 1..m."""
    return [int(math.floor(k * num_layers / steps + 0.5)) for k in range(1, steps + 1)]


def linear_dims(args, layer: int) -> Dict[str, tuple]:
    """(in, out) of each weight matrix of ``layer`` (from the config: packed quantized weights
    do not show them)."""
    d, hd = args.model_dim, args.head_dim
    q, kv, f = args.num_query_heads[layer], args.num_kv_heads[layer], args.ffn_dims[layer]
    return {"qkv_proj": (d, (q + 2 * kv) * hd), "out_proj": (q * hd, d),
            "proj_1": (d, 2 * f), "proj_2": (f, d)}


@dataclass
class M2R2Config:
    steps: int
    targets: List[int]
    rank: int = 8
    scale: float = 1.0

    @classmethod
    def for_model(cls, args, rate: float = 2.0, rank: int = 8) -> "M2R2Config":
        if rank < 1:
            raise MlxeffError(f"the adapter rank must be at least 1, got {rank}")
        m = fast_steps(args.num_transformer_layers, rate)
        return cls(m, target_depths(args.num_transformer_layers, m), rank)


# ---- adapters -----------------------------------------------------------------------------------

class LowRankAdapter(nn.Module):
    """``x -> s (x A^T) B^T`` with A (rank, in), B (out, rank); B starts at zero."""

    def __init__(self, fan_in: int, fan_out: int, rank: int, scale: float = 1.0):
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)
        self.a = mx.random.uniform(-bound, bound, (rank, fan_in))
        self.b = mx.zeros((fan_out, rank))
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        return ((x @ self.a.T) @ self.b.T) * self.scale


class AdaptedLinear(nn.Module):
    """A model's linear layer (any format: float, affine, SeedLM) plus an adapter."""

    def __init__(self, base: nn.Module, adapter: LowRankAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) + self.adapter(x).astype(x.dtype)


class StepAdapters(nn.Module):
    def __init__(self, dims: Dict[str, tuple], rank: int, scale: float):
        super().__init__()
        for name in LINEARS:
            setattr(self, name, LowRankAdapter(*dims[name], rank, scale))


_OWNERS = {"qkv_proj": "attn", "out_proj": "attn", "proj_1": "ffn", "proj_2": "ffn"}


def merged_linear(base: nn.Module, adapter: LowRankAdapter) -> Optional[nn.Linear]:
    """A float ``nn.Linear`` whose weight is ``W + s B A`` (None for quantized layers)."""
    if type(base) is not nn.Linear:
        return None
    w = base.weight
    out = nn.Linear(w.shape[1], w.shape[0], bias="bias" in base)
    delta = (adapter.b.astype(mx.float32) @ adapter.a.astype(mx.float32)) * adapter.scale
    out.weight = (w.astype(mx.float32) + delta).astype(w.dtype)
    if "bias" in base:
        out.bias = base.bias
    return out


@contextlib.contextmanager
def swapped(block: nn.Module, replacements: Dict[str, nn.Module]):
    """Run ``block`` (a model's TransformerBlock) with some weight matrices replaced, then restore.
    Child modules are items of their parent (an ``nn.Module`` is a dict): swapping prebuilt items
    took 20 us per block where building four modules and setting them as attributes took 94 us
    (busy 2-core CPU, measured)."""
    owners = [(name, block[_OWNERS[name]]) for name in replacements]
    saved = [owner[name] for name, owner in owners]
    try:
        for name, owner in owners:
            owner[name] = replacements[name]
        yield block
    finally:
        for (name, owner), base in zip(owners, saved):
            owner[name] = base


def adapters_on(block: nn.Module, adapters: "StepAdapters"):
    """``swapped`` with every weight matrix of ``block`` plus its adapter."""
    return swapped(block, {n: AdaptedLinear(block[o][n], adapters[n]) for n, o in _OWNERS.items()})


class _Holder:
    """Plain storage on a module that stays out of its parameter tree."""

    def __init__(self):
        self.replacements: dict = {}


class Router(nn.Module):
    """A logistic probe: does the fast stream's argmax equal the slow stream's?"""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim + 2, 1)
        self.proj.weight = mx.zeros_like(self.proj.weight)
        self.proj.bias = mx.zeros_like(self.proj.bias)

    def __call__(self, state: mx.array, logits: mx.array) -> mx.array:
        """Logit of trust for each row; ``state`` the final-normed fast state, ``logits`` its head's."""
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        top = logprobs.max(axis=-1, keepdims=True)
        entropy = -(mx.exp(logprobs) * logprobs).sum(axis=-1, keepdims=True)
        features = mx.concatenate([state.astype(mx.float32), top, entropy], axis=-1)
        return self.proj(features)[..., 0]


class FastStream(nn.Module):
    """The accelerator adapters of every fast step and the router."""

    def __init__(self, args, config: M2R2Config):
        super().__init__()
        self._config = config
        self.steps = [StepAdapters(linear_dims(args, j), config.rank, config.scale)
                      for j in range(config.steps)]
        self.router = Router(args.model_dim)
        self._holder = _Holder()

    @property
    def config(self) -> M2R2Config:
        return self._config

    def replacements(self, model: nn.Module, merge: bool = False) -> List[Dict[str, nn.Module]]:
        """Per fast step, what replaces each weight matrix of block ``j``: the model's layer plus
        its adapter, or with ``merge`` a float layer with the adapter folded into its weight
        (quantized layers keep the adapter beside them). Built once, rebuilt when the model's
        layers or the adapters' arrays change."""
        current = [(model.layers[j][o][n],) + ((self.steps[j][n].a, self.steps[j][n].b) if merge
                                               else ())
                   for j in range(len(self.steps)) for n, o in _OWNERS.items()]
        key = (id(model), merge)
        cached = self._holder.replacements.get(key)
        if cached is not None and all(x is y for a, b in zip(cached[0], current)
                                      for x, y in zip(a, b)):
            return cached[1]
        out = []
        for j, adapters in enumerate(self.steps):
            reps = {}
            for n, o in _OWNERS.items():
                base = model.layers[j][o][n]
                reps[n] = (merge and merged_linear(base, adapters[n])) or \
                    AdaptedLinear(base, adapters[n])
            out.append(reps)
        self._holder.replacements[key] = (current, out)
        return out

    def __call__(self, model: nn.Module, h: mx.array, cache: Optional[Sequence] = None, mask=None,
                 states: Optional[list] = None, merge: bool = False) -> mx.array:
        """The fast state after every step from ``h`` (the embedded tokens), through the model's
        blocks ``0..m-1`` (``cache``: the model's cache list, or per-layer stand-ins); each
        intermediate state is appended to ``states`` when given. ``merge``: see ``replacements``
        (inference only: the merged weights are constants)."""
        t = model.transformer
        for j, reps in enumerate(self.replacements(model, merge)):
            with swapped(model.layers[j], reps):
                h = t.forward_layers(h, j, j + 1, cache, mask=mask)
            if states is not None:
                states.append(h)
        return h

    def adapter_macs(self) -> int:
        return sum(a.a.size + a.b.size for s in self.steps for a in (getattr(s, n) for n in LINEARS))


# ---- the artifact -------------------------------------------------------------------------------

@dataclass
class M2R2:
    stream: FastStream
    info: Dict[str, Any] = field(default_factory=dict)

    def check(self, model: nn.Module, source=None) -> None:
        sig = self.info.get("base")
        if sig and sig != base_signature(model):
            diff = [k for k in sig if sig[k] != base_signature(model).get(k)]
            raise MlxeffError(f"these adapters were trained for another model shape ({diff[0]}: "
                              f"{sig[diff[0]]} vs {base_signature(model)[diff[0]]})", source)
        if self.stream.config.steps > len(model.layers):
            raise MlxeffError(f"the fast stream has {self.stream.config.steps} steps but the model "
                              f"has {len(model.layers)} layers", source)

    def save(self, path, *, force: bool = False, base: Optional[nn.Module] = None,
             extra_files: Optional[Dict[str, str]] = None) -> Path:
        from .. import io

        path = Path(path)
        meta = {"mlxeff_artifact": ARTIFACT, "format_version": FORMAT_VERSION,
                **asdict(self.stream.config), **self.info}
        if base is not None:
            meta["base"] = base_signature(base)
        with io.atomic_directory(path, force=force) as tmp:
            weights = dict(tree_flatten(self.stream.parameters()))
            mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        return path

    @classmethod
    def load(cls, path, model: nn.Module) -> "M2R2":
        from .. import io

        path = Path(path)
        meta, meta_file = artifacts.read_meta(path, kind=ARTIFACT, label="M2R2", article="an",
                                              meta_file=META_FILE, format_version=FORMAT_VERSION)
        try:
            config = M2R2Config(int(meta["steps"]), [int(x) for x in meta["targets"]],
                                int(meta["rank"]), float(meta["scale"]))
        except (KeyError, TypeError, ValueError) as e:
            raise MlxeffError(f"bad or missing field ({e.__class__.__name__}: {e})", meta_file) from None
        info = {k: v for k, v in meta.items() if k not in
                ("mlxeff_artifact", "format_version", *asdict(config))}
        if not 1 <= config.steps <= len(model.layers) or len(config.targets) != config.steps:
            raise MlxeffError(f"the fast stream has {config.steps} steps and {len(config.targets)} "
                              f"targets; the model has {len(model.layers)} layers", meta_file)
        art = cls(FastStream(model.args, config), info)
        art.check(model, path)
        if not (path / WEIGHTS_FILE).is_file():
            raise MlxeffError(f"missing {WEIGHTS_FILE}", path)
        io.load_weights_into(art.stream, io.read_safetensors(path / WEIGHTS_FILE), path / WEIGHTS_FILE)
        mx.eval(art.stream.parameters())
        return art


def resolve_dir(path, model_dir=None) -> Path:
    """``path`` itself, or ``MODEL/m2r2/<path>`` when only that exists."""
    return artifacts.resolve_dir(path, model_dir, "m2r2")


# ---- drafting -----------------------------------------------------------------------------------

class M2R2Drafter(LayerDrafter):
    """Drafts with the fast stream on the model's cache (``early_exit.LayerDrafter``'s loop)."""

    def __init__(self, stream: FastStream, draft: int = 8, threshold: float = 0.5,
                 sampling: Optional[SamplingConfig] = None, policy: Optional[DraftLength] = None,
                 merge: bool = True):
        super().__init__(stream.config.steps, draft, sampling, policy)
        self.stream = stream
        self.threshold = threshold
        self.merge = merge

    def check(self, model) -> None:
        M2R2(self.stream).check(model)

    def draft_cost(self, model) -> float:
        return weight_share(model.args, self.layers, self.stream.adapter_macs())

    def hidden(self, h):
        return self.stream(self.model, h, self.cache, merge=self.merge)

    def trusted(self, state, logits):
        if self.threshold <= 0:
            return None
        return mx.sigmoid(self.stream.router(state[:, -1, :], logits))[0] >= self.threshold


def _build(ctx, o) -> dict:
    model = ctx.model
    art = M2R2.load(resolve_dir(o["path"], ctx.model_dir), model)
    art.stream.set_dtype(model.transformer.norm.weight.dtype)
    return {"drafter": M2R2Drafter(art.stream, o["draft"], o["threshold"])}


register(Technique(
    name="m2r2",
    title="M2R2 accelerated residual stream (arXiv 2502.02040)",
    summary="Draft with an accelerated residual stream (adapters trained by train-m2r2; a bare "
    "NAME means MODEL/m2r2/NAME) over the model's first layers; one forward of the whole model "
    "verifies the draft (greedy output is identical to plain decoding).",
    hooks=("drafter",),
    value=Option("path", Path, None, "The M2R2 directory or NAME.", metavar="NAME"),
    options=(DRAFT_OPTION,
             Option("threshold", float, 0.5, "Stop a draft after a token the router trusts less "
                    "than this (0: no router).",
                    check=lambda v: None if 0 <= v <= 1 else f"must be in [0, 1], got {v}")),
    build=_build,
))
