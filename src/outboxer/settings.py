"""Configuration: the one place environment variables and ``outboxer.toml`` are read.

Precedence, highest first: arguments given in code (``Outbox(...)`` keywords,
``register_service(table=...)``), ``OUTBOXER_*`` environment variables, the TOML
file, defaults. Nested keys use ``__`` in the environment::

    OUTBOXER_URL=postgresql://app@db/app
    OUTBOXER_TOPIC_PREFIX=shop
    OUTBOXER_SERVICES__TASK__TOPIC=shop.tasks.v2   # service "task" (or "Task")
    OUTBOXER_SERVICES__MY_SVC__TABLE=my_outbox     # service "my-svc": '-' is '_'

and sections in the TOML file (``./outboxer.toml``, or the path in
``OUTBOXER_CONFIG``)::

    url = "postgresql://app@db/app"
    topic_prefix = "shop"
    [services.task]
    topic = "shop.tasks.v2"
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from outboxer.backoff import DEFAULT_MAX_RETRY, check_max_retry
from outboxer.envelope import DEFAULT_MAX_PAYLOAD_BYTES
from outboxer.errors import ConfigurationError
from outboxer.routing import ServiceOverride, validate_table_name, validate_topic_name

CONFIG_ENV = "OUTBOXER_CONFIG"
DEFAULT_CONFIG_FILE = "outboxer.toml"
DEFAULT_URL = "sqlite:///outboxer.db"

# Every default of the engine, defined once; the loops read them from the settings.
DEFAULT_BATCH_SIZE = 100
DEFAULT_RELAY_PIPELINE = 4
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_LEASE = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_REDELIVER_AFTER = 600.0

_config_file: ContextVar[Path | None] = ContextVar("outboxer_config_file", default=None)
_isolated: ContextVar[bool] = ContextVar("outboxer_settings_isolated", default=False)


class ServiceSettings(BaseModel):
    """Per-service route overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    table: str | None = None
    topic: str | None = None
    group: str | None = None

    @field_validator("table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        return None if v is None else validate_table_name(v)

    @field_validator("topic", "group")
    @classmethod
    def _topic(cls, v: str | None) -> str | None:
        return None if v is None else validate_topic_name(v)

    def as_override(self) -> ServiceOverride:
        return ServiceOverride(table=self.table, topic=self.topic, group=self.group)


class OutboxSettings(BaseSettings):
    """Everything that can be configured outside the code."""

    model_config = SettingsConfigDict(
        env_prefix="OUTBOXER_",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    url: str = DEFAULT_URL
    transport: str = "local"
    """``local``, ``memory`` or a broker URL such as ``kafka://host:port``."""
    topic_prefix: str = "outboxer"
    max_retry: int = DEFAULT_MAX_RETRY
    retry_unit: float = Field(default=1.0, gt=0, description="backoff unit in seconds")
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1)
    strict_json: bool = True
    services: dict[str, ServiceSettings] = Field(default_factory=dict)
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=10_000)
    relay_pipeline: int = Field(default=DEFAULT_RELAY_PIPELINE, ge=1, le=64)
    """Batches a relay may have in flight: it claims and sends the next batch while
    the broker acknowledges the previous ones."""
    poll_interval: float = Field(default=DEFAULT_POLL_INTERVAL, gt=0)
    """Longest wait between relay polls when nothing wakes the relay."""
    poll_interval_min: float = Field(default=0.01, gt=0)
    """Poll this soon after a poll that found rows; the wait doubles while polls find
    nothing, up to ``poll_interval``."""
    lease: float = Field(default=DEFAULT_LEASE, gt=0, description="claim lease in seconds")
    shutdown_timeout: float = Field(default=DEFAULT_SHUTDOWN_TIMEOUT, gt=0)
    redeliver_after: float = Field(
        default=DEFAULT_REDELIVER_AFTER,
        ge=0,
        description="seconds after which a published, unconsumed row is sent again (0: never)",
    )
    notify: bool = True
    """PostgreSQL: ``publish`` notifies (NOTIFY, one per transaction and table) and
    workers listen (LISTEN), so a publish in another process wakes the relay at once.
    Polling stays as the fallback."""
    isolate_handlers: bool = False
    """Run every handler in its own SAVEPOINT from the start. By default a consumer
    batch first runs its handlers without savepoints (one transaction, the fast
    path) and only runs it again isolated when something fails."""
    error_delay: float = Field(default=1.0, gt=0, description="first wait after a failed round")
    error_delay_max: float = Field(default=30.0, gt=0, description="longest wait after failures")
    kafka: dict[str, Any] = Field(default_factory=dict)
    """Settings of the Kafka transport (``OUTBOXER_KAFKA__*``, ``[kafka]``), validated by
    it: see :class:`outboxer.transports.kafka.KafkaSettings`."""

    @field_validator("max_retry")
    @classmethod
    def _max_retry(cls, v: int) -> int:
        return check_max_retry(v)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return v if v == "" else validate_topic_name(v, what="topic prefix")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _isolated.get():
            return (init_settings,)
        path = _config_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def from_values(cls, **values: Any) -> OutboxSettings:
        """Settings from ``values`` and defaults only: no environment, no file."""
        token = _isolated.set(True)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigurationError(f"invalid outboxer configuration: {exc}") from exc
        finally:
            _isolated.reset(token)

    def overrides(self) -> dict[str, ServiceOverride]:
        return {name: s.as_override() for name, s in self.services.items()}


def config_path(explicit: str | Path | None = None) -> Path | None:
    """The TOML file to read: explicit, then ``$OUTBOXER_CONFIG``, then ``./outboxer.toml``."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigurationError(f"configuration file {str(path)!r} does not exist")
        return path
    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigurationError(f"{CONFIG_ENV}={env!r} does not name a file")
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> OutboxSettings:
    """Read settings from the environment and the TOML file; ``overrides`` win."""
    token = _config_file.set(config_path(config_file))
    try:
        return OutboxSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigurationError(f"invalid outboxer configuration: {exc}") from exc
    finally:
        _config_file.reset(token)
