#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup, tree and on_signal run from traps
# with-postgres.sh CMD ARGS...: run CMD with DATABASE_URL pointing at a PostgreSQL.
#
# When DATABASE_URL is already set, CMD simply runs against it. Otherwise a throwaway
# cluster is started in a temp dir (scripts/pg.sh) and stopped and removed however
# CMD ends: success, failure, Ctrl-C or SIGTERM. The exit code is CMD's.
# PG_SCRIPT (absolute path of pg.sh) is exported for tests that start clusters of
# their own, e.g. to restart the database under a running pool.
set -uo pipefail

[ $# -ge 1 ] || {
	echo "usage: scripts/with-postgres.sh CMD [ARGS...]" >&2
	exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
export PG_SCRIPT="${PG_SCRIPT:-$here/pg.sh}"

if [ -n "${DATABASE_URL:-}" ]; then
	exec "$@"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/with-postgres.XXXXXX") || exit 1
child=
cleaned=

cleanup() {
	[ -n "$cleaned" ] && return
	cleaned=1
	bash "$here/pg.sh" stop "$tmp" || echo "with-postgres: could not stop the cluster in $tmp" >&2
	rm -rf "$tmp"
}

# tree PID: PID and all its descendants. `go test` runs the test binary as a child
# of its own, and that one would outlive a signal sent to `go` alone.
tree() {
	local c
	for c in $(pgrep -P "$1" 2>/dev/null || ps -o pid= --ppid "$1" 2>/dev/null); do
		tree "$c"
	done
	echo "$1"
}

on_signal() {
	local sig=$1 code=$2
	trap '' INT TERM
	if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
		# Without job control the child ignores SIGINT (bash does that to background
		# jobs), so it is always asked to stop with SIGTERM, then killed if it lingers.
		# shellcheck disable=SC2046
		kill -TERM $(tree "$child") 2>/dev/null
		for _ in $(seq 1 100); do
			kill -0 "$child" 2>/dev/null || break
			sleep 0.1
		done
		# shellcheck disable=SC2046
		kill -KILL $(tree "$child") 2>/dev/null
		wait "$child" 2>/dev/null
	fi
	echo "with-postgres: got SIG$sig, stopping the cluster" >&2
	exit "$code"
}

trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

if ! DATABASE_URL=$(bash "$here/pg.sh" start "$tmp"); then
	echo "with-postgres: could not start PostgreSQL" >&2
	exit 1
fi
export DATABASE_URL
echo "with-postgres: throwaway PostgreSQL at $DATABASE_URL" >&2

# CMD runs in the background so a signal reaches the traps at once (bash defers traps
# while a foreground child runs). Background jobs get /dev/null as stdin unless it is
# passed on explicitly; fd 0 may also be closed (CI without stdin).
if (exec 3<&0) 2>/dev/null; then
	"$@" <&0 &
else
	"$@" </dev/null &
fi
child=$!
wait "$child"
rc=$?
child=
exit "$rc"
