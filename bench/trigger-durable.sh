#!/usr/bin/env bash
# bench/trigger-durable.sh: what the NOTIFY trigger costs the card issuer's
# writer on a DURABLE cluster (fsync=on, synchronous_commit=on), where every
# commit waits for its WAL flush. `make bench` measures on the throwaway
# cluster tuned for speed (fsync=off); this one shows the other regime:
# NOTIFY's commit-time lock serialises notifying commits through their flush.
#
#   bench/trigger-durable.sh [CLIENTS...]   (default: 1 4 16; 8 s a run, 2 rounds)
#
# Single-row INSERTs by pgbench for users nobody streams, alternating trigger
# dropped / trigger installed (its own pg_get_triggerdef), nobody listening.
# A throwaway cluster (scripts/pg.sh) is started and removed; nothing else runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
clients=("$@")
[ ${#clients[@]} -gt 0 ] || clients=(1 4 16)
secs=${TRIGGER_BENCH_SECONDS:-8}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/threeds-trigger.XXXXXX")
cleanup() { bash scripts/pg.sh stop "$tmp/pg" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT INT TERM

# pgbench and psql come with the PostgreSQL packages scripts/pg.sh installs.
bindir=$(dirname "$(command -v pgbench || ls -d /usr/lib/postgresql/*/bin/pgbench | sort -V | tail -1)")
make -s build
url=$(bash scripts/pg.sh start "$tmp/pg")
"$bindir/psql" "$url" -qX -c "ALTER SYSTEM SET fsync = on" -c "ALTER SYSTEM SET synchronous_commit = on"
bash scripts/pg.sh restart "$tmp/pg" >/dev/null
DATABASE_URL=$url bin/threeds-records migrate >/dev/null
trigger=$("$bindir/psql" "$url" -AtX -c "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'threeds_records_notify_insert'")
cat >"$tmp/insert.pgbench" <<'SQL'
\set uid random(1000001, 1100000)
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at) VALUES (:uid, '123456', 12.34, 'USD', 'pgbench writer', 300, now());
SQL
tps() { "$bindir/pgbench" -n -M prepared -f "$tmp/insert.pgbench" -T "$secs" -c "$1" -j "$(( $1 < 2 ? 1 : 2 ))" "$url" 2>/dev/null | awk '/^tps/ { print int($3) }'; }

echo "durable cluster: fsync=$("$bindir/psql" "$url" -AtX -c 'SHOW fsync'), synchronous_commit=$("$bindir/psql" "$url" -AtX -c 'SHOW synchronous_commit'); $secs s a run"
for c in "${clients[@]}"; do
	for round in 1 2; do
		"$bindir/psql" "$url" -qX -c "DROP TRIGGER IF EXISTS threeds_records_notify_insert ON threeds_records"
		without=$(tps "$c")
		"$bindir/psql" "$url" -qX -c "$trigger"
		with=$(tps "$c")
		echo "clients $c, round $round: without the trigger $without tps, with it $with tps ($(( 100 * with / without ))%)"
	done
done
