"""One HTTP attempt: a POST to the address the URL check pinned, never to a fresh DNS answer."""

from __future__ import annotations

from typing import Any

from .urls import Target

TIMEOUT_S = (5.0, 10.0)
"""Connect and read timeouts of one attempt."""
MAX_RESPONSE_BYTES = 4096


def default_ca_certs() -> str | None:
    """The CA bundle requests would use (certifi's), else the system's (``None``)."""
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def post_pinned(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    timeout: tuple[float, float] = TIMEOUT_S,
    ca_certs: str | None = None,
) -> int:
    """POST ``body`` to a checked ``target`` and return the status code. The connection
    goes to one of ``target.ips`` (the next only if connecting to one fails at once),
    never to a fresh DNS answer; the request carries ``Host: target.host_header`` and, for
    https, SNI and certificate verification for ``target.host``. Redirects are not
    followed and at most ``MAX_RESPONSE_BYTES`` of the answer is read."""
    from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, Timeout
    from urllib3.exceptions import NewConnectionError

    if not target.ips:
        raise ValueError("the target has no checked address")
    headers = {**headers, "Host": target.host_header}
    for n, ip in enumerate(target.ips):
        kw: dict[str, Any] = {
            "port": target.port,
            "timeout": Timeout(connect=timeout[0], read=timeout[1]),
            "maxsize": 1,
            "retries": False,
        }
        pool: HTTPConnectionPool
        if target.scheme == "https":
            pool = HTTPSConnectionPool(
                ip,
                cert_reqs="CERT_REQUIRED",
                ca_certs=ca_certs,
                server_hostname=target.host,
                assert_hostname=target.host,
                **kw,
            )
        else:
            pool = HTTPConnectionPool(ip, **kw)
        try:
            resp = pool.urlopen(
                "POST",
                target.path,
                body=body,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                assert_same_host=False,
            )
            try:
                resp.read(MAX_RESPONSE_BYTES, decode_content=False)  # a little of it, never all
            finally:
                resp.close()
            return resp.status
        except NewConnectionError:  # refused or unreachable at once (not a timeout): the next checked address
            if n == len(target.ips) - 1:
                raise
        finally:
            pool.close()
    raise AssertionError("unreachable")
