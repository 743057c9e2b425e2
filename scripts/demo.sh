#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup and on_signal run from traps
# `make run`: a local PostgreSQL with demo data, a dev signing key, a token for user
# 1001, and the service in the foreground. Ctrl-C stops the service and the cluster.
# State lives in .demo/ (cluster, keys, token) and is reused by the next run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pgdir=$PWD/.demo/pg
listen=${LISTEN_ADDR:-:8080}
issuer=https://issuer.demo.local
audience=threeds-records

say() { printf 'demo: %s\n' "$*" >&2; }

svc=
cleaned=
cleanup() {
	[ -n "$cleaned" ] && return
	cleaned=1
	if [ -n "$svc" ] && kill -0 "$svc" 2>/dev/null; then
		kill -TERM "$svc" 2>/dev/null || true
		wait "$svc" 2>/dev/null || true
	fi
	say "stopping PostgreSQL in $pgdir"
	bash scripts/pg.sh stop "$pgdir" || say "could not stop PostgreSQL in $pgdir"
}
on_signal() {
	trap '' INT TERM
	say "got SIG$1, stopping"
	cleanup
	exit "$2"
}
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

mkdir -p .demo
say "starting PostgreSQL in $pgdir"
db_url=$(bash scripts/pg.sh start "$pgdir")

say "building bin/threeds-records and bin/devtoken"
CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o bin/threeds-records .
go build -o bin/devtoken ./tools/devtoken

say "applying the schema and loading scripts/demo-seed.sql"
DATABASE_URL=$db_url bin/threeds-records migrate >/dev/null
psql=$(cat "$pgdir/bindir")/psql
[ -x "$psql" ] || psql=$(command -v psql) || {
	say "psql not found next to the PostgreSQL server binaries nor on PATH"
	exit 1
}
"$psql" -X -q -v ON_ERROR_STOP=1 -d "$db_url" -f scripts/demo-seed.sql

if [ ! -f .demo/key.json ] || [ ! -f .demo/jwks.json ]; then
	bin/devtoken keygen -alg ES256 -kid demo-1 -jwks .demo/jwks.json -key .demo/key.json -force
fi
token=$(bin/devtoken mint -key .demo/key.json -iss "$issuer" -aud "$audience" -sub 1001 -ttl 12h)
(umask 077 && printf '%s\n' "$token" >.demo/token)

host=${listen%:*}
port=${listen##*:}
case $host in "" | 0.0.0.0 | "[::]" | "::") host=127.0.0.1 ;; esac

# What the card issuer's integration does when a passcode comes in: one plain
# INSERT. migrate's trigger turns its commit into a NOTIFY, and the service
# pushes the record to user 1001's open streams.
store_sql="INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at) VALUES (1001, lpad(floor(random() * 1000000)::int::text, 6, '0'), 19.99, 'USD', 'Demo Checkout', 300, now()) RETURNING id, passcode"

cat >&2 <<EOF

  threeds-records demo on $listen (database $db_url)
  Signed in as user 1001 for 12h (token also in .demo/token). Try:

curl -s -H "Authorization: Bearer $token" 'http://$host:$port/3ds/my-records?page=1&page_size=5'

  Watch passcodes arrive: open the event stream in one terminal (it first replays the
  passcodes still valid, then says "ready", then a ": ping" every 15 s)...

curl -sN -H "Authorization: Bearer $token" 'http://$host:$port/3ds/my-records/events'

  ...and store a new passcode for user 1001 in another; it shows up in the stream at once:

'$psql' -X -d '$db_url' -c "$store_sql"

  Ctrl-C stops the service and the database.

EOF

# In the background so SIGTERM reaches the trap at once; the service handles
# SIGINT/SIGTERM itself and drains before exiting.
env -u JWKS_URL \
	DATABASE_URL="$db_url" \
	JWKS_FILE="$PWD/.demo/jwks.json" \
	JWT_ISSUER="$issuer" \
	JWT_AUDIENCE="$audience" \
	LISTEN_ADDR="$listen" \
	bin/threeds-records &
svc=$!
rc=0
wait "$svc" || rc=$?
svc=
exit "$rc"
