#!/usr/bin/env bash
# A throwaway nginx reverse proxy in front of the service, for tests and local trials.
#
#   scripts/nginx.sh start DIR UPSTREAM   writes DIR/nginx.conf, starts nginx on a free
#                                          127.0.0.1 port proxying to UPSTREAM (host:port)
#                                          and prints its base URL (also in DIR/url)
#   scripts/nginx.sh stop  DIR             stops it; fine if already stopped or never started
#
# The config is the plain one a gateway team writes for any HTTP backend, with
# NOTHING specific to Server-Sent Events: proxy_buffering stays at nginx's
# default (on). With that default nginx holds a streamed answer until the
# upstream ends it when the upstream speaks HTTP/1.0 to it (nginx's default
# proxy_http_version) or when gzip applies to it; the service's
# `X-Accel-Buffering: no` turns buffering off for the stream, which is what
# gateway_test.go proves against each variant below.
#
# Tuning, from the environment at start:
#   NGINX_PROXY_READ_TIMEOUT  proxy_read_timeout, the longest the upstream may stay
#                             silent before nginx closes the connection (default 60s,
#                             nginx's own default)
#   NGINX_PROXY_HTTP_VERSION  1.1 (default: keep-alive to the upstream, chunked bodies)
#                             or 1.0 (nginx's own default when the directive is absent)
#   NGINX_GZIP                on: compress text/event-stream and application/json
#                             answers, as a site that gzips everything does (default off)
#   NGINX_BIN                 the nginx binary (default: PATH, then /usr/sbin)
# As root with apt-get, the Debian package `nginx` is installed when missing. Everything
# nginx writes (pid file, logs, temp files) stays in DIR, so an ordinary user can run it.
set -euo pipefail

prog=nginx.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat >&2 <<'EOF'
usage: scripts/nginx.sh start DIR UPSTREAM_HOST:PORT
       scripts/nginx.sh stop  DIR
EOF
	exit 2
}

find_bin() {
	# /usr/sbin is not on an ordinary user's PATH on Debian.
	find_program NGINX_BIN "$(command -v nginx 2>/dev/null || true)" /usr/sbin/nginx /usr/local/sbin/nginx /usr/local/nginx/sbin/nginx /opt/homebrew/bin/nginx
}

need_bin() { need_program nginx find_bin NGINX_BIN; }

running_pid() { pid_in "$dir/nginx.pid"; }

write_config() {
	local port=$1 upstream=$2 user_line= version gzip_lines= conn_line=
	version=${NGINX_PROXY_HTTP_VERSION:-1.1}
	case $version in
	1.1) conn_line='proxy_set_header Connection "";' ;;
	1.0) ;; # nginx sends "Connection: close" itself
	*) die "NGINX_PROXY_HTTP_VERSION must be 1.0 or 1.1 (got '$version')" ;;
	esac
	case ${NGINX_GZIP:-off} in
	on) gzip_lines='gzip on; gzip_types text/event-stream application/json; gzip_min_length 1;' ;;
	off) ;;
	*) die "NGINX_GZIP must be on or off (got '$NGINX_GZIP')" ;;
	esac
	# As root, nginx would run its workers as `nobody`, which cannot write the
	# temp directories below DIR (a 0700 mktemp directory); a throwaway proxy on
	# 127.0.0.1 may keep root's rights. An ordinary user's nginx ignores `user`.
	if is_root; then
		user_line='user root;'
	fi
	mkdir -p "$dir/tmp"
	cat >"$dir/nginx.conf" <<EOF
# written by scripts/nginx.sh: a throwaway gateway, not a production config
daemon on;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
$user_line

events {
    worker_connections 1024;
}

http {
    access_log $dir/access.log;
    client_body_temp_path $dir/tmp/client_body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    $gzip_lines

    server {
        listen 127.0.0.1:$port;

        # A generic proxy. No SSE-specific tuning: proxy_buffering is left
        # at its default (on).
        location / {
            proxy_pass http://$upstream;
            proxy_http_version $version;
            $conn_line
            proxy_read_timeout ${NGINX_PROXY_READ_TIMEOUT:-60s};
        }
    }
}
EOF
}

start() {
	local upstream=$1 port i before out
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
		before=0
		[ -f "$dir/error.log" ] && before=$(wc -l <"$dir/error.log")
		# -e: the error log before the config is read (nginx >= 1.19.5), so an
		# ordinary user gets no alert about /var/log/nginx; -p: relative paths
		# resolve in DIR, never in the system prefix.
		if out=$("$bin" -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" 2>&1); then
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
		if printf '%s\n' "$out" | grep -q 'Address already in use' ||
			tail -n +"$((before + 1))" "$dir/error.log" 2>/dev/null | grep -q 'Address already in use'; then
			continue
		fi
		printf '%s\n' "$out" >&2
		tail -n 20 "$dir/error.log" >&2 2>/dev/null || true
		die "nginx did not start in $dir (log: $dir/error.log)"
	done
	die "could not find a free port for nginx"
}

stop() {
	local pid
	[ -d "$dir" ] || return 0
	dir=$(cd "$dir" && pwd -P)
	pid=$(running_pid) || return 0
	# SIGTERM is nginx's fast shutdown; SIGQUIT (graceful) would wait for every
	# open event stream. The master made itself a session leader: its group
	# holds the workers too.
	terminate nginx "$pid" "-$pid"
}

start_stop_main "$@"
