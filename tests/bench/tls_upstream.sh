#!/usr/bin/env bash
# tests/bench/tls_upstream.sh: N concurrent SSE streams through zonegate to
# an https:// upstream, once with upstream.http_version "1.1" and once with
# "2" (issue 14, part 5: connection and TLS-session reuse, HTTP/2
# multiplexing to HTTPS upstreams).
#
# Makes a throwaway CA and a server certificate (openssl, in the temp dir),
# starts mockllm, nginx (one worker) with `listen ... ssl http2` (TLS 1.2 and
# 1.3, session cache and tickets on, http2_max_concurrent_streams 128, its
# default) proxying to mockllm, and for each mode a fresh zonegate (one-voter,
# auth none, cache off, log warn, usage off) whose endpoint is that https://
# upstream with upstream.ca_file = the throwaway CA. Then streamload.c
# (compiled into the temp dir) opens N streams RAMP per second, each CHUNKS
# chunks INTERVAL_MS apart. Per mode it prints: the TCP connections nginx
# accepted during the run (stub_status "accepts", i.e. the connections
# zonegate opened to the upstream), the connections that carried the run's
# requests and how their TLS handshakes went (nginx's access log:
# $connection, $ssl_session_reused, $ssl_protocol, $server_protocol: full or
# resumed), zonegate's RSS after start-up and at the peak (sampled every
# 100 ms) and CPU seconds (utime + stime) over the run, nginx's worker CPU
# seconds, and the chunk delivery delay p50/p99 (streamload: read time minus
# mockllm's mock_sent_at_ms); then a markdown table. Not a pass/fail test:
# exit 1 only if the set-up fails (a tool or binary missing, a process that
# does not start, a sanity stream that does not answer 200).
#
# Every wait is bounded (wait_http; streamload's own deadline and `timeout`
# around it); loopback only; lib.sh's trap stops every process started here
# and removes the temp dir.
#
# Usage: tests/bench/tls_upstream.sh [BUILD_DIR]   (default: <repo>/build-rel)
# Env:   N (1000) CHUNKS (20) INTERVAL_MS (500) RAMP (new streams/s, 2000)
#        MODES ("1.1 2": upstream.http_version values, run in this order)
#        PIN (1: zonegate on core 0; nginx, mockllm and the client on core 1)
#        KEEP_TMP (1 keeps the temp dir: logs, configs, nginx access log)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$repo/build-rel}
N=${N:-1000}
CHUNKS=${CHUNKS:-20}
INTERVAL_MS=${INTERVAL_MS:-500}
RAMP=${RAMP:-2000}
MODES=${MODES:-"1.1 2"}
PIN=${PIN:-1}

for bin in "$build/zonegate" "$build/tests/mockllm"; do
  [[ -x $bin ]] || { echo "tls_upstream.sh: $bin not found; build first:" >&2
    echo "  cmake -S $repo -B $build -DCMAKE_BUILD_TYPE=Release && cmake --build $build -j2" >&2; exit 1; }
done
for tool in nginx openssl gcc curl python3 timeout taskset; do
  command -v "$tool" >/dev/null || { echo "tls_upstream.sh: $tool is not installed" >&2; exit 1; }
done
for mode in $MODES; do
  [[ $mode == 1.1 || $mode == 2 ]] || { echo "tls_upstream.sh: MODES: \"$mode\" is not 1.1 or 2" >&2; exit 1; }
done


source "$repo/tests/bench/lib.sh"
bench_stream_fds tls_upstream.sh
command_line="N=$N CHUNKS=$CHUNKS INTERVAL_MS=$INTERVAL_MS RAMP=$RAMP MODES=\"$MODES\" $0 $*"
bench_tmp tls_upstream

bench_pin

bench_streamload

# ---- a throwaway CA and a certificate for localhost / 127.0.0.1 -----------------
pki=$tmp/pki
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=zonegate bench CA" -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>"$pki/openssl.log"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
  -keyout "$pki/server.key" -out "$pki/server.csr" 2>>"$pki/openssl.log"
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
  >"$pki/ext.cnf"
openssl x509 -req -in "$pki/server.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 2 -extfile "$pki/ext.cnf" -out "$pki/server.crt" 2>>"$pki/openssl.log"

# ---- mockllm and nginx ------------------------------------------------------------
"${on_side[@]}" "$build/tests/mockllm" --listen 127.0.0.1:0 >"$tmp/mockllm.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$tmp/mockllm.out" && break; sleep 0.1; done
port_mock=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/mockllm.out")
[[ -n $port_mock ]] || { echo "tls_upstream.sh: mockllm did not start" >&2; exit 1; }

read -r port_tls port_status <<<"$(free_ports 2)"
ngx=$tmp/nginx
mkdir -p "$ngx/logs"
cat >"$ngx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $nofile;
daemon off;
pid $ngx/nginx.pid;
error_log $ngx/logs/error.log warn;
events { worker_connections $(( 2 * N + N / 4 + 512 )); }
http {
  client_body_temp_path $ngx/body; proxy_temp_path $ngx/proxy;
  fastcgi_temp_path $ngx/fastcgi; uwsgi_temp_path $ngx/uwsgi; scgi_temp_path $ngx/scgi;
  keepalive_requests 1000000; keepalive_timeout 120s;
  log_format conn '\$connection \$ssl_session_reused \$ssl_protocol \$server_protocol \$status';
  upstream mockllm { server 127.0.0.1:$port_mock; keepalive 256; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$port_status; access_log off;
    location = /status { stub_status; }
  }
  server {
    listen 127.0.0.1:$port_tls ssl http2 backlog=4096;
    ssl_certificate $pki/server.crt; ssl_certificate_key $pki/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m; ssl_session_tickets on;
    access_log $ngx/logs/access.log conn;
    location / { proxy_pass http://mockllm; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; }
  }
}
EOF
"${on_side[@]}" nginx -p "$ngx" -c "$ngx/nginx.conf" -g "user $(id -un) $(id -gn);" \
  >"$ngx/stdout.log" 2>&1 &
ngx_master=$!
pids+=($!)
wait_http "http://127.0.0.1:$port_status/status"
ngx_worker=$(cat "/proc/$ngx_master/task/$ngx_master/children" 2>/dev/null | awk '{print $1}')
[[ -n $ngx_worker ]] || { echo "tls_upstream.sh: no nginx worker under $ngx_master" >&2; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code} %{http_version}' --max-time 5 --cacert "$pki/ca.crt" \
  "https://localhost:$port_tls/v1/models" || true)
[[ $code == "200 2" ]] || { echo "tls_upstream.sh: nginx over TLS + HTTP/2 answered '$code'" >&2; exit 1; }

accepts() { curl -s --max-time 5 "http://127.0.0.1:$port_status/status" | awk 'NR == 3 {print $1}'; }
cpu_s() { python3 -c "import os,sys; x=open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')',1)[1].split(); print((int(x[11])+int(x[12]))/os.sysconf('SC_CLK_TCK'))" "$1"; }

# measure.py PID -- streamload args: samples zonegate's VmRSS every 100 ms
# while streamload runs; prints streamload's line and one RUN line.
cat >"$tmp/measure.py" <<'EOF'
import os, subprocess, sys, time
pid = int(sys.argv[1])
cmd = sys.argv[3:]
tick = os.sysconf("SC_CLK_TCK")
def rss():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"): return int(line.split()[1])
def cpu():
    with open(f"/proc/{pid}/stat") as f:
        x = f.read().rsplit(")", 1)[1].split()
    return (int(x[11]) + int(x[12])) / tick
before, cpu0, peak = rss(), cpu(), 0
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
while p.poll() is None:
    peak = max(peak, rss())
    time.sleep(0.1)
out = p.stdout.read().strip()
print(out)
print(f"RUN rss_before_kb={before} rss_peak_kb={peak} cpu_s={cpu() - cpu0:.2f}")
EOF

# ---- one run per mode -----------------------------------------------------------------
results=$tmp/results.txt
: >"$results"
run_mode() { # MODE
  local mode=$1 dir=$tmp/zonegate-$1 p a r zg_pid out line run a0 a1 c0 c1 lines0
  read -r p a r <<<"$(free_ports 3)"
  mkdir -p "$dir"
  cat >"$dir/config.json" <<EOF
{"node": {"id": "bench", "zone": "A"},
 "listen": {"gateway": "127.0.0.1:$p", "admin": "127.0.0.1:$a", "raft": "127.0.0.1:$r"},
 "cluster": {"data_dir": "$dir/data"},
 "endpoint": "https://localhost:$port_tls", "api_key": "env:ZG_BENCH_UPSTREAM_KEY",
 "upstream": {"ca_file": "$pki/ca.crt", "http_version": "$mode"},
 "auth": {"mode": "none"}, "usage": {"enabled": false},
 "performance": {"max_concurrent": 100000, "max_queue": 100000, "cache_size": 0},
 "logging": {"level": "warn"}}
EOF
  ZG_BENCH_UPSTREAM_KEY=bench-key "${on_proxy[@]}" "$build/zonegate" serve --config "$dir/config.json" \
    >"$dir/zonegate.log" 2>&1 &
  zg_pid=$!
  pids+=($zg_pid)
  wait_http "http://127.0.0.1:$p/health/live"
  code=$(curl -s -o "$dir/sanity.out" -w '%{http_code}' --max-time 10 -H 'Content-Type: application/json' \
    -H 'X-Mock-Chunks: 3' -H 'X-Mock-Chunk-Interval-Ms: 10' \
    --data-binary '{"model":"mock-gpt","stream":true,"messages":[{"role":"user","content":"hi"}]}' \
    "http://127.0.0.1:$p/v1/chat/completions" || true)
  [[ $code == 200 ]] && grep -q 'data: \[DONE\]' "$dir/sanity.out" ||
    { echo "tls_upstream.sh: sanity stream (http_version $mode) answered $code: $(head -c 300 "$dir/sanity.out")" >&2
      tail -5 "$dir/zonegate.log" >&2; exit 1; }
  sleep 1
  lines0=$(wc -l <"$ngx/logs/access.log")
  a0=$(accepts); c0=$(cpu_s "$ngx_worker")
  out=$(timeout $(( N / RAMP + CHUNKS * INTERVAL_MS / 1000 + 90 )) "${on_side[@]}" python3 "$tmp/measure.py" \
    "$zg_pid" -- "$tmp/streamload" --port "$p" --streams "$N" --chunks "$CHUNKS" \
    --interval-ms "$INTERVAL_MS" --rate "$RAMP" 2>&1 || true)
  c1=$(cpu_s "$ngx_worker")
  a1=$(accepts)
  line=$(grep '^STREAMLOAD ' <<<"$out" || true)
  run=$(grep '^RUN ' <<<"$out" || true)
  [[ -n $line && -n $run ]] || { echo "tls_upstream.sh: streamload (http_version $mode) failed: $out" >&2; exit 1; }
  # The run's requests in nginx's log: connections that carried them and
  # how each connection's handshake went (the status request's own
  # connection is in a1 - a0, hence the - 1).
  local conn
  conn=$(tail -n +"$((lines0 + 1))" "$ngx/logs/access.log" | awk '
    !($1 in seen) { seen[$1] = 1; n++; if ($2 == "r") resumed++; else full++; proto[$3 " " $4]++ }
    END { p = ""; for (k in proto) p = p (p ? "," : "") k; gsub(/ /, "_", p);
          printf "conns_used=%d full=%d resumed=%d requests=%d protocol=%s", n, full, resumed, NR, p }')
  echo "== http_version $mode: $line"
  echo "   $run nginx_cpu_s=$(python3 -c "print(f'{$c1 - $c0:.2f}')") accepted=$((a1 - a0 - 1)) $conn"
  echo "$mode $line $run nginx_cpu_s=$(python3 -c "print(f'{$c1 - $c0:.2f}')") accepted=$((a1 - a0 - 1)) $conn" >>"$results"
  kill -TERM "$zg_pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$zg_pid" 2>/dev/null || break; sleep 0.1; done
  sleep 2 # nginx logs the closed connections; the next run starts clean
}

echo "== N=$N streams, $CHUNKS chunks ${INTERVAL_MS} ms apart, ramp $RAMP/s; modes: $MODES (load $(cut -d' ' -f1-3 /proc/loadavg))"
for mode in $MODES; do run_mode "$mode"; done

# ---- summary --------------------------------------------------------------------------
python3 - "$results" "$N" <<'EOF' | tee "$tmp/summary.md"
import re, sys
n = int(sys.argv[2])
print("\n| upstream.http_version | TCP connections opened to nginx | TLS handshakes full / resumed | requests | zonegate RSS after start-up → peak MB (KB per stream) | zonegate CPU s | nginx worker CPU s | chunk delay p50 / p99 ms | ok / failed |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for line in open(sys.argv[1]):
    mode, rest = line.split(" ", 1)
    kv = dict(re.findall(r"(\w+)=([-0-9.]+)", rest))
    x = {k: float(v) for k, v in kv.items()}
    proto = re.search(r"protocol=(\S+)", rest).group(1).replace("_", " ")
    print(f"| {mode} ({proto}) | {x['accepted']:.0f} (carried the run: {x['conns_used']:.0f}) | "
          f"{x['full']:.0f} / {x['resumed']:.0f} | {x['requests']:.0f} | "
          f"{x['rss_before_kb']/1024:.1f} → {x['rss_peak_kb']/1024:.1f} "
          f"({(x['rss_peak_kb'] - x['rss_before_kb']) / n:.1f}) | {x['cpu_s']:.2f} | {x['nginx_cpu_s']:.2f} | "
          f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f} | {x['ok']:.0f} / {x['failed']:.0f} |")
EOF
echo
echo "Command: $command_line"
