"""The ports through which the domain reaches the outside, as protocols.

``jobs`` calls these; adapters in the layers above implement them (``vramq.storage``
implements ``ObjectStore``) and the composition roots (``vramq.api.wiring``, the worker)
hand them in. Nothing here imports an adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .settings import Settings


@runtime_checkable
class ObjectStore(Protocol):
    """Bytes under string keys (``jobs/<job_id>/image-0.png``), with signed download links.

    Errors: a missing object is ``errors.NotFound``; a store that cannot be reached is
    ``errors.ServiceUnavailable``; a bad key is ``ValueError``.
    """

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Store ``data`` under ``key``, replacing any object there."""

    def get(self, key: str) -> bytes:
        """The bytes under ``key``."""

    def list(self, prefix: str = "") -> list[str]:
        """Every key under the folder ``prefix`` (``""``: the whole store), sorted."""

    def delete(self, key: str) -> None:
        """Delete the object under ``key``; a missing object is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix``; return how many there were."""

    def signed_url(self, key: str, expires_in: int) -> str:
        """A download link for ``key`` valid for ``expires_in`` seconds (absolute, or
        relative to the API for a store the API serves itself)."""

    def ping(self) -> None:
        """Return if the store is usable; raise ``ServiceUnavailable`` saying why not."""


StoreFactory = Callable[["Settings"], ObjectStore]
"""Builds the store the settings name (``vramq.storage.store_for``)."""
