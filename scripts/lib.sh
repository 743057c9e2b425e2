# Shared by scripts/pg.sh and scripts/pgbouncer.sh (sourced, not run). The
# caller sets prog (its name in messages) before sourcing.
# shellcheck shell=bash disable=SC2154 # prog is set by the caller

say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
	say "$*"
	exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# make_reachable DIR: as root the postgres user runs the servers, and must be
# able to reach DIR: mktemp directories are 0700.
make_reachable() {
	local dir=$1 p=$1
	chown postgres "$dir"
	while [ "$p" != / ]; do
		p=$(dirname "$p")
		if ! runuser -u postgres -- test -x "$p" 2>/dev/null; then
			say "granting o+x on $p so the postgres user can reach $dir"
			chmod o+x "$p"
		fi
	done
}

port_in_use() {
	# A refused connection means nobody listens; the server's own bind remains
	# the real arbiter (callers retry on another port when it fails).
	if command -v timeout >/dev/null 2>&1; then
		timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
	else
		bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
	fi
}

pick_port() {
	local p
	for _ in $(seq 1 200); do
		# Below the Linux ephemeral range (32768+), so outgoing connections do not
		# squat on it.
		p=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
		if ! port_in_use "$p"; then
			echo "$p"
			return 0
		fi
	done
	die "no free TCP port found on 127.0.0.1"
}

# apt_install PACKAGE FOUND_CMD: installs a Debian package unless FOUND_CMD
# succeeds once the lock is held. Scripts starting in parallel on a fresh CI
# machine would otherwise race for the dpkg lock, so they share one lock and
# the later ones find the package already there.
apt_install() {
	local pkg=$1 found=$2 log
	exec 9>/tmp/threeds-records-apt-install.lock
	if command -v flock >/dev/null 2>&1; then
		flock -w 600 9 || die "timed out waiting for another script to finish installing packages"
	fi
	if "$found" >/dev/null; then
		exec 9>&-
		return 0
	fi
	say "installing the Debian package '$pkg' with apt-get"
	log=$(mktemp "${TMPDIR:-/tmp}/$prog-apt.XXXXXX")
	if ! {
		apt-get update -qq &&
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg"
	} >"$log" 2>&1 </dev/null; then
		tail -n 30 "$log" >&2 || true
		exec 9>&-
		die "apt-get install $pkg failed (full log: $log)"
	fi
	exec 9>&-
	rm -f "$log"
}

# find_program VAR CANDIDATE...: the binary the variable VAR names when it is
# set (it must be executable), else the first executable candidate (empty
# ones are skipped).
find_program() {
	local var=$1 b
	shift
	if [ -n "${!var:-}" ]; then
		[ -x "${!var}" ] || die "$var=${!var} is not executable"
		echo "${!var}"
		return 0
	fi
	for b in "$@"; do
		if [ -n "$b" ] && [ -x "$b" ]; then
			echo "$b"
			return 0
		fi
	done
	return 1
}

# need_program PACKAGE FIND VAR: sets bin to what the function FIND finds. As
# root with apt-get, the Debian package PACKAGE is installed when missing, and
# the system-wide service the package starts is stopped: it is not ours to
# keep running. Otherwise it says how to install it (or set VAR) and exits.
need_program() {
	local pkg=$1 find=$2 var=$3
	if bin=$("$find"); then
		return 0
	fi
	if is_root && command -v apt-get >/dev/null 2>&1; then
		apt_install "$pkg" "$find"
		if command -v service >/dev/null 2>&1; then
			service "$pkg" stop >/dev/null 2>&1 || true
		fi
		if command -v systemctl >/dev/null 2>&1; then
			systemctl disable --now "$pkg" >/dev/null 2>&1 || true
		fi
		bin=$("$find") || die "$pkg was installed but its binary was not found"
		say "installed $bin"
		return 0
	fi
	cat >&2 <<EOF
$prog: $pkg was not found. Install it, for example:
  Debian/Ubuntu:  sudo apt-get install $pkg
  Fedora/RHEL:    sudo dnf install $pkg
  macOS:          brew install $pkg
or point $var at the binary.
EOF
	exit 1
}

# pid_in FILE: the pid written in FILE, when that process is alive.
pid_in() {
	local pid
	[ -f "$1" ] || return 1
	pid=$(cat "$1" 2>/dev/null) || return 1
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# terminate NAME PID [KILL_TARGET]: SIGTERM, which is the fast stop of every
# program these scripts run (their graceful stops would wait for open event
# streams, which may be never); SIGKILL of KILL_TARGET (default PID; "-PID" for
# a process group) if it is still there after 10 s.
terminate() {
	local name=$1 pid=$2 target=${3:-$2}
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 1 100); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	say "$name ($pid) ignored SIGTERM for 10s; killing it"
	kill -KILL -- "$target" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

# start_stop_main "$@": the command line of a script that defines usage, start
# and stop: `start DIR ARG` or `stop DIR`. Sets the globals dir and bin.
start_stop_main() {
	[ $# -ge 2 ] || usage
	local cmd=$1
	dir=$2
	[ -n "$dir" ] || usage
	bin=
	case $cmd in
	start)
		[ $# -eq 3 ] || usage
		start "$3"
		;;
	stop)
		[ $# -eq 2 ] || usage
		stop
		;;
	*)
		usage
		;;
	esac
}
