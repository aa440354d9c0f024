#!/usr/bin/env bash
# Failover RTO benchmark (issue: failover tests, item 1): a loopback cluster
# (gw-a, gw-b, witness) behind HAProxy with deploy/haproxy.cfg, 20 req/s of
# chats through HAProxy; the active is SIGKILLed ROUNDS times (default 20),
# restarted and rejoined between rounds. Prints the RTO through HAProxy per
# round (kill -> first successful request answered by the new active, by
# its X-Zonegate-Node header), then min / median / p99 / max and the failed
# client requests. The goal (p99 <= 2 s) is printed, not asserted; the run
# fails (exit 1) only if a round does not complete, a double-active sample
# is seen or an acknowledged admin write is lost.
#
# Usage: tests/bench/failover_rto.sh [BUILD_DIR] [ROUNDS]
#   BUILD_DIR defaults to build; needs haproxy, python3 with pytest.
#   FAILOVER_REPORT=path.json also writes the figures as JSON.
#   ZG_HAPROXY_CFG=path runs against a candidate HAProxy config.
#   TLS=1 runs the cluster with mutual TLS between nodes (security.tls);
#   TLS=both runs plaintext, then TLS (before/after in one run).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
rounds=${2:-20}
export ZONEGATE_BIN=${ZONEGATE_BIN:-$PWD/$build/zonegate}
export MOCKLLM_BIN=${MOCKLLM_BIN:-$PWD/$build/tests/mockllm}
for bin in "$ZONEGATE_BIN" "$MOCKLLM_BIN"; do
  [ -x "$bin" ] || { echo "error: $bin not found; build first (cmake --build $build)" >&2; exit 1; }
done
command -v haproxy >/dev/null || { echo "error: haproxy is not installed" >&2; exit 1; }
echo "failover RTO: $rounds x SIGKILL of the active, $(haproxy -v | head -1 | cut -d' ' -f1-3)"
run_once() {
  echo "== $([ "$1" = 1 ] && echo "mutual TLS between nodes" || echo "plaintext between nodes")"
  echo "command: ZG_TLS=$1 FAILOVER_ROUNDS=$rounds python3 -m pytest -s -q tests/integration/test_failover.py -k sigkill"
  ZG_TLS=$1 FAILOVER_ROUNDS=$rounds timeout $((60 + rounds * 20)) \
    python3 -m pytest -s -q -p no:cacheprovider tests/integration/test_failover.py -k sigkill
}
case "${TLS:-0}" in
  both) run_once 0; run_once 1 ;;
  *) run_once "${TLS:-0}" ;;
esac
