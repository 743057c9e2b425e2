#!/usr/bin/env bash
# A throwaway PgBouncer in transaction-pooling mode, for tests and local trials. Apart from
# where it listens, whom it trusts and the pool size, its pgbouncer.ini is stock: in particular
# no ignore_startup_parameters, so it refuses the statement_timeout startup parameter the way a
# stock production PgBouncer does.
#
#   scripts/pgbouncer.sh start DIR UPSTREAM_URL   writes DIR/pgbouncer.ini, starts pgbouncer on a free
#                                                 127.0.0.1 port and prints the URL to use instead of
#                                                 UPSTREAM_URL (also in DIR/url)
#   scripts/pgbouncer.sh stop  DIR                stops it; fine if already stopped or never started
#
# UPSTREAM_URL is a postgres:// URL such as scripts/pg.sh prints. Every database on the
# upstream server is reachable through the pooler under its own name.
#
# Tuning, from the environment at start:
#   PGBOUNCER_POOL_SIZE                 server connections per database/user pair (default 4)
#   PGBOUNCER_IGNORE_STARTUP_PARAMETERS startup parameters pgbouncer accepts and drops
#                                       (default: none, as in a stock pgbouncer.ini)
#   PGBOUNCER_BIN                       the pgbouncer binary (default: PATH, then /usr/sbin)
# As root with apt-get, the Debian package `pgbouncer` is installed when missing, and
# pgbouncer runs as the postgres user (it refuses to run as root).
set -euo pipefail

prog=pgbouncer.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat >&2 <<'EOF'
usage: scripts/pgbouncer.sh start DIR UPSTREAM_URL
       scripts/pgbouncer.sh stop  DIR
EOF
	exit 2
}

as_runner() {
	if is_root; then
		(cd / && runuser -u postgres -- "$@")
	else
		"$@"
	fi
}

find_bin() {
	# /usr/sbin is not on an ordinary user's PATH on Debian.
	find_program PGBOUNCER_BIN "$(command -v pgbouncer 2>/dev/null || true)" /usr/sbin/pgbouncer /usr/local/sbin/pgbouncer /usr/local/bin/pgbouncer
}

need_bin() { need_program pgbouncer find_bin PGBOUNCER_BIN; }

running_pid() { pid_in "$dir/pgbouncer.pid"; }

# parse_upstream URL: sets up_user, up_pass, up_host, up_port, up_db, up_query.
parse_upstream() {
	local url=$1 rest auth hostport
	case $url in
	postgres://* | postgresql://*) rest=${url#*://} ;;
	*) die "UPSTREAM_URL must be a postgres:// URL" ;;
	esac
	up_query=
	case $rest in *\?*)
		up_query=${rest#*\?}
		rest=${rest%%\?*}
		;;
	esac
	case $rest in *@*)
		auth=${rest%%@*}
		rest=${rest#*@}
		;;
	*) auth= ;;
	esac
	up_user=${auth%%:*}
	up_pass=
	case $auth in *:*) up_pass=${auth#*:} ;; esac
	hostport=${rest%%/*}
	up_db=postgres
	case $rest in */?*) up_db=${rest#*/} ;; esac
	up_host=${hostport%:*}
	up_port=5432
	case $hostport in *:*) up_port=${hostport##*:} ;; esac
	[ -n "$up_user" ] || up_user=$(id -un)
	[ -n "$up_host" ] || die "UPSTREAM_URL has no host"
	case "$up_user$up_pass$up_host$up_port" in *[\"\'\ %]*) die "UPSTREAM_URL: quotes, spaces and %-escapes are not supported here" ;; esac
}

write_config() {
	local port=$1
	# auth_type trust: the pooler listens on 127.0.0.1 only and fronts a throwaway
	# cluster. The auth file still lists the user, and its password (if any) is what
	# pgbouncer logs in to the upstream with.
	(umask 077 && printf '"%s" "%s"\n' "$up_user" "$up_pass" >"$dir/userlist.txt")
	cat >"$dir/pgbouncer.ini" <<EOF
; written by scripts/pgbouncer.sh: a throwaway pooler, not a production config
[databases]
* = host=$up_host port=$up_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
pool_mode = transaction
default_pool_size = ${PGBOUNCER_POOL_SIZE:-4}
admin_users = $up_user
EOF
	if [ -n "${PGBOUNCER_IGNORE_STARTUP_PARAMETERS:-}" ]; then
		echo "ignore_startup_parameters = $PGBOUNCER_IGNORE_STARTUP_PARAMETERS" >>"$dir/pgbouncer.ini"
	fi
	if is_root; then
		chown postgres "$dir/userlist.txt" "$dir/pgbouncer.ini"
	fi
}

start() {
	local url=$1 port i before
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd -P)
	case $dir in *" "* | *\"* | *\'*) die "DIR must not contain spaces or quotes: $dir" ;; esac
	need_bin
	parse_upstream "$url"
	if is_root; then
		id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user (pgbouncer refuses root)"
		make_reachable "$dir"
	fi
	if running_pid >/dev/null; then
		cat "$dir/url"
		return 0
	fi
	for _ in $(seq 1 10); do
		port=$(pick_port)
		write_config "$port"
		before=0
		[ -f "$dir/pgbouncer.log" ] && before=$(wc -l <"$dir/pgbouncer.log")
		as_runner "$bin" -d -q "$dir/pgbouncer.ini" || true
		for i in $(seq 1 100); do
			if running_pid >/dev/null && port_in_use "$port"; then
				local out="postgres://$up_user@127.0.0.1:$port/$up_db"
				[ -n "$up_query" ] && out="$out?$up_query"
				echo "$out" >"$dir/url"
				echo "$out"
				return 0
			fi
			if [ "$i" -gt 5 ] && ! running_pid >/dev/null; then
				break
			fi
			sleep 0.1
		done
		if tail -n +"$((before + 1))" "$dir/pgbouncer.log" 2>/dev/null | grep -q 'Address already in use'; then
			continue
		fi
		tail -n 20 "$dir/pgbouncer.log" >&2 2>/dev/null || true
		die "pgbouncer did not start in $dir (log: $dir/pgbouncer.log)"
	done
	die "could not find a free port for pgbouncer"
}

stop() {
	local pid
	[ -d "$dir" ] || return 0
	dir=$(cd "$dir" && pwd -P)
	pid=$(running_pid) || return 0
	# SIGTERM is pgbouncer's immediate shutdown: a throwaway pooler has nothing to drain.
	terminate pgbouncer "$pid"
}

start_stop_main "$@"
