"""Superposition prompting: fork-join prompt paths for retrieval-augmented generation.

Paper: Merth, Fu, Rastegari, Najibi, "Superposition Prompting: Improving and Accelerating
Retrieval-Augmented Generation", ICML 2024, arXiv 2404.06910 (official code:
github.com/apple/ml-superposition-prompting, a patch of Hugging Face transformers; its rules were
read there and are restated here, not copied).

Algorithm. A retrieval-augmented prompt is a preamble ``p``, documents ``d_1 .. d_n`` and a query
``q``. Instead of one long sequence, the prompt is a fork-join graph: the preamble, then one *path*
per document (``d_i`` followed by its own copy of ``q``), then the response joining the paths. A
segment attends only to its ancestors on its own path (and causally to itself): document ``i`` sees
the preamble, query copy ``i`` sees the preamble and ``d_i``, the response sees the preamble and the
kept paths (``superposition_graph.forkjoin_mask``).

- *Equilibrium positions* (the code's rule): with ``P`` the preamble's length, ``l_i`` document
  ``i``'s and ``H = n / sum_i (1 / l_i)`` their harmonic mean, token ``j`` of document ``i`` sits at
  ``P + (H / l_i) j`` (real-valued), so every path spans ``[P, P + H)``; every query copy at
  ``P + H + j``; the response at ``P + H + m + j`` (``m`` the query's length); a decoded token at the
  previous position + 1. RoPE at real-valued positions goes through the model's ``positions`` input
  (``mlxeff.models.attention.rope_real``). Ablation ``positions="left"``: documents at ``P + j``, the
  query after the longest, ``P + max_i l_i + j``.
- *Bayesian path scores* (as the code computes them): ``s_i = mean_j log p(q_j | p, d_i, q_<j) +
  mean_j log p(d_ij | p, d_i,<j)``, each mean over the segment's tokens after its first (the
  prediction made inside the segment). Ablation ``scoring="attention"``: the attention the last
  query token of path ``i`` pays to ``d_i`` (see deviations).
- *Pruning*: the ``top_k`` paths by score are kept; the pruned paths' keys and values are dropped
  (the paper's rule) and the response is computed after the preamble and the kept paths only.
  Option ``reweight="soft"`` (the code's attenuation): the kept paths stay, and the response and
  every decoded token add ``(s_i - max_kept s) / T`` to their attention logits over path ``i``'s
  tokens.
- *Path caching*: the preamble's keys and values and each preamble+document path's (with the
  document's score term) do not depend on the question: they are computed once and reused by every
  later question (``superposition_cache.PathCache``; in memory, and with a directory on disk across
  runs). A question then costs only the ``n`` query copies and the response.
- *Path parallelisation*: all documents, then all query copies, run as one batch of paths
  (``superposition_paths``), sorted by length and cut into batches of ``batch_tokens`` padded
  tokens.

Engine integration. A prefill technique (registry name ``superposition``; hooks ``prefill`` and
``decode``). The engine's prompt is the *question*: the prefill decodes its token ids to text, puts
it in the query template and tokenises each segment with the model's tokenizer (loaded from the
model directory, ``mlxeff.io.load_tokenizer``); the documents come from ``--superposition-docs
FILE`` (a ``.jsonl`` file or a folder of ``.txt`` files), the preamble and templates from options.
The cache it leaves (``SuperpositionLayerCache``) holds the preamble, the kept paths and the
response at their positions; the decode hook appends tokens after the last position. The Python
API (``superposition_hooks``, ``generate``) takes a tokenizer, the documents and a question
directly, and a ``PathCache`` to share across questions.

Deviations and resolved choices:

- Option flags follow the registry's ``--NAME-OPTION`` rule: ``--superposition-docs``,
  ``--superposition-top-k``, ``--superposition-doc-cache`` (the issue's ``--docs``, ``--top-k``,
  ``--doc-cache``; the registry has no short aliases).
- A segment of one token has no prediction inside it: its score term is 0 (the code's mean over no
  tokens is undefined).
- Attention scoring uses the last query token's attention only (over the keys it may see:
  renormalised, since the reported softmax also covers padded keys), averaged over heads, then
  layers; the code sums the layer- and head-averaged attention of every query token. The model
  reports the last row's attention weights only (``want_scores``), and attention is computed nowhere
  but in ``mlxeff/models``. Attention scoring needs the batched passes (``single_pass`` is Bayesian
  only).
- The response prefix (``--superposition-response``, default ``"Answer:"``) must have a token: the
  first answer token is predicted by the response's last token, which sees every kept path. (The
  code with an empty task takes it from the last path's last query token, which sees one path.)
- Positions are float32 for the model (real-valued RoPE); when every position is an integer (one
  document, equal lengths, left-aligned) they are passed as integers, so that one document gives
  the classical prompt exactly. Decoded tokens follow the last position + 1 through this
  technique's decode hook (the cache's integer ``next_position`` would round it down).
- Path caching and the equilibrium rule: a document's positions depend on the harmonic mean of the
  whole set, so entries are keyed by the document's positions too; the same collection asked
  another question always hits. Left-aligned positions do not depend on the other documents, so
  their entries are shared by any set.
- The document's score term is computed once with its keys and values (stored in the cache entry).
- ``single_pass=True`` runs the whole graph in one forward with the fork-join mask (no path
  caching, no batching): the reference the batched paths are tested against.
- Templates: the default preamble and templates are this module's own wording, not the paper's.
  Batch size 1, as the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from ..cache import PositionedKVCache
from ..engine import DecodeStrategy, PrefillStrategy
from ..errors import MlxeffError
from .registry import Option, Technique, TechniqueError, register
from .superposition_cache import (
    PathCache, SegmentKV, SuperpositionLayerCache, compute_dtype, fill, position_array,
    response_mask, segment_key,
)
from .superposition_graph import POSITION_RULES, Layout, layout, soft_bias, top_k
from .superposition_paths import run_documents, run_preamble, run_queries, run_single_pass
from .superposition_prompt import (  # noqa: F401  (part of this module's API)
    DEFAULT_DOCUMENT, DEFAULT_PREAMBLE, DEFAULT_QUERY, DEFAULT_RESPONSE, Document, ForkJoinPrompt,
    PromptTemplate, build_prompt, classical_ids, encode, load_documents,
)

SCORINGS = ("bayesian", "attention")
REWEIGHTS = ("drop", "soft")


@dataclass(frozen=True)
class SuperpositionConfig:
    """``top_k`` paths kept; ``positions``: equilibrium | left; ``scoring``: bayesian | attention;
    ``reweight``: drop (the paper) | soft (the code's attenuation, at ``temperature``);
    ``batch_tokens``: padded tokens per batched forward; ``single_pass``: the one-forward reference."""

    top_k: int = 1
    positions: str = "equilibrium"
    scoring: str = "bayesian"
    reweight: str = "drop"
    temperature: float = 1.0
    batch_tokens: int = 2048
    single_pass: bool = False

    def __post_init__(self):
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise MlxeffError(f"top-k must be a positive integer, got {self.top_k!r}")
        for name, allowed in (("positions", POSITION_RULES), ("scoring", SCORINGS), ("reweight", REWEIGHTS)):
            if getattr(self, name) not in allowed:
                raise MlxeffError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise MlxeffError(f"temperature must be positive, got {self.temperature}")
        if self.batch_tokens < 1:
            raise MlxeffError(f"batch tokens must be positive, got {self.batch_tokens}")
        if self.single_pass and self.scoring != "bayesian":
            raise MlxeffError("the single-pass reference scores paths the Bayesian way only")


@dataclass
class SuperpositionRun:
    """What one prefill did: the paths' scores and which were kept, the segment lengths, and how
    many documents came from the path cache."""

    scores: List[float]
    kept: List[int]
    document_loglik: List[float]
    query_loglik: List[float]
    preamble_tokens: int
    document_tokens: List[int]
    query_tokens: int
    response_tokens: int
    documents_cached: int
    documents_computed: int
    preamble_cached: bool
    layout: Layout = field(repr=False)


# ---- the prefill ----------------------------------------------------------------------------------

def path_segments(model, prompt: ForkJoinPrompt, lay: Layout, config: SuperpositionConfig,
                  path_cache: PathCache) -> Tuple[SegmentKV, List[SegmentKV], bool, int]:
    """The preamble's and every document's segments, from ``path_cache`` where present (computed,
    batched, and stored otherwise). Returns (preamble, documents, preamble cached, documents
    cached)."""
    fp = path_cache.bind(model)
    dtype = compute_dtype(model)
    pkey = segment_key(fp, dtype, "preamble", prompt.preamble)
    pre = path_cache.get(pkey)
    pre_cached = pre is not None
    if pre is None:
        pre = run_preamble(model, prompt.preamble, lay.preamble)
        path_cache.put(pkey, pre)
    keys = [segment_key(fp, dtype, "document", prompt.preamble, d, lay.documents[i])
            for i, d in enumerate(prompt.documents)]
    docs: List[Optional[SegmentKV]] = [path_cache.get(k) for k in keys]
    missing = [i for i, d in enumerate(docs) if d is None]
    if missing:
        new = run_documents(model, pre, [prompt.documents[i] for i in missing],
                            [lay.documents[i] for i in missing], config.batch_tokens)
        for i, seg in zip(missing, new):
            docs[i] = seg
            path_cache.put(keys[i], seg)
    return pre, docs, pre_cached, len(docs) - len(missing)


def respond(model, cache: Sequence[PositionedKVCache], ids: Sequence[int], positions: np.ndarray) -> mx.array:
    """Run the response prefix after everything cached; the last token's logits (1, V)."""
    c = cache[0]
    mask = response_mask(getattr(c, "slot_bias", None), c.offset, len(ids), compute_dtype_of(model))
    h = model.transformer(mx.array(np.asarray(ids, dtype=np.uint32))[None], cache=cache,
                          positions=position_array(positions)[None], mask=mask)
    return model.logits(h[:, -1:])[:, -1, :]


def compute_dtype_of(model):
    return model.transformer.norm.weight.dtype


def superposition_prefill(model, prompt: ForkJoinPrompt, cache: Sequence[PositionedKVCache],
                          config: SuperpositionConfig = SuperpositionConfig(),
                          path_cache: Optional[PathCache] = None) -> Tuple[mx.array, SuperpositionRun]:
    """Fill ``cache`` (fresh, one layer cache per layer) with the preamble, the kept paths and the
    response; the next token's logits (1, V) and what was done."""
    n = len(prompt.documents)
    if n == 0:
        raise MlxeffError("superposition prompting needs at least one document")
    if config.top_k > n:
        raise MlxeffError(f"top-k {config.top_k} is larger than the number of documents ({n})")
    if cache[0].offset:
        raise MlxeffError("superposition prefill needs a fresh cache")
    lay = layout(config.positions, len(prompt.preamble), prompt.document_lengths, len(prompt.query),
                 len(prompt.response))
    if config.single_pass:
        pre, docs, queries = run_single_pass(model, prompt.preamble, prompt.documents, prompt.query, lay)
        q_ll = np.array([q.loglik for q in queries])
        att, pre_cached, cached = None, False, 0
    else:
        path_cache = path_cache if path_cache is not None else PathCache()
        pre, docs, pre_cached, cached = path_segments(model, prompt, lay, config, path_cache)
        queries, q_ll, att = run_queries(model, pre, docs, prompt.query, lay.query, config.batch_tokens,
                                         attention=config.scoring == "attention")
    d_ll = np.array([d.loglik for d in docs])
    scores = d_ll + q_ll if config.scoring == "bayesian" else att
    kept = top_k(scores, config.top_k)
    bias = None
    if config.reweight == "soft":
        per_path = soft_bias(scores, kept, config.temperature)
        bias = np.concatenate([np.zeros(pre.size)] + [np.full(docs[i].size + queries[i].size, b)
                                                       for i, b in zip(kept, per_path)])
    fill(cache, [pre] + [s for i in kept for s in (docs[i], queries[i])], bias)
    logits = respond(model, cache, prompt.response, lay.response)
    run = SuperpositionRun([float(s) for s in scores], kept, d_ll.tolist(), q_ll.tolist(),
                           len(prompt.preamble), prompt.document_lengths, len(prompt.query),
                           len(prompt.response), cached, n - cached, pre_cached, lay)
    return logits, run


# ---- engine hooks -----------------------------------------------------------------------------

class SuperpositionPrefill(PrefillStrategy):
    """The engine's prefill: the prompt is the question; documents, preamble and templates are
    fixed when the hook is made. ``path_cache`` (default: a private in-memory one) keeps the
    preamble and the documents across calls; ``last`` describes the latest call."""

    def __init__(self, tokenizer, documents: Sequence[Union[Document, str]],
                 template: PromptTemplate = PromptTemplate(),
                 config: SuperpositionConfig = SuperpositionConfig(),
                 path_cache: Optional[PathCache] = None):
        self.tokenizer = tokenizer
        self.template = template.check()
        self.config = config
        self.documents = list(documents)
        self.path_cache = path_cache if path_cache is not None else PathCache()
        self._fixed = build_prompt(tokenizer, template, self.documents, "?")
        if config.top_k > len(self.documents):
            raise MlxeffError(f"top-k {config.top_k} is larger than the number of documents "
                              f"({len(self.documents)})")
        self.last: Optional[SuperpositionRun] = None

    def make_cache(self, model) -> List[SuperpositionLayerCache]:
        return [SuperpositionLayerCache() for _ in model.layers]

    def fork_join(self, question: str) -> ForkJoinPrompt:
        if not question.strip():
            raise MlxeffError("the question is empty")
        q = encode(self.tokenizer, self.template.query_text(question))
        f = self._fixed
        return ForkJoinPrompt(f.preamble, f.documents, q, f.response)

    def question(self, prompt: mx.array) -> str:
        return self.tokenizer.decode([int(t) for t in prompt.tolist()], skip_special_tokens=True)

    def prepare(self, model) -> None:
        """Compute (or load) the preamble and every document into the path cache ahead of the
        questions."""
        f = self._fixed
        lay = layout(self.config.positions, len(f.preamble), f.document_lengths, 1, 1)
        path_segments(model, f, lay, self.config, self.path_cache)

    def __call__(self, model, prompt, cache):
        logits, self.last = superposition_prefill(model, self.fork_join(self.question(prompt)), cache,
                                                  self.config, self.path_cache)
        return logits


class SuperpositionDecode(DecodeStrategy):
    """Tokens appended after the latest position (+1 each), seeing every cached slot (with the
    soft reweighting's bias when the prefill left one)."""

    def __call__(self, model, tokens, cache):
        c = cache[0]
        if not isinstance(c, PositionedKVCache) or c.ordered:
            return super().__call__(model, tokens, cache)
        n = tokens.size
        start = float(np.max(c.positions)) + 1.0
        mask = response_mask(getattr(c, "slot_bias", None), c.offset, n, compute_dtype_of(model))
        return model(tokens[None], cache=cache, positions=position_array(start + np.arange(n))[None],
                     mask=mask)[0]


# ---- the Python API ---------------------------------------------------------------------------

def superposition_hooks(tokenizer, documents: Sequence[Union[Document, str]], *,
                        template: PromptTemplate = PromptTemplate(),
                        config: SuperpositionConfig = SuperpositionConfig(),
                        path_cache: Optional[PathCache] = None) -> dict:
    """``{"prefill": ..., "decode": ...}`` for ``mlxeff.stream_generate`` / ``generate_step``."""
    return {"prefill": SuperpositionPrefill(tokenizer, documents, template, config, path_cache),
            "decode": SuperpositionDecode()}


def generate(model, tokenizer, question: str, documents: Sequence[Union[Document, str]], *,
             preamble: Optional[str] = None, template: Optional[PromptTemplate] = None,
             config: SuperpositionConfig = SuperpositionConfig(),
             path_cache: Optional[PathCache] = None, **kwargs) -> str:
    """Answer ``question`` from ``documents`` with superposition prompting (``kwargs`` go to
    ``mlxeff.generate.generate``: ``max_tokens``, ``temp``, ...)."""
    from ..generate import generate as _generate

    template = template or PromptTemplate()
    if preamble is not None:
        template = PromptTemplate(preamble, template.document, template.query, template.response)
    hooks = superposition_hooks(tokenizer, documents, template=template, config=config,
                                path_cache=path_cache)
    return _generate(model, tokenizer, question, **hooks, **kwargs)


# ---- the registry ---------------------------------------------------------------------------------

def _one_of(allowed):
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}, got {v!r}"


def _unescape(text: str) -> str:
    """Command-line templates spell a line break and a tab as \\n and \\t."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _build(ctx, o) -> dict:
    from ..io import load_tokenizer

    if o["docs"] is None:
        raise TechniqueError("--superposition needs --superposition-docs FILE (a .jsonl file or a "
                             "folder of .txt files)")
    docs = load_documents(o["docs"])
    if o["top_k"] > len(docs):
        raise TechniqueError(f"--superposition-top-k {o['top_k']} is larger than the number of "
                             f"documents ({len(docs)}) in {o['docs']}")
    tokenizer = load_tokenizer(ctx.model_dir) if ctx.model_dir is not None else None
    if tokenizer is None:
        raise TechniqueError("--superposition needs the model's tokenizer (a model directory with "
                             "tokenizer files)")
    template = PromptTemplate(*(_unescape(o[k]) for k in ("preamble", "document", "query", "response")))
    config = SuperpositionConfig(o["top_k"], o["positions"], o["scoring"], o["reweight"],
                                 o["temperature"], o["batch"])
    cache = PathCache(o["doc_cache"])
    cache.bind(ctx.model)  # a cache made by another model is refused here, before generating
    return superposition_hooks(tokenizer, docs, template=template, config=config, path_cache=cache)


register(Technique(
    name="superposition",
    title="Superposition prompting (arXiv 2404.06910)",
    summary="Answer the prompt (a question) from documents processed as parallel prompt paths: "
    "each document and a copy of the question form a path, the best paths by a Bayesian score are "
    "kept and the answer is generated from them alone.",
    hooks=("prefill", "decode"),
    options=(
        Option("docs", Path, None, "The documents: a .jsonl file (one {\"text\": ..., \"title\": ...} "
               "per line) or a folder of .txt files.", metavar="FILE"),
        Option("top_k", int, 1, "Paths kept for the answer.",
               check=lambda v: None if v >= 1 else f"must be at least 1, got {v}"),
        Option("doc_cache", Path, None, "Directory keeping the preamble's and the documents' "
               "keys and values across runs (made by one model; created if absent).", metavar="DIR"),
        Option("preamble", str, DEFAULT_PREAMBLE, "Text before the documents (\\n: a line "
               "break).", metavar="TEXT"),
        Option("document", str, DEFAULT_DOCUMENT, "Template of one document ({text}, {title}; "
               "\\n: a line break).", metavar="TEMPLATE"),
        Option("query", str, DEFAULT_QUERY, "Template of the query copy after each document "
               "({question}; \\n: a line break).", metavar="TEMPLATE"),
        Option("response", str, DEFAULT_RESPONSE, "Text after the kept paths; the answer follows "
               "it (\\n: a line break).", metavar="TEXT"),
        Option("positions", str, "equilibrium", "Path positions: equilibrium (every path spans the "
               "harmonic mean of the document lengths) or left (left-aligned).",
               check=_one_of(POSITION_RULES)),
        Option("scoring", str, "bayesian", "Path score: bayesian (log-likelihood of the query and "
               "the document) or attention.", check=_one_of(SCORINGS)),
        Option("reweight", str, "drop", "Pruned paths are dropped; soft also weights the kept paths "
               "in the answer's attention by their scores.", check=_one_of(REWEIGHTS)),
        Option("temperature", float, 1.0, "Temperature of the soft reweighting.",
               check=lambda v: None if v > 0 else f"must be positive, got {v}"),
        Option("batch", int, 2048, "Padded tokens per batched forward of paths.",
               check=lambda v: None if v >= 1 else f"must be at least 1, got {v}"),
    ),
    build=_build,
))
