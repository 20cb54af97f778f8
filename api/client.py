"""A small Python client for the vramq HTTP API (used by ``vramq submit`` and ``vramq demo``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests

TERMINAL = {"succeeded", "failed", "canceled"}


class ApiError(Exception):
    """The server answered with a problem+json error."""

    def __init__(self, status: int, problem: dict):
        super().__init__(f"{status} {problem.get('code')}: {problem.get('detail')}")
        self.status = status
        self.problem = problem


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30,
        rate_limit_retries: int = 3,
    ):
        self.base_url = base_url.rstrip("/")
        self.rate_limit_retries = rate_limit_retries
        self.http = requests.Session()
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _call(self, method: str, path: str, **kw) -> Any:
        resp = self.http.request(method, self.base_url + path, timeout=self.timeout, **kw)
        for _ in range(self.rate_limit_retries):
            if resp.status_code != 429:
                break
            # Rate limited: wait as told (capped) and try again.
            time.sleep(min(float(resp.headers.get("Retry-After", "1")), 60.0))
            resp = self.http.request(method, self.base_url + path, timeout=self.timeout, **kw)
        if resp.status_code >= 400:
            try:
                problem = resp.json()
            except ValueError:
                problem = {"code": "http_error", "detail": resp.text[:500]}
            raise ApiError(resp.status_code, problem)
        return resp.json()

    def submit(
        self,
        model: str,
        input: dict,
        *,
        priority: str = "normal",
        metadata: dict | None = None,
        idempotency_key: str | None = None,
        webhook: dict | None = None,
    ) -> dict:
        """``POST /v1/jobs``; ``webhook={"url", "events"?}`` has the job's end announced."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"model": model, "input": input, "priority": priority, "metadata": metadata or {}}
        if webhook is not None:
            body["webhook"] = webhook
        return self._call("POST", "/v1/jobs", json=body, headers=headers)

    def upload(self, data: bytes, filename: str, purpose: str = "audio") -> dict:
        """``POST /v1/files``: store a file (audio for speech jobs) and return its record."""
        return self._call("POST", "/v1/files", files={"file": (filename, data)}, data={"purpose": purpose})

    def get(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def create_account(self, name: str | None = None) -> dict:
        """``POST /v1/accounts``: a free account; the answer holds its API key (shown once)."""
        return self._call("POST", "/v1/accounts", json={"name": name} if name else {})

    def usage(self) -> dict:
        return self._call("GET", "/v1/usage")

    def history(
        self, *, status: str | None = None, model: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> dict:
        params = {k: v for k, v in {"status": status, "model": model, "limit": limit, "cursor": cursor}.items() if v}
        return self._call("GET", "/v1/jobs", params=params)

    def save(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/save")

    def share(self, job_id: str) -> str:
        return self._call("POST", f"/v1/jobs/{job_id}/share")["url"]

    def unshare(self, job_id: str) -> dict:
        return self._call("DELETE", f"/v1/jobs/{job_id}/share")

    def webhook_secret(self) -> str:
        return self._call("GET", "/v1/webhooks/secret")["secret"]

    def deliveries(self, job_id: str) -> list[dict]:
        return self._call("GET", f"/v1/jobs/{job_id}/deliveries")["data"]

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models")["data"]

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[tuple[str, dict]]:
        """Follow ``GET /v1/jobs/{id}/events``: yields ``(event, data)`` as they come
        (``status``, ``progress``, ``delta``, ``done``), and ``("keep-alive", {})`` on the
        server's idle comments, so a caller can check its own deadline."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        return self._stream(f"/v1/jobs/{job_id}/events", headers)

    def _stream(self, path: str, headers: dict | None = None) -> Iterator[tuple[str, dict]]:
        """A server-sent event stream as ``(event, data)`` pairs."""
        headers = {"Accept": "text/event-stream", **(headers or {})}
        with self.http.get(self.base_url + path, headers=headers, stream=True, timeout=(self.timeout, 30)) as resp:
            if resp.status_code >= 400:
                raise ApiError(resp.status_code, resp.json())
            event, data = "message", []
            for line in resp.iter_lines(decode_unicode=True):
                if line.startswith(":"):
                    yield "keep-alive", {}
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield event, json.loads("\n".join(data))
                    event, data = "message", []

    def wait(
        self, job_id: str, *, timeout: float = 600, poll_s: float = 1.0, on_update: Callable[[dict], None] | None = None
    ) -> dict:
        """Wait until the job finishes, following its event stream (one request, however
        long the job), or polling every ``poll_s`` if the stream breaks; ``on_update``
        sees the job at each change."""
        deadline = time.monotonic() + timeout
        job = self.get(job_id)
        if on_update:
            on_update(job)
        if job["status"] in TERMINAL:
            return job
        try:
            for event, data in self.events(job_id):
                if event == "done":
                    job = data
                elif event in ("status", "progress"):
                    job = {**job, **data}
                if on_update and event in ("status", "progress", "done"):
                    on_update(job)
                if event == "done":
                    return job
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
        except (requests.RequestException, ValueError):
            pass  # the stream broke: poll instead
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll_s)

    # --- batches ------------------------------------------------------------------------

    def submit_batch(
        self,
        jobs: list[dict] | None = None,
        *,
        input_file: str | None = None,
        priority: str = "low",
        metadata: dict | None = None,
        webhook: dict | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        """``POST /v1/batches``: ``jobs`` (``[{"custom_id", "model", "input"}]``) or an
        uploaded JSONL ``input_file`` (``upload(data, name, purpose="batch")``). All or
        none: a bad line is a 422 naming its line."""
        body: dict = {"priority": priority, "metadata": metadata or {}}
        if jobs is not None:
            body["jobs"] = jobs
        if input_file is not None:
            body["input_file"] = input_file
        if webhook is not None:
            body["webhook"] = webhook
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/batches", json=body, headers=headers)

    def batch(self, batch_id: str) -> dict:
        return self._call("GET", f"/v1/batches/{batch_id}")

    def cancel_batch(self, batch_id: str) -> dict:
        return self._call("POST", f"/v1/batches/{batch_id}/cancel")

    def batch_jobs(self, batch_id: str, *, status: str | None = None, page_size: int = 1000) -> Iterator[dict]:
        """Every job of the batch in submission order, a page at a time."""
        cursor = None
        while True:
            params = {k: v for k, v in {"status": status, "limit": page_size, "cursor": cursor}.items() if v}
            page = self._call("GET", f"/v1/batches/{batch_id}/jobs", params=params)
            yield from page["data"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def batch_events(self, batch_id: str) -> Iterator[tuple[str, dict]]:
        """Follow ``GET /v1/batches/{id}/events``: ``counts`` (the batch) as they change,
        then ``done`` (the batch with its ``results_url``)."""
        return self._stream(f"/v1/batches/{batch_id}/events")

    def wait_batch(
        self,
        batch_id: str,
        *,
        timeout: float = 3600,
        poll_s: float = 2.0,
        on_update: Callable[[dict], None] | None = None,
    ) -> dict:
        """Wait until the batch has finished and its results are written (``results_url``),
        following its event stream, or polling if the stream breaks."""
        deadline = time.monotonic() + timeout
        try:
            for event, batch in self.batch_events(batch_id):
                if event in ("counts", "done") and on_update:
                    on_update(batch)
                if event == "done":
                    return batch
                if time.monotonic() > deadline:
                    raise TimeoutError(f"batch {batch_id} not finished after {timeout}s")
        except (requests.RequestException, ValueError):
            pass
        while True:
            batch = self.batch(batch_id)
            if on_update:
                on_update(batch)
            if batch["finished_at"]:
                return batch
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not finished after {timeout}s")
            time.sleep(poll_s)

    def batch_results(self, batch: dict) -> list[dict]:
        """The finished batch's manifest: one ``{custom_id, job_id, status, output, error}``
        per job, in submission order."""
        if not batch.get("results_url"):
            raise ValueError(f"batch {batch['id']} has no results yet (wait_batch first)")
        return [json.loads(line) for line in self.download(batch["results_url"]).decode().splitlines() if line]

    def download(self, url: str) -> bytes:
        resp = self.http.get(url, timeout=self.timeout)
        resp.raise_for_status()
        return resp.content


def verify_webhook(secret: str, body: bytes | str, headers: dict[str, str]) -> dict:
    """For a webhook receiver: check a delivery's Standard Webhooks signature (and that its
    timestamp is within 5 minutes) and return the payload. Raises
    ``standardwebhooks.WebhookVerificationError`` when it does not verify.
    Deduplicate on ``headers["webhook-id"]``: a retried delivery keeps its id."""
    from standardwebhooks import Webhook

    return Webhook(secret).verify(body, headers)
