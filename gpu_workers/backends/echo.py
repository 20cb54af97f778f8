"""The echo model: a text model that does no work, to measure what the queue itself costs.

It loads no weights and takes no device memory (``jobs.vram.estimate_entry`` gives it 0
bytes). A job's output has the shape of any text job's (``text``, ``finish_reason``,
``usage``): the text is the prompt, or the content of the last user message (the last
message when none is the user's), cut after ``max_tokens`` tokens. Tokens are counted by
``jobs.prompts.echo_tokens`` (words between whitespace: the model has no tokenizer), the
rule the API admits echo jobs with. The text is streamed as one ``delta``, as a text
model streams its pieces.

It batches like an engine backend (``batching = "engine"``): each task thread runs its
own job at once, so no job waits for a batcher thread or for company (``max_wait_ms``);
that is the cheapest way through the worker. The runtime bills each job the wall time
of its ``run_one`` call, microseconds.
"""

from __future__ import annotations

import re
from typing import Any

from vramq.jobs.errors import JobCanceled
from vramq.jobs.prompts import echo_prompt_tokens

from .base import Backend, ItemResult, WorkItem

_WORD = re.compile(r"\S+")


def echoed(inp: dict[str, Any]) -> str:
    """The text an echo job answers with, before the ``max_tokens`` cut."""
    messages = inp.get("messages")
    if messages is None:
        return str(inp["prompt"])
    users = [m for m in messages if m["role"] == "user"]
    return str((users or messages)[-1]["content"])


def cut(text: str, max_tokens: int) -> tuple[str, int, str]:
    """``text`` up to the end of its ``max_tokens``-th word: ``(text, tokens, finish_reason)``,
    the reason ``"length"`` when words were cut off, else ``"stop"``."""
    words = text.split()
    if len(words) <= max_tokens:
        return text, len(words), "stop"
    end = next(m.end() for i, m in enumerate(_WORD.finditer(text)) if i == max_tokens - 1)
    return text[:end], max_tokens, "length"


class EchoBackend(Backend):
    """A ``text`` model (``backend = "echo"``) that answers with its input."""

    batching = "engine"

    def load(self) -> None:
        """Nothing to load."""

    def run_one(self, item: WorkItem) -> ItemResult:
        if item.is_canceled():
            raise JobCanceled("canceled")
        inp = item.input
        text, completion_tokens, finish_reason = cut(echoed(inp), inp["max_tokens"])
        if text:
            item.on_delta(text)
        return ItemResult(
            output={
                "text": text,
                "finish_reason": finish_reason,
                "usage": {"prompt_tokens": echo_prompt_tokens(inp), "completion_tokens": completion_tokens},
            }
        )

    def run_batch(self, items: list[WorkItem]) -> list[ItemResult | BaseException]:
        results: list[ItemResult | BaseException] = []
        for item in items:
            try:
                results.append(self.run_one(item))
            except JobCanceled as exc:
                results.append(exc)
        return results

    def release_memory(self) -> None:
        """Nothing held: no collection, no device cache to empty."""
