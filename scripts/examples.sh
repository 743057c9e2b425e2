#!/usr/bin/env bash
# Gets the example clients under examples/ ready to run, for tests and trials.
#
#   scripts/examples.sh setup   finds Node.js and npm (as root with apt-get, installs
#                               the Debian packages `nodejs` and `npm` when missing),
#                               runs `npm ci` in examples/ when its node_modules is
#                               missing or older than package-lock.json, and prints
#                               the node binary's path
#
# From the environment: NODE_BIN and NPM_BIN (the binaries; default: PATH, then
# /usr/bin and /usr/local/bin). The examples need Node 18 or later (fetch and
# ReadableStream built in): Debian 12's nodejs is 18.
set -euo pipefail

prog=examples.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

examples=$(cd "$(dirname "${BASH_SOURCE[0]}")/../examples" && pwd -P)

find_node() {
	find_program NODE_BIN "$(command -v node 2>/dev/null || true)" "$(command -v nodejs 2>/dev/null || true)" /usr/bin/node /usr/bin/nodejs /usr/local/bin/node /opt/homebrew/bin/node
}

find_npm() {
	find_program NPM_BIN "$(command -v npm 2>/dev/null || true)" /usr/bin/npm /usr/local/bin/npm /opt/homebrew/bin/npm
}

setup() {
	local node npm major
	need_program nodejs find_node NODE_BIN
	node=$bin
	need_program npm find_npm NPM_BIN
	npm=$bin
	major=$("$node" -p 'process.versions.node.split(".")[0]')
	[ "$major" -ge 18 ] || die "$node is Node.js $major; the examples need 18 or later (fetch and ReadableStream built in)"
	if [ ! -f "$examples/node_modules/.package-lock.json" ] ||
		[ "$examples/package-lock.json" -nt "$examples/node_modules/.package-lock.json" ]; then
		say "npm ci in $examples"
		# A lock held across parallel test packages: two npm ci in one folder
		# would delete each other's files.
		exec 8>"$examples/.npm-ci.lock"
		if command -v flock >/dev/null 2>&1; then
			flock -w 600 8 || die "timed out waiting for another npm ci in $examples"
		fi
		if [ ! -f "$examples/node_modules/.package-lock.json" ] ||
			[ "$examples/package-lock.json" -nt "$examples/node_modules/.package-lock.json" ]; then
			(cd "$examples" && "$npm" ci --no-audit --no-fund --loglevel=error) >&2 ||
				die "npm ci failed in $examples"
		fi
		exec 8>&-
	fi
	echo "$node"
}

case ${1:-} in
setup) setup ;;
*)
	echo "usage: scripts/examples.sh setup" >&2
	exit 2
	;;
esac
