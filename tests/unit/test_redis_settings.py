"""The Redis transport's settings and URL: refused with a clear error when wrong."""

from __future__ import annotations

import pytest

from outboxer.errors import ConfigurationError
from outboxer.transports.redis import RedisSettings, create
from outboxer.transports.redis.admin import Topology
from outboxer.transports.redis.transport import redacted
from outboxer.transports.registry import make_transport
from tests.helpers import isolated_settings


def test_the_url_names_a_server() -> None:
    transport = make_transport("redis://127.0.0.1:6379/2", isolated_settings())
    assert transport.name == "redis"
    for bad in ("redis://", "redis:///0", "redis://host:port/0", "redis://h:6379/db"):
        with pytest.raises(ConfigurationError):
            create(bad, isolated_settings())


def test_settings_are_validated_and_unknown_keys_refused() -> None:
    settings = isolated_settings(redis={"lanes": 8, "maxlen": 1000})
    transport = make_transport("redis://127.0.0.1:6379/0", settings)
    assert transport.settings.lanes == 8  # type: ignore[attr-defined]
    assert transport.settings.maxlen == 1000  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="lanes"):
        isolated_settings(redis={"lanes": 0})
    with pytest.raises(ConfigurationError, match="lane"):
        isolated_settings(redis={"lane": 4})
    with pytest.raises(ConfigurationError):
        RedisSettings.parse({"maxlen": 0})
    assert RedisSettings().maxlen is None  # trimming is off unless asked for


def test_a_key_has_one_stable_lane() -> None:
    topology = Topology(RedisSettings(lanes=4, key_prefix="p:"))
    # crc32, not Python's salted hash(): the same lane in every process.
    assert [topology.lane_of(k) for k in ("a", "b", "order-1", "")] == [3, 1, 3, 0]
    assert topology.stream("orders", 2) == "p:orders:2"
    assert topology.lease("orders", 2, "billing") == "p:orders:2:lease:billing"
    assert topology.streams("orders") == [f"p:orders:{n}" for n in range(4)]


def test_passwords_stay_out_of_messages() -> None:
    assert redacted("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redacted("redis://app:s3cret@h/1") == "redis://app:***@h/1"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
