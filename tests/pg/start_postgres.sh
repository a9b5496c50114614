#!/usr/bin/env bash
# Start (or reuse) a throwaway PostgreSQL cluster for the shared-storage tests and print its
# SQLAlchemy URL on stdout. Idempotent: a second call finds the running server and prints
# the same URL. `start_postgres.sh status` exits 0 when it runs; `start_postgres.sh stop`
# stops it and deletes the cluster.
#
# The cluster lives in $SPARSEGEN_PG_DIR (default: $TMPDIR/sparsegen-pg) and listens only
# on a unix socket in that directory (no TCP port to collide with). Installs the server
# with apt-get when it is missing and this runs as root. PostgreSQL refuses to run as
# root, so as root the cluster belongs to the `postgres` user (created by the package).
set -euo pipefail

dir=${SPARSEGEN_PG_DIR:-${TMPDIR:-/tmp}/sparsegen-pg}
db=sparsegen
log() { echo "start_postgres: $*" >&2; }

find_bin() {
  local name=$1
  if command -v "$name" >/dev/null 2>&1 && [[ "$(command -v "$name")" != /usr/bin/* ]]; then
    command -v "$name"; return
  fi
  # Debian/Ubuntu keep the server binaries out of PATH (/usr/bin/pg_ctl is a wrapper)
  local hit
  hit=$(ls -1d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1 || true)
  [[ -n "$hit" ]] && { echo "$hit"; return; }
  command -v "$name" 2>/dev/null || true
}

initdb=$(find_bin initdb)
if [[ -z "$initdb" ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing the PostgreSQL server (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
    initdb=$(find_bin initdb)
  fi
  [[ -n "$initdb" ]] || { log "no PostgreSQL server (initdb) found and cannot install one"; exit 1; }
fi
bindir=$(dirname "$initdb")
pg_ctl=$bindir/pg_ctl

# as root, run the server tools as `postgres`
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" --shell /bin/false postgres
  as_pg() { runuser -u postgres -- "$@"; }
  owner=postgres
else
  as_pg() { "$@"; }
  owner=$(id -un)
fi

data=$dir/data
if [[ ${1:-} == status ]]; then
  [[ -d $data ]] && as_pg "$pg_ctl" -D "$data" status >/dev/null 2>&1
  exit
fi
if [[ ${1:-} == stop ]]; then
  [[ -d $data ]] && as_pg "$pg_ctl" -D "$data" -m immediate stop >&2 || true
  rm -rf "$dir"
  exit 0
fi

mkdir -p "$dir"
chown "$owner" "$dir"
if [[ ! -f $data/PG_VERSION ]]; then
  as_pg "$initdb" -D "$data" -U "$db" -A trust --no-sync >"$dir/initdb.log" 2>&1 ||
    { log "initdb failed:"; cat "$dir/initdb.log" >&2; exit 1; }
fi
if ! as_pg "$pg_ctl" -D "$data" status >/dev/null 2>&1; then
  # listen on the socket only; fsync off: a throwaway cluster needs no durability
  as_pg "$pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses='' -k $dir -c fsync=off -c synchronous_commit=off -c max_connections=100" \
    start >&2 || { log "the server did not start:"; tail -n 20 "$dir/server.log" >&2; exit 1; }
fi
# the clients (the tests) may run as another user than the server: let them reach the socket
chmod 755 "$dir"
psql=$bindir/psql
[[ -x $psql ]] || psql=psql
if ! "$psql" -h "$dir" -U "$db" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1; then
  "$psql" -h "$dir" -U "$db" -d postgres -qc "CREATE DATABASE $db" >&2
fi
echo "postgresql+psycopg2://$db@/$db?host=$dir"
