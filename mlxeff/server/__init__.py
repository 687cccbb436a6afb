"""``mlxeff serve``: an OpenAI-compatible HTTP server with mlxeff's techniques per request.

Stack. FastAPI on uvicorn (a standard ASGI stack), not mlx-lm's ``mlx_lm.server``: mlx-lm's server
is a hand-written ``http.server`` handler whose generation loop calls mlx-lm's own
``stream_generate`` / ``BatchGenerator`` with mlx-lm caches; it has no place for mlxeff's engine
hooks (a prefill strategy, a decode strategy, a drafter, an attention function), so hosting an
mlxeff model there would mean patching its internals. FastAPI gives request validation
(pydantic), server-sent events and disconnect detection; uvicorn is the server mlx-lm's users
would otherwise reach for. What mlx-lm does offer is reused: its sampler filters, logits
processors (penalties), detokenizers and chat-template rendering.

Parts, one job each:

- ``options``: one request's settings (sampling, stop strings, penalties, techniques), checked;
- ``runner``: a request's generation on ``mlxeff.stream_generate`` (stops, logprobs, usage,
  cancellation between tokens);
- ``window_cache``: ``--max-kv-size`` as a bounded window on the positioned cache;
- ``worker``: the single generation thread (MLX runs one model from one thread at a time), a FIFO
  queue of jobs, cancellation;
- ``protocol``: the OpenAI request bodies and response objects;
- ``app``: the routes; ``launch``: uvicorn in the foreground or on a thread.

Choices: one model per server (the ``model`` field of a request is not used to pick one); requests
run one at a time in arrival order (no batching); a request's ``mlxeff`` field replaces the
server's technique defaults (``{}`` turns them off); the prompt cache is not kept between requests
(each request's text equals a fresh ``mlxeff generate`` run).
"""

from .app import ServedModel, create_app  # noqa: F401
from .launch import ServerThread, serve  # noqa: F401
from .options import GenerationOptions, RequestError  # noqa: F401

__all__ = ["GenerationOptions", "RequestError", "ServedModel", "ServerThread", "create_app", "serve"]
