"""Tokenizers: the one loader (for model directories and tokenizer directories), saving, identity.

``load_tokenizer`` wraps mlx-lm's loader (Hugging Face ``AutoTokenizer`` without remote code, plus
mlx-lm's streaming detokenizer) with the checks a directory from a stranger needs first:

- every file the loaders may open (``*.json``, ``*.model``, ``*.txt``, ``*.jinja``, ``*.tiktoken``
  at the top of the directory) must be a regular file -- a symlink to ``/dev/zero`` or a FIFO
  would be read until memory runs out or block forever -- of at most ``MAX_TOKENIZER_BYTES``
  (64 MiB; the largest published ``tokenizer.json`` files, 256k-piece vocabularies, are ~35 MB);
- ``tokenizer_config.json`` must be a strict JSON object; its entries that name files
  (``tokenizer_file``, ``vocab_file``, ``merges_file``, ``fast_tokenizer_files``) must name
  files inside the directory, and ``chat_template_type``/``tool_parser_type`` (mlx-lm imports a
  module by that name) must be plain identifiers;
- ``model_max_length`` must be a number (transformers compares it with every encoding's length);
- the loaded tokenizer must encode and decode a sample text, also through mlx-lm's streaming
  detokenizer (a config value that transformers only trips over when encoding fails here, not
  in the middle of generation);
- any failure of the loaders becomes one ``MlxeffError`` naming the directory.

``check_vocabulary`` refuses a tokenizer that can produce an id the model has no embedding row
for (the embedding lookup would read out of bounds).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from .errors import MlxeffError
from .files import check_regular, read_json, short_repr

MAX_TOKENIZER_BYTES = 64 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
READ_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
FILE_KEYS = ("tokenizer_file", "vocab_file", "merges_file", "fast_tokenizer_files")
MODULE_KEYS = ("chat_template_type", "tool_parser_type")


def has_tokenizer(path) -> bool:
    path = Path(path)
    return any(_lexists(path / f) for f in TOKENIZER_FILES)


def _lexists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def check_tokenizer_files(path) -> None:
    """The checks of the module docstring, before any tokenizer library opens a file."""
    path = Path(path)
    try:
        entries = sorted(path.iterdir())
    except OSError as e:
        raise MlxeffError(f"cannot list the directory ({e.strerror or e})", path) from None
    for entry in entries:
        if entry.name.endswith(READ_SUFFIXES) and not entry.name.startswith(".") and not entry.name.endswith(
                (".safetensors.index.json", ".bin.index.json")):
            check_regular(entry, MAX_TOKENIZER_BYTES, "tokenizer file")
    cfg_file = path / "tokenizer_config.json"
    if not _lexists(cfg_file):
        return
    cfg = read_json(cfg_file, MAX_TOKENIZER_BYTES, "tokenizer config")
    for key in FILE_KEYS:
        value = cfg.get(key)
        names = value if isinstance(value, list) else [value]
        for name in names:
            if name is None:
                continue
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                raise MlxeffError(f"{key} {short_repr(name)} does not name a file in this directory", cfg_file)
    length = cfg.get("model_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float))):
        raise MlxeffError(f"model_max_length must be a number, got {short_repr(length)}", cfg_file)
    for key in MODULE_KEYS:
        value = cfg.get(key)
        if value is not None and not (isinstance(value, str) and re.fullmatch(r"[a-z][a-z0-9_]{0,63}", value)):
            raise MlxeffError(f"{key} {short_repr(value)} is not a plain module name", cfg_file)


def load_tokenizer(path, required: bool = True, eos_token_ids=None):
    """The tokenizer of a directory through mlx-lm's wrapper.

    ``required=False`` returns None when the directory has no tokenizer files (a model directory
    written with ``--no-tokenizer``); otherwise their absence is an error. ``eos_token_ids``: the
    model config's ``eos_token_id`` (extra stop tokens for generation).
    """
    path = Path(path)
    if not path.is_dir():
        raise MlxeffError("not a tokenizer directory", path)
    if not has_tokenizer(path):
        if required:
            raise MlxeffError("no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json)", path)
        return None
    check_tokenizer_files(path)
    from mlx_lm.tokenizer_utils import load as load_tok

    try:
        from transformers.utils import logging as hf_logging

        # transformers warns that it does not know model_type "openelm"; the tokenizer needs no model.
        hf_logging.set_verbosity_error()
        tok = load_tok(path, eos_token_ids=eos_token_ids)
        _smoke_test(tok)
        return tok
    except (MlxeffError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # tokenizers' Rust panics arrive as pyo3's PanicException(BaseException)
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise MlxeffError(f"cannot load the tokenizer ({text})", path) from None


SAMPLE_TEXT = "Once upon a time, a café:\n\t日本 🤖 1,000!"


def _smoke_test(tok) -> None:
    ids = tok.encode(SAMPLE_TEXT)
    tok.decode(ids)
    detokenizer = tok.detokenizer
    detokenizer.reset()
    for i in ids:
        detokenizer.add_token(i)
    detokenizer.finalize()
    detokenizer.text


def largest_id(tokenizer) -> int:
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab = inner.get_vocab()
    return max(vocab.values(), default=-1)


def check_vocabulary(tokenizer, vocab_size: int, source) -> None:
    """Refuse a tokenizer with ids the model has no embedding row for."""
    top = largest_id(tokenizer)
    if top >= vocab_size:
        raise MlxeffError(f"the tokenizer has token id {top} but the model's vocabulary has {vocab_size} "
                          "rows", source)


def save_tokenizer(tokenizer, directory: Path) -> None:
    # mlx-lm's TokenizerWrapper forwards attribute access, so save_pretrained reaches the HF tokenizer.
    if not hasattr(tokenizer, "save_pretrained"):
        raise MlxeffError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")
    tokenizer.save_pretrained(str(directory))
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


def special_ids(tokenizer) -> tuple:
    """(bos_id, eos_id) of a tokenizer (wrapper or HF)."""
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def tokenizer_fingerprint(tokenizer) -> str:
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(inner, "backend_tokenizer", None) or getattr(inner, "_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(inner.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def fast_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` inside a (wrapped) Hugging Face fast tokenizer."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(inner, "backend_tokenizer", None)
    if backend is None:
        raise MlxeffError("expected a Hugging Face fast tokenizer (tokenizer.json)")
    return backend
