"""The console's access rules that need no server: which addresses are local, where
a form may send the browser back to, the session cookie's value, the hint when the
``web`` extra is missing, host names and origins, tokens, and the throttle's bound."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from outboxer.cli import app
from outboxer.errors import ConfigurationError
from outboxer.web.security import (
    MIN_TOKEN_LENGTH,
    Throttle,
    allowed_host_names,
    check_token,
    generate_token,
    is_loopback,
    origin_matches,
    safe_next,
    session_value,
    split_host,
    trusted_networks,
)


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.com", False),
    ],
)
def test_loopback_addresses(host: str, local: bool) -> None:
    assert is_loopback(host) is local


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/dead?service=a", "/dead?service=a"),
        (None, "/"),
        ("", "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("dead", "/"),
    ],
)
def test_only_local_paths_are_followed(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_the_session_cookie_proves_the_token_without_holding_it() -> None:
    value = session_value("s3cret")
    assert "s3cret" not in value
    assert value == session_value("s3cret")
    assert value != session_value("s3cret2")


def test_a_missing_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "outboxer.web", None)
    result = CliRunner().invoke(app, ["--app", "x:outbox", "web"])
    assert result.exit_code == 1
    assert "pip install 'outboxer[web]'" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost.:8089", ("localhost", 8089)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8089", ("::1", 8089)),
        ("[0:0::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("console.example.com", ("console.example.com", None)),
        ("my_svc.internal:1", ("my_svc.internal", 1)),
        ("", None),
        (":8089", None),
        ("host:0", None),
        ("host:65536", None),
        ("host:http", None),
        ("[::1", None),
        ("[::1]x", None),
        ("a b", None),
        ("evil.example/x", None),
        ("-bad.example", None),
        ("a" * 64 + ".example", None),
    ],
)
def test_host_headers(value: str, expected: tuple[str, int | None] | None) -> None:
    assert split_host(value) == expected


@pytest.mark.parametrize(
    ("origin", "host", "https", "same_origin"),
    [
        ("http://127.0.0.1:8089", "127.0.0.1:8089", False, True),
        ("http://127.0.0.1:8089/dead?x=1", "127.0.0.1:8089", False, True),  # a Referer
        ("http://localhost", "localhost:80", False, True),
        ("https://console.example.com", "console.example.com", True, True),
        ("https://console.example.com:443", "Console.Example.com", True, True),
        ("http://[::1]:8089", "[::1]:8089", False, True),
        ("https://console.example.com", "console.example.com", False, False),
        ("http://console.example.com", "console.example.com", True, False),
        ("http://127.0.0.1:9999", "127.0.0.1:8089", False, False),
        ("http://localhost:8089", "127.0.0.1:8089", False, False),
        ("http://attacker.example:8089", "127.0.0.1:8089", False, False),
        ("null", "127.0.0.1:8089", False, False),
        ("file:///etc/passwd", "127.0.0.1:8089", False, False),
        ("http://127.0.0.1:99999", "127.0.0.1:8089", False, False),
    ],
)
def test_origin_of_changes(origin: str, host: str, https: bool, same_origin: bool) -> None:
    assert origin_matches(origin, host, https=https) is same_origin


def test_allowed_hosts_and_proxies_are_parsed_and_checked() -> None:
    assert allowed_host_names(["a.example, B.example", "c.example  10.0.0.1", "a.example"]) == (
        "a.example",
        "b.example",
        "c.example",
        "10.0.0.1",
    )
    assert [str(n) for n in trusted_networks(["127.0.0.1,10.0.0.0/8", "::1"])] == [
        "127.0.0.1/32",
        "10.0.0.0/8",
        "::1/128",
    ]
    for bad in ("*", "a.example:443", "https://a.example", "a/b"):
        with pytest.raises(ConfigurationError):
            allowed_host_names([bad])
    with pytest.raises(ConfigurationError, match="proxy"):
        trusted_networks(["proxy.example"])


def test_weak_tokens_are_refused_off_loopback() -> None:
    check_token(None, bind="0.0.0.0")  # no token: the command line refuses that itself
    check_token("abc", bind="127.0.0.1")  # on loopback a short token is the user's choice
    check_token("x" * MIN_TOKEN_LENGTH, bind="0.0.0.0")
    check_token(generate_token(), bind="::")
    for bind, elsewhere in (("0.0.0.0", False), ("10.1.2.3", False), ("127.0.0.1", True)):
        with pytest.raises(ConfigurationError, match="at least 16 random characters"):
            check_token("x" * (MIN_TOKEN_LENGTH - 1), bind=bind, reached_from_elsewhere=elsewhere)
    for bad in (" padded-token-of-16+", "token-of-16-chars\n", "tab\tinside-a-long-token"):
        with pytest.raises(ConfigurationError, match="white space at an end or control characters"):
            check_token(bad, bind="127.0.0.1")
    assert len(generate_token()) >= 40
    assert generate_token() != generate_token()


def test_throttle_forgets_the_oldest_addresses_beyond_its_bound() -> None:
    now = [0.0]
    throttle = Throttle(free=1, base=1, cap=1, forget=1, max_clients=3, clock=lambda: now[0])
    for i in range(5):
        assert throttle.failed(f"192.0.2.{i}") == (1, 1)
    assert throttle.retry_after("192.0.2.0") is None  # dropped: beyond the bound
    assert throttle.retry_after("192.0.2.4") == 1
    assert Throttle.key("::ffff:192.0.2.4") == "192.0.2.4"
    assert Throttle.key("2001:db8::1") == "2001:db8::/64"
    now[0] = 1.0
    assert throttle.retry_after("192.0.2.4") is None
    with pytest.raises(ConfigurationError):
        Throttle(free=0)
