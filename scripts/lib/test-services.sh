# Sourced by scripts/test.sh: makes sure the servers the tests need exist.
#
# - redis-server and the PostgreSQL server binaries (initdb, pg_ctl): the
#   multi-node tests start private instances on free ports so they can kill them.
# - A PostgreSQL the store conformance tests can create schemas in: the one in
#   AI4FREE_TEST_PG_URL, else 127.0.0.1:5432; when nothing answers there, a
#   private cluster is started under target/test-pg for the run.
. scripts/lib/apt.sh
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt_install "the tests start private servers" "${need_apt[@]}"
fi

pg_answers() { psql "$1" -Atc 'select 1' >/dev/null 2>&1; }

if [ -z "${AI4FREE_TEST_PG_URL:-}" ]; then
  for url in "postgres://$(id -un)@127.0.0.1:5432/test" "postgres://postgres@127.0.0.1:5432/postgres"; do
    if pg_answers "$url"; then export AI4FREE_TEST_PG_URL="$url"; break; fi
  done
fi
if [ -z "${AI4FREE_TEST_PG_URL:-}" ]; then
  pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  pgdir="$PWD/target/test-pg"
  port=55432
  as_pg=()
  [ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
  echo "==> no PostgreSQL on 127.0.0.1:5432; starting a private one on port $port"
  if [ ! -f "$pgdir/data/PG_VERSION" ]; then
    mkdir -p "$pgdir"
    [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$pgdir"
    "${as_pg[@]}" "$pgbin/initdb" -D "$pgdir/data" -A trust -U postgres --no-sync >/dev/null
  fi
  "${as_pg[@]}" "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
    -o "-p $port -k $pgdir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null || true
  export AI4FREE_TEST_PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
  pg_answers "$AI4FREE_TEST_PG_URL" || { echo "could not start PostgreSQL for the tests" >&2; exit 1; }
fi
echo "==> PostgreSQL for store tests: ${AI4FREE_TEST_PG_URL%%@*}@…"
