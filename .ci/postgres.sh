#!/usr/bin/env bash
# Makes sure the PostgreSQL server the tests use answers on 127.0.0.1:5432 with trust
# authentication for local TCP connections and a database "test" (the tests' default
# SYNCD_TEST_POSTGRES_URL). When none answers, installs Debian's server, starts it and
# sets it up. Needs root and Debian's package archive.
set -euo pipefail

answers() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }

if [ -n "${SYNCD_TEST_POSTGRES_URL:-}" ]; then
  echo "postgres: using SYNCD_TEST_POSTGRES_URL"
  exit 0
fi
if answers; then
  echo "postgres: a server answers on 127.0.0.1:5432"
  exit 0
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "postgres: none answers; installing Debian's server"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
hba=/etc/postgresql/$version/main/pg_hba.conf
# Trust local TCP connections: this server exists only for the tests.
sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
pg_ctlcluster --skip-systemctl-redirect "$version" main restart || \
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
for _ in $(seq 1 50); do answers && break; sleep 0.2; done
answers || { echo "postgres: the server did not start" >&2; exit 1; }
su postgres -c "psql -q -c 'CREATE DATABASE test'" 2>/dev/null || true
echo "postgres: $version started on 127.0.0.1:5432"
