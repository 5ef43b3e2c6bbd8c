#!/usr/bin/env bash
# Make the local PostgreSQL ready for the change-data-capture tests, idempotently:
#   1. the cluster is running (started if it is down);
#   2. wal_level = logical (ALTER SYSTEM + restart, only when it is not already);
#   3. max_replication_slots / max_wal_senders are at least $SEMCACHE_PG_MIN_SLOTS (default 10);
#   4. the tests' database exists (default semcache_test, created from the `test` database).
# Safe to run any number of times: when everything is already right it changes nothing and
# restarts nothing. Needs psql and pg_ctlcluster (Debian's postgresql-common) and rights to run
# pg_ctlcluster (root or the cluster owner).
#
# Environment: PGHOST (default 127.0.0.1), PGPORT (5432), PGUSER (postgres),
#              SEMCACHE_PG_TEST_DB (semcache_test), SEMCACHE_PG_MIN_SLOTS (10).
set -euo pipefail

export PGHOST="${PGHOST:-127.0.0.1}"
export PGPORT="${PGPORT:-5432}"
export PGUSER="${PGUSER:-postgres}"
TEST_DB="${SEMCACHE_PG_TEST_DB:-semcache_test}"
MIN_SLOTS="${SEMCACHE_PG_MIN_SLOTS:-10}"

log() { echo "ensure_postgres_logical: $*" >&2; }

q() { # q DB SQL -> the single value, unaligned
    psql -X -q -t -A -v ON_ERROR_STOP=1 -d "$1" -c "$2"
}

cluster_version() {
    # The one installed major version (e.g. 15); several: the highest.
    ls /etc/postgresql | sort -V | tail -n 1
}

pg_ctl_cluster() { # pg_ctl_cluster start|restart
    local version
    version="$(cluster_version)"
    log "pg_ctlcluster $version main $1"
    pg_ctlcluster --skip-systemctl-redirect "$version" main "$1"
}

accepting() {
    pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null && q postgres "SELECT 1" >/dev/null 2>&1
}

wait_ready() {
    local i
    for i in $(seq 1 120); do
        if accepting; then return 0; fi
        sleep 0.5
    done
    log "PostgreSQL did not accept connections on $PGHOST:$PGPORT within 60 s"
    return 1
}

# 1. running at all
if ! accepting; then
    pg_ctl_cluster start || true   # "already running" is not an error for us
    wait_ready
fi

# 2. + 3. settings that need a restart
needs_restart=0
wal_level="$(q postgres "SHOW wal_level")"
if [ "$wal_level" != "logical" ]; then
    log "wal_level is '$wal_level'; setting it to 'logical'"
    q postgres "ALTER SYSTEM SET wal_level = logical" >/dev/null
    needs_restart=1
fi
for setting in max_replication_slots max_wal_senders; do
    value="$(q postgres "SHOW $setting")"
    if [ "$value" -lt "$MIN_SLOTS" ]; then
        log "$setting is $value; raising it to $MIN_SLOTS"
        q postgres "ALTER SYSTEM SET $setting = $MIN_SLOTS" >/dev/null
        needs_restart=1
    fi
done
if [ "$needs_restart" = 1 ]; then
    pg_ctl_cluster restart
    wait_ready
    wal_level="$(q postgres "SHOW wal_level")"
    if [ "$wal_level" != "logical" ]; then
        log "wal_level is still '$wal_level' after the restart"
        exit 1
    fi
fi

# 4. the tests' own database
if [ "$(q postgres "SELECT count(*) FROM pg_database WHERE datname = '$TEST_DB'")" = 0 ]; then
    log "creating database $TEST_DB"
    # Two sessions may race to create it; losing the race is fine.
    psql -X -q -d test -c "CREATE DATABASE \"$TEST_DB\"" >/dev/null 2>&1 \
        || psql -X -q -d postgres -c "CREATE DATABASE \"$TEST_DB\"" >/dev/null 2>&1 \
        || [ "$(q postgres "SELECT count(*) FROM pg_database WHERE datname = '$TEST_DB'")" = 1 ]
fi

log "ready: wal_level=logical, max_replication_slots=$(q postgres "SHOW max_replication_slots"), \
max_wal_senders=$(q postgres "SHOW max_wal_senders"), database $TEST_DB"
