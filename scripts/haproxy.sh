#!/usr/bin/env bash
# A throwaway HAProxy in front of the service, for tests and local trials.
#
#   scripts/haproxy.sh start DIR UPSTREAM   writes DIR/haproxy.cfg, starts HAProxy on a free
#                                            127.0.0.1 port proxying to UPSTREAM (host:port)
#                                            and prints its base URL (also in DIR/url)
#   scripts/haproxy.sh stop  DIR             stops it; fine if already stopped or never started
#
# The config is the plain HTTP-mode one a gateway team writes for any backend.
# Two settings matter to the event stream (docs/gateways.md):
#   HAPROXY_HTTP_NO_DELAY   on: `option http-no-delay`, each event is sent at once.
#                           off (default, HAProxy's own): HAProxy holds small writes
#                           back to batch them, and each event arrives about 200 ms late.
#   HAPROXY_TIMEOUT_SERVER  `timeout server`, the longest the upstream may stay silent
#                           (default 60s); the stream's heartbeats must come sooner
#   HAPROXY_TIMEOUT_CLIENT  `timeout client` (default 60s)
#   HAPROXY_TIMEOUT_TUNNEL  `timeout tunnel` (default unset: then the two above apply)
#   HAPROXY_BIN             the haproxy binary (default: PATH, then /usr/sbin)
# As root with apt-get, the Debian package `haproxy` is installed when missing. Everything
# HAProxy writes (pid file) stays in DIR, so an ordinary user can run it.
set -euo pipefail

prog=haproxy.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat >&2 <<'EOF2'
usage: scripts/haproxy.sh start DIR UPSTREAM_HOST:PORT
       scripts/haproxy.sh stop  DIR
EOF2
	exit 2
}

find_bin() {
	# /usr/sbin is not on an ordinary user's PATH on Debian.
	find_program HAPROXY_BIN "$(command -v haproxy 2>/dev/null || true)" /usr/sbin/haproxy /usr/local/sbin/haproxy /opt/homebrew/bin/haproxy
}

need_bin() { need_program haproxy find_bin HAPROXY_BIN; }

running_pid() { pid_in "$dir/haproxy.pid"; }

timeout_var() {
	local name=$1 value=$2
	case $value in
	[0-9]*ms | [0-9]*s | [0-9]*m | [0-9]*h) echo "$value" ;;
	*) die "$name must be a number with ms, s, m or h (got '$value')" ;;
	esac
}

write_config() {
	local port=$1 upstream=$2 nodelay_line= tunnel_line= server client
	case ${HAPROXY_HTTP_NO_DELAY:-off} in
	on) nodelay_line='option http-no-delay' ;;
	off) ;;
	*) die "HAPROXY_HTTP_NO_DELAY must be on or off (got '$HAPROXY_HTTP_NO_DELAY')" ;;
	esac
	server=$(timeout_var HAPROXY_TIMEOUT_SERVER "${HAPROXY_TIMEOUT_SERVER:-60s}")
	client=$(timeout_var HAPROXY_TIMEOUT_CLIENT "${HAPROXY_TIMEOUT_CLIENT:-60s}")
	if [ -n "${HAPROXY_TIMEOUT_TUNNEL:-}" ]; then
		tunnel_line="timeout tunnel $(timeout_var HAPROXY_TIMEOUT_TUNNEL "$HAPROXY_TIMEOUT_TUNNEL")"
	fi
	cat >"$dir/haproxy.cfg" <<EOF2
# written by scripts/haproxy.sh: a throwaway gateway, not a production config
global
    pidfile $dir/haproxy.pid
    maxconn 2048

defaults
    mode http
    option forwardfor
    timeout connect 5s
    timeout client $client
    timeout server $server
    $tunnel_line
    $nodelay_line

frontend gateway
    bind 127.0.0.1:$port
    default_backend service

backend service
    server service1 $upstream
EOF2
}

start() {
	local upstream=$1 port i out
	case $upstream in
	*:[0-9]*) ;;
	*) die "UPSTREAM must be host:port, e.g. 127.0.0.1:8080 (got '$upstream')" ;;
	esac
	case $upstream in *[\ \;\"\'\{\}]*) die "UPSTREAM must not contain spaces, quotes, braces or ';'" ;; esac
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd -P)
	case $dir in *[\ \;\"\'\{\}]*) die "DIR must not contain spaces, quotes, braces or ';': $dir" ;; esac
	need_bin
	if running_pid >/dev/null; then
		cat "$dir/url"
		return 0
	fi
	for _ in $(seq 1 10); do
		port=$(pick_port)
		write_config "$port" "$upstream"
		"$bin" -q -c -f "$dir/haproxy.cfg" >/dev/null 2>&1 || {
			"$bin" -c -f "$dir/haproxy.cfg" >&2 || true
			die "haproxy rejected $dir/haproxy.cfg"
		}
		# -D: daemon; its pid goes to the config's pidfile.
		if out=$("$bin" -D -f "$dir/haproxy.cfg" 2>&1); then
			for i in $(seq 1 100); do
				if running_pid >/dev/null && port_in_use "$port"; then
					echo "http://127.0.0.1:$port" >"$dir/url"
					echo "http://127.0.0.1:$port"
					return 0
				fi
				if [ "$i" -gt 5 ] && ! running_pid >/dev/null; then
					break
				fi
				sleep 0.1
			done
		fi
		if printf '%s\n' "$out" | grep -qi 'address already in use\|cannot bind'; then
			continue
		fi
		printf '%s\n' "$out" >&2
		die "haproxy did not start in $dir"
	done
	die "could not find a free port for haproxy"
}

stop() {
	local pid
	[ -d "$dir" ] || return 0
	dir=$(cd "$dir" && pwd -P)
	pid=$(running_pid) || return 0
	# SIGTERM is HAProxy's hard stop; SIGUSR1 (soft stop) would wait for every
	# open event stream.
	terminate haproxy "$pid"
}

start_stop_main "$@"
