#!/bin/bash
# Start a real PostgreSQL server on this machine (Debian's packages, no systemd, no container)
# and make a role + database for the Postgres-instance tests and benchmarks.
#
#   apt-get install postgresql (only when missing) -> pg_ctlcluster start -> role + database
#
# Idempotent: a running cluster and an existing role/database are kept. Run as root (it runs the
# server as the `postgres` user, as Debian's packaging does). The last line printed is the URL:
#   postgresql://arena_test:arena_test@127.0.0.1:5432/arena_test
# The role may create databases: the tests make a fresh database per Dagster instance and drop it.
# Environment: PG_ROLE, PG_PASSWORD, PG_DATABASE (default arena_test), PG_HOST (127.0.0.1).
# This is a TEST server (a well-known password, local connections only): the team setup's own
# database is described in docs/team.md.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
ROLE=${PG_ROLE:-arena_test}
PASSWORD=${PG_PASSWORD:-arena_test}
DB=${PG_DATABASE:-arena_test}
HOST=${PG_HOST:-127.0.0.1}

if [ "$(id -u)" != 0 ]; then echo "postgres-up.sh must run as root" >&2; exit 1; fi
t0=$(date +%s)
if ! command -v pg_lsclusters >/dev/null || [ -z "$(ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null)" ]; then
  echo "postgres-up: installing postgresql (Debian package)" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 postgresql >/dev/null
fi

# The newest installed major version; its cluster "main" (the package creates it; re-create it if
# someone dropped it).
VER=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VER main"; then
  echo "postgres-up: creating cluster $VER/main" >&2
  pg_createcluster "$VER" main >/dev/null
fi
PORT=$(pg_lsclusters -h | awk -v v="$VER" '$1==v && $2=="main" {print $3}')
if ! pg_lsclusters -h | awk -v v="$VER" '$1==v && $2=="main" {print $4}' | grep -q online; then
  echo "postgres-up: starting cluster $VER/main on port $PORT" >&2
  # the socket directory lives in /run, which a fresh boot (or container) may not have
  install -d -o postgres -g postgres -m 2775 /var/run/postgresql
  pg_ctlcluster "$VER" main start
fi
for _ in $(seq 1 60); do
  pg_isready -q -h "$HOST" -p "$PORT" && break
  sleep 0.5
done
pg_isready -h "$HOST" -p "$PORT" >&2

psql_admin() { runuser -u postgres -- psql -p "$PORT" -v ON_ERROR_STOP=1 -qAt "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname='$ROLE'")" != 1 ]; then
  psql_admin -c "CREATE ROLE \"$ROLE\" LOGIN CREATEDB PASSWORD '$PASSWORD'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname='$DB'")" != 1 ]; then
  psql_admin -c "CREATE DATABASE \"$DB\" OWNER \"$ROLE\""
fi
URL="postgresql://$ROLE:$PASSWORD@$HOST:$PORT/$DB"
# a real login over TCP with the password, as Dagster will connect
PGPASSWORD=$PASSWORD psql -h "$HOST" -p "$PORT" -U "$ROLE" -d "$DB" -qAt -c "SELECT 1" >/dev/null
echo "postgres-up: PostgreSQL $(runuser -u postgres -- psql -p "$PORT" -qAt -c 'SHOW server_version') up ($(( $(date +%s) - t0 )) s)" >&2
echo "$URL"
