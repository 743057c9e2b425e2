#!/usr/bin/env bash
# Throwaway PostgreSQL clusters for tests, CI and the demo.
#
#   scripts/pg.sh start   DIR   initdb (once) + start; prints the URL on stdout, also in DIR/url
#   scripts/pg.sh stop    DIR   fast shutdown; fine if already stopped or never started
#   scripts/pg.sh restart DIR   stop + start on the same port (for reconnect tests)
#   scripts/pg.sh url     DIR   prints the URL of DIR's cluster
#   scripts/pg.sh standby DIR PRIMARY_DIR
#                               a hot standby of the (running) cluster in PRIMARY_DIR:
#                               pg_basebackup -R (once), then start on a port of its own
#                               and wait until it accepts connections; prints its URL like
#                               start. stop/restart/url work on DIR as on any cluster.
#
# Binaries: $PG_BINDIR, else the newest /usr/lib/postgresql/*/bin, else
# `pg_config --bindir`, else PATH; as root with apt-get they are installed when missing.
# The cluster trusts every local connection and is tuned for speed, not durability:
# never point it at data you want to keep.
set -euo pipefail

prog=pg.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat >&2 <<'EOF'
usage: scripts/pg.sh start|stop|restart|url DIR
       scripts/pg.sh standby DIR PRIMARY_DIR
EOF
	exit 2
}

# initdb and postgres refuse to run as root, so as root everything that touches the
# cluster runs as the postgres user; an ordinary user runs the binaries directly.
as_pg() {
	if is_root; then
		(cd / && runuser -u postgres -- "$@")
	else
		"$@"
	fi
}

valid_bindir() {
	[ -n "${1:-}" ] && [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ] && [ -x "$1/postgres" ]
}

find_bindir() {
	local d
	if [ -n "${PG_BINDIR:-}" ]; then
		valid_bindir "$PG_BINDIR" || die "PG_BINDIR=$PG_BINDIR has no initdb/pg_ctl/postgres"
		echo "$PG_BINDIR"
		return 0
	fi
	# A client-only install (postgresql-client) also creates /usr/lib/postgresql/N/bin,
	# so a directory only counts when it holds the server binaries.
	for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5,5nr); do
		if valid_bindir "$d"; then
			echo "$d"
			return 0
		fi
	done
	if command -v pg_config >/dev/null 2>&1; then
		d=$(pg_config --bindir 2>/dev/null || true)
		if valid_bindir "$d"; then
			echo "$d"
			return 0
		fi
	fi
	if command -v initdb >/dev/null 2>&1; then
		d=$(dirname "$(command -v initdb)")
		if valid_bindir "$d"; then
			echo "$d"
			return 0
		fi
	fi
	return 1
}

install_postgres() {
	apt_install postgresql find_bindir
	# The Debian package creates and starts a 'main' cluster on port 5432; it would only
	# hold that port and memory, so stop it and keep it from starting again.
	if command -v pg_lsclusters >/dev/null 2>&1; then
		pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
			pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
			if [ -f "/etc/postgresql/$ver/$name/start.conf" ]; then
				echo manual >"/etc/postgresql/$ver/$name/start.conf"
			fi
		done
	fi
	if command -v service >/dev/null 2>&1; then
		service postgresql stop >/dev/null 2>&1 || true
	fi
	say "PostgreSQL installed (auto-started cluster stopped)"
}

need_bindir() {
	local d
	# A data directory only works with the major version that created it.
	if [ -z "${PG_BINDIR:-}" ] && [ -f "$dir/bindir" ]; then
		d=$(cat "$dir/bindir")
		if valid_bindir "$d"; then
			bindir=$d
			return 0
		fi
	fi
	if bindir=$(find_bindir); then
		return 0
	fi
	if is_root && command -v apt-get >/dev/null 2>&1; then
		install_postgres
		bindir=$(find_bindir) || die "PostgreSQL was installed but its binaries were not found"
		return 0
	fi
	cat >&2 <<'EOF'
pg.sh: PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found.
Install PostgreSQL, for example:
  Debian/Ubuntu:  sudo apt-get install postgresql
  Fedora/RHEL:    sudo dnf install postgresql-server
  macOS:          brew install postgresql@16
or point PG_BINDIR at the directory that holds initdb and pg_ctl.
EOF
	exit 1
}

is_running() {
	[ -f "$dir/data/postmaster.pid" ] && as_pg "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

init_cluster() {
	[ -f "$dir/data/PG_VERSION" ] && return 0
	local out
	if ! out=$(as_pg "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync 2>&1); then
		printf '%s\n' "$out" >&2
		die "initdb failed in $dir/data"
	fi
	# Settings live in the config file (not on the pg_ctl command line) so a path with
	# spaces survives; the port stays on the command line because start picks it.
	cat >>"$dir/data/postgresql.conf" <<EOF

# added by scripts/pg.sh: a disposable cluster, fast rather than durable
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
# logical: STREAM_SOURCE=wal decodes the WAL, and 'pg.sh standby' streams from it
# too; initdb -A trust already lets loopback replication connections in. Every
# wal-source service of a parallel test run holds a slot and a WAL sender.
wal_level = logical
max_wal_senders = 40
max_replication_slots = 40
EOF
}

# try_start PORT: 0 = up, 3 = the port was taken (caller may retry), 1 = other failure.
try_start() {
	local port=$1 out before
	before=0
	if [ -f "$dir/log" ]; then
		before=$(wc -l <"$dir/log")
	fi
	if out=$(as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -o "-p $port" -w -t 60 start 2>&1); then
		return 0
	fi
	if tail -n +"$((before + 1))" "$dir/log" 2>/dev/null | grep -q 'Address already in use'; then
		return 3
	fi
	printf '%s\n' "$out" >&2
	tail -n 20 "$dir/log" >&2 2>/dev/null || true
	return 1
}

write_url() {
	local port=$1 url
	url="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
	echo "$port" >"$dir/port"
	echo "$url" >"$dir/url"
	echo "$bindir" >"$dir/bindir"
	echo "$url"
}

wait_ready() {
	local port=$1
	for _ in $(seq 1 100); do
		if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -t 2 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	die "PostgreSQL in $dir did not accept connections on 127.0.0.1:$port (log: $dir/log)"
}

# start_cluster [PORT]: with PORT (restart) that exact port or fail; without, the
# previous port when free, else a random free one.
start_cluster() {
	local want=${1:-} port rc attempt
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd -P)
	case $dir in *"'"*) die "DIR must not contain a single quote: $dir" ;; esac
	need_bindir
	if is_root; then
		id postgres >/dev/null 2>&1 ||
			die "running as root needs a 'postgres' user (initdb refuses root); create one or run as an ordinary user"
		make_reachable "$dir"
	fi
	init_cluster
	if is_running; then
		port=$(cat "$dir/port" 2>/dev/null) || die "$dir is running but $dir/port is missing"
		write_url "$port"
		return 0
	fi
	for attempt in $(seq 1 20); do
		if [ -n "$want" ]; then
			port=$want
		elif [ "$attempt" -eq 1 ] && [ -f "$dir/port" ] && ! port_in_use "$(cat "$dir/port")"; then
			port=$(cat "$dir/port")
		else
			port=$(pick_port)
		fi
		rc=0
		try_start "$port" || rc=$?
		if [ "$rc" -eq 0 ]; then
			wait_ready "$port"
			write_url "$port"
			return 0
		fi
		if [ "$rc" -ne 3 ]; then
			die "PostgreSQL failed to start in $dir (log: $dir/log)"
		fi
		if [ -n "$want" ]; then
			# The port may be released a moment after the old postmaster exits.
			[ "$attempt" -lt 20 ] || break
			sleep 0.25
		fi
	done
	if [ -n "$want" ]; then
		die "port $want is taken by another process; cannot restart $dir on the same port"
	fi
	die "could not find a free port for $dir"
}

stop_cluster() {
	[ -d "$dir" ] || return 0
	dir=$(cd "$dir" && pwd -P)
	[ -f "$dir/data/postmaster.pid" ] || return 0
	need_bindir
	is_running || return 0
	if ! as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1; then
		say "fast shutdown of $dir failed; trying immediate"
		as_pg "$bindir/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
			die "could not stop PostgreSQL in $dir"
	fi
}

# make_standby PRIMARY_DIR: fills DIR/data with a base backup of the running
# cluster in PRIMARY_DIR, set up to follow it (-R: standby.signal and
# primary_conninfo), unless DIR already holds a cluster.
make_standby() {
	local pdir=$1 pport level hba out
	{ [ -f "$pdir/port" ] && [ -f "$pdir/bindir" ]; } ||
		die "$pdir holds no cluster started by pg.sh: start the primary first"
	pdir=$(cd "$pdir" && pwd -P)
	pport=$(cat "$pdir/port")
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd -P)
	case $dir in *"'"*) die "DIR must not contain a single quote: $dir" ;; esac
	[ "$dir" != "$pdir" ] || die "the standby needs a directory of its own, not the primary's"
	if [ -f "$dir/data/PG_VERSION" ]; then
		return 0
	fi
	# The primary's major version, or the backup cannot be started; need_bindir
	# then keeps using it through DIR/bindir.
	if [ -z "${PG_BINDIR:-}" ]; then
		PG_BINDIR=$(cat "$pdir/bindir")
	fi
	need_bindir
	if is_root; then
		id postgres >/dev/null 2>&1 ||
			die "running as root needs a 'postgres' user (initdb refuses root); create one or run as an ordinary user"
		make_reachable "$dir"
	fi
	"$bindir/pg_isready" -q -h 127.0.0.1 -p "$pport" -U postgres -d postgres -t 5 ||
		die "the primary in $pdir does not accept connections on 127.0.0.1:$pport: start it first"
	# A cluster made before pg.sh set these (or by someone else) may lack them:
	# say what to change rather than let pg_basebackup fail obscurely.
	level=$("$bindir/psql" -X -A -t -q -h 127.0.0.1 -p "$pport" -U postgres -d postgres -c 'SHOW wal_level') ||
		die "could not ask the primary in $pdir for its wal_level"
	case $level in
	replica | logical) ;;
	*) die "the primary in $pdir has wal_level=$level; set wal_level = replica in $pdir/data/postgresql.conf and restart it" ;;
	esac
	hba=$(as_pg cat "$pdir/data/pg_hba.conf")
	if ! printf '%s\n' "$hba" | grep -Eq '^[[:space:]]*host[[:space:]]+replication[[:space:]]+(all|postgres)[[:space:]]+127\.0\.0\.1/32'; then
		die "$pdir/data/pg_hba.conf has no 'host replication' line for 127.0.0.1/32; add one (trust is fine for a throwaway cluster) and reload the primary"
	fi
	if ! out=$(as_pg "$bindir/pg_basebackup" -D "$dir/data" -h 127.0.0.1 -p "$pport" -U postgres \
		-R -X stream -c fast --no-sync 2>&1); then
		printf '%s\n' "$out" >&2
		die "pg_basebackup from $pdir into $dir/data failed"
	fi
	# The copy carries the primary's postgresql.conf; the last setting in the file
	# wins, so the standby gets its own socket directory. hot_standby (the
	# default) is what lets it answer queries.
	cat >>"$dir/data/postgresql.conf" <<EOF

# added by scripts/pg.sh standby: a hot standby of $pdir
unix_socket_directories = '$dir'
hot_standby = on
EOF
	echo "$pdir" >"$dir/primary"
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$2
[ -n "$dir" ] || usage
bindir=
if [ "$cmd" = standby ]; then
	{ [ $# -eq 3 ] && [ -n "$3" ]; } || usage
else
	[ $# -eq 2 ] || usage
fi

case $cmd in
start)
	start_cluster
	;;
stop)
	stop_cluster
	;;
restart)
	[ -f "$dir/port" ] || die "$dir has no port yet: start it first"
	port=$(cat "$dir/port")
	stop_cluster
	start_cluster "$port"
	;;
standby)
	make_standby "$3"
	start_cluster
	;;
url)
	[ -f "$dir/url" ] || die "no cluster has been started in $dir"
	cat "$dir/url"
	;;
*)
	usage
	;;
esac
