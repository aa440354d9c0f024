#!/usr/bin/env bash
# Admin write benchmark (issue: Raft group): throughput and commit latency
# of replicated admin writes (POST /v1/tokens on the leader: the answer
# comes only after the entry is committed by a majority and applied) on a
# three-node loopback cluster with raft_uv on disk. Prints figures; it is
# not a pass/fail test. Bounded: each wrk run lasts DURATION seconds. The
# last column is the CPU time of the three nodes per write (user + system),
# steadier than writes/s on a shared machine.
#
# Usage: tests/bench/admin_writes.sh [BUILD_DIR] [DURATION]
#   SNAP=N overrides cluster.snapshot_threshold (default: the config default).
#   TLS=1 runs the cluster with mutual TLS (security.tls: Raft and admin API
#   over TLS 1.3, certificates from `zonegate certs init`); TLS=both runs the
#   plaintext cluster and then the TLS one, for a before/after in one run.
#   ROUNDS=N repeats that N times (interleaved) and, with TLS=both, prints
#   the median writes/s and node CPU per write of each mode and the cost.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
duration=${2:-10}
work=$(mktemp -d /tmp/zg-bench-admin.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do { kill -9 "$p"; wait "$p"; } 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

export ZONEGATE_CLUSTER_SECRET=bench-cluster-secret-0001
export ZONEGATE_MASTER_KEY=$(openssl rand -base64 32)
export ZONEGATE_ADMIN_TOKEN=bench-admin-token-000001
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
# user + system clock ticks of the node processes (fields 14 and 15 of stat)
cpu_ticks() {
  local t=0 p
  for p in "${pids[@]}"; do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
bench_once() {
declare -A G A R
tls=$1
for n in gw-a gw-b witness; do G[$n]=$(port); A[$n]=$(port); R[$n]=$(port); done
tlsopt="" scheme=http
if [ "$tls" = 1 ]; then
  rm -rf "$work/certs"
  "$build/zonegate" certs init "$work/certs" --nodes gw-a,gw-b,witness >/dev/null
  scheme=https
fi
zone() { case $1 in gw-a) echo A;; gw-b) echo B;; *) echo C;; esac; }
role() { [ "$1" = witness ] && echo witness || echo gateway; }
snapopt=""
[ -n "${SNAP:-}" ] && snapopt=",\"snapshot_threshold\":$SNAP"
for n in gw-a gw-b witness; do
  peers=""
  for p in gw-a gw-b witness; do
    [ "$p" = "$n" ] && continue
    peers+="{\"id\":\"$p\",\"zone\":\"$(zone $p)\",\"role\":\"$(role $p)\",\"raft\":\"127.0.0.1:${R[$p]}\",\"admin\":\"127.0.0.1:${A[$p]}\",\"gateway\":\"127.0.0.1:${G[$p]}\"},"
  done
  [ "$tls" = 1 ] && tlsopt=",\"tls\":{\"cert\":\"$work/certs/$n.crt\",\"key\":\"$work/certs/$n.key\",\"ca\":\"$work/certs/ca.crt\"}"
  rm -rf "$work/data-$n"
  cat > "$work/$n.json" <<JSON
{"node":{"id":"$n","zone":"$(zone $n)","role":"$(role $n)"},
 "listen":{"gateway":"127.0.0.1:${G[$n]}","admin":"127.0.0.1:${A[$n]}","raft":"127.0.0.1:${R[$n]}"},
 "cluster":{"data_dir":"$work/data-$n","peers":[${peers%,}],"secret":"env:ZONEGATE_CLUSTER_SECRET"$snapopt},
 "security":{"master_key":"env:ZONEGATE_MASTER_KEY","admin_token":"env:ZONEGATE_ADMIN_TOKEN"$tlsopt},
 "endpoint":"http://127.0.0.1:9","logging":{"level":"warn"}}
JSON
  "$build/zonegate" serve --config "$work/$n.json" > "$work/$n.log" 2>&1 &
  pids+=($!)
done
leader=""
for _ in $(seq 1 100); do
  for n in gw-a gw-b; do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:${G[$n]}/health/active")" = 200 ]; then leader=$n; fi
  done
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || { echo "no active node came up" >&2; exit 1; }
cat > "$work/write.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("ZONEGATE_ADMIN_TOKEN")
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/v1/tokens", nil, '{"name":"bench' .. counter .. '"}')
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %.0f %.3f %.3f %.3f\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
LUA
echo "zonegate admin write benchmark ($([ "$tls" = 1 ] && echo "mutual TLS 1.3 on Raft + admin" || echo plaintext)): 3 voters on loopback (raft_uv on $(df -h "$work" | awk 'NR==2{print $1}')), leader $leader, ${duration}s per run"
printf '%-28s %10s %8s %12s %10s %10s %10s %14s\n' "load" "writes" "errors" "writes/s" "p50 ms" "p99 ms" "max ms" "node CPU us/w"
for c in 1 16 64; do
  cpu0=$(cpu_ticks)
  out=$(wrk -t1 -c"$c" -d"${duration}s" -s "$work/write.lua" "$scheme://127.0.0.1:${A[$leader]}" | grep '^RESULT')
  cpu1=$(cpu_ticks)
  read -r _ reqs errs rps p50 p99 max <<<"$out"
  # CPU of the three nodes per write (user + system): steadier than
  # writes/s on a shared machine, and what TLS costs.
  cpu_us=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$reqs" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%.0f", (n > 0 ? (b - a) * 1e6 / hz / n : 0) }')
  printf '%-28s %10s %8s %12s %10s %10s %10s %14s\n' "$c concurrent writer(s)" "$reqs" "$errs" "$rps" "$p50" "$p99" "$max" "$cpu_us"
  echo "$tls $c $rps $cpu_us" >> "$work/summary"
done
for p in "${pids[@]}"; do { kill -9 "$p"; wait "$p"; } 2>/dev/null || true; done
pids=()
}
rounds=${ROUNDS:-1}
for r in $(seq 1 "$rounds"); do
  [ "$rounds" -gt 1 ] && echo "== round $r of $rounds"
  case "${TLS:-0}" in
    both) bench_once 0; echo; bench_once 1 ;;
    *) bench_once "${TLS:-0}" ;;
  esac
done
if [ "${TLS:-0}" = both ]; then
  # Medians over the rounds, and what TLS costs (interleaved rounds, so the
  # machine's other load falls on both modes alike).
  python3 - "$work/summary" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print("\nTLS cost (median of %d interleaved round(s)):" % (len(rows) // 6))
print("%-22s %14s %14s %10s %16s %16s %10s" % ("writers", "plain w/s", "TLS w/s", "w/s cost", "plain CPU us/w", "TLS CPU us/w", "CPU cost"))
for c in ("1", "16", "64"):
    def med(tls, col):
        return statistics.median(float(r[col]) for r in rows if r[0] == tls and r[1] == c)
    pw, tw, pc, tc = med("0", 2), med("1", 2), med("0", 3), med("1", 3)
    print("%-22s %14.0f %14.0f %9.0f%% %16.0f %16.0f %9.0f%%" % (
        c, pw, tw, 100 * (1 - tw / pw) if pw else 0, pc, tc, 100 * (tc / pc - 1) if pc else 0))
PY
fi
echo "targets: p99 <= 10 ms, >= 1000 writes/s; TLS costs at most 20 % of the plaintext writes/s"
