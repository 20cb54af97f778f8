"""Where job inputs and outputs live: an ``ObjectStore`` chosen by URL.

    file:///abs/path        LocalStore, files under that directory, links served by the API
    file:relative/path      LocalStore under the data dir
    s3://bucket[/prefix]    S3Store, presigned links (``s3_endpoint_url`` for MinIO, moto)

``store_for(settings)`` is the store factory the composition roots hand to
``jobs.services.Services``: this package implements the domain's ``jobs.ports.ObjectStore``
and imports nothing of vramq but ``jobs.errors``.

Importing this package does not import boto3; only building an ``S3Store`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from vramq.jobs.errors import ConfigError

from .base import ObjectStore
from .local import LinkRefused, LocalStore
from .s3 import S3Store

__all__ = ["LinkRefused", "LocalStore", "ObjectStore", "S3Store", "open_store", "store_for"]

_ACCEPTED = "file:///absolute/path, file:relative/path (under the data dir) or s3://bucket[/prefix]"


def open_store(
    url: str,
    *,
    s3_endpoint_url: str | None = None,
    secret_key: bytes | str | None = None,
    data_dir: Path | str | None = None,
) -> ObjectStore:
    """The store that ``url`` names (``VRAMQ_STORAGE_URL``); ``ConfigError`` if it names none.

    Args:
        url: ``file:...`` or ``s3://...``, see the module docstring.
        s3_endpoint_url: the S3-compatible endpoint for ``s3://`` URLs; None for AWS.
        secret_key: signs ``file:`` store links; required for them.
        data_dir: where ``file:relative/path`` URLs are rooted.
    """
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ConfigError(f"storage URL {url!r} must not have a query or fragment; use {_ACCEPTED}")
    if parts.scheme == "file":
        # The path is taken as written, not percent-decoded: settings build these URLs
        # by pasting a directory path in, so "%" in a directory name must stay literal.
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigError(f"storage URL {url!r} names no local directory; use {_ACCEPTED}")
        root = Path(parts.path)
        if not root.is_absolute():
            if data_dir is None:
                raise ConfigError(f"storage URL {url!r} is relative but no data dir was given; use {_ACCEPTED}")
            root = Path(data_dir) / root
        if not secret_key:
            raise ConfigError(f"storage URL {url!r} needs a secret key to sign download links")
        return LocalStore(root, secret_key)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"storage URL {url!r} names no bucket; use {_ACCEPTED}")
        try:
            return S3Store(parts.netloc, prefix=parts.path.strip("/"), endpoint_url=s3_endpoint_url)
        except ValueError as exc:  # the prefix is not a valid key folder
            raise ConfigError(f"storage URL {url!r}: {exc}") from None
    raise ConfigError(f"unsupported storage URL {url!r}; use {_ACCEPTED}")


class StoreSettings(Protocol):
    """What ``store_for`` reads of the settings (``jobs.settings.Settings`` has it all;
    this package imports nothing of vramq but ``jobs.errors``)."""

    @property
    def storage_url(self) -> str: ...
    @property
    def s3_endpoint_url(self) -> str | None: ...
    @property
    def secret_key(self) -> bytes | str | None: ...
    @property
    def data_dir(self) -> Path | str | None: ...


def store_for(settings: StoreSettings) -> ObjectStore:
    """The store that ``settings`` name: its ``storage_url``, ``s3_endpoint_url``,
    ``secret_key`` and ``data_dir`` (a ``jobs.settings.Settings`` or anything with those
    attributes), as ``open_store`` reads them."""
    return open_store(
        settings.storage_url,
        s3_endpoint_url=settings.s3_endpoint_url,
        secret_key=settings.secret_key,
        data_dir=settings.data_dir,
    )
