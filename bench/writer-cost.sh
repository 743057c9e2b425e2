#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup runs from a trap
# bench/writer-cost.sh (`make bench-writer`): what each STREAM_SOURCE costs the
# card issuer's writer on a DURABLE cluster (fsync, synchronous_commit and
# full_page_writes on, wal_level = logical), side by side in the same rounds:
#
#   none    no trigger, no publication, no service: the baseline
#   notify  the trigger, and the real service (STREAM_SOURCE=notify) LISTENing
#   wal     the publication, and the real service (STREAM_SOURCE=wal) decoding
#           through its temporary slot
#
#   bench/writer-cost.sh [CLIENTS...]   (default: 1 4 16)
#
# WRITER_COST_SECONDS (8) a pgbench run, WRITER_COST_ROUNDS (2), WRITER_COST_STREAMS
# (50). Single-row INSERTs by pgbench for users 1..STREAMS; while a source runs,
# one stream per user is open (tools/streamcount) and every record inserted must
# reach it (counted; the bench waits up to 60 s for the stragglers). Each source's
# ratio is its insert rate over the baseline's of the same round and client count;
# rounds alternate the order of the sources. CPU per row from /proc (10 ms
# ticks): the source's backend on the primary (the LISTEN session, or the WAL
# sender) and the service, which share the machine with the writer.
# A source the binary cannot serve (a build without the wal source) is reported
# missing and the others still run. A throwaway cluster (scripts/pg.sh) is
# started and removed; nothing else runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
clients=("$@")
[ ${#clients[@]} -gt 0 ] || clients=(1 4 16)
secs=${WRITER_COST_SECONDS:-8}
rounds=${WRITER_COST_ROUNDS:-2}
streams=${WRITER_COST_STREAMS:-50}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/threeds-writer-cost.XXXXXX")
svc_pid= sc_pid=
stop_source() {
	# Only the processes this script started, by their pids.
	if [ -n "$sc_pid" ]; then kill -TERM "$sc_pid" 2>/dev/null || true; wait "$sc_pid" 2>/dev/null || true; fi
	if [ -n "$svc_pid" ]; then kill -TERM "$svc_pid" 2>/dev/null || true; wait "$svc_pid" 2>/dev/null || true; fi
	sc_pid= svc_pid=
}
cleanup() { stop_source; bash scripts/pg.sh stop "$tmp/pg" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# pgbench and psql come with the PostgreSQL packages scripts/pg.sh installs.
bindir=$(dirname "$(command -v pgbench || ls -d /usr/lib/postgresql/*/bin/pgbench | sort -V | tail -1)")
psql() { "$bindir/psql" "$url" -qAtX "$@"; }
make -s build
go build -o "$tmp/devtoken" ./tools/devtoken
go build -o "$tmp/streamcount" ./tools/streamcount
url=$(bash scripts/pg.sh start "$tmp/pg")
psql -c "ALTER SYSTEM SET fsync = on" -c "ALTER SYSTEM SET synchronous_commit = on" \
	-c "ALTER SYSTEM SET full_page_writes = on" -c "ALTER SYSTEM SET wal_level = logical"
bash scripts/pg.sh restart "$tmp/pg" >/dev/null
DATABASE_URL=$url bin/threeds-records migrate >/dev/null

"$tmp/devtoken" keygen -alg ES256 -kid writer-cost -jwks "$tmp/jwks.json" -key "$tmp/key.json" 2>/dev/null
for u in $(seq 1 "$streams"); do
	echo "$u $("$tmp/devtoken" mint -key "$tmp/key.json" -iss writer-cost -sub "$u" -ttl 2h)"
done >"$tmp/tokens.txt"
cat >"$tmp/insert.pgbench" <<SQL
\set uid random(1, $streams)
INSERT INTO threeds_records (user_id, passcode, amount, currency, merchant_name, expires_after, received_at) VALUES (:uid, '123456', 12.34, 'USD', 'pgbench writer', 300, now());
SQL
tps() { "$bindir/pgbench" -n -M prepared -f "$tmp/insert.pgbench" -T "$secs" -c "$1" -j "$(($1 < 2 ? 1 : 2))" "$url" 2>/dev/null | awk '/^tps/ { print int($3) }'; }
ticks() { [ -n "$1" ] && awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# install SOURCE: the schema for SOURCE, an empty table, and for a real source
# the service and its streams. Fails (1) when the service cannot serve it.
install() {
	local src=$1 port
	if [ "$src" = none ]; then
		psql -c "SET client_min_messages = warning" -c "DROP TRIGGER IF EXISTS threeds_records_notify_insert ON threeds_records" \
			-c "DROP PUBLICATION IF EXISTS threeds_records_events"
	else
		DATABASE_URL=$url STREAM_SOURCE=$src bin/threeds-records migrate >/dev/null
	fi
	psql -c "TRUNCATE threeds_records" -c "CHECKPOINT"
	[ "$src" = none ] && return 0
	port=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
	DATABASE_URL=$url JWKS_FILE=$tmp/jwks.json JWT_ISSUER=writer-cost LISTEN_ADDR=127.0.0.1:$port \
		STREAM_SOURCE=$src LOG_LEVEL=warn bin/threeds-records >"$tmp/service.log" 2>&1 &
	svc_pid=$!
	: >"$tmp/count"
	"$tmp/streamcount" -addr "127.0.0.1:$port" -tokens "$tmp/tokens.txt" -count-file "$tmp/count" -ready-timeout 20s >"$tmp/streams.out" &
	sc_pid=$!
	for _ in $(seq 1 250); do
		grep -q '^ready' "$tmp/streams.out" && return 0
		if grep -q '^refused' "$tmp/streams.out"; then
			missing[$src]=$(sed -n 's/^refused: //p' "$tmp/streams.out" | cut -c1-160)
			stop_source
			return 1
		fi
		sleep 0.1
	done
	missing[$src]="the streams never became ready"
	stop_source
	return 1
}

# source_pid SOURCE: the primary's backend that serves the source.
source_pid() {
	case $1 in
	notify) psql -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'threeds-records-listen' LIMIT 1" ;;
	wal) psql -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender' LIMIT 1" ;;
	esac
}

# wait_delivered: every record in the table reached its stream (60 s at most);
# prints how long the stragglers took, or "MISSING n".
wait_delivered() {
	local inserted got start=$SECONDS
	inserted=$(psql -c "SELECT count(*) FROM threeds_records")
	while :; do
		got=$(cat "$tmp/count" 2>/dev/null || echo 0)
		if [ "${got:-0}" -ge "$inserted" ]; then
			echo "all $inserted delivered (+$((SECONDS - start)) s)"
			return
		fi
		if [ $((SECONDS - start)) -ge 60 ]; then
			echo "MISSING $((inserted - ${got:-0})) of $inserted"
			return
		fi
		sleep 0.2
	done
}

declare -A rate cpu svc delivered missing
echo "durable cluster: fsync=$(psql -c 'SHOW fsync'), synchronous_commit=$(psql -c 'SHOW synchronous_commit'), full_page_writes=$(psql -c 'SHOW full_page_writes'), wal_level=$(psql -c 'SHOW wal_level'); $secs s a run, $rounds rounds, $streams streams; $(nproc) cores, load average $(cut -d" " -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
for round in $(seq 1 "$rounds"); do
	order=(none notify wal)
	[ $((round % 2)) -eq 0 ] && order=(wal notify none)
	for src in "${order[@]}"; do
		[ -n "${missing[$src]:-}" ] && continue
		install "$src" || continue
		pid=$(source_pid "$src")
		for c in "${clients[@]}"; do
			before_rows=$(psql -c "SELECT count(*) FROM threeds_records")
			before_ticks=$(ticks "$pid")
			before_svc=$(ticks "$svc_pid")
			rate[$src,$c,$round]=$(tps "$c")
			if [ "$src" != none ]; then
				delivered[$src,$c,$round]=$(wait_delivered)
				rows=$(($(psql -c "SELECT count(*) FROM threeds_records") - before_rows))
				rows=$((rows > 0 ? rows : 1))
				cpu[$src,$c,$round]=$(((($(ticks "$pid") - before_ticks) * 10000) / rows))
				svc[$src,$c,$round]=$(((($(ticks "$svc_pid") - before_svc) * 10000) / rows))
			fi
		done
		stop_source
		[ "$src" != none ] && sed -n 's/^received/streams: received/p' "$tmp/streams.out" | sed "s/^/  $src round $round /"
	done
done

for c in "${clients[@]}"; do
	for round in $(seq 1 "$rounds"); do
		base=${rate[none,$c,$round]}
		line="clients $c, round $round: none $base tps"
		for src in notify wal; do
			if [ -n "${missing[$src]:-}" ]; then
				line+="; $src MISSING (${missing[$src]})"
				continue
			fi
			r=${rate[$src,$c,$round]}
			line+="; $src $r tps ($(awk -v a="$r" -v b="$base" 'BEGIN { printf "%.2f", a / b }')), per row ${cpu[$src,$c,$round]} µs of its backend and ${svc[$src,$c,$round]} µs of the service, ${delivered[$src,$c,$round]}"
		done
		echo "$line"
	done
done
