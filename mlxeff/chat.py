"""Chat: conversation templates and a session that keeps its prompt cache between turns.

Templates. A conversation becomes tokens through the tokenizer's chat template (Jinja, rendered by
Hugging Face's sandboxed renderer, as mlx-lm does) or one given with ``--chat-template FILE``.
A tokenizer without a template (mlxeff's embedded model is a base model trained on books) gets
``DEFAULT_CHAT_TEMPLATE``, a plain transcript::

    <s>SYSTEM PROMPT

    User: question
    Assistant: answer
    User: next question
    Assistant:

and replies stop at a new ``User:`` line (``DEFAULT_CHAT_STOP``), so a base model continues the
transcript as one speaker.

Prompt cache. ``ChatSession`` keeps the model's cache and the tokens it holds. Each turn renders
the whole conversation, keeps the cached prefix it shares with the new prompt, trims the rest
(the reply as the template writes it back may tokenize differently from how it was generated) and
processes only the new tokens. Choices: techniques that keep their own cache (LazyLLM, KV
Prediction) process the whole conversation again each turn (their caches cannot be extended from
the outside); with ``--max-kv-size`` the window's evicted tokens are gone, so a trim deeper than
the recent part of the window starts a fresh cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .cache import make_prompt_cache, trim_cache
from .errors import MlxeffError
from .server.options import GenerationOptions
from .server.runner import Finish, cache_owner, run
from .server.window_cache import make_window_cache

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = ("\nUser:",)
SAMPLE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]


@dataclass(frozen=True)
class ChatFormat:
    """A template (None: the tokenizer's own) and the stop strings that end a reply."""

    template: Optional[str]
    stops: Tuple[str, ...] = ()
    source: str = "the tokenizer's chat template"


def chat_format(tokenizer, template_file: Optional[Path] = None) -> ChatFormat:
    """The template to use: ``template_file``, else the tokenizer's, else the default transcript."""
    if template_file is not None:
        try:
            text = Path(template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MlxeffError(f"cannot read the chat template ({e.__class__.__name__}: {e})",
                              template_file) from None
        fmt = ChatFormat(text, (), str(template_file))
        render(tokenizer, fmt, SAMPLE)  # a broken template fails here, naming the file
        return fmt
    if getattr(tokenizer, "chat_template", None):
        return ChatFormat(None)
    return ChatFormat(DEFAULT_CHAT_TEMPLATE, DEFAULT_CHAT_STOP, "the default transcript template")


def render(tokenizer, fmt: ChatFormat, messages: Sequence[Dict[str, str]]) -> List[int]:
    """Token ids of ``messages`` followed by the assistant's turn."""
    kwargs = {} if fmt.template is None else {"chat_template": fmt.template}
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    except Exception as e:  # jinja2's TemplateError and friends
        raise MlxeffError(f"{fmt.source}: cannot render the conversation "
                          f"({e.__class__.__name__}: {e})") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with one model; ``send`` streams a reply (``Delta``s, then a ``Finish``
    whose usage adds ``reused_tokens``: prompt tokens taken from the cache)."""

    def __init__(self, model, tokenizer, fmt: ChatFormat, options: GenerationOptions, *,
                 system_prompt: Optional[str] = None, max_kv_size: Optional[int] = None,
                 prefill_step_size: Optional[int] = None, model_dir=None):
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        self.options = replace(options, stop=tuple(options.stop) + tuple(
            s for s in fmt.stops if s not in options.stop))
        self.system_prompt = system_prompt
        self.max_kv_size = max_kv_size
        self.prefill_step_size = prefill_step_size
        self.model_dir = model_dir
        self.reuse = cache_owner(options.techniques) is None
        self.last: Optional[Finish] = None
        self.reset()

    def reset(self) -> None:
        self.messages: List[Dict[str, str]] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        self.cache: Optional[list] = None
        self.cached: List[int] = []  # the tokens the cache has seen, in order (evicted ones too)

    def _fresh_cache(self) -> list:
        self.cached = []
        if self.max_kv_size:
            return make_window_cache(self.model, self.max_kv_size)
        return make_prompt_cache(self.model)

    def _prepare(self, ids: List[int]) -> Tuple[Optional[list], List[int]]:
        """The cache to extend and the tokens still to process."""
        if not self.reuse:
            return None, ids
        if self.cache is None:
            self.cache = self._fresh_cache()
        common = min(common_prefix(self.cached, ids), len(ids) - 1)  # process one token at least
        drop = len(self.cached) - common
        recent = self.cache[0].offset - getattr(self.cache[0], "keep", 0)
        if drop > recent:  # the window has evicted tokens this trim would need
            self.cache, common = self._fresh_cache(), 0
        elif drop > 0:
            trim_cache(self.cache, drop)
        self.cached = self.cached[:common]
        return self.cache, ids[common:]

    def send(self, text: str) -> Iterator:
        messages = self.messages + [{"role": "user", "content": text}]
        ids = render(self.tokenizer, self.fmt, messages)
        cache, rest = self._prepare(ids)
        finish = None
        try:
            for event in run(self.model, self.tokenizer, rest, self.options, model_dir=self.model_dir,
                             prefill_step_size=self.prefill_step_size,
                             max_kv_size=None if self.reuse else self.max_kv_size,
                             prompt_cache=cache):
                if isinstance(event, Finish):
                    finish = event
                yield event
        finally:
            if cache is not None:
                seen = ids + (finish.tokens if finish is not None else [])
                held = cache[0].next_position  # tokens the cache holds, counting evicted ones
                self.cached = seen[:held] if held <= len(seen) else []
                if held > len(seen):  # not what the engine promises: start over next turn
                    self.cache = None
        if finish is not None:
            finish.usage["reused_tokens"] = len(ids) - len(rest)
            finish.usage["prompt_tokens"] = len(ids)
            finish.usage["total_tokens"] = len(ids) + finish.usage["completion_tokens"]
            self.messages = messages + [{"role": "assistant", "content": finish.text.strip()}]
            self.last = finish
