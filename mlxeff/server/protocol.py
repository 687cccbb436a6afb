"""The OpenAI wire format: request bodies (pydantic), their checks, and the response objects.

Request bodies follow OpenAI's completions and chat completions APIs; fields mlx-lm's server
accepts beyond them (``top_k``, ``min_p``, ``repetition_penalty`` and the ``*_context_size``
of each penalty) are accepted too, and ``mlxeff`` carries technique specs (the OpenAI clients send it with
``extra_body``). Fields this server does not know are ignored, as OpenAI-compatible servers do;
features it cannot honour (``n`` > 1, ``echo``, ``suffix``, tools) are refused with a 400 rather
than silently ignored. Responses carry the statistics of ``mlxeff generate`` in ``usage``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .options import MAX_LOGPROBS, GenerationOptions, RequestError
from .runner import Finish, TokenLogprob

ROLES = ("system", "developer", "user", "assistant")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, ge=0)
    repetition_context_size: Optional[int] = Field(None, ge=1)
    presence_context_size: Optional[int] = Field(None, ge=1)
    frequency_context_size: Optional[int] = Field(None, ge=1)
    logit_bias: Optional[Dict[str, float]] = None
    mlxeff: Optional[Dict[str, Any]] = None

    def check_common(self) -> None:
        if self.n != 1:
            raise RequestError(f"n: this server returns one choice per request, got n={self.n}")


class CompletionBody(_Body):
    prompt: Union[str, List[int], List[str], List[List[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None

    def single_prompt(self) -> Union[str, List[int]]:
        """The one prompt (text or token ids) this request holds."""
        self.check_common()
        if self.echo:
            raise RequestError("echo: not supported")
        if self.suffix:
            raise RequestError("suffix: not supported (no insertion model)")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RequestError(f"prompt: one prompt per request, got {len(p)}")
            p = p[0]
        if isinstance(p, str) and not p:
            raise RequestError("prompt: the prompt is empty")
        if isinstance(p, list) and not p:
            raise RequestError("prompt: the prompt is empty")
        return p


class ChatBody(_Body):
    messages: List[Dict[str, Any]]
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[List[Any]] = None

    def conversation(self) -> List[Dict[str, str]]:
        """The messages as ``{"role", "content"}`` with text content (parts joined)."""
        self.check_common()
        if self.tools:
            raise RequestError("tools: tool calls are not supported")
        if not self.messages:
            raise RequestError("messages: at least one message is needed")
        out = []
        for i, m in enumerate(self.messages):
            role = m.get("role")
            if role not in ROLES:
                raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text_content(m.get("content"), i)})
        return out


def _text_content(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"messages[{i}].content must be text or a list of text parts")


def request_techniques(specs: Optional[Dict[str, Any]], defaults: Dict[str, dict]) -> Dict[str, dict]:
    """The techniques of a request: its ``mlxeff`` field when present (``{}`` turns the server's
    defaults off), else the server's. Checked by the registry; a request names technique files
    only by a bare name (looked up beside the model), never by a path."""
    from ..techniques import registry

    if specs is None:
        return defaults
    if not isinstance(specs, dict):
        raise RequestError(f"mlxeff must be an object mapping technique names to options, got {specs!r}")
    resolved = registry.resolve(specs)
    for name, values in resolved.items():
        t = registry.get(name)
        for o in t.options + ((t.value,) if t.value else ()):
            v = values.get(o.name)
            if o.type is Path and v is not None and (Path(v).name != str(v) or str(v) in (".", "..")):
                raise RequestError(f"mlxeff.{name}.{o.name}: a request may name a directory beside "
                                   f"the model only by its bare name, got {str(v)!r}")
    return specs


def generation_options(body: _Body, defaults: Dict[str, Any], techniques: Dict[str, dict],
                       *, extra_stops=(), logprobs: Optional[int] = None,
                       max_tokens: Optional[int] = None) -> GenerationOptions:
    """``GenerationOptions`` from a body; ``defaults`` (the server's flags) fill what it omits."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias = None
    if body.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in body.logit_bias.items()}
        except ValueError:
            raise RequestError("logit_bias: keys must be token ids") from None

    def pick(value, key):
        return defaults[key] if value is None else value

    return GenerationOptions(
        max_tokens=max_tokens or body.max_tokens or defaults["max_tokens"],
        temp=pick(body.temperature, "temp"), top_p=pick(body.top_p, "top_p"),
        top_k=pick(body.top_k, "top_k"), min_p=pick(body.min_p, "min_p"), seed=body.seed,
        stop=tuple(stop) + tuple(s for s in extra_stops if s not in stop), logprobs=logprobs,
        repetition_penalty=body.repetition_penalty,
        repetition_context_size=body.repetition_context_size or 20,
        presence_penalty=body.presence_penalty,
        presence_context_size=body.presence_context_size or 20,
        frequency_penalty=body.frequency_penalty,
        frequency_context_size=body.frequency_context_size or 20,
        logit_bias=bias, techniques=techniques)


# ---- responses -----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, status: int, param: Optional[str] = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def completion_logprobs(entries: List[TokenLogprob]) -> Optional[dict]:
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for _, t, lp in e.top} for e in entries],
        "text_offset": [e.offset for e in entries],
    }


def chat_logprobs(entries: List[TokenLogprob]) -> dict:
    def item(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(item(e.text, e.logprob), top_logprobs=[item(t, lp) for _, t, lp in e.top])
                        for e in entries]}


def completion_object(rid: str, model: str, finish: Finish, want_logprobs: bool) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": finish.text, "finish_reason": finish.finish_reason,
                     "logprobs": completion_logprobs(finish.logprobs) if want_logprobs else None}],
        "usage": finish.usage,
    }


def chat_object(rid: str, model: str, finish: Finish, want_logprobs: bool) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": finish.text},
                     "finish_reason": finish.finish_reason,
                     "logprobs": chat_logprobs(finish.logprobs) if want_logprobs else None}],
        "usage": finish.usage,
    }


def completion_chunk(rid: str, model: str, text: str, entries=None, finish_reason=None,
                     usage=None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                          "logprobs": completion_logprobs(entries) if entries is not None else None}]}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def chat_chunk(rid: str, model: str, delta: Optional[dict], entries=None, finish_reason=None,
               usage=None) -> dict:
    choices = [] if delta is None else [
        {"index": 0, "delta": delta, "finish_reason": finish_reason,
         "logprobs": chat_logprobs(entries) if entries is not None else None}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk
