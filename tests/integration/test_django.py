"""The Django integration on SQLite, PostgreSQL and MariaDB, in this process.

Django is configured by this module's fixture (three database aliases on scratch
databases, migrated by Django's ``migrate``, which runs ``MigrateOutbox``) and
unconfigured when the module ends, so no other test module sees Django settings.
Workers that are killed and restarted are in ``test_django_worker.py``.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")

from django.conf import settings as django_settings
from django.db import connections, transaction
from sqlalchemy import func, select

from outboxer import OutboxSettings
from outboxer.database.connector import READ_ONLY
from outboxer.errors import (
    ConfigurationError,
    MessageNotFoundError,
    StoreError,
    TransactionRequiredError,
)
from outboxer.models import Status
from outboxer.testing import drain_sync
from tests.helpers import ServerDatabase

pytestmark = pytest.mark.django

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django_shop"
ALIASES = ("default", "postgresql", "mariadb")


@pytest.fixture(scope="module")
def django_project(
    pg_database: ServerDatabase, mysql_database: ServerDatabase, tmp_path_factory: Any
) -> Iterator[None]:
    """Django configured with one alias per database, migrated; unconfigured after."""
    import django  # noqa: PLC0415
    import pymysql  # noqa: PLC0415
    from django.conf import empty  # type: ignore[attr-defined]  # noqa: PLC0415
    from django.core.management import call_command  # noqa: PLC0415

    from outboxer.contrib.django import django_database  # noqa: PLC0415

    pymysql.install_as_MySQLdb()  # Django's MySQL backend on PyMySQL (no mysqlclient)
    sys.path.insert(0, str(EXAMPLE))
    sqlite = tmp_path_factory.mktemp("django") / "default.db"
    django_settings.configure(
        DEBUG=False,
        SECRET_KEY="test",
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=[
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "outboxer.contrib.django",
            "shop",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        ROOT_URLCONF="shop_project.urls",
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ]
                },
            }
        ],
        DATABASES={
            "default": django_database(f"sqlite:///{sqlite}"),
            # Kept between operations, as a worker's should be: the restart test needs it.
            "postgresql": {**django_database(pg_database.url), "CONN_MAX_AGE": 600},
            "mariadb": {**django_database(mysql_database.url), "CONN_MAX_AGE": 600},
        },
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        USE_TZ=True,
        OUTBOXER_APP="shop.events:outbox",
    )
    django.setup()
    try:
        for alias in ALIASES:
            call_command("migrate", database=alias, verbosity=0)
        yield
    finally:
        from shop.events import outbox as shop_outbox  # noqa: PLC0415

        shop_outbox.close()
        connections.close_all()
        django_settings._wrapped = empty
        sys.path.remove(str(EXAMPLE))


@pytest.fixture(params=ALIASES)
def outbox(request: pytest.FixtureRequest, django_project: None) -> Iterator[Any]:
    """A DjangoOutbox on one alias with a fresh service (its table migrated)."""
    from outboxer.contrib.django import DjangoOutbox  # noqa: PLC0415

    ob = DjangoOutbox(
        using=request.param,
        settings=OutboxSettings.from_values(retry_unit=0.01, poll_interval=0.05),
    )
    service = f"svc_{uuid.uuid4().hex[:10]}"
    ob.register_event("order.placed", service=service)
    ob.register_event("order.batched", service=service)
    ob.migrate()
    ob.service = service  # type: ignore[attr-defined]
    try:
        yield ob
    finally:
        ob.close()
        with ob.db.sync_engine.begin() as conn:
            ob.table_for(service).drop(conn)
        ob.db.dispose()


def rows(ob: Any) -> list[tuple[str, Any, str]]:
    """(event_type, payload, status) of every row of the test's service."""
    table = ob.table_for(ob.service)
    with ob.db.sync_engine.connect().execution_options(**READ_ONLY) as conn:
        found = conn.execute(
            select(table.c.event_type, table.c.payload, table.c.status).order_by(table.c.id)
        ).all()
    return [(r.event_type, r.payload, r.status) for r in found]


def test_publish_commits_with_the_atomic_block(outbox: Any) -> None:
    from shop.models import Order  # noqa: PLC0415

    with transaction.atomic(using=outbox.using):
        order = Order.objects.using(outbox.using).create(total=10)
        oid = outbox.publish("order.placed", {"id": order.id}, key=f"order-{order.id}")
        # Not visible to another connection before the commit.
        assert rows(outbox) == []
    assert oid > 0
    [(event_type, payload, status)] = rows(outbox)
    assert event_type == "order.placed"
    assert f'"id":{order.id}' in payload.replace(" ", "")
    assert status == Status.PENDING.value


def test_an_atomic_block_that_raises_leaves_no_event(outbox: Any) -> None:
    from shop.models import Order  # noqa: PLC0415

    before = Order.objects.using(outbox.using).count()

    def place() -> None:
        with transaction.atomic(using=outbox.using):
            order = Order.objects.using(outbox.using).create(total=10)
            outbox.publish("order.placed", {"id": order.id})
            raise RuntimeError("after publishing")

    with pytest.raises(RuntimeError, match="after publishing"):
        place()
    assert rows(outbox) == []
    assert Order.objects.using(outbox.using).count() == before


def test_nested_blocks_and_savepoints(outbox: Any) -> None:
    using = outbox.using

    def dropped() -> None:
        with transaction.atomic(using=using):
            outbox.publish("order.placed", {"n": "inner dropped"})
            raise ValueError("rolled back to the savepoint")

    with transaction.atomic(using=using):
        outbox.publish("order.placed", {"n": "outer"})
        with transaction.atomic(using=using):  # a savepoint that commits with the outer
            outbox.publish("order.placed", {"n": "inner kept"})
        with pytest.raises(ValueError, match="rolled back"):
            dropped()
        sid = transaction.savepoint(using=using)
        outbox.publish("order.placed", {"n": "manual savepoint"})
        transaction.savepoint_rollback(sid, using=using)
        outbox.publish("order.placed", {"n": "last"})
    payloads = [payload for _, payload, _ in rows(outbox)]
    assert [p.split('"n":')[1].strip(' "}') for p in payloads] == [
        "outer",
        "inner kept",
        "last",
    ]


def test_publish_outside_an_atomic_block_is_refused(outbox: Any) -> None:
    with pytest.raises(TransactionRequiredError, match=r"transaction\.atomic"):
        outbox.publish("order.placed", {"n": 1})
    assert rows(outbox) == []
    outbox.publish("order.placed", {"n": 2}, autocommit=True)
    assert len(rows(outbox)) == 1


def test_a_rejected_event_leaves_the_block_usable(outbox: Any) -> None:
    from shop.models import Order  # noqa: PLC0415

    from outboxer.errors import RoutingError  # noqa: PLC0415

    with transaction.atomic(using=outbox.using):
        with pytest.raises(RoutingError):
            outbox.publish("not.registered", {})
        order = Order.objects.using(outbox.using).create(total=3)
        outbox.publish("order.placed", {"id": order.id})
    assert len(rows(outbox)) == 1


def test_a_publish_that_failed_in_the_database_rolls_the_block_back(outbox: Any) -> None:
    """As an ORM write that fails: a caller that catches the error cannot commit its
    business writes without the event (on any database)."""
    from shop.models import Order  # noqa: PLC0415

    using = outbox.using
    outbox.register_event("order.lost", service=f"{outbox.service}_missing")  # no table
    before = Order.objects.using(using).count()
    with transaction.atomic(using=using):
        Order.objects.using(using).create(total=7)
        with pytest.raises(StoreError):
            outbox.publish("order.lost", {"n": 1})
    assert Order.objects.using(using).count() == before


def test_apublish_from_async_code(outbox: Any) -> None:
    import asyncio  # noqa: PLC0415

    async def view() -> int:
        return await outbox.apublish("order.placed", {"n": 1}, autocommit=True)

    assert asyncio.run(view()) > 0
    assert len(rows(outbox)) == 1


def invoices(using: str, order_ids: list[int]) -> dict[int, int]:
    from django.db.models import Count  # noqa: PLC0415
    from shop.models import Invoice  # noqa: PLC0415

    found = (
        Invoice.objects.using(using)
        .filter(order_id__in=order_ids)
        .values("order_id")
        .annotate(n=Count("id"))
    )
    return {row["order_id"]: row["n"] for row in found}


def test_handlers_write_with_the_orm_once_and_a_failure_rolls_back(outbox: Any) -> None:
    from shop.models import Invoice, Order  # noqa: PLC0415

    using = outbox.using
    calls: dict[int, int] = {}

    @outbox.handler("order.placed")
    def create_invoice(event: Any) -> None:
        order_id = event.payload["id"]
        calls[order_id] = calls.get(order_id, 0) + 1
        Invoice.objects.using(using).create(order_id=order_id)
        if event.payload.get("fail") and calls[order_id] == 1:
            # The invoice above must roll back with this attempt.
            raise RuntimeError("first attempt fails")

    ids = []
    with transaction.atomic(using=using):
        for n in range(5):
            order = Order.objects.using(using).create(total=n)
            ids.append(order.id)
            outbox.publish("order.placed", {"id": order.id, "fail": n == 2})
    drain_sync(outbox, timeout=60)
    assert invoices(using, ids) == dict.fromkeys(ids, 1)
    assert calls[ids[2]] == 2
    assert [status for _, _, status in rows(outbox)] == [Status.CONSUMED.value] * 5
    table = outbox.table_for(outbox.service)
    with outbox.db.sync_engine.connect() as conn:
        retried = conn.execute(
            select(func.count()).select_from(table).where(table.c.retry_count > 0)
        ).scalar_one()
    assert retried == 1


def test_batch_handlers_write_with_the_orm(outbox: Any) -> None:
    from shop.models import Invoice, Order  # noqa: PLC0415

    using = outbox.using
    seen: list[int] = []

    @outbox.batch_handler("order.batched")
    def create_invoices(events: list[Any]) -> None:
        seen.append(len(events))
        Invoice.objects.using(using).bulk_create(
            [Invoice(order_id=e.payload["id"]) for e in events]
        )

    with transaction.atomic(using=using):
        ids = [Order.objects.using(using).create(total=1).id for _ in range(6)]
        for order_id in ids:
            outbox.publish("order.batched", {"id": order_id})
    drain_sync(outbox, timeout=60)
    assert invoices(using, ids) == dict.fromkeys(ids, 1)
    assert sum(seen) == 6
    assert max(seen) > 1  # consecutive events came in one call


def test_a_handler_that_swallows_a_database_error_fails_its_event(outbox: Any) -> None:
    """Django marks its block for rollback when an ORM write fails inside it; a handler
    that catches the error and returns must not count as handled (its block would roll
    back while its event is marked consumed, or the whole batch silently)."""
    from django.db import IntegrityError  # noqa: PLC0415
    from shop.models import Invoice, Order  # noqa: PLC0415

    using = outbox.using
    with transaction.atomic(using=using):
        taken = Order.objects.using(using).create(total=1).id
        outbox.publish("order.placed", {"id": taken}, max_retry=2)

    @outbox.handler("order.placed")
    def swallow(event: Any) -> None:
        Invoice.objects.using(using).create(order_id=event.payload["id"])
        with contextlib.suppress(IntegrityError):
            Order.objects.using(using).create(id=event.payload["id"], total=2)  # taken

    drain_sync(outbox, timeout=30)
    assert invoices(using, [taken]) == {}
    [(_, _, status)] = rows(outbox)
    assert status == Status.DEAD.value
    table = outbox.table_for(outbox.service)
    with outbox.db.sync_engine.connect() as conn:
        error = conn.execute(select(table.c.last_error)).scalar_one()
    assert "marked for rollback" in (error or "")


def test_async_handlers_are_refused(outbox: Any) -> None:
    async def handle(event: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="plain functions"):
        outbox.handler("order.placed")(handle)


def test_a_handler_cannot_commit_the_transaction(outbox: Any) -> None:
    using = outbox.using

    @outbox.handler("order.placed")
    def commits(event: Any) -> None:
        with connections[using].cursor() as cursor:
            cursor.execute("COMMIT")

    outbox.publish("order.placed", {"n": 1}, autocommit=True)
    with pytest.raises(TimeoutError):
        drain_sync(outbox, timeout=3)
    [(_, _, status)] = rows(outbox)
    assert status in (Status.PUBLISHED.value, Status.PENDING.value, Status.DEAD.value)
    table = outbox.table_for(outbox.service)
    with outbox.db.sync_engine.connect() as conn:
        error = conn.execute(select(table.c.last_error)).scalar_one()
    assert "tried to end the transaction" in (error or "")


@pytest.fixture
def admin_client(django_project: None) -> Iterator[Any]:
    """A signed-in superuser, and the outbox of OUTBOXER_APP (SQLite alias)."""
    from django.contrib.auth.models import User  # noqa: PLC0415
    from django.test import Client  # noqa: PLC0415

    name = f"admin_{uuid.uuid4().hex[:8]}"
    user = User.objects.create_superuser(name, f"{name}@example.com", "pw")
    client = Client()
    client.force_login(user)
    try:
        yield client
    finally:
        user.delete()


def test_the_admin_lists_filters_requeues_and_purges_dead_letters(admin_client: Any) -> None:
    from shop.events import outbox as shop  # noqa: PLC0415

    live = shop.publish("order.placed", {"id": 1}, key="order-live", autocommit=True)
    dead = shop.publish(
        "order.placed", {"id": 2}, key="order-dead", event_id="evt-dead", autocommit=True
    )
    shop.store("billing").mark_dead(dead, "the invoice service refused the order")
    url = "/admin/outboxer/outboxmessage/"

    page = admin_client.get(url)
    assert page.status_code == 200
    body = page.content.decode()
    assert "order-live" in body
    assert "order-dead" in body

    only_dead = admin_client.get(url, {"status": "dead"}).content.decode()
    assert "order-dead" in only_dead
    assert "order-live" not in only_dead
    assert "refused the order" in only_dead
    by_key = admin_client.get(url, {"q": "order-live"}).content.decode()
    assert "order-live" in by_key
    assert "order-dead" not in by_key
    by_event_id = admin_client.get(url, {"q": "evt-dead"}).content.decode()
    assert "order-dead" in by_event_id
    assert "order-live" not in by_event_id
    other_type = admin_client.get(url, {"event_type": "order.cancelled"}).content.decode()
    assert "order-live" not in other_type
    assert admin_client.get(url, {"status": "nonsense"}).status_code == 400

    # Read-only: no add or change form, no delete.
    assert admin_client.get(f"{url}add/").status_code in (403, 404, 302)

    done = admin_client.post(url, {"action": "requeue", "ids": [str(dead)], "service": "billing"})
    assert done.status_code == 302
    assert shop.admin.message(dead, service="billing").status is Status.PENDING
    assert shop.admin.message(live, service="billing").status is Status.PENDING

    shop.store("billing").mark_dead(dead, "refused again")
    done = admin_client.post(url, {"action": "purge_dead", "service": "billing"})
    assert done.status_code == 302
    with pytest.raises(MessageNotFoundError):
        shop.admin.message(dead, service="billing")
    assert shop.admin.message(live, service="billing").status is Status.PENDING

    # Both actions are in the audit trail under the signed-in Django user.
    trail = shop.admin.audit(services=["billing"]).entries
    actions = [(e.action, e.actor) for e in trail[:2]]
    user = admin_client.session.get("_auth_user_id")
    assert user is not None
    assert [a for a, _ in actions] == ["purge", "requeue"]
    assert all(actor.startswith("django:") and actor != "django:" for _, actor in actions)


def test_the_admin_needs_a_staff_user(django_project: None) -> None:
    from django.test import Client  # noqa: PLC0415

    page = Client().get("/admin/outboxer/outboxmessage/")
    assert page.status_code == 302
    assert "/admin/login/" in page["Location"]


@pytest.mark.parametrize("outbox", ["postgresql", "mariadb"], indirect=True)
def test_the_worker_connects_again_after_its_connections_are_killed(outbox: Any) -> None:
    """What a database restart does to the worker's connections: they die under it.
    The operation in flight fails with a StoreError; the next one connects again."""
    from shop.models import Invoice  # noqa: PLC0415

    from outboxer.errors import StoreError  # noqa: PLC0415

    store = outbox.store(outbox.service)
    store.status()  # the connector's thread now holds a connection
    engine = outbox.db.sync_engine
    with engine.connect() as conn:
        mine = conn.exec_driver_sql(
            "SELECT CONNECTION_ID()" if "mysql" in engine.name else "SELECT pg_backend_pid()"
        ).scalar_one()
        if "mysql" in engine.name:
            ids = [
                r[0]
                for r in conn.exec_driver_sql(
                    "SELECT id FROM information_schema.processlist WHERE db = DATABASE()"
                )
                if r[0] != mine
            ]
            for other in ids:
                conn.exec_driver_sql(f"KILL {int(other)}")
        else:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> %s",
                (mine,),
            )
            ids = [1]
    assert ids, "the connector held no connection to kill"
    outcomes = []
    for _ in range(3):
        try:
            store.status()
            outcomes.append("ok")
        except StoreError:
            outcomes.append("error")
    # The operation in flight fails once (the killed connection), then it connects again.
    assert outcomes == ["error", "ok", "ok"], outcomes

    using = outbox.using

    @outbox.handler("order.placed")
    def invoice(event: Any) -> None:
        Invoice.objects.using(using).create(order_id=event.payload["id"])

    # This thread's connection died too; a request would fail and Django would drop it.
    connections[using].close()
    outbox.publish("order.placed", {"id": 777_000}, autocommit=True)
    drain_sync(outbox, timeout=30)
    assert invoices(using, [777_000]) == {777_000: 1}


@pytest.mark.parametrize("outbox", ["default"], indirect=True)
def test_the_worker_connects_again_to_other_aliases_its_handlers_use(outbox: Any) -> None:
    """Django's close_old_connections covers every alias: a handler that reads another
    database keeps working after that database's connections die."""
    from shop.models import Order  # noqa: PLC0415

    seen: list[int] = []

    @outbox.handler("order.placed")
    def read_elsewhere(event: Any) -> None:
        seen.append(Order.objects.using("postgresql").count())

    outbox.publish("order.placed", {"n": 1}, autocommit=True)
    drain_sync(outbox, timeout=30)  # the worker's thread now holds a PostgreSQL connection
    with connections["postgresql"].cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    outbox.publish("order.placed", {"n": 2}, autocommit=True, max_retry=5)
    drain_sync(outbox, timeout=30)
    assert [status for _, _, status in rows(outbox)] == [Status.CONSUMED.value] * 2


def test_bad_configuration_is_refused_with_a_typed_error(
    django_project: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from outboxer.contrib.django import database_url, django_database, load_outbox  # noqa: PLC0415

    with pytest.raises(ConfigurationError, match="unsupported database"):
        django_database("oracle://scott@db/orcl")
    assert django_database("postgresql+psycopg://u:p@h:5433/d") == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "d",
        "USER": "u",
        "PASSWORD": "p",
        "HOST": "h",
        "PORT": "5433",
    }
    with pytest.raises(ConfigurationError, match="no database 'nope'"):
        database_url("nope")
    monkeypatch.setattr(
        django_settings,
        "DATABASES",
        {
            "memory": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
            "oracle": {"ENGINE": "django.db.backends.oracle", "NAME": "x"},
        },
    )
    with pytest.raises(ConfigurationError, match="in-memory SQLite"):
        database_url("memory")
    with pytest.raises(ConfigurationError, match="outboxer supports"):
        database_url("oracle")
    monkeypatch.setattr(django_settings, "OUTBOXER_APP", "shop.models")
    with pytest.raises(ConfigurationError, match="OUTBOXER_APP"):
        load_outbox()
    monkeypatch.setattr(django_settings, "OUTBOXER_APP", "shop.models:Order")
    with pytest.raises(ConfigurationError, match="not a DjangoOutbox"):
        load_outbox()


def test_the_migrations_match_the_models(django_project: None) -> None:
    """outboxer's own migration (the admin's unmanaged model) and the example's leave
    nothing for ``makemigrations`` to write."""
    from django.core.management import call_command  # noqa: PLC0415

    call_command("makemigrations", "outboxer", "shop", check=True, dry_run=True, verbosity=0)
