#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup and on_signal run from traps
# `make bench`: the whole performance measurement from a clean checkout.
#
# A throwaway PostgreSQL (scripts/pg.sh) in a temp dir, migrated by the real
# binary (make build), seeded by the bench tool, then the real service on
# 127.0.0.1 driven by bench/ (Go), in alternating rounds with the floor
# (../shared/floor, or FLOOR_DIR: the bare stack, built here with the same
# flags as the service; a clone without it runs the service alone).
# Everything it starts is stopped however it ends. Extra arguments go to the
# bench tool (go run ./bench -h lists them), e.g.
#   make bench BENCH_ARGS='-c 8 -d 5s -rounds 3 -db-params pool_max_conns=8'
# Set BENCH_KEEP=DIR to keep the cluster (seeded once, reused by later runs).
# Set BENCH_CPUPROFILE=FILE to run the service as its test binary
# (TestServeForProfile in bench_test.go) and get its CPU profile under the
# bench's load in FILE (go tool pprof FILE); the release binary has no
# profiling endpoint. BENCH_TRACE=FILE does the same for an execution
# trace: `go tool trace -pprof=sched FILE` then says where goroutines waited
# to run.
# Set BENCH_COMPARE=REV (a commit, branch or tag) to build that revision too
# and measure it in the same rounds as the working tree: before/after in one
# run, e.g. BENCH_COMPARE=HEAD with an uncommitted change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

say() { printf 'bench: %s\n' "$*" >&2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/threeds-bench.XXXXXX")
pgdir=${BENCH_KEEP:-$tmp/pg}
cleaned=
cleanup() {
	[ -n "$cleaned" ] && return
	cleaned=1
	# The bench tool stops the service itself (and the kernel kills it if the
	# tool dies: Pdeathsig); this is for a tool killed before it could.
	for f in "$tmp"/*.pid; do
		if [ -f "$f" ]; then
			kill -TERM "$(cat "$f")" 2>/dev/null || true
		fi
	done
	if [ -z "${BENCH_KEEP:-}" ]; then
		bash scripts/pg.sh stop "$pgdir" || say "could not stop PostgreSQL in $pgdir"
	fi
	rm -rf "$tmp"
}
on_signal() {
	trap '' INT TERM
	say "got SIG$1, stopping"
	if [ -n "${tool:-}" ]; then
		kill -TERM "$tool" 2>/dev/null || true
		wait "$tool" 2>/dev/null || true
	fi
	cleanup
	exit "$2"
}
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

say "building bin/threeds-records (make build) and the bench tool"
make -s build
go build -o "$tmp/bench" ./bench
service=$root/bin/threeds-records
extra=()
if [ -n "${BENCH_CPUPROFILE:-}${BENCH_TRACE:-}" ]; then
	args="-test.run=^TestServeForProfile\$"
	if [ -n "${BENCH_CPUPROFILE:-}" ]; then
		case $BENCH_CPUPROFILE in /*) ;; *) BENCH_CPUPROFILE=$root/$BENCH_CPUPROFILE ;; esac
		say "the service's CPU profile goes to $BENCH_CPUPROFILE"
		args+=" -test.cpuprofile=$BENCH_CPUPROFILE"
	fi
	if [ -n "${BENCH_TRACE:-}" ]; then
		case $BENCH_TRACE in /*) ;; *) BENCH_TRACE=$root/$BENCH_TRACE ;; esac
		say "the service's execution trace goes to $BENCH_TRACE (go tool trace -pprof=sched $BENCH_TRACE > sched.pprof)"
		args+=" -test.trace=$BENCH_TRACE"
	fi
	say "building the service's test binary to profile it"
	go test -c -o "$tmp/threeds-records.test" .
	service=$tmp/threeds-records.test
	extra+=(-env THREEDS_SERVE_FOR_PROFILE=1 -service-args "$args")
fi

if [ -n "${BENCH_COMPARE:-}" ]; then
	say "building $BENCH_COMPARE ($(git rev-parse --short "$BENCH_COMPARE")) to compare with the working tree"
	mkdir "$tmp/compare-src"
	git archive "$BENCH_COMPARE" | tar -x -C "$tmp/compare-src"
	(cd "$tmp/compare-src" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$tmp/compare" .)
	extra+=(-compare "$(git rev-parse --short "$BENCH_COMPARE")=$tmp/compare")
fi

floor_dir=${FLOOR_DIR:-$root/../shared/floor}
if [ -z "${FLOOR_DIR:-}" ] && [ ! -f "$floor_dir/go.mod" ]; then
	# A git worktree lives elsewhere; ../shared is beside the main checkout.
	if common=$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null); then
		[ -f "$(dirname "$common")/../shared/floor/go.mod" ] && floor_dir=$(dirname "$common")/../shared/floor
	fi
fi
if [ -f "$floor_dir/go.mod" ]; then
	say "building the floor from $floor_dir (same flags as make build)"
	(cd "$floor_dir" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$tmp/floor" .)
	extra+=(-floor "$tmp/floor")
else
	say "no floor at $floor_dir (set FLOOR_DIR): measuring the service alone"
fi

say "starting PostgreSQL in $pgdir"
db_url=$(bash scripts/pg.sh start "$pgdir")
# The wal source (-source wal) needs wal_level = logical, which scripts/pg.sh
# does not set (replica): set it and restart once. Only then, because
# logical adds WAL to every insert the notify scenario's writer measures.
case " $* ${BENCH_ARGS:-} " in
*" -source wal "* | *" -source=wal "* | *" --source wal "* | *" --source=wal "*)
	psql=$(cat "$pgdir/bindir")/psql
	if [ "$("$psql" -X -A -t -q "$db_url" -c 'SHOW wal_level')" != logical ]; then
		say "setting wal_level = logical for the wal source (one restart)"
		"$psql" -X -q "$db_url" -c 'ALTER SYSTEM SET wal_level = logical' >/dev/null
		db_url=$(bash scripts/pg.sh restart "$pgdir")
	fi
	;;
esac
DATABASE_URL=$db_url "$root/bin/threeds-records" migrate >/dev/null

# The tool runs in the background so the traps fire at once on Ctrl-C.
# pgbench (the stream scenario's writer) ships with the server binaries.
# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags on purpose
"$tmp/bench" -db "$db_url" -service "$service" -migrate-bin "$root/bin/threeds-records" -dir "$tmp" \
	-pg-pid-file "$pgdir/data/postmaster.pid" -pgbench "$(cat "$pgdir/bindir")/pgbench" \
	${extra[@]+"${extra[@]}"} ${BENCH_ARGS:-} "$@" &
tool=$!
rc=0
wait "$tool" || rc=$?
tool=
exit "$rc"
