"""The object stores: shared behaviour on both backends, then each backend's own.

S3 runs against a real ``moto_server`` over HTTP (tests/fixtures/s3.py). moto 5.2.5
checks neither the signature nor the expiry of presigned URLs (it serves a tampered
or expired link with 200), so those checks are left to S3 itself and not tested here:
a test against moto could not fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests

from tests.fixtures.s3 import free_port
from vramq.jobs.errors import ConfigError, NotFound, ServiceUnavailable
from vramq.storage import LinkRefused, LocalStore, ObjectStore, S3Store, open_store

SECRET = "test-secret"
BAD_KEYS = ["", "../x", "a/../../x", "/abs", "a\\b", "a//b", "a/./b", "a/", "x" * 1025, "a\nb"]


@pytest.fixture
def local_store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "objects", SECRET)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.e2e)])  # s3: the moto server
def store(request) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


# -- shared behaviour -------------------------------------------------------------------


def test_put_get_roundtrip(store):
    data = bytes(range(256)) * 10
    store.put("jobs/j1/out.bin", data)
    assert store.get("jobs/j1/out.bin") == data
    store.put("jobs/j1/out.bin", b"replaced")
    assert store.get("jobs/j1/out.bin") == b"replaced"


def test_get_missing_key_is_not_found(store):
    with pytest.raises(NotFound, match="jobs/none/x.png"):
        store.get("jobs/none/x.png")


def test_list_and_delete_prefix(store):
    for key in ["jobs/a/1.png", "jobs/a/deep/2.txt", "jobs/ab/3.txt", "other/4.json"]:
        store.put(key, key.encode())
    # A prefix names a folder: "jobs/a" does not reach into "jobs/ab/".
    assert store.list("jobs/a") == ["jobs/a/1.png", "jobs/a/deep/2.txt"]
    assert store.list("jobs/a/") == ["jobs/a/1.png", "jobs/a/deep/2.txt"]
    assert store.list("nothing") == []

    assert store.delete_prefix("jobs/a") == 2
    assert store.list() == ["jobs/ab/3.txt", "other/4.json"]
    with pytest.raises(NotFound):
        store.get("jobs/a/1.png")
    assert store.get("jobs/ab/3.txt") == b"jobs/ab/3.txt"
    assert store.delete_prefix("jobs/a") == 0


def test_delete_prefix_refuses_the_whole_store(store):
    store.put("keep/me.txt", b"x")
    with pytest.raises(ValueError, match="whole store"):
        store.delete_prefix("")
    assert store.list() == ["keep/me.txt"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda key: repr(key)[:12])
def test_bad_keys_are_refused(store, key):
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.signed_url(key, 60)
    assert store.list() == []


@pytest.mark.parametrize("expires_in", [0, -5, 8 * 24 * 3600])
def test_link_lifetime_is_bounded(store, expires_in):
    with pytest.raises(ValueError, match="expires_in"):
        store.signed_url("a.png", expires_in)


# -- S3Store ----------------------------------------------------------------------------


def test_s3_signed_url_downloads_over_http(s3_store):
    key = "jobs/j1/my image é.png"
    s3_store.put(key, b"\x89PNG fake")
    answer = requests.get(s3_store.signed_url(key, 60), timeout=10)
    assert answer.status_code == 200
    assert answer.content == b"\x89PNG fake"
    assert answer.headers["Content-Type"] == "image/png"  # guessed from the extension


def test_s3_keys_live_under_the_prefix(s3_store):
    s3_store.put("a/b.txt", b"x")
    raw = s3_store.client.list_objects_v2(Bucket=s3_store.bucket)
    assert [item["Key"] for item in raw["Contents"]] == ["vramq/a/b.txt"]


def test_s3_delete_prefix_batches_past_a_thousand_keys(s3_store):
    with ThreadPoolExecutor(16) as pool:  # boto3 clients are thread-safe; this is just faster
        list(pool.map(lambda n: s3_store.put(f"big/{n:04}", b""), range(1001)))
    # moto accepts any batch size, so watch the requests: S3 refuses more than 1000 keys.
    batches = []
    s3_store.client.meta.events.register(
        "before-parameter-build.s3.DeleteObjects", lambda params, **_: batches.append(len(params["Delete"]["Objects"]))
    )
    assert s3_store.delete_prefix("big") == 1001
    assert batches == [1000, 1]
    assert s3_store.list() == []


def test_s3_ping_and_missing_bucket(moto_s3_endpoint):
    store = S3Store("vramq-no-such-bucket", endpoint_url=moto_s3_endpoint)
    with pytest.raises(ServiceUnavailable, match="404"):
        store.ping()
    with pytest.raises(ConfigError, match="does not exist"):
        store.get("a.txt")
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    store.ping()


def test_s3_down_fails_fast_with_service_unavailable(aws_credentials):
    store = S3Store("vramq", endpoint_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="unreachable"):
        store.ping()
    assert time.monotonic() - started < 5
    with pytest.raises(ServiceUnavailable, match="could not read 'a.txt'"):
        store.get("a.txt")


# -- LocalStore -------------------------------------------------------------------------


def _link_parts(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return parts.path, query["expires"][0], query["sig"][0]


def test_local_signed_url_is_relative_and_verifies(local_store):
    key = "jobs/j1/my image é.png"
    local_store.put(key, b"\x89PNG fake")
    path, expires, sig = _link_parts(local_store.signed_url(key, 60))
    assert path == "/v1/blobs/" + quote(key)
    assert int(expires) - time.time() == pytest.approx(60, abs=2)
    local_store.verify(key, expires, sig)
    file, content_type = local_store.open(key)
    assert (file.read_bytes(), content_type) == (b"\x89PNG fake", "image/png")


def test_local_tampered_or_expired_links_are_refused(local_store):
    _, expires, sig = _link_parts(local_store.signed_url("jobs/j1/a.png", 60))
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    refusals = {
        "signature": lambda: local_store.verify("jobs/j1/a.png", expires, flipped),
        "key": lambda: local_store.verify("jobs/j2/a.png", expires, sig),
        "expiry": lambda: local_store.verify("jobs/j1/a.png", int(expires) + 3600, sig),
        "garbage expiry": lambda: local_store.verify("jobs/j1/a.png", "soon", sig),
        "expired": lambda: local_store.verify("jobs/j1/a.png", expires, sig, now=int(expires) + 1),
    }
    for name, attempt in refusals.items():
        with pytest.raises(LinkRefused) as caught:
            attempt()
        assert caught.value.code == "forbidden"
        assert caught.value.reason == ("expired" if name == "expired" else "bad signature"), name


def test_local_links_need_the_same_secret(tmp_path):
    _, expires, sig = _link_parts(LocalStore(tmp_path, "one").signed_url("a.png", 60))
    LocalStore(tmp_path, "one").verify("a.png", expires, sig)
    with pytest.raises(LinkRefused):
        LocalStore(tmp_path, "two").verify("a.png", expires, sig)


def test_local_keys_cannot_escape_root(tmp_path, local_store):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    local_store.ping()
    # A symlink inside root is the one way left once '..' keys are refused.
    os.symlink(outside, local_store.root / "link")
    with pytest.raises(ValueError, match="outside the store root"):
        local_store.get("link/secret.txt")
    with pytest.raises(ValueError, match="outside the store root"):
        local_store.open("link/secret.txt")
    with pytest.raises(ValueError, match="outside the store root"):
        local_store.put("link/new.txt", b"x")
    assert local_store.list() == []
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_local_writes_are_atomic_and_deletes_prune_folders(local_store):
    local_store.put("jobs/j1/a.txt", b"x")
    assert [p.name for p in (local_store.root / "jobs/j1").iterdir()] == ["a.txt"]  # no temp file left
    (local_store.root / "jobs/j1/.b.txt.0123456789abcdef.tmp").write_bytes(b"half")  # a write in flight
    assert local_store.list() == ["jobs/j1/a.txt"]
    local_store.put("jobs/keep.txt", b"y")
    local_store.delete_prefix("jobs/j1")
    local_store.delete_prefix("jobs/j1/")
    assert local_store.list() == ["jobs/keep.txt"]


def test_local_ping_creates_root(tmp_path):
    store = LocalStore(tmp_path / "new" / "objects", SECRET)
    store.ping()
    assert store.root.is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ServiceUnavailable):
        LocalStore(blocker / "objects", SECRET).ping()


# -- open_store -------------------------------------------------------------------------


def test_open_store_by_url(tmp_path):
    local = open_store(f"file://{tmp_path}/objects", secret_key=SECRET)
    assert isinstance(local, LocalStore) and local.root == tmp_path / "objects"
    relative = open_store("file:objects", secret_key=SECRET, data_dir=tmp_path)
    assert isinstance(relative, LocalStore) and relative.root == tmp_path / "objects"
    s3 = open_store("s3://bucket/some/prefix/", s3_endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")


@pytest.mark.parametrize(
    "url",
    ["http://example.com/x", "/srv/objects", "file://host/x", "file:objects", "s3://", "s3://b/../x", "s3://b?x=1"],
)
def test_open_store_refuses_other_urls(url):
    with pytest.raises(ConfigError, match="storage URL"):
        open_store(url, secret_key=SECRET)


def test_open_store_local_needs_a_secret(tmp_path):
    with pytest.raises(ConfigError, match="secret key"):
        open_store(f"file://{tmp_path}")


def _python(code: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)


@pytest.mark.e2e
def test_s3_without_boto3_names_the_extra():
    # None in sys.modules makes "import boto3" fail, as if it were not installed.
    result = _python(
        "import sys; sys.modules['boto3'] = None\n"
        "from vramq.storage import S3Store\n"
        "from vramq.jobs.errors import MissingExtra\n"
        "try:\n    S3Store('b')\nexcept MissingExtra as exc:\n    print(exc)"
    )
    assert result.returncode == 0, result.stderr
    assert "vramq[s3]" in result.stdout
