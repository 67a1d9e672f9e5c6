#!/usr/bin/env bash
# Makes sure the database servers the integration tests talk to are running.
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

if [ $status -ne 0 ] && [ "${CI:-}" != "true" ]; then
    echo "ensure-services: tests that need a missing server will be skipped (they fail under CI=true)" >&2
    exit 0
fi
exit $status
