"""The HTTP application: OpenAI-compatible routes over one model and one generation worker.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health``. Every error is OpenAI's JSON error object
(``{"error": {"message", "type", "param", "code"}}``) with a 4xx status for a bad request and 5xx
for a server failure; the server keeps serving after either.

A request is checked on the event loop (body, sampling values, technique specs), then queued on
the worker (``mlxeff.server.worker``), which tokenizes it, checks its length against the context
limit and generates. The response starts only once the job has started, so a request refused by
the worker still gets a proper 400. A client that disconnects cancels its job: a stream notices
when its next event cannot be sent, a plain request by polling the connection while it waits.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import MlxeffError
from . import protocol
from .options import GenerationOptions, RequestError
from .runner import Delta, Finish, run
from .worker import DONE, Failure, Job, Worker

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks its client


@dataclass
class Started:
    prompt_tokens: int


@dataclass
class ServedModel:
    """The model and the server-wide settings (the ``mlxeff serve`` flags)."""

    model: Any
    tokenizer: Any
    model_id: str
    model_dir: Optional[Path] = None
    defaults: Dict[str, Any] = field(default_factory=lambda: dict(
        max_tokens=256, temp=0.0, top_p=1.0, top_k=0, min_p=0.0))
    techniques: Dict[str, dict] = field(default_factory=dict)
    chat_format: Any = None  # mlxeff.chat.ChatFormat
    max_context: Optional[int] = None  # prompt + generated tokens; None: no limit
    max_kv_size: Optional[int] = None
    prefill_step_size: Optional[int] = None  # None: by device (engine.prefill_step_size)

    def prompt_ids(self, prompt: Union[str, List[int]]) -> List[int]:
        if isinstance(prompt, str):
            from ..generate import encode_prompt

            return encode_prompt(self.tokenizer, prompt).tolist()
        vocab = self.model.args.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return list(prompt)

    def limited(self, ids: Sequence[int], options: GenerationOptions) -> GenerationOptions:
        """``options`` with max_tokens cut to the context left; a prompt that fills it is refused."""
        if not self.max_context:
            return options
        room = self.max_context - len(ids)
        if room < 1:
            raise RequestError(f"the prompt has {len(ids)} tokens; this server's context is "
                               f"{self.max_context} tokens (prompt and completion; --max-context)")
        if options.max_tokens > room:
            options = replace(options, max_tokens=room)
        return options

    def generate(self, ids: List[int], options: GenerationOptions, job: Job):
        options = self.limited(ids, options)
        yield Started(len(ids))
        for event in run(self.model, self.tokenizer, ids, options, model_dir=self.model_dir,
                         prefill_step_size=self.prefill_step_size, max_kv_size=self.max_kv_size,
                         cancelled=lambda: job.cancelled):
            if isinstance(event, Finish) and job.started is not None:
                event.usage["queue_s"] = job.started - job.submitted
            yield event


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, status), status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def next_event(job: Job, request: Optional[Request] = None):
    """The job's next event; with ``request``, cancel the job if its client goes away (checked
    every ``DISCONNECT_POLL_S`` however fast the events come)."""
    while True:
        if request is not None and time.monotonic() >= job.next_check:
            job.next_check = time.monotonic() + DISCONNECT_POLL_S
            if await request.is_disconnected():
                job.cancel()
                return DONE
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue


def create_app(served: ServedModel, worker: Optional[Worker] = None) -> FastAPI:
    """The FastAPI application; it owns ``worker`` (made here when not given) and stops it on
    shutdown."""
    from ..techniques import registry

    registry.techniques()  # import every technique module here, not on the worker thread
    # Evaluate the weights here: a cast left lazy (``--dtype``) would be computed on this thread's
    # stream, which MLX (streams are per thread) does not give the worker.
    import mlx.core as mx

    mx.eval(served.model.parameters())
    worker = worker or Worker()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="mlxeff", version=__version__, lifespan=lifespan)
    app.state.served, app.state.worker = served, worker

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request, exc):
        return _error(400, _validation_message(exc))

    @app.exception_handler(MlxeffError)
    async def _bad_value(request, exc):
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        body = {"status": "ok" if worker.alive else "error", "model": served.model_id,
                "running": worker.running is not None, "queued": worker.queued,
                "completed": worker.completed, "cancelled": worker.cancelled,
                "failed": worker.failed}
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.model_id, "object": "model",
                                            "created": int(time.time()), "owned_by": "mlxeff"}]}

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionBody, request: Request):
        prompt = body.single_prompt()
        techniques = protocol.request_techniques(body.mlxeff, served.techniques)
        options = protocol.generation_options(body, served.defaults, techniques,
                                              logprobs=body.logprobs)

        def work(job):
            yield from served.generate(served.prompt_ids(prompt), options, job)

        return await respond(request, work, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatBody, request: Request):
        from ..chat import render

        messages = body.conversation()
        techniques = protocol.request_techniques(body.mlxeff, served.techniques)
        fmt = served.chat_format
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        options = protocol.generation_options(body, served.defaults, techniques,
                                              extra_stops=fmt.stops, logprobs=logprobs,
                                              max_tokens=body.max_completion_tokens)

        def work(job):
            yield from served.generate(render(served.tokenizer, fmt, messages), options, job)

        return await respond(request, work, body, chat=True)

    async def respond(request: Request, work, body, chat: bool):
        job = worker.submit(Job(work, asyncio.get_running_loop()))
        first = await next_event(job, request)
        if isinstance(first, Failure):
            return _error(first.status, first.message)
        if not isinstance(first, Started):  # the client left while queued
            return _error(499, "the client closed the request")
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        want_logprobs = bool(body.logprobs) if chat else body.logprobs is not None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_chat(job, rid, want_logprobs, usage) if chat else \
                stream_completion(job, rid, want_logprobs, usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        while True:
            event = await next_event(job, request)
            if isinstance(event, Failure):
                return _error(event.status, event.message)
            if isinstance(event, Finish):
                make = protocol.chat_object if chat else protocol.completion_object
                return JSONResponse(make(rid, served.model_id, event, want_logprobs))
            if event is DONE:
                return _error(499, "the client closed the request")

    async def stream_events(job: Job) -> AsyncIterator:
        """The job's events until it ends; a client that goes away cancels it."""
        try:
            while True:
                event = await next_event(job)
                if event is DONE:
                    return
                yield event
        finally:
            job.cancel()  # no-op once the job has finished

    async def stream_completion(job, rid, want_logprobs, include_usage):
        async for event in stream_events(job):
            if isinstance(event, Failure):
                yield sse(protocol.error_body(event.message, event.status))
                break
            if isinstance(event, Delta):
                yield sse(protocol.completion_chunk(rid, served.model_id, event.text,
                                                    event.logprobs if want_logprobs else None))
            elif isinstance(event, Finish):
                yield sse(protocol.completion_chunk(rid, served.model_id, "", [] if want_logprobs
                                                    else None, event.finish_reason))
                if include_usage:
                    chunk = protocol.completion_chunk(rid, served.model_id, "", usage=event.usage)
                    chunk["choices"] = []
                    yield sse(chunk)
                yield "data: [DONE]\n\n"

    async def stream_chat(job, rid, want_logprobs, include_usage):
        model_id = served.model_id
        yield sse(protocol.chat_chunk(rid, model_id, {"role": "assistant", "content": ""}))
        async for event in stream_events(job):
            if isinstance(event, Failure):
                yield sse(protocol.error_body(event.message, event.status))
                break
            if isinstance(event, Delta):
                yield sse(protocol.chat_chunk(rid, model_id, {"content": event.text},
                                              event.logprobs if want_logprobs else None))
            elif isinstance(event, Finish):
                yield sse(protocol.chat_chunk(rid, model_id, {}, None, event.finish_reason))
                if include_usage:
                    yield sse(protocol.chat_chunk(rid, model_id, None, usage=event.usage))
                yield "data: [DONE]\n\n"

    return app
