#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup and on_signal run from traps
# make soak: the real binary under steady load while PostgreSQL restarts, the
# JWKS endpoint goes down, slowloris clients and 1 MiB headers arrive, and the
# database stalls under a flood of requests and idle connections (RSS must stay
# under deploy/kubernetes/deployment.yaml's memory limit); prints a Markdown
# table and exits non-zero when a value that must be 0 is not.
# Everything is throwaway (a cluster from scripts/pg.sh in a temp dir) and runs
# on 127.0.0.1; about 3 minutes. Arguments go to the soak program (soak/), e.g.
#   scripts/soak.sh -scale 0.2     a quick trial with every phase shortened
#   scripts/soak.sh -phases 0,5    only the baseline and the stall phase
# SOAK_KEEP=1 keeps the work dir (service log, report) even on success.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

say() { printf 'soak.sh: %s\n' "$*" >&2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/soak.XXXXXX")
child=
cleaned=
rc=1
cleanup() {
	[ -n "$cleaned" ] && return
	cleaned=1
	if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
		kill -TERM "$child" 2>/dev/null || true
		wait "$child" 2>/dev/null || true
	fi
	# The soak program stops the service itself; this covers a soak that was killed.
	if [ -f "$work/service.pid" ]; then
		pid=$(cat "$work/service.pid")
		if kill -0 "$pid" 2>/dev/null; then
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	bash "$repo/scripts/pg.sh" stop "$work/pg" || say "could not stop the cluster in $work/pg"
	if [ "$rc" -eq 0 ] && [ -z "${SOAK_KEEP:-}" ]; then
		rm -rf "$work"
	else
		say "kept $work (service.log, report.md, pg/log)"
	fi
}
on_signal() {
	trap '' INT TERM
	say "got SIG$1, stopping"
	rc=$2
	cleanup
	exit "$2"
}
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

say "work dir $work"
db_url=$(bash scripts/pg.sh start "$work/pg")
say "building the service (as the Dockerfile does) and the soak driver"
CGO_ENABLED=0 go build -trimpath -o "$work/threeds-records" .
go build -o "$work/soak" ./soak
say "migrating"
DATABASE_URL=$db_url "$work/threeds-records" migrate >"$work/migrate.log"

# In the background so a signal reaches the trap at once.
"$work/soak" -bin "$work/threeds-records" -database-url "$db_url" \
	-pg-script "$repo/scripts/pg.sh" -pg-dir "$work/pg" \
	-log "$work/service.log" -pidfile "$work/service.pid" -report "$work/report.md" \
	-manifest "$repo/deploy/kubernetes/deployment.yaml" "$@" </dev/null &
child=$!
rc=0
wait "$child" || rc=$?
child=
exit "$rc"
