"""LocalStore: objects as files in a directory, downloaded through HMAC-signed API links.

The zero-config default. A key is a path under ``root``; writes are atomic (a temp file
in the same folder, then ``os.replace``), so a reader never sees half an object. The
content type is not stored: it is guessed from the key's extension when the API
serves the file, and vramq names its outputs with the right extension.

Links are relative (``/v1/blobs/<key>?expires=..&sig=..``); the API makes them
absolute, checks them with ``verify`` and streams the file from ``open``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from pathlib import Path
from urllib.parse import quote, urlencode

from vramq.jobs.errors import ConfigError, Conflict, NotFound, ServiceUnavailable, VramqError

from .base import ObjectStore, guess_content_type, validate_key

# Temp files are ".<name>.<16 hex>.tmp" next to their target; listings skip them.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")


class LinkRefused(VramqError):
    """A signed link was refused: it has expired or its signature does not match."""

    code = "forbidden"

    def __init__(self, reason: str):
        super().__init__(f"link refused: {reason}")
        self.reason = reason


class LocalStore(ObjectStore):
    """Objects under ``root``; links signed with ``secret_key`` and served by the API.

    Args:
        root: the directory holding the objects; created on first write or ``ping``.
        secret_key: the HMAC key for links; every API process must share it.
        url_prefix: the API route that serves links (``/v1/blobs``).
    """

    def __init__(self, root: Path | str, secret_key: bytes | str, url_prefix: str = "/v1/blobs"):
        if not secret_key:
            raise ConfigError("LocalStore needs a non-empty secret key to sign download links")
        self.root = Path(root).expanduser().resolve()
        self._secret = secret_key.encode() if isinstance(secret_key, str) else bytes(secret_key)
        self.url_prefix = url_prefix.rstrip("/")
        self.location = self.root.as_uri()

    # -- what the API's blob route uses --------------------------------------------

    def verify(self, key: str, expires: int | str, sig: str, now: float | None = None) -> None:
        """Accept a link's ``expires`` and ``sig`` for ``key``, or raise ``LinkRefused``.

        The signature is checked before the expiry, so a link whose expiry was edited
        reads as "bad signature", not "expired".
        """
        try:
            expires_at = int(expires)
        except (TypeError, ValueError):
            raise LinkRefused("bad signature") from None
        given = sig.encode("utf-8", "replace") if isinstance(sig, str) else b""
        if not hmac.compare_digest(self._sign(key, expires_at).encode(), given):
            raise LinkRefused("bad signature")
        if (time.time() if now is None else now) >= expires_at:
            raise LinkRefused("expired")

    def open(self, key: str) -> tuple[Path, str]:
        """The file holding ``key`` and its content type, for the API to stream."""
        validate_key(key)
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"no object {key!r}")
        return path, guess_content_type(key)

    # -- primitives -----------------------------------------------------------------

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        for attempt in range(3):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._write_atomic(path, data)
                return
            except FileNotFoundError:
                # A concurrent delete_prefix pruned the empty folder between mkdir and
                # the write; make it again.
                if attempt == 2:
                    raise
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                # Unlike S3, a file system cannot hold both "a" and "a/b".
                raise Conflict(f"key {key!r} clashes with an existing object or folder in {self.location}") from None

    def _get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key!r}") from None

    def _list(self, prefix: str) -> list[str]:
        top = self._path(prefix) if prefix else self.root
        keys = []
        # os.walk does not follow symlinked folders, so a listing stays inside root.
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if not _TEMP_NAME.match(name):
                    keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return keys

    def _delete_many(self, keys: list[str]) -> None:
        folders = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        # Prune emptied folders so one folder per finished job does not pile up forever.
        for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while path != self.root:
                try:
                    path.rmdir()
                except OSError:  # not empty (or already gone): stop climbing
                    break
                path = path.parent

    def _signed_url(self, key: str, expires_in: int) -> str:
        expires = int(time.time()) + expires_in
        query = urlencode({"expires": expires, "sig": self._sign(key, expires)})
        return f"{self.url_prefix}/{quote(key, safe='/')}?{query}"

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceUnavailable(f"object store {self.location} cannot be created: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ServiceUnavailable(f"object store {self.location} is not writable by this process")

    # -- helpers --------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """The file for ``key``; refuses any path that resolves outside ``root``.

        Key validation already rules out ``..``; this also catches symlinks inside
        root that point elsewhere.
        """
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"object key {key!r} resolves outside the store root")
        return path

    def _sign(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            # "xb" (not mkstemp) so the file gets the process umask, not mode 0600,
            # and an API running as another user can still read it.
            with open(temp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
