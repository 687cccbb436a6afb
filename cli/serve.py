"""``mlxeff serve``: an OpenAI-compatible HTTP server (``mlxeff.server``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DTYPE_HELP, PREFILL_STEP_HELP, check_prefill_step_size, fail, load_for_generation
from .techniques import with_techniques


def register(app: typer.Typer) -> None:
    app.command("serve")(with_techniques(serve))


def check_techniques(net, path, techniques: dict, max_kv_size: Optional[int],
                     step_size: Optional[int]) -> None:
    """Build the techniques once so that a bad option or a missing file fails at start."""
    from mlxeff.errors import MlxeffError
    from mlxeff.server.runner import cache_owner, technique_hooks

    try:
        technique_hooks(net, techniques, model_dir=path, step_size=step_size)
    except MlxeffError as e:
        fail(str(e))
    owner = cache_owner(techniques) if techniques else None
    if max_kv_size and owner:
        fail(f"--max-kv-size: {owner} keeps its own cache and cannot run in a bounded window")


def load_for_chat(model: Optional[Path], dtype: str, techniques: dict, max_kv_size: Optional[int],
                  step_size: Optional[int], chat_template: Optional[str]):
    """(path, model, tokenizer, chat format) for ``serve`` and ``chat``: loaded, the techniques
    checked, the chat template found; each problem ends in one line."""
    from mlxeff.chat import chat_format
    from mlxeff.errors import MlxeffError

    path, net, tokenizer = load_for_generation(model, dtype)
    check_techniques(net, path, techniques, max_kv_size, step_size)
    try:
        return path, net, tokenizer, chat_format(tokenizer, chat_template)
    except MlxeffError as e:
        fail(str(e))


def check_max_kv_size(max_kv_size: Optional[int]) -> None:
    from mlxeff.server.window_cache import SINK_TOKENS

    if max_kv_size is not None and max_kv_size < SINK_TOKENS + 2:
        fail(f"--max-kv-size must be at least {SINK_TOKENS + 2} (the first {SINK_TOKENS} tokens "
             f"are always kept), got {max_kv_size}", code=2)


def serve(
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="An mlxeff model directory (default: the embedded model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every "
                             "interface; the server has no authentication)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0 picks a free one; the "
                             "address is printed)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Tokens to generate when a "
                                   "request gives no max_tokens."),
    temp: float = typer.Option(0.0, "--temp", help="Temperature when a request gives none, >= 0 "
                               "(0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="top_p when a request gives none, in (0, 1]."),
    top_k: int = typer.Option(0, "--top-k", help="top_k when a request gives none (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="min_p when a request gives none (0 = off)."),
    chat_template: Optional[Path] = typer.Option(
        None, "--chat-template", help="A Jinja chat template file for /v1/chat/completions "
        "(default: the tokenizer's; without one, a plain 'User:'/'Assistant:' transcript that "
        "stops at the next 'User:' line)."),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", help="Prompt plus completion tokens per request at most; longer "
        "prompts get a 400, completions stop at the limit (default: the model's trained context "
        "length; 0 = no limit)."),
    max_kv_size: Optional[int] = typer.Option(
        None, "--max-kv-size", help="Bound each request's KV cache to this many tokens: the first 4 "
        "and the most recent ones (mlx-lm's rotating window). Not with LazyLLM or KV Prediction."),
    prefill_step_size: Optional[int] = typer.Option(
        None, "--prefill-step-size", help=PREFILL_STEP_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level: critical, "
                                  "error, warning, info, debug or trace."),
    techniques: dict = None,
):
    """Serve the model over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions
    (streaming with "stream": true), /v1/models and /health. Technique flags below set the
    server-wide default; a request's "mlxeff" field (extra_body in the OpenAI clients) replaces it,
    e.g. {"mlxeff": {"lookup": {"draft": 4}}}. Requests run one at a time in arrival order;
    usage reports time to first token and, with a drafter, accepted tokens per forward."""
    from mlxeff.sampling import SamplingConfig, SamplingError
    from mlxeff.server import ServedModel, create_app, serve as run_server

    if max_tokens < 1:
        fail(f"--max-tokens must be at least 1, got {max_tokens}", code=2)
    check_prefill_step_size(prefill_step_size)
    if max_context is not None and max_context < 0:
        fail(f"--max-context must be at least 0 (0 = no limit), got {max_context}", code=2)
    if not 0 <= port <= 65535:
        fail(f"--port must be between 0 and 65535, got {port}", code=2)
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        fail(f"--log-level must be critical, error, warning, info, debug or trace, got {log_level!r}",
             code=2)
    check_max_kv_size(max_kv_size)
    try:
        SamplingConfig(temp, top_p, top_k, min_p)
    except SamplingError as e:
        fail(str(e), code=2)
    path, net, tokenizer, fmt = load_for_chat(model, dtype, techniques, max_kv_size,
                                              prefill_step_size, chat_template)
    if max_context is None:
        max_context = getattr(net.args, "max_context_length", None) or 0
    served = ServedModel(
        net, tokenizer, model_id=path.resolve().name, model_dir=path,
        defaults=dict(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p),
        techniques=techniques or {}, chat_format=fmt, max_context=max_context or None,
        max_kv_size=max_kv_size, prefill_step_size=prefill_step_size)
    run_server(create_app(served), host, port, log_level,
               announce=lambda line: print(line, flush=True))
