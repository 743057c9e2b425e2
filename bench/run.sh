#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup and on_signal run from traps
# `make bench`: the whole performance measurement from a clean checkout.
#
# A throwaway PostgreSQL (scripts/pg.sh) in a temp dir, migrated by the real
# binary (make build), seeded by the bench tool, then the real service on
# 127.0.0.1 driven by bench/ (Go), next to the same SQL straight to PostgreSQL.
# Everything it starts is stopped however it ends. Extra arguments go to the
# bench tool (go run ./bench -h lists them), e.g.
#   make bench BENCH_ARGS='-c 8 -d 5s -db-params pool_max_conns=8'
# Set BENCH_KEEP=DIR to keep the cluster (seeded once, reused by later runs).
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
	if [ -f "$tmp/service.pid" ]; then
		pid=$(cat "$tmp/service.pid")
		kill -TERM "$pid" 2>/dev/null || true
	fi
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

say "starting PostgreSQL in $pgdir"
db_url=$(bash scripts/pg.sh start "$pgdir")
DATABASE_URL=$db_url "$root/bin/threeds-records" migrate >/dev/null

# The tool runs in the background so the traps fire at once on Ctrl-C.
# pgbench (the stream scenario's writer) ships with the server binaries.
# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags on purpose
"$tmp/bench" -db "$db_url" -service "$root/bin/threeds-records" -dir "$tmp" \
	-pg-pid-file "$pgdir/data/postmaster.pid" -pgbench "$(cat "$pgdir/bindir")/pgbench" ${BENCH_ARGS:-} "$@" &
tool=$!
rc=0
wait "$tool" || rc=$?
tool=
exit "$rc"
