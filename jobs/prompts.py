"""Admission for text jobs: does the prompt plus ``max_tokens`` fit the model's context?

The API counts the prompt with the model's own tokenizer (``tokenizer.json`` beside the
weights, read with the ``tokenizers`` library, no torch) and renders ``messages`` with
the model's chat template (``tokenizer_config.json``, Jinja in a sandbox, as transformers
does), so a request the engine would refuse is refused at submit with 422, before it
takes a place in the queue. Where the API cannot read the tokenizer (weights only on the
GPU hosts), the check is skipped and the worker refuses the job with
``context_length_exceeded`` instead.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

from .errors import InputError

log = logging.getLogger("vramq.prompts")


class PromptCounter:
    def __init__(self, weights: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(weights / "tokenizer.json"))
        self.template = None
        source = _chat_template(weights)
        if source is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self.template = env.from_string(source)

    def count(self, inp: dict) -> int | None:
        """Prompt tokens as the engine will see them; None if they cannot be known here."""
        if inp.get("messages") is not None:
            if self.template is None:
                return None
            try:
                text = self.template.render(messages=[{"role": m["role"], "content": m["content"]}
                                                      for m in inp["messages"]], add_generation_prompt=True)
            except Exception:  # the worker reports a template that refuses the turns
                return None
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return len(self.tokenizer.encode(inp["prompt"]).ids)


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


def _raise(message: str):
    raise ValueError(message)


@lru_cache(maxsize=64)
def counter_for(weights: Path) -> PromptCounter | None:
    try:
        return PromptCounter(weights)
    except Exception as exc:  # no tokenizer here, or no tokenizers library
        log.warning("cannot count prompt tokens for %s at submit (%s); the worker will", weights, exc)
        return None


def check_context(entry, inp: dict) -> int | None:
    """Raise 422 when prompt tokens + ``max_tokens`` exceed the model's ``max_context``.

    Returns the prompt's token count (None when the tokenizer is not readable here)."""
    counter = counter_for(Path(entry.weights))
    tokens = counter.count(inp) if counter is not None else None
    if tokens is None:
        return None
    limit = entry.limit.max_context
    if tokens + inp["max_tokens"] > limit:
        field = "messages" if inp.get("messages") is not None else "prompt"
        msg = (f"the prompt is {tokens} tokens; with max_tokens {inp['max_tokens']} that is "
               f"{tokens + inp['max_tokens']}, past the limit max_context {limit} of model {entry.id}")
        raise InputError(msg, [{"loc": ["input", field], "msg": msg}], code="context_length_exceeded")
    return tokens
