"""A small Python client for the vramq HTTP API (used by ``vramq submit`` and ``vramq demo``)."""

from __future__ import annotations

import time
from typing import Any, Callable

import requests

TERMINAL = {"succeeded", "failed", "canceled"}


class ApiError(Exception):
    """The server answered with a problem+json error."""

    def __init__(self, status: int, problem: dict):
        super().__init__(f"{status} {problem.get('code')}: {problem.get('detail')}")
        self.status = status
        self.problem = problem


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30):
        self.base_url = base_url.rstrip("/")
        self.http = requests.Session()
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _call(self, method: str, path: str, **kw) -> Any:
        resp = self.http.request(method, self.base_url + path, timeout=self.timeout, **kw)
        if resp.status_code >= 400:
            try:
                problem = resp.json()
            except ValueError:
                problem = {"code": "http_error", "detail": resp.text[:500]}
            raise ApiError(resp.status_code, problem)
        return resp.json()

    def submit(self, model: str, input: dict, *, priority: str = "normal", metadata: dict | None = None,
               idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"model": model, "input": input, "priority": priority, "metadata": metadata or {}}
        return self._call("POST", "/v1/jobs", json=body, headers=headers)

    def upload(self, data: bytes, filename: str, purpose: str = "audio") -> dict:
        """``POST /v1/files``: store a file (audio for speech jobs) and return its record."""
        return self._call("POST", "/v1/files", files={"file": (filename, data)}, data={"purpose": purpose})

    def get(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models")["data"]

    def wait(self, job_id: str, *, timeout: float = 600, poll_s: float = 0.2,
             on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job finishes; ``on_update`` sees every state read."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll_s)

    def download(self, url: str) -> bytes:
        resp = self.http.get(url, timeout=self.timeout)
        resp.raise_for_status()
        return resp.content
