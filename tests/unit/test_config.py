from __future__ import annotations

from pathlib import Path

import pytest

from outboxer import ConfigurationError, Outbox, OutboxSettings, load_settings
from outboxer.database.engines import async_url, safe_url, sync_url


def test_defaults_ignore_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOXER_TOPIC_PREFIX", "fromenv")
    assert OutboxSettings.from_values().topic_prefix == "outboxer"
    assert load_settings().topic_prefix == "fromenv"


def test_environment_service_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTBOXER_SERVICES__TASK__TOPIC", "env.task")
    monkeypatch.setenv("OUTBOXER_SERVICES__MY_SVC__TABLE", "my_table")
    monkeypatch.setenv("OUTBOXER_MAX_RETRY", "5")
    ob = Outbox(f"sqlite:///{tmp_path / 'x.db'}")
    assert ob.routes.route_for_service("task").topic == "env.task"
    assert ob.routes.route_for_service("my-svc").table_name == "my_table"
    assert ob.retry_policy.max_retry == 5
    ob.close()


def test_toml_file_and_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outboxer.toml").write_text(
        'topic_prefix = "fromfile"\nmax_retry = 9\n'
        '[services.task]\ntopic = "file.task"\ngroup = "file.group"\n'
    )
    monkeypatch.setenv("OUTBOXER_SERVICES__TASK__TOPIC", "env.task")
    settings = load_settings()
    assert settings.topic_prefix == "fromfile"
    assert settings.max_retry == 9
    task = settings.services["task"]
    assert (task.topic, task.group) == ("env.task", "file.group")
    ob = Outbox(f"sqlite:///{tmp_path / 'x.db'}", max_retry=3)
    assert ob.retry_policy.max_retry == 3  # code wins
    route = ob.register_service("task")
    assert (route.topic, route.group_id) == ("env.task", "file.group")
    ob.close()


def test_explicit_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "custom.toml"
    path.write_text('url = "sqlite:///custom.db"\n')
    assert load_settings(path).url == "sqlite:///custom.db"
    monkeypatch.setenv("OUTBOXER_CONFIG", str(path))
    assert load_settings().url == "sqlite:///custom.db"
    monkeypatch.setenv("OUTBOXER_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError, match=r"missing\.toml"):
        load_settings()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("OUTBOXER_SERVICES__TASK__TABLE", "bad-table"),
        ("OUTBOXER_SERVICES__TASK__TOPIC", "bad topic"),
        ("OUTBOXER_MAX_RETRY", "0"),
        ("OUTBOXER_TOPIC_PREFIX", "a/b"),
        ("OUTBOXER_MAX_PAYLOAD_BYTES", "-1"),
    ],
)
def test_invalid_configuration_is_rejected_at_load(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str
) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigurationError):
        load_settings()


def test_invalid_keyword_is_rejected() -> None:
    with pytest.raises(ConfigurationError):
        Outbox("sqlite:///x.db", settings=OutboxSettings.from_values(), max_retry=0)


@pytest.mark.parametrize(
    ("url", "sync", "async_"),
    [
        ("sqlite:///a.db", "sqlite+pysqlite", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///a.db", "sqlite+pysqlite", "sqlite+aiosqlite"),
        ("postgresql://u@h/d", "postgresql+psycopg", "postgresql+psycopg"),
        ("postgresql+psycopg2://u@h/d", "postgresql+psycopg", "postgresql+psycopg"),
        ("postgresql+asyncpg://u@h/d", "postgresql+psycopg", "postgresql+asyncpg"),
        ("mysql://u@h/d", "mysql+pymysql", "mysql+aiomysql"),
        ("mariadb://u@h/d", "mariadb+pymysql", "mariadb+aiomysql"),
        ("mysql+asyncmy://u@h/d", "mysql+pymysql", "mysql+asyncmy"),
    ],
)
def test_driver_derivation(url: str, sync: str, async_: str) -> None:
    assert sync_url(url).drivername == sync
    assert async_url(url).drivername == async_


def test_unsupported_and_memory_urls() -> None:
    with pytest.raises(ConfigurationError, match="oracle"):
        sync_url("oracle://u@h/d")
    with pytest.raises(ConfigurationError, match="in-memory"):
        sync_url("sqlite://")
    with pytest.raises(ConfigurationError):
        sync_url("::not a url::")


def test_password_never_shown() -> None:
    assert "s3cret" not in safe_url("postgresql://app:s3cret@db/app")
    ob = Outbox("postgresql://app:s3cret@db/app", settings=OutboxSettings.from_values())
    assert "s3cret" not in repr(ob)


def test_kafka_client_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # librdkafka's setting names contain dots: the environment gives them as one JSON object.
    from outboxer.transports.kafka.settings import KafkaSettings  # noqa: PLC0415

    monkeypatch.setenv(
        "OUTBOXER_KAFKA__CONFIG", '{"security.protocol": "SSL", "fetch.wait.max.ms": 10}'
    )
    assert KafkaSettings.parse(load_settings().kafka).config == {
        "security.protocol": "SSL",
        "fetch.wait.max.ms": 10,
    }
    for bad in ("security.protocol=SSL", '["SSL"]'):
        monkeypatch.setenv("OUTBOXER_KAFKA__CONFIG", bad)
        with pytest.raises(ConfigurationError, match="JSON object"):
            KafkaSettings.parse(load_settings().kafka)
