"""Admission for text jobs: does the prompt plus ``max_tokens`` fit the model's context?
And the one chat-template formatter, which the vLLM backend uses too.

The API counts the prompt with the model's own tokenizer (``tokenizer.json`` beside the
weights, read with the ``tokenizers`` library, no torch) and formats ``messages`` with
the model's chat template (``ChatTemplate``: ``chat_template.jinja`` or
``tokenizer_config.json``, Jinja in a sandbox, with the environment and variables
transformers' ``apply_chat_template`` gives it), so a request the engine would refuse is
refused at submit with 422, before it takes a place in the queue. The worker's vLLM
backend formats ``messages`` with the same ``format_chat``, so the tokens counted at
admission are the tokens the engine sees. Where the API cannot read the tokenizer
(weights only on the GPU hosts), the check is skipped and the worker refuses the job
with ``context_length_exceeded`` instead.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from jinja2.ext import Extension
    from jinja2.nodes import Node
    from jinja2.parser import Parser

    from .catalog import ModelEntry

from .catalog import TextLimits
from .errors import InputError

log = logging.getLogger("vramq.prompts")


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The named special tokens a chat template sees as variables (transformers'
``special_tokens_map``: ``{{ bos_token }}`` and the like)."""


class ChatTemplate:
    """A model's chat template, applied as transformers' ``apply_chat_template`` applies
    it: an immutable Jinja sandbox with ``trim_blocks`` and ``lstrip_blocks``, loop
    controls, ``{% generation %}`` blocks, a ``tojson`` that does not escape HTML,
    ``raise_exception`` and ``strftime_now``; and as variables ``messages``, ``tools``,
    ``documents``, ``add_generation_prompt`` and the named special tokens."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_generation_blocks(), loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        self.template = env.from_string(source)
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def of(cls, weights: Path) -> ChatTemplate | None:
        """The model's template as transformers saves it beside the weights; None if it has none."""
        source = _chat_template(weights)
        return None if source is None else cls(source, _special_tokens(weights))

    def format(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for ``messages`` (each ``{"role", "content"}``), ending with
        the assistant's turn opened. Raises ``jinja2.TemplateError`` when the template
        refuses the turns."""
        return self.template.render(
            messages=[{"role": m["role"], "content": m["content"]} for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **self.special_tokens,
        )


@lru_cache(maxsize=64)
def chat_template(weights: Path) -> ChatTemplate | None:
    """The model's ``ChatTemplate`` (read once per process), None without one."""
    return ChatTemplate.of(weights)


def format_chat(weights: Path, messages: list[dict[str, Any]]) -> str:
    """``messages`` as the model's prompt text: what the API counts at admission and what
    the vLLM backend tokenizes for the engine. Raises ValueError when the model has no
    chat template, ``jinja2.TemplateError`` when its template refuses the turns."""
    template = chat_template(Path(weights))
    if template is None:
        raise ValueError(
            "the model has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json)"
        )
    return template.format(messages)


class PromptCounter:
    def __init__(self, weights: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(weights / "tokenizer.json"))
        self.template = ChatTemplate.of(weights)

    def token_ids(self, inp: dict[str, Any]) -> list[int] | None:
        """The prompt's tokens as the engine will see them; None if they cannot be known here."""
        if inp.get("messages") is not None:
            if self.template is None:
                return None
            try:
                text = self.template.format(inp["messages"])
            except Exception:  # the worker reports a template that refuses the turns
                return None
            # The template writes the special tokens itself (a BOS where the model has one).
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(inp["prompt"]).ids

    def count(self, inp: dict[str, Any]) -> int | None:
        """Prompt tokens as the engine will see them; None if they cannot be known here."""
        ids = self.token_ids(inp)
        return None if ids is None else len(ids)


def _chat_template(weights: Path) -> str | None:
    """The chat template as transformers saves it: ``chat_template.jinja`` (transformers 5),
    else ``chat_template`` in ``tokenizer_config.json`` (a string, or named templates)."""
    path = weights / "chat_template.jinja"
    if path.exists():
        return path.read_text()
    config = weights / "tokenizer_config.json"
    source = json.loads(config.read_text()).get("chat_template") if config.exists() else None
    if isinstance(source, list):  # [{"name": "default", "template": …}, …]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    return source if isinstance(source, str) else None


def _special_tokens(weights: Path) -> dict[str, str]:
    """The named special tokens as transformers reads them: ``tokenizer_config.json``,
    then the legacy ``special_tokens_map.json`` for those it does not name. A token is a
    string or a serialized ``AddedToken`` (``{"content": …}``)."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = weights / name
        config = json.loads(path.read_text()) if path.exists() else {}
        for key in SPECIAL_TOKENS:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and key not in found:
                found[key] = value
    return found


def _generation_blocks() -> type[Extension]:
    """The ``{% generation %}…{% endgeneration %}`` tag transformers defines (it marks the
    assistant's tokens for training masks); formatting keeps the block's text as is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlocks(Extension):
        tags = {"generation"}

        def parse(self, parser: Parser) -> Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

        def _keep(self, caller: Any) -> Any:
            return caller()

    return GenerationBlocks


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # As transformers': Jinja's own tojson escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(format)


def _raise(message: str) -> NoReturn:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=64)
def counter_for(weights: Path) -> PromptCounter | None:
    try:
        return PromptCounter(weights)
    except Exception as exc:  # no tokenizer here, or no tokenizers library
        log.warning("cannot count prompt tokens for %s at submit (%s); the worker will", weights, exc)
        return None


def check_context(entry: ModelEntry, inp: dict[str, Any]) -> int | None:
    """Raise 422 when prompt tokens + ``max_tokens`` exceed the model's ``max_context``.

    Returns the prompt's token count (None when the tokenizer is not readable here). A
    model without weights (``echo``) has no tokenizer: its prompt is counted with
    ``echo_prompt_tokens``."""
    if entry.weights is None:
        tokens: int | None = echo_prompt_tokens(inp)
    else:
        counter = counter_for(Path(entry.weights))
        tokens = counter.count(inp) if counter is not None else None
    if tokens is None:
        return None
    assert isinstance(entry.limit, TextLimits), entry.id  # only text models take prompts
    limit = entry.limit.max_context
    if tokens + inp["max_tokens"] > limit:
        field = "messages" if inp.get("messages") is not None else "prompt"
        msg = (
            f"the prompt is {tokens} tokens; with max_tokens {inp['max_tokens']} that is "
            f"{tokens + inp['max_tokens']}, past the limit max_context {limit} of model {entry.id}"
        )
        raise InputError(msg, [{"loc": ["input", field], "msg": msg}], code="context_length_exceeded")
    return tokens


def echo_tokens(text: str) -> int:
    """Tokens as the ``echo`` model counts them, having no tokenizer: one per word (a run of
    characters between whitespace, ``str.split``). Cheap, and the same rule at admission
    and in the echo backend's ``usage``; not any real model's count."""
    return len(text.split())


def echo_prompt_tokens(inp: dict[str, Any]) -> int:
    """An echo job's prompt tokens: the words of ``prompt``, or of every message's content."""
    if inp.get("messages") is not None:
        return sum(echo_tokens(m["content"]) for m in inp["messages"])
    return echo_tokens(inp["prompt"])
