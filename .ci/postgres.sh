#!/usr/bin/env bash
# A PostgreSQL server for the deployment tests (tests/deployment), from Debian's `postgresql` package.
#
#   bash .ci/postgres.sh                     install if missing, start the cluster, create the user
#   bash .ci/postgres.sh --database NAME     ... and (re)create an empty database NAME owned by the user
#   bash .ci/postgres.sh --drop NAME         drop database NAME (the tests' teardown)
#
# Idempotent: a running cluster and an existing user are left as they are. The last line of stdout is
# the SQLAlchemy URL of the database (or of the server with no database), so a caller can read it.
# Our own cluster on its own port (not Debian's `main` on 5432), so another PostgreSQL on this machine
# is never touched. Settings: REMOTE_ML_PG_PORT (5433), REMOTE_ML_PG_CLUSTER (remote_ml),
# REMOTE_ML_PG_USER / REMOTE_ML_PG_PASSWORD (remote_ml / rml-pg-7c41). The password is not a word of any
# name here: Airflow's secrets masker masks the metadata database's password wherever it appears, and a
# password "remote_ml" turned every artifact path, DAG id and module name in logs and API answers into "***".
set -euo pipefail

PORT="${REMOTE_ML_PG_PORT:-5433}"
CLUSTER="${REMOTE_ML_PG_CLUSTER:-remote_ml}"
PG_USER="${REMOTE_ML_PG_USER:-remote_ml}"
PG_PASSWORD="${REMOTE_ML_PG_PASSWORD:-rml-pg-7c41}"
DATABASE=""
DROP=""

while [ $# -gt 0 ]; do
    case "$1" in
        --database) DATABASE="$2"; shift 2 ;;
        --drop) DROP="$2"; shift 2 ;;
        *) echo "postgres.sh: unknown argument $1 (use --database NAME or --drop NAME)" >&2; exit 2 ;;
    esac
done
for name in "$DATABASE" "$DROP" "$PG_USER" "$CLUSTER"; do
    # Names go into SQL and paths unquoted: allow only what needs no quoting.
    if [ -n "$name" ] && ! [[ "$name" =~ ^[a-z_][a-z0-9_]*$ ]]; then
        echo "postgres.sh: '$name' is not a plain lower-case identifier ([a-z_][a-z0-9_]*)" >&2; exit 2
    fi
done

as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -n -u postgres "$@"; fi
}

# One caller at a time: two test sessions starting together must not both create the cluster.
exec 9>"${TMPDIR:-/tmp}/remote-ml-postgres.lock"
flock -w 600 9 || { echo "postgres.sh: another postgres.sh held the lock for 10 minutes" >&2; exit 1; }

if ! command -v pg_createcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "postgres.sh: PostgreSQL is not installed and this is not root: apt-get install postgresql" >&2
        exit 1
    fi
    echo "postgres.sh: installing Debian's postgresql package" >&2
    export DEBIAN_FRONTEND=noninteractive
    say() { printf 'postgres.sh: %s\n' "$*" >&2; }
    # Wait for another apt/dpkg (CI's docker-engine.sh, a parallel session) instead of failing at once;
    # `apt-get update` needs the retry of apt.sh: it does not wait for the lists lock by itself.
    # shellcheck source=/dev/null
    source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
    apt_get update -q >&2
    apt_get install -y -q --no-install-recommends postgresql >&2
fi

VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
if ! pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c {found = 1} END {exit !found}'; then
    echo "postgres.sh: creating cluster $VERSION/$CLUSTER on port $PORT" >&2
    pg_createcluster "$VERSION" "$CLUSTER" --port "$PORT" >&2 9>&-
fi
STATUS="$(pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c {print $4}')"
if [ "$STATUS" != "online" ]; then
    echo "postgres.sh: starting cluster $VERSION/$CLUSTER" >&2
    # 9>&-: the server must not inherit the lock, or the next caller would wait for it forever.
    pg_ctlcluster "$VERSION" "$CLUSTER" start >&2 9>&- || {
        tail -n 30 "/var/log/postgresql/postgresql-$VERSION-$CLUSTER.log" >&2 || true
        exit 1
    }
fi
PORT="$(pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c {print $3}')"
for _ in $(seq 1 120); do
    pg_isready -q -h 127.0.0.1 -p "$PORT" && break
    sleep 0.5
done
pg_isready -h 127.0.0.1 -p "$PORT" >&2 || { echo "postgres.sh: server on port $PORT is not ready after 60 s" >&2; exit 1; }

psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PORT" -d postgres "$@"; }

psql_admin -c "DO \$\$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
        CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD';
    ELSE
        ALTER ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD';  -- the URL printed below must work
    END IF;
END \$\$;" >&2

if [ -n "$DROP" ]; then
    psql_admin -c "DROP DATABASE IF EXISTS $DROP WITH (FORCE)" >&2
fi
if [ -n "$DATABASE" ]; then
    psql_admin -c "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" >&2
    psql_admin -c "CREATE DATABASE $DATABASE OWNER $PG_USER" >&2
fi
echo "postgresql+psycopg2://$PG_USER:$PG_PASSWORD@127.0.0.1:$PORT/$DATABASE"
