"""The web page: ``/`` (and ``/s/<token>`` opened by a browser) serves ``web/index.html``,
``/web/<name>`` its script and style sheet. Static files committed in the package; no
build step.

Every page answer carries a strict Content-Security-Policy: scripts, styles and requests
only from this server (``'self'``), so the page can never load or send anything to another
host. Images, videos and downloads may also come from the object store, whose signed
links point at S3 when the store is S3.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request

from vramq.jobs.errors import NotFound

bp = Blueprint("web", __name__)

WEB_DIR = Path(__file__).with_name("web")
#: The files ``/web/<name>`` serves, with their types (nothing else in the folder is served).
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
#: Where an S3 store's signed links point when no endpoint is configured (AWS).
AWS_S3_ORIGIN = "https://*.amazonaws.com"


def _store_origin() -> str:
    """The object store's origin, for the media sources of the policy ('' for the local store,
    whose links are this server's own ``/v1/blobs/…``)."""
    settings = current_app.config["VRAMQ"].settings
    if not settings.storage_url.startswith("s3://"):
        return ""
    if settings.s3_endpoint_url:
        parts = urlsplit(settings.s3_endpoint_url)
        return f" {parts.scheme}://{parts.netloc}"
    return " " + AWS_S3_ORIGIN


def content_security_policy() -> str:
    store = _store_origin()
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            f"img-src 'self' data: blob:{store}",
            f"media-src 'self' blob:{store}",
            "form-action 'self'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        )
    )


def _headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": content_security_policy(),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def page(status: int = 200) -> Response:
    """The page itself (``index.html``); ``status`` 404 for a share link that no longer works."""
    html = (WEB_DIR / "index.html").read_bytes()
    return Response(html, status=status, mimetype="text/html", headers=_headers())


def wants_page() -> bool:
    """Did a browser ask (HTML preferred to JSON), rather than an API client?"""
    accept = request.accept_mimetypes
    return accept["text/html"] > accept["application/json"]


@bp.get("/")
def index():
    return page()


@bp.get("/web/<name>")
def asset(name: str):
    if name not in ASSETS:
        raise NotFound(f"no file {name!r} in the web page")
    resp = Response((WEB_DIR / name).read_bytes(), mimetype=ASSETS[name], headers=_headers())
    resp.content_type = ASSETS[name]
    return resp
