"""The object store contract: job inputs and outputs kept as bytes under string keys.

``ObjectStore`` owns what every backend shares: the public API, key validation,
folder-style prefixes, batched deletes, link lifetimes, content-type defaults and
turning "cannot reach the store" into ``ServiceUnavailable``. A backend implements
the primitives only: ``_put``, ``_get``, ``_list``, ``_delete_many``, ``_signed_url``
and ``ping``.

Keys look like relative POSIX paths (``jobs/<job_id>/image-0.png``). A prefix names a
folder: ``list("jobs/abc")`` and ``list("jobs/abc/")`` both mean the keys under
``jobs/abc/``, never ``jobs/abcd/...``.
"""

from __future__ import annotations

import abc
import builtins
import mimetypes
from collections.abc import Iterator
from contextlib import contextmanager

from vramq.jobs.errors import ServiceUnavailable

#: Longest key accepted (S3 allows 1024 bytes; we count characters and stay ASCII-safe).
MAX_KEY_CHARS = 1024
#: Longest signed-link lifetime: S3's SigV4 ceiling, applied to every backend alike.
MAX_LINK_SECONDS = 7 * 24 * 3600
#: S3 DeleteObjects accepts at most 1000 keys per request.
DELETE_BATCH = 1000
#: Content type when neither the caller nor the key's extension says otherwise.
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key, else raise ``ValueError`` saying why.

    Keys become file paths in the local store, so anything that could climb out of a
    folder or mean different things on different systems is refused here, once, for
    every backend.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"object key is {len(key)} characters long; the limit is {MAX_KEY_CHARS}")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} must be relative (no leading '/')")
    if "\\" in key:
        raise ValueError(f"object key {key!r} must not contain backslashes")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise ValueError(f"object key {key!r} must not contain control characters")
    segments = key.split("/")
    if ".." in segments:
        raise ValueError(f"object key {key!r} must not contain '..' segments")
    if any(seg in ("", ".") for seg in segments):
        raise ValueError(f"object key {key!r} must not contain empty or '.' segments")
    return key


def folder(prefix: str, *, allow_root: bool) -> str:
    """Normalise a prefix to ``"a/b/"`` form (``""`` is the whole store, if allowed)."""
    if prefix == "":
        if allow_root:
            return ""
        raise ValueError("an empty prefix would mean the whole store; name a folder")
    return validate_key(prefix.removesuffix("/")) + "/"


def guess_content_type(key: str) -> str:
    """The content type the key's extension suggests, or ``application/octet-stream``."""
    return mimetypes.guess_type(key, strict=False)[0] or DEFAULT_CONTENT_TYPE


class ObjectStore(abc.ABC):
    """Bytes under keys, with signed download links. Subclass and fill in the primitives."""

    #: The backend client's exceptions that mean the store cannot be reached. The base
    #: turns them into ``ServiceUnavailable`` so callers handle one error type.
    connection_errors: tuple[type[BaseException], ...] = ()
    #: Where the store lives, for messages (``s3://bucket/prefix``, ``file:///srv/objects``).
    location: str = "?"

    # -- public API ---------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Store ``data`` under ``key``, replacing any object there."""
        validate_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"object data must be bytes, not {type(data).__name__}")
        with self._reaching("write", key):
            self._put(key, bytes(data), content_type or guess_content_type(key))

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; ``NotFound`` if there is no such object."""
        validate_key(key)
        with self._reaching("read", key):
            return self._get(key)

    def list(self, prefix: str = "") -> list[str]:
        """Every key under the folder ``prefix`` (``""``: the whole store), sorted."""
        path = folder(prefix, allow_root=True)
        with self._reaching("list", path):
            return sorted(self._list(path))

    def delete(self, key: str) -> None:
        """Delete the object under ``key``; a missing object is not an error."""
        validate_key(key)
        with self._reaching("delete", key):
            self._delete_many([key])

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix``; return how many there were.

        An empty prefix is refused: emptying the whole store is never what a job meant.
        """
        path = folder(prefix, allow_root=False)
        with self._reaching("delete", path):
            keys = self._list(path)
            for start in range(0, len(keys), DELETE_BATCH):
                self._delete_many(keys[start : start + DELETE_BATCH])
        return len(keys)

    def signed_url(self, key: str, expires_in: int) -> str:
        """A download link for ``key`` valid for ``expires_in`` seconds.

        Minting a link does not check that the object exists (S3 does not either).
        """
        validate_key(key)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int):
            raise TypeError("expires_in must be an int number of seconds")
        if not 1 <= expires_in <= MAX_LINK_SECONDS:
            raise ValueError(f"expires_in must be between 1 and {MAX_LINK_SECONDS} seconds, got {expires_in}")
        with self._reaching("sign a link for", key):
            return self._signed_url(key, expires_in)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location}>"

    # -- helpers for backends -----------------------------------------------------

    @contextmanager
    def _reaching(self, action: str, key: str) -> Iterator[None]:
        """Turn the backend's connection errors into ``ServiceUnavailable``."""
        try:
            yield
        except self.connection_errors as exc:
            raise ServiceUnavailable(
                f"object store {self.location} is unreachable (could not {action} {key!r}): {exc}"
            ) from exc

    # -- primitives ---------------------------------------------------------------

    @abc.abstractmethod
    def _put(self, key: str, data: bytes, content_type: str) -> None:
        """Write ``data`` under ``key`` (already validated), replacing any object."""

    @abc.abstractmethod
    def _get(self, key: str) -> bytes:
        """Read ``key``; raise ``jobs.errors.NotFound`` if it does not exist."""

    @abc.abstractmethod
    # ``builtins.list``: inside this class body, ``list`` is the method above.
    def _list(self, prefix: str) -> builtins.list[str]:
        """Keys starting with ``prefix`` (``""`` or a folder ending in ``/``), any order."""

    @abc.abstractmethod
    def _delete_many(self, keys: builtins.list[str]) -> None:
        """Delete these keys (at most ``DELETE_BATCH``); a missing key is not an error."""

    @abc.abstractmethod
    def _signed_url(self, key: str, expires_in: int) -> str:
        """A link that downloads ``key`` for ``expires_in`` seconds (already validated)."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Return if the store is usable; raise ``ServiceUnavailable`` saying why not."""
