"""Settings are read once from VRAMQ_* into a frozen object; unset means embedded defaults."""

from __future__ import annotations

import dataclasses

import pytest

from vramq.jobs.errors import ConfigError
from vramq.jobs.settings import Settings


def test_embedded_defaults(tmp_path):
    s = Settings.from_env({"VRAMQ_DATA_DIR": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path / 'vramq.db'}"
    assert s.broker_url is None and s.embedded_broker
    assert s.storage_url == f"file://{tmp_path / 'objects'}"
    assert s.catalog is None and s.models_dir == tmp_path / "models"
    assert (s.link_ttl, s.retention_hours, s.lease_s) == (3600, 24, 30)
    # A secret is made once per installation and reused, never a well-known default.
    assert len(s.secret_key) == 64 and Settings.from_env({"VRAMQ_DATA_DIR": str(tmp_path)}).secret_key == s.secret_key
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.link_ttl = 5


def test_configured_services(tmp_path):
    s = Settings.from_env(
        {
            "VRAMQ_DATA_DIR": str(tmp_path),
            "VRAMQ_DATABASE_URL": "postgresql://db/vramq",
            "VRAMQ_BROKER_URL": "redis://r:6379/0",
            "VRAMQ_STORAGE_URL": "s3://bucket/p",
            "VRAMQ_S3_ENDPOINT_URL": "http://minio:9000",
            "VRAMQ_LINK_TTL": "60",
            "VRAMQ_SECRET_KEY": "k",
            "VRAMQ_WEBHOOK_ALLOW_HOSTS": "10.0.0.0/8, hooks.internal",
            "VRAMQ_MAX_BODY_KB": "8",
        }
    )
    assert s.broker_url == "redis://r:6379/0" and not s.embedded_broker
    assert s.link_ttl == 60 and s.secret_key == "k" and s.max_body_bytes == 8192
    assert s.webhook_allow_hosts == ("10.0.0.0/8", "hooks.internal")


@pytest.mark.parametrize(
    "name, value, needle",
    [
        ("LINK_TTL", "soon", "not an integer"),
        ("LINK_TTL", "-1", "must be positive"),
        ("RETENTION_HOURS", "0", "must be positive"),
        ("VISIBILITY_TIMEOUT", "10", "must exceed VRAMQ_LEASE_SECONDS"),
        ("RATE_LIMIT_ANONYMOUS", "-1", "must be zero or more"),
        ("FREE_DAILY_TOKENS", "lots", "not an integer"),
    ],
)
def test_bad_values_are_refused_by_name(tmp_path, name, value, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        Settings.from_env({"VRAMQ_DATA_DIR": str(tmp_path), f"VRAMQ_{name}": value})
    assert f"VRAMQ_{name}" in str(err.value)


def test_metering_settings_default_to_the_seeds_and_zero_turns_a_limit_off(tmp_path):
    s = Settings.from_env({"VRAMQ_DATA_DIR": str(tmp_path)})
    assert (s.anonymous_daily_tokens, s.free_daily_tokens) == (2500, 5000)
    assert (s.rate_limit_anonymous, s.rate_limit_keyed) == (120, 1200)
    off = Settings.from_env({"VRAMQ_DATA_DIR": str(tmp_path), "VRAMQ_RATE_LIMIT_KEYED": "0"})
    assert off.rate_limit_keyed == 0
