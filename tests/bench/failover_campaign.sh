#!/usr/bin/env bash
# Failover fault campaign (issue 10): a loopback cluster (gw-a, gw-b,
# witness) behind HAProxy with the shipped deploy/haproxy.cfg, 20 chats/s
# through HAProxy (one in five an SSE stream); ROUNDS rounds of each fault
# kind on the active node: SIGKILL, SIGSTOP (3 s), Raft cut (3 s, client
# port still reachable), SIGTERM, switchover, and SIGKILL right after a
# write only the witness got (lagkill), and a one-way cut of the active's
# Raft port for 3 s (oneway; both need root and nft). Default 20 rounds =
# 140 faults (about 6 minutes on 2 cores).
#
# Prints one line per fault and the table: per fault kind the RTO through
# HAProxy (fault -> first request answered by the new active) median, p99
# and max, and the client requests that failed, split into streams cut
# mid-answer (the only failure allowed) and everything else. Exits 1 if a
# request failed other than a stream cut mid-answer, a double-active sample
# was seen, an acknowledged admin write was lost or a round did not heal.
#
# Usage: tests/bench/failover_campaign.sh [BUILD_DIR] [ROUNDS]
#   CAMPAIGN_KINDS=sigkill,raftcut restricts the kinds;
#   CAMPAIGN_REPORT=path.json also writes the figures as JSON;
#   ZG_HAPROXY_CFG=path runs against a candidate HAProxy config.
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
kinds=${CAMPAIGN_KINDS:-sigkill,sigstop,raftcut,sigterm,switchover,lagkill,oneway}
n_kinds=$(echo "$kinds" | tr ',' '\n' | grep -c .)
echo "failover campaign: $rounds rounds x {$kinds}, $(haproxy -v | head -1 | cut -d' ' -f1-3)"
echo "command: CAMPAIGN_ROUNDS=$rounds python3 -m pytest -s -q tests/integration/test_failover_campaign.py"
cd tests/integration
CAMPAIGN_ROUNDS=$rounds CAMPAIGN_KINDS=$kinds timeout $((120 + rounds * n_kinds * 15)) \
  python3 -m pytest -s -q -p no:cacheprovider test_failover_campaign.py
