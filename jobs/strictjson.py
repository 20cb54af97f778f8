"""Strict JSON for everything a client sends: request bodies and JSONL batch files.

Python's ``json`` module is lenient where the rest of the system is not:

* ``NaN``, ``Infinity`` and ``-Infinity`` (and numbers like ``1e400``, which parse to
  infinity) are not JSON (RFC 8259); PostgreSQL refuses them, and so does every other
  JSON parser a result would meet.
* ``\\u0000`` decodes to a NUL character, which PostgreSQL ``text`` and ``jsonb`` refuse,
  and a lone surrogate (``"\\ud800"``) to a string that cannot be encoded as UTF-8.
* Nesting is limited only by the recursion limit: 10,000 ``[`` raise ``RecursionError``,
  and a value a few hundred levels deep parses but then breaks ``json.dumps``, pydantic
  or the database driver further on.

``loads`` parses like ``json.loads`` (a syntax error is a ``ValueError``, as there) and
then refuses, with an ``InputError`` (422) naming the place (``loc``), any value this API
does not take. ``check`` does the same for a value parsed elsewhere.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from .errors import InputError

MAX_DEPTH = 32
"""Objects and arrays nested deeper than this are refused (a job body is 4-6 deep)."""

_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")

Loc = tuple[str | int, ...]
"""Where a value sits: object keys and array indexes from the outside in."""


class _NonFinite:
    """What ``NaN``/``Infinity`` parse to here, so that ``check`` can name their place."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def loads(data: str | bytes, loc: Sequence[str | int] = (), *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data`` (UTF-8 bytes or text) as strict JSON.

    Raises ``ValueError`` (``json.JSONDecodeError``, ``UnicodeDecodeError``) for input
    that is not JSON at all, and ``InputError`` naming ``loc`` + the path inside the value
    for a non-finite number, a NUL or lone surrogate in a string or key, or nesting past
    ``max_depth``.
    """
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    try:
        value = json.loads(text, parse_constant=_NonFinite)
    except RecursionError:
        raise _refuse(list(loc), f"nested deeper than {max_depth} levels (limit)") from None
    check(value, loc, max_depth=max_depth)
    return value


def check(value: Any, loc: Sequence[str | int] = (), *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse (``InputError``) what ``loads`` refuses, in an already parsed value.

    Iterative, so a deep value cannot exhaust the stack while being checked."""
    stack: list[tuple[Any, Loc, int]] = [(value, tuple(loc), 1)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, str):
            _check_str(v, where)
        elif isinstance(v, dict):
            if depth > max_depth:
                raise _refuse(list(where), f"nested deeper than {max_depth} levels (limit)")
            for k, x in v.items():
                if isinstance(k, str) and _BAD_CHAR.search(k):
                    _check_str(k, where + (_printable(k),), key=True)
                stack.append((x, where + (k,), depth + 1))
        elif isinstance(v, list):
            if depth > max_depth:
                raise _refuse(list(where), f"nested deeper than {max_depth} levels (limit)")
            stack.extend((x, where + (i,), depth + 1) for i, x in enumerate(v))
        elif isinstance(v, _NonFinite):
            raise _refuse(list(where), f"{v.text} is not a JSON number: numbers must be finite")
        elif isinstance(v, float) and not math.isfinite(v):
            raise _refuse(list(where), "number out of range: numbers must be finite (at most about 1.8e308)")


def _check_str(s: str, where: Loc, key: bool = False) -> None:
    bad = _BAD_CHAR.search(s)
    if bad is None:
        return
    what = "key" if key else "string"
    if bad.group() == "\x00":
        raise _refuse(list(where), f"the {what} contains a NUL character (\\u0000), which is not accepted")
    raise _refuse(
        list(where),
        f"the {what} contains a lone UTF-16 surrogate (\\u{ord(bad.group()):04x}), which is not valid Unicode",
    )


def _printable(s: str) -> str:
    """``s`` with its NULs and lone surrogates written as ``\\uXXXX`` (for a ``loc``)."""
    return _BAD_CHAR.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def _refuse(loc: list[str | int], msg: str) -> InputError:
    place = ".".join(str(p) for p in loc) or "body"
    return InputError(f"{place}: {msg}", [{"loc": loc, "msg": msg}])
