"""``mlxeff chat``: an interactive conversation that keeps its prompt cache between turns."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import DTYPE_HELP, PREFILL_STEP_HELP, check_prefill_step_size, fail
from .serve import check_max_kv_size, load_for_chat
from .techniques import with_techniques

HELP = "Commands: /reset starts a new conversation, /help shows this, /quit (or Ctrl-D) leaves."


def register(app: typer.Typer) -> None:
    app.command("chat")(with_techniques(chat))


def _read(interactive: bool) -> Optional[str]:
    try:
        if interactive:
            return input(">> ")
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except EOFError:
        return None


def chat(
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="An mlxeff model directory (default: the embedded model)."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="A system message "
                                                "that opens the conversation."),
    chat_template: Optional[Path] = typer.Option(
        None, "--chat-template", help="A Jinja chat template file (default: the tokenizer's; "
        "without one, a plain 'User:'/'Assistant:' transcript that stops at the next 'User:' line)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Tokens per reply at most."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature, >= 0 (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in (0, 1] (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Minimum probability relative to the top "
                                "token, in [0, 1] (0 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling (set once "
                                       "at the start)."),
    repetition_penalty: Optional[float] = typer.Option(
        None, "--repetition-penalty", help="Divide the positive logits (multiply the negative "
        "ones) of recently seen tokens by this factor (CTRL's penalty; 1 or 0 = off)."),
    repetition_context_size: int = typer.Option(
        20, "--repetition-context-size", help="Recent tokens the repetition penalty looks at."),
    presence_penalty: Optional[float] = typer.Option(
        None, "--presence-penalty", help="Subtract this from the logits of tokens seen recently "
        "(OpenAI's presence penalty, in [-2, 2])."),
    presence_context_size: int = typer.Option(
        20, "--presence-context-size", help="Recent tokens the presence penalty looks at."),
    frequency_penalty: Optional[float] = typer.Option(
        None, "--frequency-penalty", help="Subtract this times the count of each recently seen "
        "token from its logit (OpenAI's frequency penalty, in [-2, 2])."),
    frequency_context_size: int = typer.Option(
        20, "--frequency-context-size", help="Recent tokens the frequency penalty looks at."),
    max_kv_size: Optional[int] = typer.Option(
        None, "--max-kv-size", help="Bound the KV cache to this many tokens: the first 4 and the "
        "most recent ones (mlx-lm's rotating window). Not with LazyLLM or KV Prediction."),
    prefill_step_size: Optional[int] = typer.Option(
        None, "--prefill-step-size", help=PREFILL_STEP_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    stats: bool = typer.Option(False, "--stats", help="After each reply print its statistics "
                               "(tokens processed and reused from the cache, speed, TTFT)."),
    techniques: dict = None,
):
    """Chat with a model in the terminal (or over standard input, one message per line). The
    conversation is rendered with the chat template each turn; only the tokens not already in
    the prompt cache are processed. /reset, /help, /quit."""
    from mlxeff.chat import ChatSession
    from mlxeff.errors import MlxeffError
    from mlxeff.server.options import GenerationOptions, RequestError
    from mlxeff.server.runner import Delta

    check_prefill_step_size(prefill_step_size)
    check_max_kv_size(max_kv_size)
    try:
        options = GenerationOptions(
            max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
            presence_penalty=presence_penalty, presence_context_size=presence_context_size,
            frequency_penalty=frequency_penalty, frequency_context_size=frequency_context_size,
            techniques=techniques or {})
    except RequestError as e:  # the option names are the flags' with dashes
        fail(f"--{str(e).replace('_', '-')}", code=2)
    except MlxeffError as e:
        fail(str(e), code=2)
    path, net, tokenizer, fmt = load_for_chat(model, dtype, techniques, max_kv_size,
                                              prefill_step_size, chat_template)
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    session = ChatSession(net, tokenizer, fmt, options, system_prompt=system_prompt,
                          max_kv_size=max_kv_size, prefill_step_size=prefill_step_size,
                          model_dir=path)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"mlxeff chat with {path} ({fmt.source}). {HELP}")
    while True:
        line = _read(interactive)
        if line is None or line.strip() == "/quit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            print("(new conversation)")
            continue
        if text == "/help":
            print(HELP)
            continue
        try:
            for event in session.send(line):
                if isinstance(event, Delta):
                    print(event.text, end="", flush=True)
        except KeyboardInterrupt:
            print("\n(interrupted)")
            continue
        except MlxeffError as e:
            fail(str(e))
        print()
        if stats and session.last is not None:
            u = session.last.usage
            print(f"[prompt {u['prompt_tokens']} tokens ({u['reused_tokens']} from the cache, "
                  f"{u.get('prompt_tps', 0):.1f} tokens-per-sec), reply {u['completion_tokens']} "
                  f"tokens ({u.get('generation_tps', 0):.1f} tokens-per-sec), time to first token "
                  f"{u.get('ttft_s', 0):.3f} s, {session.last.finish_reason}]", flush=True)
