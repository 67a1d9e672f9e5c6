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
    kafka = load_settings().section("kafka")
    assert isinstance(kafka, KafkaSettings)
    assert kafka.config == {"security.protocol": "SSL", "fetch.wait.max.ms": 10}
    for bad in ("security.protocol=SSL", '["SSL"]'):
        monkeypatch.setenv("OUTBOXER_KAFKA__CONFIG", bad)
        with pytest.raises(ConfigurationError, match="JSON object"):
            load_settings()


def test_the_kafka_section_from_toml_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from outboxer.transports.kafka.settings import KafkaSettings  # noqa: PLC0415

    config = tmp_path / "outboxer.toml"
    config.write_text(
        "[kafka]\npartitions = 6\ncreate_topics = false\n"
        '[kafka.config]\n"security.protocol" = "SSL"\n'
    )
    monkeypatch.setenv("OUTBOXER_KAFKA__SESSION_TIMEOUT_MS", "7000")
    monkeypatch.setenv("outboxer_kafka__partitions", "8")  # any case, over the file
    assert load_settings(config).section("kafka") == KafkaSettings(
        partitions=8,
        create_topics=False,
        session_timeout_ms=7000,
        config={"security.protocol": "SSL"},
    )
    monkeypatch.delenv("outboxer_kafka__partitions")
    monkeypatch.delenv("OUTBOXER_KAFKA__SESSION_TIMEOUT_MS")
    monkeypatch.setenv("OUTBOXER_KAFKA", '{"partitions": 9}')  # the section as one object
    assert load_settings(config).section("kafka").partitions == 9  # type: ignore[attr-defined]
    # No section in the configuration: the model's defaults.
    assert OutboxSettings.from_values().section("kafka") == KafkaSettings()


def test_keyword_overrides_keep_the_sections() -> None:
    settings = OutboxSettings.from_values(kafka={"partitions": 7}, max_retry=9)
    ob = Outbox("sqlite:///unused.db", settings=settings, max_retry=5)
    try:
        assert ob.settings.max_retry == 5
        assert ob.settings.section("kafka").partitions == 7  # type: ignore[attr-defined]
    finally:
        ob.close()


def test_unknown_sections_and_section_keys_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "outboxer.toml"
    config.write_text(
        "[kafka]\nsesion_timeout_ms = 6000\n[rabbitmq]\nurl = 'x'\n[activemq]\nurl = 'x'\n"
    )
    with pytest.raises(ConfigurationError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert (
        "unknown setting 'kafka.sesion_timeout_ms' (did you mean 'kafka.session_timeout_ms'?)"
        in message
    )
    assert "unknown setting 'activemq'" in message
    assert "unknown setting 'rabbitmq.url'" in message
    # The outbox's own problems and a section's are reported together.
    with pytest.raises(ConfigurationError) as caught:
        OutboxSettings.from_values(max_retyr=3, kafka={"partitions": 0})
    assert "'max_retyr' (did you mean 'max_retry'?)" in str(caught.value)
    assert "kafka.partitions: Input should be greater than or equal to 1" in str(caught.value)


def test_a_registered_section_is_read_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import BaseModel, ConfigDict  # noqa: PLC0415

    from outboxer.settings import register_section, registered_sections  # noqa: PLC0415

    class PigeonSettings(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        loft: str = "roof"
        birds: int = 2

    monkeypatch.setattr("outboxer.settings._sections", registered_sections())
    monkeypatch.setattr("outboxer.settings._sections_model", None)
    with pytest.raises(ConfigurationError, match="unknown setting 'pigeon'"):
        OutboxSettings.from_values(pigeon={"birds": 3})
    register_section("pigeon", PigeonSettings)
    assert OutboxSettings.from_values(pigeon={"birds": 3}).section("pigeon") == PigeonSettings(
        birds=3
    )
    monkeypatch.setenv("OUTBOXER_PIGEON__LOFT", "barn")
    assert load_settings().section("pigeon") == PigeonSettings(loft="barn")
    with pytest.raises(ConfigurationError, match="a setting of the outbox itself"):
        register_section("retention", PigeonSettings)
    with pytest.raises(ConfigurationError, match="no settings section 'heron'"):
        OutboxSettings.from_values().section("heron")
