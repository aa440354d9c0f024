#!/usr/bin/env bash
# tests/bench/run.sh: throughput and added latency of zonegate against the
# mock upstream directly and against nginx as a reference reverse proxy.
#
# Prints figures; it is a measurement, not a pass/fail test (it exits 0
# unless the set-up itself fails: a binary missing, a process that does not
# start, a sanity request that does not answer 200). Every step is bounded
# in time (`timeout`), and a trap stops every process it started.
#
# Usage: tests/bench/run.sh [BUILD_DIR]     (default: <repo>/build-bench)
# Env:   DURATION (s, wrk run, 10)  WARMUP (s, 3)  CONNS (wrk connections, 64)
#        RATE (paced req/s, 2000)   PACED_SECONDS (10)  PACED_CONNS (16)
#        PIN (1: taskset pinning, 0: none)  KEEP_TMP (1: keep the temp dir)
#        UPSTREAM_CLIENT (unset: the build's default; auto: the lean client for the
#        http:// mock; curl: libcurl)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$repo/build-bench}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-64}
RATE=${RATE:-2000}
PACED_SECONDS=${PACED_SECONDS:-10}
PACED_CONNS=${PACED_CONNS:-16}
PIN=${PIN:-1}
command_line="$0 $*"
env_line="DURATION=$DURATION WARMUP=$WARMUP CONNS=$CONNS RATE=$RATE PACED_SECONDS=$PACED_SECONDS PIN=$PIN"

zonegate=$build/zonegate
mockllm=$build/tests/mockllm
for bin in "$zonegate" "$mockllm"; do
  [[ -x $bin ]] || { echo "run.sh: $bin not found; build first:" >&2
    echo "  cmake -S $repo -B $build -DCMAKE_BUILD_TYPE=Release && cmake --build $build -j2" >&2; exit 1; }
done
for tool in wrk nginx gcc curl python3 timeout; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is not installed" >&2; exit 1; }
done

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
tmp=$(mktemp -d /tmp/zonegate-bench.XXXXXX)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ ${KEEP_TMP:-0} == 1 ]]; then echo "temp dir kept: $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- CPU layout ----------------------------------------------------------
# zonegate runs one uv loop (single-threaded), so nginx gets one worker.
# With 2 cores: the proxy under test owns core 0; mockllm and the client
# (wrk -t1 / pacedload) share core 1. Both proxies see exactly the same
# layout. For the direct runs the client moves to core 0 (the core the proxy
# would use), so mockllm is never slower in the direct run for sharing its
# core with the client.
ncpu=$(nproc)
if [[ $PIN == 1 && $ncpu -ge 2 ]]; then
  on_proxy=(taskset -c 0); on_upstream=(taskset -c 1); on_client=(taskset -c 1); on_client_direct=(taskset -c 0)
  layout="proxy on core 0; mockllm + client on core 1; direct runs: client on core 0"
else
  on_proxy=(); on_upstream=(); on_client=(); on_client_direct=()
  layout="no pinning ($ncpu cores)"
fi

free_ports() { # prints N free loopback ports
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_http() { # URL: wait up to 10 s for any HTTP answer
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)
    [[ $code != 000 ]] && return 0
    sleep 0.1
  done
  echo "run.sh: nothing answers at $1" >&2
  return 1
}

body='{"model":"mock-gpt","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in one short sentence."}],"temperature":0,"stream":false}'
printf '%s' "$body" >"$tmp/body.json"

sanity() { # NAME PORT: one request must answer 200
  local code
  code=$(curl -s -o "$tmp/sanity.out" -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
    --data-binary @"$tmp/body.json" "http://127.0.0.1:$2/v1/chat/completions" || true)
  if [[ $code != 200 ]]; then
    echo "run.sh: sanity request through $1 answered $code: $(head -c 300 "$tmp/sanity.out")" >&2
    exit 1
  fi
}

# ---- start mockllm, zonegate (warn and info), nginx ---------------------
read -r port_zg_warn port_zg_info port_ngx port_ngx_log adm1 raft1 adm2 raft2 <<<"$(free_ports 8)"

"${on_upstream[@]}" "$mockllm" --listen 127.0.0.1:0 >"$tmp/mockllm.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$tmp/mockllm.out" && break; sleep 0.1; done
port_mock=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/mockllm.out")
[[ -n $port_mock ]] || { echo "run.sh: mockllm did not start: $(cat "$tmp/mockllm.out")" >&2; exit 1; }

start_zonegate() { # NAME PORT ADMIN RAFT LEVEL
  mkdir -p "$tmp/$1"
  cat >"$tmp/$1/config.json" <<EOF
{"node": {"id": "bench", "zone": "A"},
 "listen": {"gateway": "127.0.0.1:$2", "admin": "127.0.0.1:$3", "raft": "127.0.0.1:$4"},
 "cluster": {"data_dir": "$tmp/$1/data"},
 "endpoint": "http://127.0.0.1:$port_mock", "api_key": "env:ZG_BENCH_UPSTREAM_KEY",
 "auth": {"mode": "none"},
 "performance": {"max_concurrent": 1000, "max_queue": 10000, "cache_size": 0${UPSTREAM_CLIENT:+, \"upstream_client\": \"$UPSTREAM_CLIENT\"}},
 "logging": {"level": "$5"}}
EOF
  # The log goes to a file, as a real deployment's would (not to a terminal).
  ZG_BENCH_UPSTREAM_KEY=bench-key "${on_proxy[@]}" "$zonegate" serve --config "$tmp/$1/config.json" \
    >"$tmp/$1/zonegate.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$2/health/live"
}
start_zonegate zg-warn "$port_zg_warn" "$adm1" "$raft1" warn
start_zonegate zg-info "$port_zg_info" "$adm2" "$raft2" info

mkdir -p "$tmp/nginx/logs"
cat >"$tmp/nginx/nginx.conf" <<EOF
# generated by tests/bench/run.sh
worker_processes 1;          # zonegate is single-threaded: one worker for a fair comparison
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  upstream mockllm {
    server 127.0.0.1:$port_mock;
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {   # access log off, like zonegate at logging.level=warn
    listen 127.0.0.1:$port_ngx;
    access_log off;
    location / {
      proxy_pass http://mockllm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  server {   # access log on, like zonegate at logging.level=info
    listen 127.0.0.1:$port_ngx_log;
    access_log $tmp/nginx/logs/access.log;
    location / {
      proxy_pass http://mockllm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
"${on_proxy[@]}" nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -g "user $(id -un) $(id -gn);" \
  >"$tmp/nginx/stdout.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$port_ngx/"

sanity direct "$port_mock"
sanity zonegate "$port_zg_warn"
sanity zonegate-info "$port_zg_info"
sanity nginx "$port_ngx"
sanity nginx-log "$port_ngx_log"

# ---- wrk: closed-loop throughput ----------------------------------------
cat >"$tmp/chat.lua" <<EOF
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[$body]]
done = function(s, lat, req)
  io.write(string.format(
    "WRK requests=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d errors=%d non2xx=%d\n",
    s.requests, s.requests / (s.duration / 1e6), lat:percentile(50), lat:percentile(90),
    lat:percentile(99), lat.max,
    s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout, s.errors.status))
end
EOF

declare -A rps p50 p90 p99 errs
run_wrk() { # NAME PORT CLIENT-PIN...
  local name=$1 port=$2 line
  shift 2
  timeout $((WARMUP + 10)) "$@" wrk -t1 -c"$CONNS" -d"${WARMUP}s" --timeout 5s -s "$tmp/chat.lua" \
    "http://127.0.0.1:$port" >/dev/null 2>&1 || true
  timeout $((DURATION + 15)) "$@" wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 5s -s "$tmp/chat.lua" \
    "http://127.0.0.1:$port" >"$tmp/wrk-$name.out" 2>&1 || true
  line=$(grep '^WRK ' "$tmp/wrk-$name.out" || true)
  [[ -n $line ]] || { echo "run.sh: wrk against $name printed no result: $(cat "$tmp/wrk-$name.out")" >&2; exit 1; }
  rps[$name]=$(sed 's/.* rps=\([0-9.]*\).*/\1/' <<<"$line")
  p50[$name]=$(sed 's/.* p50_us=\([0-9]*\).*/\1/' <<<"$line")
  p90[$name]=$(sed 's/.* p90_us=\([0-9]*\).*/\1/' <<<"$line")
  p99[$name]=$(sed 's/.* p99_us=\([0-9]*\).*/\1/' <<<"$line")
  errs[$name]=$(sed 's/.* errors=\([0-9]*\) non2xx=\([0-9]*\).*/\1+\2/' <<<"$line")
  printf '  %-14s %s\n' "$name" "$line"
}

echo "== wrk: ${CONNS} connections, 1 thread, ${WARMUP}s warmup + ${DURATION}s, POST /v1/chat/completions ($layout)"
run_wrk direct "$port_mock" "${on_client_direct[@]}"
run_wrk zonegate "$port_zg_warn" "${on_client[@]}"
run_wrk nginx "$port_ngx" "${on_client[@]}"
run_wrk zonegate-info "$port_zg_info" "${on_client[@]}"
run_wrk nginx-log "$port_ngx_log" "${on_client[@]}"

# ---- pacedload: added latency at a fixed rate ----------------------------
gcc -std=gnu11 -O2 -Wall -Wextra -Werror -o "$tmp/pacedload" "$repo/tests/bench/pacedload.c"
declare -A pp50 pp90 pp99 pmax perr
run_paced() { # NAME PORT CLIENT-PIN...
  local name=$1 port=$2 line
  shift 2
  line=$(timeout $((PACED_SECONDS + 20)) "$@" "$tmp/pacedload" --port "$port" --body "$tmp/body.json" \
    --rate "$RATE" --duration "$PACED_SECONDS" --warmup 2 --connections "$PACED_CONNS" 2>&1 || true)
  [[ $line == PACED* ]] || { echo "run.sh: pacedload against $name failed: $line" >&2; exit 1; }
  pp50[$name]=$(sed 's/.* p50_us=\([0-9.]*\).*/\1/' <<<"$line")
  pp90[$name]=$(sed 's/.* p90_us=\([0-9.]*\).*/\1/' <<<"$line")
  pp99[$name]=$(sed 's/.* p99_us=\([0-9.]*\).*/\1/' <<<"$line")
  pmax[$name]=$(sed 's/.* max_us=\([0-9.]*\).*/\1/' <<<"$line")
  perr[$name]=$(sed 's/.* non2xx=\([0-9]*\) errors=\([0-9]*\).*/\1+\2/' <<<"$line")
  printf '  %-14s %s\n' "$name" "$line"
}
echo "== pacedload: ${RATE} req/s open loop, 2s warmup + ${PACED_SECONDS}s, ${PACED_CONNS} keep-alive connections"
run_paced direct "$port_mock" "${on_client_direct[@]}"
run_paced zonegate "$port_zg_warn" "${on_client[@]}"
run_paced nginx "$port_ngx" "${on_client[@]}"
run_paced zonegate-info "$port_zg_info" "${on_client[@]}"

# ---- summary ---------------------------------------------------------------
calc() { python3 -c "print($1)"; }
ratio_direct=$(calc "f'{${rps[zonegate]} / ${rps[direct]}:.2f}'")
ratio_nginx=$(calc "f'{${rps[zonegate]} / ${rps[nginx]}:.2f}'")
ratio_nginx_info=$(calc "f'{${rps[zonegate-info]} / ${rps[nginx-log]}:.2f}'")
added=$(calc "f'{${pp50[zonegate]} - ${pp50[direct]}:.0f}'")
added_info=$(calc "f'{${pp50[zonegate-info]} - ${pp50[direct]}:.0f}'")
added_nginx=$(calc "f'{${pp50[nginx]} - ${pp50[direct]}:.0f}'")
added_p99=$(calc "f'{${pp99[zonegate]} - ${pp99[direct]}:.0f}'")
met_tput=$(calc "'met' if ${rps[zonegate]} >= 0.8 * ${rps[nginx]} else 'NOT met'")
met_tput_info=$(calc "'met' if ${rps[zonegate-info]} >= 0.8 * ${rps[nginx-log]} else 'NOT met'")
met_lat=$(calc "'met' if ${pp50[zonegate]} - ${pp50[direct]} <= 100 else 'NOT met'")
met_lat_info=$(calc "'met' if ${pp50[zonegate-info]} - ${pp50[direct]} <= 100 else 'NOT met'")

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
cat <<EOF

### Benchmark (tests/bench/run.sh)

Command: \`$env_line $command_line\`
Machine: $ncpu × $cpu, $(uname -sr); zonegate $commit; nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), 1 worker
Layout: $layout. mockllm answers at once (latency 0).
Load average before the run: $load_before (other work on the machine makes the figures noisy; compare runs on a quiet machine).

Throughput: wrk, $CONNS keep-alive connections, 1 thread, ${DURATION}s after ${WARMUP}s warmup, small non-stream chat completion.

| target | requests/s | p50 µs | p90 µs | p99 µs | errors+non-2xx |
|---|---:|---:|---:|---:|---:|
| mockllm direct | ${rps[direct]} | ${p50[direct]} | ${p90[direct]} | ${p99[direct]} | ${errs[direct]} |
| zonegate (log warn) | ${rps[zonegate]} | ${p50[zonegate]} | ${p90[zonegate]} | ${p99[zonegate]} | ${errs[zonegate]} |
| nginx (access log off) | ${rps[nginx]} | ${p50[nginx]} | ${p90[nginx]} | ${p99[nginx]} | ${errs[nginx]} |
| zonegate (log info, access lines) | ${rps[zonegate-info]} | ${p50[zonegate-info]} | ${p90[zonegate-info]} | ${p99[zonegate-info]} | ${errs[zonegate-info]} |
| nginx (access log on) | ${rps[nginx-log]} | ${p50[nginx-log]} | ${p90[nginx-log]} | ${p99[nginx-log]} | ${errs[nginx-log]} |

Ratios: zonegate/direct = $ratio_direct; zonegate/nginx = $ratio_nginx (logs on: $ratio_nginx_info).

Latency at a fixed $RATE req/s (pacedload, open loop, ${PACED_SECONDS}s after 2s warmup; from each request's due time):

| target | p50 µs | p90 µs | p99 µs | max µs | errors+non-2xx |
|---|---:|---:|---:|---:|---:|
| mockllm direct | ${pp50[direct]} | ${pp90[direct]} | ${pp99[direct]} | ${pmax[direct]} | ${perr[direct]} |
| zonegate (log warn) | ${pp50[zonegate]} | ${pp90[zonegate]} | ${pp99[zonegate]} | ${pmax[zonegate]} | ${perr[zonegate]} |
| nginx (access log off) | ${pp50[nginx]} | ${pp90[nginx]} | ${pp99[nginx]} | ${pmax[nginx]} | ${perr[nginx]} |
| zonegate (log info) | ${pp50[zonegate-info]} | ${pp90[zonegate-info]} | ${pp99[zonegate-info]} | ${pmax[zonegate-info]} | ${perr[zonegate-info]} |

Added median latency: zonegate $added µs (log info: $added_info µs; nginx: $added_nginx µs); added p99: zonegate $added_p99 µs.

| target (from the issue) | result | |
|---|---|---|
| zonegate ≥ 0.8 × nginx throughput | $ratio_nginx × (logs on: $ratio_nginx_info ×) | $met_tput (logs on: $met_tput_info) |
| added median latency ≤ 100 µs at $RATE req/s | $added µs (log info: $added_info µs) | $met_lat (log info: $met_lat_info) |
EOF
