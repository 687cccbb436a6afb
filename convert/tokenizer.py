"""The tokenizer that goes with a converted model.

Four ways in: a Hugging Face source that has one (its files are copied verbatim), ``tokenizer=``
a tokenizer directory (copied verbatim), ``tokenizer=`` a SentencePiece ``tokenizer.model``, or
``tokenizer=`` a llama2.c ``tokenizer.bin`` (see ``llama2c``); the last two are turned into a
Hugging Face fast tokenizer. Whatever is chosen is checked before the weights are read: its files
plus the output's ``config.json`` go to a scratch directory and are loaded exactly as
``mlxeff.load`` will load them (``mlxeff.tokenizer.load_tokenizer``: regular files of bounded size
only), and its ids must fit the model's vocabulary.

SentencePiece conversion. Llama-2's model (which OpenELM uses) is BPE with a dummy prefix, byte
fallback and no normalization. The fast tokenizer reproducing it: the BPE vocabulary with merges
ordered by the merged piece's score (ties by the pieces' ids), byte fallback, a normalizer that
prepends "▁" and maps spaces to "▁", and a post-processor that adds BOS — the "legacy" Llama layout
of the official Llama-2 ``tokenizer.json``. (transformers 5's own route from a ``tokenizer.model``
gives different ids around runs of spaces and a leading space; this one matched SentencePiece on
every one of ~61,000 lines of English prose when it was written.) A self-check encodes sample
strings with both and refuses the model if any differ, so an unusual SentencePiece setup is an
error, not a silently different tokenizer. A llama2.c vocabulary is the same SentencePiece
vocabulary exported with spaces for "▁": the same construction applies, checked against
llama2.c's own encoding algorithm (``llama2c.encode``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, List, Optional

from mlxeff.atomic import scratch_directory
from mlxeff.errors import MlxeffError
from mlxeff.files import check_regular, read_bounded
from mlxeff.tokenizer import MAX_TOKENIZER_BYTES, check_tokenizer_files

from . import llama2c

# Files a tokenizer directory may hold (copied when present).
COPY_PATTERNS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                 "chat_template.json")

SELF_CHECK = (
    "Once upon a time, there was a little girl named Lily.",
    "  two leading spaces,  double  spaces and a trailing one ",
    " leading space\nnew line\ttab",
    "Numbers 3.14159 and 1,000,000; punctuation!? \"quotes\" (parens) [brackets]",
    "unicode: café naïve — “curly” 日本語 🤖",
    "",
)


class TokenizerFiles:
    """A tokenizer directory whose files are copied into the output unchanged."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        present = [self.directory / f for f in COPY_PATTERNS]
        self.files = [f for f in present if f.exists() or f.is_symlink()]
        if not self.files:
            raise MlxeffError("no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json)", directory)
        check_tokenizer_files(self.directory)  # regular files of bounded size before they are copied

    def save_pretrained(self, out):
        for f in self.files:
            shutil.copyfile(f, Path(out) / f.name)

    def __repr__(self):
        return f"TokenizerFiles({self.directory})"


def bpe_tokenizer(pieces: List[str], scores: List[float], kinds: List[str],
                  reference: Callable[[str], List[int]], path):
    """A ``PreTrainedTokenizerFast`` for a SentencePiece-style BPE vocabulary ("▁" for spaces).

    ``kinds[i]``: normal, byte, unknown, bos, eos or control. ``reference(text)`` gives the ids the
    original encoder produces (BOS first); the result must agree on ``SELF_CHECK``."""
    try:
        return _bpe_tokenizer(pieces, scores, kinds, reference, path)
    except (MlxeffError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # tokenizers' Rust panics arrive as pyo3's PanicException(BaseException)
        raise MlxeffError(f"cannot build a tokenizer from this vocabulary ({' '.join(str(e).split())[:200]})",
                          path) from None


def _bpe_tokenizer(pieces, scores, kinds, reference, path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for i, piece in enumerate(pieces):
        if kinds[i] != "normal":
            continue
        splits = sorted(
            (vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
            for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        )
        merges += [(-scores[i], i, j, left, right) for j, (_, _, left, right) in enumerate(splits)]
    merges = [(left, right) for *_, left, right in sorted(merges)]

    def first(kind):
        return next((pieces[i] for i in range(len(pieces)) if kinds[i] == kind), None)

    unk, bos, eos = first("unknown"), first("bos"), first("eos")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = [pieces[i] for i in range(len(pieces)) if kinds[i] in ("unknown", "bos", "eos", "control")]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    for text in SELF_CHECK:
        ours = tok.encode(text).ids
        try:
            ref = reference(text)
        except ValueError as e:
            raise MlxeffError(f"cannot encode sample text with this vocabulary ({e})", path) from None
        if ours != ref:
            raise MlxeffError(
                f"cannot reproduce this tokenizer's encoding (it differs on {text!r}); "
                "pass a Hugging Face tokenizer directory instead", path,
            )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   clean_up_tokenization_spaces=False)


def sentencepiece_to_hf(path):
    """A SentencePiece BPE ``tokenizer.model`` -> a ``PreTrainedTokenizerFast`` with the same ids."""
    import sentencepiece as spm

    path = Path(path)
    raw = read_bounded(path, MAX_TOKENIZER_BYTES, "tokenizer model")
    try:
        sp = spm.SentencePieceProcessor(model_proto=raw)
    except Exception as e:
        raise MlxeffError(f"not a SentencePiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__})", path) from None
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(raw)
        model_type = proto.trainer_spec.model_type
    except Exception:
        model_type = None
    if model_type is not None and model_type != pb.TrainerSpec.BPE:
        raise MlxeffError("only BPE SentencePiece models (Llama-style) can be converted", path)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    if len(set(pieces)) != n:
        raise MlxeffError("the SentencePiece model repeats a piece", path)
    kinds = ["unknown" if sp.is_unknown(i) else "byte" if sp.is_byte(i) else "control" if sp.is_control(i)
             else "normal" for i in range(n)]
    for kind, i in (("bos", sp.bos_id()), ("eos", sp.eos_id())):
        if 0 <= i < n:
            kinds[i] = kind

    def reference(text):
        return ([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(text)

    return bpe_tokenizer(pieces, [sp.get_score(i) for i in range(n)], kinds, reference, path)


def llama2c_to_hf(path):
    """A llama2.c ``tokenizer.bin`` -> a ``PreTrainedTokenizerFast`` with the same ids."""
    path = Path(path)
    vocab = llama2c.read_vocab(path)
    kinds = [vocab.kind(i) for i in range(len(vocab.pieces))]
    names = {"unknown": "<unk>", "bos": "<s>", "eos": "</s>"}
    pieces = [names.get(k, p.replace(" ", "▁")) for k, p in zip(kinds, vocab.pieces)]
    if len(set(pieces)) != len(pieces):
        raise MlxeffError("llama2.c tokenizer: two pieces differ only by '▁' versus a space", path)
    return bpe_tokenizer(pieces, vocab.scores, kinds, lambda text: llama2c.encode(vocab, text), path)


def from_path(path):
    """``--tokenizer PATH``: a tokenizer directory, a SentencePiece model or a llama2.c vocabulary."""
    path = Path(path)
    if path.is_dir():
        return TokenizerFiles(path)
    if not (path.exists() or path.is_symlink()):
        raise MlxeffError("no such tokenizer file or directory", path)
    check_regular(path, MAX_TOKENIZER_BYTES, "tokenizer file")
    if path.suffix == ".bin" or (path.suffix != ".model" and llama2c.looks_like_llama2c(path)):
        return llama2c_to_hf(path)
    return sentencepiece_to_hf(path)


def check(tokenizer, config: dict, vocab_size: int, source) -> int:
    """Load ``tokenizer`` as ``mlxeff.load`` will; return its size; refuse one too big for the model."""
    from mlxeff.io import load_tokenizer
    from mlxeff.tokenizer import largest_id

    with scratch_directory("mlxeff-tokcheck-") as tmp:
        try:
            tokenizer.save_pretrained(str(tmp))
        except MlxeffError:
            raise
        except Exception as e:
            raise MlxeffError(f"cannot write the tokenizer ({type(e).__name__}: {e})", source) from None
        (tmp / "config.json").write_text(json.dumps(config))
        try:
            loaded = load_tokenizer(tmp, config=config)
        except MlxeffError as e:
            raise MlxeffError(f"the tokenizer does not load ({str(e).split(': ', 1)[-1]})", source) from None
        if loaded is None:
            raise MlxeffError("the tokenizer wrote no files", source)
        inner = getattr(loaded, "_tokenizer", loaded)
        n, top = len(inner), largest_id(loaded)
    if n > vocab_size:
        raise MlxeffError(f"the tokenizer has {n} tokens but the model's vocabulary has {vocab_size}", source)
    if top >= vocab_size:
        raise MlxeffError(f"the tokenizer has token id {top} but the model's vocabulary has {vocab_size} rows", source)
    return n


def resolve(tokenizer, source_dir: Optional[Path], src):
    """The tokenizer to write: ``None`` = the source's own (error if none), ``False`` = no tokenizer."""
    if tokenizer is False:
        return None
    if tokenizer is not None:
        return from_path(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if source_dir is not None:
        return TokenizerFiles(source_dir)
    raise MlxeffError(
        "no tokenizer: the source has none; pass --tokenizer PATH (a tokenizer.model, a llama2.c "
        "tokenizer.bin or a tokenizer directory), or --no-tokenizer to convert the weights only", src,
    )
