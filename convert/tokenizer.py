"""The tokenizer that goes with a converted model.

Three ways in: a Hugging Face source that has one (its files are copied verbatim), ``tokenizer=``
a tokenizer directory (copied verbatim), or ``tokenizer=`` a SentencePiece ``tokenizer.model``,
turned into a Hugging Face fast tokenizer. Whatever is chosen is checked before the weights are
read: its files plus the output's ``config.json`` go to a scratch directory and are loaded exactly
as ``mlxeff.load`` will load them, and the vocabulary must fit the model's.

SentencePiece conversion. Llama-2's model (which OpenELM uses) is BPE with a dummy prefix, byte
fallback and no normalization. The fast tokenizer reproducing it: the BPE vocabulary with merges
ordered by the merged piece's score (ties by the pieces' ids), byte fallback, a normalizer that
prepends "▁" and maps spaces to "▁", and a post-processor that adds BOS — the "legacy" Llama layout
of the official Llama-2 ``tokenizer.json``. (transformers 5's own route from a ``tokenizer.model``
gives different ids around runs of spaces and a leading space; this one matched SentencePiece on
every one of ~61,000 lines of English prose when it was written.) A self-check encodes sample
strings with both and refuses the model if any differ, so an unusual SentencePiece setup is an
error, not a silently different tokenizer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from mlxeff.errors import MlxeffError

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
        self.files = [self.directory / f for f in COPY_PATTERNS if (self.directory / f).is_file()]
        if not self.files:
            raise MlxeffError("no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json)", directory)

    def save_pretrained(self, out):
        for f in self.files:
            shutil.copyfile(f, Path(out) / f.name)

    def __repr__(self):
        return f"TokenizerFiles({self.directory})"


def sentencepiece_to_hf(path):
    """A SentencePiece BPE ``tokenizer.model`` -> a ``PreTrainedTokenizerFast`` with the same ids."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise MlxeffError(f"not a SentencePiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__})", path) from None
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(path.read_bytes())
        model_type = proto.trainer_spec.model_type
    except Exception:
        model_type = None
    if model_type is not None and model_type != pb.TrainerSpec.BPE:
        raise MlxeffError("only BPE SentencePiece models (Llama-style) can be converted", path)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    merges = []
    for i, piece in enumerate(pieces):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        splits = sorted(
            (vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
            for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        )
        merges += [(-sp.get_score(i), i, j, left, right) for j, (_, _, left, right) in enumerate(splits)]
    merges = [(left, right) for *_, left, right in sorted(merges)]

    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    bos = pieces[sp.bos_id()] if sp.bos_id() >= 0 else None
    eos = pieces[sp.eos_id()] if sp.eos_id() >= 0 else None
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
        )
    for text in SELF_CHECK:
        ours = tok.encode(text).ids
        ref = ([sp.bos_id()] if bos is not None else []) + sp.encode(text)
        if ours != ref:
            raise MlxeffError(
                f"cannot reproduce this SentencePiece model's tokenization (it differs on {text!r}); "
                "pass a Hugging Face tokenizer directory instead", path,
            )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   clean_up_tokenization_spaces=False)


def from_path(path):
    """``--tokenizer PATH``: a SentencePiece model file or a tokenizer directory."""
    path = Path(path)
    if path.is_dir():
        return TokenizerFiles(path)
    if path.is_file():
        return sentencepiece_to_hf(path)
    raise MlxeffError("no such tokenizer file or directory", path)


def check(tokenizer, config: dict, vocab_size: int, source) -> int:
    """Load ``tokenizer`` as ``mlxeff.load`` will; return its size; refuse one too big for the model."""
    from mlxeff.io import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="mlxeff-tokcheck-") as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except MlxeffError:
            raise
        except Exception as e:
            raise MlxeffError(f"cannot write the tokenizer ({type(e).__name__}: {e})", source) from None
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        try:
            loaded = load_tokenizer(tmp)
        except MlxeffError as e:
            raise MlxeffError(f"the tokenizer does not load ({str(e).split(': ', 1)[-1]})", source) from None
        if loaded is None:
            raise MlxeffError("the tokenizer wrote no files", source)
        inner = getattr(loaded, "_tokenizer", loaded)
        n = len(inner)
    if n > vocab_size:
        raise MlxeffError(f"the tokenizer has {n} tokens but the model's vocabulary has {vocab_size}", source)
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
        "no tokenizer: the source has none; pass --tokenizer PATH (a tokenizer.model or a tokenizer "
        "directory), or --no-tokenizer to convert the weights only", src,
    )
