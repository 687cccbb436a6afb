"""Superposition prompting's inputs: documents from files, the prompt template, token ids.

Documents come from a JSON-lines file (one object per line with ``"text"`` and optionally
``"title"``) or a folder of ``.txt`` files (sorted by name; the file's stem is its title). The
template turns a preamble, documents and a question into the four token-id segments of the
fork-join graph (``ForkJoinPrompt``); the classical prompt is the same segments in a row with the
query once (``classical_ids``), so one document gives exactly the classical prompt.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

from ..errors import MlxeffError

DEFAULT_PREAMBLE = "Answer the question using only the documents below.\n\n"
DEFAULT_DOCUMENT = "Document: {text}\n"
DEFAULT_QUERY = "\nQuestion: {question}\n"
DEFAULT_RESPONSE = "Answer:"


@dataclass(frozen=True)
class Document:
    text: str
    title: str = ""


def load_documents(path) -> List[Document]:
    """Documents from a ``.jsonl`` file or a folder of ``.txt`` files; every problem is one line
    naming the file (and line)."""
    path = Path(path)
    if not path.exists():
        raise MlxeffError("no such file or folder (documents: a .jsonl file or a folder of .txt files)", path)
    if path.is_dir():
        docs = []
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise MlxeffError(f"cannot read the document ({e.__class__.__name__})", f) from None
            if not text.strip():
                raise MlxeffError("the document is empty", f)
            docs.append(Document(text.strip(), f.stem))
        if not docs:
            raise MlxeffError("no documents (no .txt files in this folder)", path)
        return docs
    if path.suffix not in (".jsonl", ".json"):
        raise MlxeffError("documents must be a .jsonl file (one {\"text\": ...} object per line) or "
                          "a folder of .txt files", path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MlxeffError(f"cannot read the documents ({e.__class__.__name__})", path) from None
    docs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MlxeffError(f"line {n}: not valid JSON ({e.msg})", path) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise MlxeffError(f"line {n}: expected an object with a \"text\" string", path)
        title = obj.get("title") or ""
        if not isinstance(title, str):
            raise MlxeffError(f"line {n}: \"title\" must be a string", path)
        if not obj["text"].strip():
            raise MlxeffError(f"line {n}: the document is empty", path)
        docs.append(Document(obj["text"].strip(), title.strip()))
    if not docs:
        raise MlxeffError("no documents in this file", path)
    return docs


def _fields(template: str) -> set:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise MlxeffError(f"bad template {template!r} ({e})") from None


@dataclass(frozen=True)
class ForkJoinPrompt:
    """The graph's token ids: the preamble, each document, the query (copied onto every path) and
    the response prefix (the first tokens after the join; the answer follows)."""

    preamble: Tuple[int, ...]
    documents: Tuple[Tuple[int, ...], ...]
    query: Tuple[int, ...]
    response: Tuple[int, ...]

    @property
    def document_lengths(self) -> List[int]:
        return [len(d) for d in self.documents]


@dataclass(frozen=True)
class PromptTemplate:
    """How text becomes segments. ``document`` uses ``{text}`` (and may use ``{title}``), ``query``
    uses ``{question}``; the preamble and the response are literal text. The preamble is
    tokenised with the tokenizer's own special tokens (a BOS where it adds one), the rest without."""

    preamble: str = DEFAULT_PREAMBLE
    document: str = DEFAULT_DOCUMENT
    query: str = DEFAULT_QUERY
    response: str = DEFAULT_RESPONSE

    def check(self, where: str = "--superposition") -> "PromptTemplate":
        for name, need, allowed in (("document", "text", {"text", "title"}),
                                    ("query", "question", {"question"})):
            fields = _fields(getattr(self, name))
            if need not in fields:
                raise MlxeffError(f"{where}-{name} must contain {{{need}}}, got {getattr(self, name)!r}")
            if fields - allowed:
                names = ", ".join("{" + a + "}" for a in sorted(allowed))
                raise MlxeffError(f"{where}-{name} may only use {names}, got {getattr(self, name)!r}")
        for name in ("preamble", "response"):
            if _fields(getattr(self, name)):
                raise MlxeffError(f"{where}-{name} is literal text (no {{...}} fields)")
        if not self.response.strip():
            raise MlxeffError(f"{where}-response must not be empty (the answer starts after it)")
        return self

    def document_text(self, doc: Union[Document, str]) -> str:
        doc = doc if isinstance(doc, Document) else Document(str(doc))
        return self.document.format(text=doc.text, title=doc.title)

    def query_text(self, question: str) -> str:
        return self.query.format(question=question.strip())


def encode(tokenizer, text: str, special: bool = False) -> Tuple[int, ...]:
    return tuple(int(t) for t in tokenizer.encode(text, add_special_tokens=special))


def build_prompt(tokenizer, template: PromptTemplate, documents: Sequence[Union[Document, str]],
                 question: str) -> ForkJoinPrompt:
    """Token ids of every segment (each segment tokenised on its own)."""
    if not documents:
        raise MlxeffError("superposition prompting needs at least one document")
    docs = []
    for i, d in enumerate(documents):
        text = d.text if isinstance(d, Document) else str(d)
        if not text.strip():
            raise MlxeffError(f"document {i + 1} is empty")
        docs.append(encode(tokenizer, template.document_text(d)))
    pre = encode(tokenizer, template.preamble, special=True)
    if not pre:
        raise MlxeffError("the preamble is empty (the documents need a common start)")
    if not question.strip():
        raise MlxeffError("the question is empty")
    return ForkJoinPrompt(pre, tuple(docs), encode(tokenizer, template.query_text(question)),
                          encode(tokenizer, template.response))


def classical_ids(prompt: ForkJoinPrompt) -> List[int]:
    """The naive prompt: the preamble, every document in order, the query once, the response."""
    out = list(prompt.preamble)
    for d in prompt.documents:
        out += d
    return out + list(prompt.query) + list(prompt.response)
