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

start_redis() {
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
}
start_rabbit() {
    rabbitmq-server -detached || return 1
    # A node takes longer to boot than wait_for's bound.
    for _ in $(seq 1 60); do rabbit_up && break; sleep 1; done
}
start_nats() {
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}
ensure_broker() { # name, server binary, check, start command
    if ! command -v "$2" >/dev/null 2>&1; then
        echo "ensure-services: $2 not installed" >&2
        [ "${CI:-}" = "true" ] && status=1
        return
    fi
    if ! "$3"; then
        echo "ensure-services: starting $1"
        "$4" || true
    fi
    wait_for "$1" "$3" || status=1
}
ensure_broker Redis redis-server redis_up start_redis
ensure_broker RabbitMQ rabbitmq-server rabbit_up start_rabbit
ensure_broker "NATS (JetStream)" nats-server nats_up start_nats

if [ $status -ne 0 ] && [ "${CI:-}" != "true" ]; then
    echo "ensure-services: tests that need a missing server will be skipped (they fail under CI=true)" >&2
    exit 0
fi
exit $status
