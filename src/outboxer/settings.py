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

A transport owns a section of its own, named after its URL scheme (``[kafka]``,
``OUTBOXER_KAFKA__PARTITIONS``): it registers the section's model with
:func:`register_section` (``register_transport(..., settings=)`` does), and the
section is validated with everything else. A section nobody registered is refused
like any unknown key.
"""

from __future__ import annotations

import difflib
import json
import os
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from outboxer.backoff import DEFAULT_MAX_RETRY, check_max_retry
from outboxer.durations import parse_duration
from outboxer.envelope import DEFAULT_MAX_PAYLOAD_BYTES
from outboxer.errors import ConfigurationError
from outboxer.routing import (
    ServiceOverride,
    validate_source,
    validate_table_name,
    validate_topic_name,
)

CONFIG_ENV = "OUTBOXER_CONFIG"
DEFAULT_CONFIG_FILE = "outboxer.toml"
DEFAULT_URL = "sqlite:///outboxer.db"

# Every default of the engine, defined once; the loops read them from the settings.
DEFAULT_BATCH_SIZE = 100
DEFAULT_RELAY_PIPELINE = 4
DEFAULT_POLL_INTERVAL = 1.0
POLLED_POLL_INTERVAL = 0.1
"""``poll_interval`` by default where no notification wakes relays across processes
(MariaDB, SQLite, ``notify = false``): the first event after an idle spell waits at
most this long, for about ten cheap empty claims a second per service and worker."""
DEFAULT_LEASE = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_DATABASE_TIMEOUT = 60.0
DEFAULT_REDELIVER_AFTER = 600.0
DEFAULT_SWEEP_INTERVAL = 3600.0
DEFAULT_PURGE_BATCH = 500
DEFAULT_PURGE_PAUSE = 0.05
DEFAULT_SCHEDULE_HORIZON = 365 * 86400.0

ENV_PREFIX = "OUTBOXER_"

_config_file: ContextVar[Path | None] = ContextVar("outboxer_config_file", default=None)
_isolated: ContextVar[bool] = ContextVar("outboxer_settings_isolated", default=False)


def _seconds(value: Any) -> Any:
    # "7d", "15m", "30s" or a number of seconds.
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    try:
        return parse_duration(value)
    except ConfigurationError as exc:
        raise ValueError(exc.message) from None


Seconds = Annotated[float, BeforeValidator(_seconds)]
"""A duration in seconds; configuration may write it ``30s``, ``15m``, ``12h``, ``7d``."""


class RetentionSettings(BaseModel):
    """What the retention sweep of ``outboxer run`` deletes, and how (``[retention]``).

    Nothing is deleted unless an age is set. Ages are measured from a row's last
    change (``updated_at``, the database clock): for a consumed row its consumption,
    for a dead row its death.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    consumed_after: Seconds | None = Field(default=None, gt=0)
    """Delete ``consumed`` rows this long after they were consumed."""
    published_after: Seconds | None = Field(default=None, gt=0)
    """Delete ``published`` rows of services that no handler in this app consumes
    (their consumers live elsewhere, so ``published`` is their final state)."""
    dead_after: Seconds | None = Field(default=None, gt=0)
    """Delete dead letters this long after they died."""
    sweep_interval: Seconds = Field(default=DEFAULT_SWEEP_INTERVAL, gt=0)
    """Seconds between two sweeps of ``outboxer run``."""
    batch_size: int = Field(default=DEFAULT_PURGE_BATCH, ge=1, le=10_000)
    """Rows deleted per statement (and per transaction)."""
    batch_pause: Seconds = Field(default=DEFAULT_PURGE_PAUSE, ge=0)
    """Pause between two batches, so replicas keep up and locks stay short."""

    @property
    def enabled(self) -> bool:
        """True when the sweep has anything to delete."""
        return any(
            age is not None for age in (self.consumed_after, self.published_after, self.dead_after)
        )


_sections_lock = threading.Lock()
_sections: dict[str, type[BaseModel]] = {}
_sections_model: type[BaseModel] | None = None


def register_section(name: str, model: type[BaseModel]) -> None:
    """Read ``[name]`` (``OUTBOXER_NAME__KEY``) into ``model``, a pydantic model that
    validates its own keys (``extra="forbid"`` to refuse unknown ones). Register before
    settings are loaded; registering a name again replaces its model."""
    if not name.isidentifier() or name != name.lower():
        raise ConfigurationError(f"settings section must be a lowercase identifier, got {name!r}")
    if name in OutboxSettings.model_fields:
        raise ConfigurationError(f"settings section {name!r} is a setting of the outbox itself")
    global _sections_model  # noqa: PLW0603 - the registry is process-wide, as the schemes are
    with _sections_lock:
        _sections[name] = model
        _sections_model = None


def registered_sections() -> dict[str, type[BaseModel]]:
    """Every registered section and its model."""
    with _sections_lock:
        return dict(_sections)


def _sections_validator() -> type[BaseModel]:
    global _sections_model  # noqa: PLW0603
    with _sections_lock:
        if _sections_model is None:
            fields: dict[str, Any] = {
                name: (model, Field(default_factory=model)) for name, model in _sections.items()
            }
            _sections_model = create_model(
                "Sections", __config__=ConfigDict(extra="forbid", frozen=True), **fields
            )
        return _sections_model


def _merge_errors(title: str, errors: list[Any], fallback: ValidationError) -> ValidationError:
    try:
        details = [
            InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"])
            | (InitErrorDetails(ctx=e["ctx"]) if "ctx" in e else {})  # type: ignore[typeddict-item]
            for e in errors
        ]
        return ValidationError.from_exception_data(title, details)
    except (KeyError, TypeError, ValueError):  # an error type pydantic cannot rebuild
        return fallback


class ServiceSettings(BaseModel):
    """Per-service route overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    table: str | None = None
    topic: str | None = None
    group: str | None = None
    ordered: bool | None = None
    format: Literal["envelope", "cloudevents", "cloudevents-structured"] | None = None
    """The messages on the wire: outboxer's envelope, or CloudEvents 1.0 in binary
    (``cloudevents``) or structured content mode."""
    source: str | None = None
    """The CloudEvents ``source`` (default ``/outboxer/<service>``)."""

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        return None if v is None else validate_source(v)

    @field_validator("table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        return None if v is None else validate_table_name(v)

    @field_validator("topic", "group")
    @classmethod
    def _topic(cls, v: str | None) -> str | None:
        return None if v is None else validate_topic_name(v)

    def as_override(self) -> ServiceOverride:
        return ServiceOverride(
            table=self.table,
            topic=self.topic,
            group=self.group,
            ordered=self.ordered,
            format=self.format,
            source=self.source,
        )


class OutboxSettings(BaseSettings):
    """Everything that can be configured outside the code."""

    model_config = SettingsConfigDict(
        env_prefix="OUTBOXER_",
        env_nested_delimiter="__",
        case_sensitive=False,
        # A typo (max_retyr) must not be silently ignored. Unknown OUTBOXER_* variables
        # are not read at all (the environment source only looks up known fields).
        extra="forbid",
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
    poll_interval: float | None = Field(default=None, gt=0)
    """Longest wait between relay polls when nothing wakes the relay. Unset: 1 s where
    publishes in other processes wake relays (PostgreSQL with ``notify``), 0.1 s where
    polling is how relays find them (MariaDB, SQLite, ``notify = false``)."""
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
    ordered_after_dead: Literal["skip", "block"] = "skip"
    """Ordered services: when an event ends dead, the later events of its key go on
    (``skip``) or wait until it is requeued and consumed, or purged (``block``)."""
    ordered_scheduled: Literal["skip", "block"] = "skip"
    """Ordered services: while an event published for later (``delay=``,
    ``deliver_at=``) is not yet due, the later events of its key go on (``skip``)
    or wait for it (``block``)."""
    schedule_horizon: Seconds = Field(default=DEFAULT_SCHEDULE_HORIZON, gt=0)
    """How far ahead ``publish(..., delay=/deliver_at=)`` may schedule an event."""
    isolate_handlers: bool = False
    """Run every handler in its own SAVEPOINT from the start. By default a consumer
    batch first runs its handlers without savepoints (one transaction, the fast
    path) and only runs it again isolated when something fails."""
    database_timeout: float = Field(default=DEFAULT_DATABASE_TIMEOUT, ge=0)
    """Seconds each statement, COMMIT and ROLLBACK on outboxer's own engines may go
    unanswered before its connection is closed as lost (0: no bound)."""
    error_delay: float = Field(default=1.0, gt=0, description="first wait after a failed round")
    error_delay_max: float = Field(default=30.0, gt=0, description="longest wait after failures")
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    """Retention of old rows (``[retention]``, ``OUTBOXER_RETENTION__*``)."""
    _sections: dict[str, BaseModel] = PrivateAttr(default_factory=dict)
    """The transports' sections (``[kafka]``...), validated by their registered models."""

    @model_validator(mode="wrap")
    @classmethod
    def _with_sections(cls, data: Any, handler: Callable[[Any], OutboxSettings]) -> Any:
        # Registered sections are taken out before the outbox's own keys are validated
        # (any other unknown key is refused there), then validated by their models.
        raw: dict[str, Any] = {}
        if isinstance(data, Mapping):
            known = registered_sections()
            data = dict(data)
            raw = {name: data.pop(name) for name in list(data) if name in known}
        errors: list[Any] = []
        first: ValidationError | None = None
        sections: BaseModel | None = None
        try:
            sections = _sections_validator().model_validate(raw)
        except ValidationError as exc:
            errors, first = exc.errors(), exc
        try:
            settings = handler(data)
        except ValidationError as exc:
            if first is None:
                raise
            raise _merge_errors(cls.__name__, exc.errors() + errors, exc) from None
        if first is not None:
            raise first
        assert sections is not None
        settings._sections = {name: getattr(sections, name) for name in type(sections).model_fields}
        return settings

    def updated(self, **values: Any) -> OutboxSettings:
        """These settings with ``values`` changed, validated again (sections kept)."""
        return OutboxSettings.from_values(**{**self.model_dump(), **self._sections, **values})

    def section(self, name: str) -> BaseModel:
        """The validated settings of the registered section ``name`` (its defaults when
        the configuration has none)."""
        found = self._sections.get(name)
        if found is not None:
            return found
        model = registered_sections().get(name)
        if model is None:
            raise ConfigurationError(f"no settings section {name!r} is registered")
        return model()

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
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            SectionsEnvSource(settings_cls),
        ]
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
            raise ConfigurationError(invalid_configuration(exc)) from exc
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
    path = config_path(config_file)
    token = _config_file.set(path)
    try:
        return OutboxSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigurationError(invalid_configuration(exc, path)) from exc
    finally:
        _config_file.reset(token)


def _known_keys(loc: tuple[str | int, ...]) -> list[str]:
    sections = registered_sections()
    if len(loc) == 1:
        return [*OutboxSettings.model_fields, *sections]
    model: Any = sections.get(str(loc[0]), OutboxSettings)
    for part in loc[1 if loc[0] in sections else 0 : -1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def invalid_configuration(exc: ValidationError, path: Path | None = None) -> str:
    """One readable message for every problem in ``exc``; unknown keys are named with
    the closest known key (``max_retyr``: did you mean ``max_retry``?)."""
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(p) for p in loc)
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
            hint = (
                f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?)" if close else ""
            )
            problems.append(f"unknown setting {key!r}{hint}")
        else:
            problems.append(f"{key}: {error['msg']} (got {error.get('input')!r})")
    where = f" (environment or {str(path)!r})" if path is not None else ""
    return f"invalid outboxer configuration{where}: " + "; ".join(problems)


class SectionsEnvSource(PydanticBaseSettingsSource):
    """``OUTBOXER_<SECTION>__<KEY>`` of every registered section (any case), nested by
    ``__``; ``OUTBOXER_<SECTION>`` may hold the whole section as one JSON object."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # the sections are no fields; see __call__

    def __call__(self) -> dict[str, Any]:
        sections = registered_sections()
        found: dict[str, Any] = {}
        for variable, value in os.environ.items():
            upper = variable.upper()
            if not upper.startswith(ENV_PREFIX):
                continue
            path = upper[len(ENV_PREFIX) :].lower().split("__")
            if path[0] not in sections:
                continue
            if len(path) == 1:
                try:
                    whole = json.loads(value)
                except ValueError:
                    whole = value  # refused by the section's model, with its name
                found[path[0]] = _deep_merge(found.get(path[0]), whole)
                continue
            node = found.setdefault(path[0], {})
            if not isinstance(node, dict):
                continue
            for part in path[1:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    break
            else:
                node[path[-1]] = value
        return found


def _deep_merge(base: Any, update: Any) -> Any:
    if not isinstance(base, dict) or not isinstance(update, dict):
        return update
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _deep_merge(merged.get(key), value)
    return merged
