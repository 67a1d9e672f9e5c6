"""The console's access rules that need no server: which addresses are local, where
a form may send the browser back to, the session cookie's value, and the hint when
the ``web`` extra is missing."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from outboxer.cli import app
from outboxer.web.security import is_loopback, safe_next, session_value


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
