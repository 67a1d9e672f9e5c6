"""The FastAPI example runs as written, and the README's Django and FastAPI sections
show the examples' code (the Django one runs in ``test_django_worker.py``)."""

from __future__ import annotations

import importlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# Blocks of the README that are files of an example: ```python title="path"
TITLED = re.findall(r'```python title="([^"]+)"\n(.*?)```', README, flags=re.S)


@pytest.fixture
def fastapi_shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    pytest.importorskip("fastapi")
    monkeypatch.setenv("SHOP_DATABASE_URL", f"sqlite:///{tmp_path / 'shop.db'}")
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "fastapi_shop"))
    sys.modules.pop("app", None)
    module = importlib.import_module("app")
    try:
        yield module
    finally:
        sys.modules.pop("app", None)


def test_the_fastapi_shop_invoices_each_order_once(fastapi_shop: Any) -> None:
    from fastapi.testclient import TestClient  # noqa: PLC0415

    with TestClient(fastapi_shop.app) as client:
        ids = [client.post("/orders", params={"total": n}).json()["id"] for n in range(20)]
        assert len(set(ids)) == 20
        deadline = time.monotonic() + 30
        while client.get("/invoices").json()["invoices"] < 20:
            assert time.monotonic() < deadline, "the lifespan's worker did not invoice"
            time.sleep(0.05)
        time.sleep(0.3)  # nothing more arrives: once each
        assert client.get("/invoices").json() == {"invoices": 20}


def test_the_readme_shows_the_examples_code() -> None:
    assert {path for path, _ in TITLED} >= {
        "examples/django_shop/shop_project/settings.py",
        "examples/django_shop/shop/events.py",
        "examples/django_shop/shop/views.py",
        "examples/fastapi_shop/app.py",
    }
    for path, block in TITLED:
        assert block.strip() in (ROOT / path).read_text(), f"README block differs from {path}"
