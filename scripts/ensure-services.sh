#!/usr/bin/env bash
# Makes sure the database servers and brokers the integration tests talk to are running.
# On a machine where they already run this only checks; where one has stopped
# it starts it again with the machine's own service command, and creates the
# MariaDB database `test` that the default test URL names. Exits non-zero if a
# server cannot be reached, so CI fails loudly instead of skipping tests.
set -uo pipefail

wait_for() { # name, check command...
    local name=$1; shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then echo "ensure-services: $name is up"; return 0; fi
        sleep 0.5
    done
    echo "ensure-services: $name did not come up" >&2
    return 1
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
maria_up() { mariadb-admin --protocol=tcp -h 127.0.0.1 -P 3306 -uroot ping; }

status=0
if command -v pg_isready >/dev/null 2>&1; then
    if ! pg_up; then
        echo "ensure-services: starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    fi
    wait_for PostgreSQL pg_up || status=1
else
    echo "ensure-services: PostgreSQL client tools not installed" >&2
    [ "${CI:-}" = "true" ] && status=1
fi

if command -v mariadb-admin >/dev/null 2>&1; then
    if ! maria_up; then
        echo "ensure-services: starting MariaDB"
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
    fi
    if wait_for MariaDB maria_up; then
        # The default test URL (tests/helpers.py) names the database `test`.
        mariadb --protocol=tcp -h 127.0.0.1 -P 3306 -uroot \
            -e "CREATE DATABASE IF NOT EXISTS test" || status=1
    else
        status=1
    fi
else
    echo "ensure-services: MariaDB client tools not installed" >&2
    [ "${CI:-}" = "true" ] && status=1
fi

# The brokers beyond Kafka: Redis (Streams), RabbitMQ and NATS with JetStream, from
# Debian's packages (installed with apt-get when missing and run as root), started with
# the same commands the machine starts them with when they are not answering.
apt_install() { # package...
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}
port_up() { (echo >"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1; }
redis_up() { port_up 6379 && { ! command -v redis-cli >/dev/null || redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }; }
rabbit_up() { port_up 5672; }
nats_up() { port_up 4222; }

command -v redis-server >/dev/null 2>&1 || apt_install redis-server redis-tools || true
command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server || true
command -v nats-server >/dev/null 2>&1 || apt_install nats-server || true

if command -v redis-server >/dev/null 2>&1; then
    if ! redis_up; then
        echo "ensure-services: starting Redis"
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
            --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    fi
    wait_for Redis redis_up || status=1
else
    echo "ensure-services: redis-server not installed" >&2
    [ "${CI:-}" = "true" ] && status=1
fi

if command -v rabbitmq-server >/dev/null 2>&1; then
    if ! rabbit_up; then
        echo "ensure-services: starting RabbitMQ"
        rabbitmq-server -detached || true
        # A node takes a while to boot.
        for _ in $(seq 1 60); do rabbit_up && break; sleep 1; done
    fi
    wait_for RabbitMQ rabbit_up || status=1
else
    echo "ensure-services: rabbitmq-server not installed" >&2
    [ "${CI:-}" = "true" ] && status=1
fi

if command -v nats-server >/dev/null 2>&1; then
    if ! nats_up; then
        echo "ensure-services: starting NATS (JetStream)"
        mkdir -p /var/lib/nats-server
        start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
            -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
    fi
    wait_for NATS nats_up || status=1
else
    echo "ensure-services: nats-server not installed" >&2
    [ "${CI:-}" = "true" ] && status=1
fi

if [ $status -ne 0 ] && [ "${CI:-}" != "true" ]; then
    echo "ensure-services: tests that need a missing server will be skipped (they fail under CI=true)" >&2
    exit 0
fi
exit $status
