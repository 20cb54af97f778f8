"""OpenAI request bodies read into vramq job inputs, and job results written as OpenAI
response bodies. Shared by the synchronous endpoints and the Batch API (a batch line's
``body`` is the same request). No Flask here.

A field OpenAI defines but vramq cannot honour is refused (400 naming it) when it asks
for something other than the default, never silently dropped; fields that change
nothing here (``user``, ``store``, ``service_tier``…) are accepted and ignored.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from typing import Any

from vramq.jobs.errors import InputError

#: Accepted and ignored: they change nothing about what a vramq job computes.
IGNORED = frozenset({"user", "store", "service_tier", "metadata", "parallel_tool_calls", "prompt_cache_key"})
#: Accepted only at these values (OpenAI's defaults).
DEFAULTS_ONLY: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False,),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def bad(param: str, msg: str) -> InputError:
    return InputError(f"{param}: {msg}", [{"loc": [param], "msg": msg}])


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object", [{"loc": ["body"], "msg": "must be a JSON object"}])
    return {k: v for k, v in body.items() if v is not None}  # null is "not given", as the SDKs send it


def _leftovers(body: dict[str, Any], known: set[str]) -> None:
    for name, value in body.items():
        if name in known or name in IGNORED:
            continue
        if name in DEFAULTS_ONLY:
            if value not in DEFAULTS_ONLY[name]:
                raise bad(name, f"not supported by vramq (only {DEFAULTS_ONLY[name][0]!r})")
            continue
        raise bad(name, "not a parameter vramq supports on this endpoint")


def _n(body: dict[str, Any]) -> None:
    if body.get("n", 1) != 1:
        raise bad("n", "must be 1: vramq's text engines generate one choice per request")


def _sampling(body: dict[str, Any], inp: dict[str, Any]) -> None:
    """``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``."""
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise bad("max_tokens", "give max_tokens or max_completion_tokens, not both")
    for name in ("max_tokens", "max_completion_tokens"):
        if name in body:
            inp["max_tokens"] = body[name]
    for name in ("temperature", "top_p", "seed"):
        if name in body:
            inp[name] = body[name]
    if "stop" in body:
        stop = body["stop"]
        inp["stop"] = [stop] if isinstance(stop, str) else stop


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)``."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", "only include_usage is supported")
    return stream, bool(options.get("include_usage"))


def chat_request(body: Any) -> tuple[str, dict[str, Any], bool, bool]:
    """``(model, vramq input, stream, include_usage)`` of a ``/chat/completions`` body."""
    body = _object(body)
    _leftovers(
        body,
        {
            "model",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "n",
            "stream",
            "stream_options",
        },
    )
    _n(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "required: a non-empty list of {role, content}")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in CHAT_ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        messages.append({"role": CHAT_ROLES[m["role"]], "content": _content(m.get("content"), i)})
    inp: dict[str, Any] = {"messages": messages}
    _sampling(body, inp)
    return body.get("model"), inp, *_stream(body)


def _content(content: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content", "only text parts are supported (vramq's text models read text)")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content", "must be a string or a list of text parts")


def completion_request(body: Any) -> tuple[str, dict[str, Any], bool, bool]:
    """``(model, vramq input, stream, include_usage)`` of a ``/completions`` body."""
    body = _object(body)
    _leftovers(
        body, {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options"}
    )
    _n(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "must be a string (one prompt per request; the Batch API takes many)")
    inp: dict[str, Any] = {"prompt": prompt}
    _sampling(body, inp)
    return body.get("model"), inp, *_stream(body)


def image_request(body: Any) -> tuple[str, dict[str, Any], str]:
    """``(model, vramq input, response_format)`` of an ``/images/generations`` body."""
    body = _object(body)
    _leftovers(
        body,
        {
            "model",
            "prompt",
            "n",
            "size",
            "response_format",
            "seed",
            "quality",
            "style",
            "output_format",
            "background",
            "moderation",
        },
    )
    for name, allowed in (
        ("quality", ("auto", "standard")),
        ("style", ("natural", "vivid")),
        ("output_format", ("png",)),
        ("background", ("auto", "opaque")),
        ("moderation", ("auto", "low")),
    ):
        if name in body and body[name] not in allowed:
            raise bad(name, f"not supported by vramq (one of {', '.join(allowed)})")
    inp: dict[str, Any] = {"prompt": body.get("prompt")}
    if not isinstance(inp["prompt"], str):
        raise bad("prompt", "required: a string")
    if "n" in body:
        inp["num_images"] = body["n"]
    if "seed" in body:
        inp["seed"] = body["seed"]
    if "size" in body and body["size"] != "auto":
        m = SIZE.fullmatch(str(body["size"]))
        if m is None:
            raise bad("size", "must be WIDTHxHEIGHT in pixels, like 512x512, within the model's limits")
        inp["width"], inp["height"] = int(m.group(1)), int(m.group(2))
    fmt = body.get("response_format", "url")
    if fmt not in ("url", "b64_json"):
        raise bad("response_format", "must be url or b64_json")
    return body.get("model"), inp, fmt


# --- responses ------------------------------------------------------------------------


def unix(iso: str | None) -> int:
    """An ISO 8601 time of vramq's JSON as Unix seconds (OpenAI's ``created``)."""
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()) if iso else 0


def usage_of(job: dict[str, Any]) -> dict[str, int]:
    u = (job.get("output") or {}).get("usage") or {}
    prompt, completion = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(job: dict[str, Any]) -> dict[str, Any]:
    out = job["output"]
    return {
        "id": job["id"],
        "object": "chat.completion",
        "created": unix(job["created_at"]),
        "model": job["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": out["text"], "refusal": None},
                "logprobs": None,
                "finish_reason": out.get("finish_reason") or "stop",
            }
        ],
        "usage": usage_of(job),
        "system_fingerprint": None,
    }


def completion_response(job: dict[str, Any]) -> dict[str, Any]:
    out = job["output"]
    return {
        "id": job["id"],
        "object": "text_completion",
        "created": unix(job["created_at"]),
        "model": job["model"],
        "choices": [
            {"index": 0, "text": out["text"], "logprobs": None, "finish_reason": out.get("finish_reason") or "stop"}
        ],
        "usage": usage_of(job),
    }


def image_response(job: dict[str, Any], fmt: str, keys: list[str], read) -> dict[str, Any]:
    """``job`` as the API shows it, ``keys`` its images' object keys in the same order,
    ``read(key)`` an object's bytes (for ``b64_json``)."""
    data = []
    for image, key in zip(job["output"]["images"], keys, strict=True):
        if fmt == "b64_json":
            data.append({"b64_json": base64.b64encode(read(key)).decode(), "revised_prompt": None})
        else:
            data.append({"url": image["url"], "revised_prompt": None})
    return {"created": unix(job["created_at"]), "data": data}
