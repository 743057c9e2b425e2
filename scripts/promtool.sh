#!/usr/bin/env bash
# Runs Prometheus's promtool with the given arguments, for tests and local checks of
# deploy/prometheus/:
#
#   scripts/promtool.sh check rules deploy/prometheus/rules.yml
#   scripts/promtool.sh test rules deploy/prometheus/rules_test.yml
#   curl -s http://127.0.0.1:8080/metrics | scripts/promtool.sh check metrics
#
# promtool is taken from PROMTOOL_BIN, then PATH, then the usual places. As root with
# apt-get, the Debian package `prometheus` (which brings promtool) is installed when
# missing, and the Prometheus server that package starts is stopped: only promtool is
# wanted. Otherwise it says how to install it and exits 1.
set -euo pipefail

prog=promtool.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

find_bin() {
	find_program PROMTOOL_BIN "$(command -v promtool 2>/dev/null || true)" /usr/bin/promtool /usr/local/bin/promtool /opt/homebrew/bin/promtool
}

bin=
need_program prometheus find_bin PROMTOOL_BIN
exec "$bin" "$@"
