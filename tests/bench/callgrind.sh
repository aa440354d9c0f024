#!/usr/bin/env bash
# tests/bench/callgrind.sh: instructions per small request (callgrind
# Ir, stable across runs on a noisy machine) for zonegate and for nginx
# (one worker, proxy_pass with keepalive) in front of the same mockllm.
#
# Each proxy runs under `valgrind --tool=callgrind`; a client sends WARM
# requests, the counters are zeroed (callgrind_control -z), then N requests
# go over one keep-alive connection and the counters are dumped: Ir / N is
# the proxy's whole cost per request, its event loop included. Then the
# same for streams: STREAMS SSE streams of CHUNKS chunks 20 ms apart
# (streamload.c, opened 1,000/s; nginx through a server with
# proxy_buffering off), Ir per stream and per chunk (the stream's set-up,
# accept, upstream connection and close included in the per-chunk figure).
#
# Usage: tests/bench/callgrind.sh [BUILD_DIR]   (default: <repo>/build-rel)
# Env:   N (2000) WARM (200) BODY (a JSON file; default: the small chat body)
#        STREAMS (200; 0 skips the stream measurement) CHUNKS (50)
#        UPSTREAM_CLIENT (unset: the build's default; auto: the lean client for the
#        http:// mock; curl: libcurl)
#        KEEP_TMP=1 (keep the callgrind.out files, for callgrind_annotate)
# Prints: CALLGRIND name=... ir_per_req=... (one line per proxy) and the ratio;
#         CALLGRIND_STREAM name=... ir_per_stream=... ir_per_chunk=... and the ratio.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$repo/build-rel}
N=${N:-2000}
WARM=${WARM:-200}
STREAMS=${STREAMS:-200}
CHUNKS=${CHUNKS:-50}
for tool in valgrind callgrind_control nginx python3 curl; do
  command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is not installed" >&2; exit 1; }
done
source "$repo/tests/bench/lib.sh"
bench_tmp callgrind
WAIT_HTTP_S=30 # valgrind starts slowly
if (( STREAMS > 0 )); then
  command -v gcc >/dev/null || { echo "callgrind.sh: gcc is not installed (STREAMS=0 skips streams)" >&2; exit 1; }
  bench_streamload
fi

if [[ -n ${BODY:-} ]]; then cp "$BODY" "$tmp/body.json"; else
  printf '%s' '{"model":"mock-gpt","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in one short sentence."}],"temperature":0,"stream":false}' >"$tmp/body.json"
fi
cat >"$tmp/seq.py" <<'PY'
import socket, sys
port, n, body = int(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3], "rb").read()
req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
s = socket.create_connection(("127.0.0.1", port)); buf = b""
for i in range(n):
    s.sendall(req)
    while True:
        h = buf.find(b"\r\n\r\n")
        if h >= 0:
            head = buf[:h].decode("latin1")
            if not head.startswith("HTTP/1.1 200"): sys.exit("bad answer: " + head[:300])
            cl = [int(l.split(":", 1)[1]) for l in head.split("\r\n")[1:] if l.lower().startswith("content-length:")]
            if not cl: sys.exit("no content-length: " + head[:300])
            if len(buf) >= h + 4 + cl[0]: buf = buf[h + 4 + cl[0]:]; break
        d = s.recv(1 << 20)
        if not d: sys.exit("connection closed")
        buf += d
PY

read -r port_zg adm raft port_ngx port_ngx_sse <<<"$(free_ports 5)"
"$build/tests/mockllm" --listen 127.0.0.1:0 >"$tmp/mockllm.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$tmp/mockllm.out" && break; sleep 0.1; done
port_mock=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/mockllm.out")

measure() { # NAME PORT PID: zero, N requests, dump, print Ir/N
  local name=$1 port=$2 pid=$3
  python3 "$tmp/seq.py" "$port" "$WARM" "$tmp/body.json"
  callgrind_control -z "$pid" >/dev/null 2>&1
  python3 "$tmp/seq.py" "$port" "$N" "$tmp/body.json"
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 0.5
  local f ir
  f=$(ls -t "$tmp"/callgrind.out."$name".* | head -1)
  ir=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p;s/^totals: *\([0-9]*\).*/\1/p' "$f" | head -1)
  echo "CALLGRIND name=$name requests=$N ir_total=$ir ir_per_req=$((ir / N)) file=$(basename "$f")"
  eval "ir_$name=$((ir / N))"
}

measure_streams() { # NAME PORT PID: zero, STREAMS streams, dump, print Ir per stream and chunk
  local name=$1 port=$2 pid=$3 line f ir
  (( STREAMS > 0 )) || return 0
  "$tmp/streamload" --port "$port" --streams 20 --chunks 3 --interval-ms 10 --rate 200 >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  line=$("$tmp/streamload" --port "$port" --streams "$STREAMS" --chunks "$CHUNKS" --interval-ms 20 --rate 1000)
  callgrind_control -d "$pid" >/dev/null 2>&1
  [[ $line == *" ok=$STREAMS failed=0 "* ]] || { echo "callgrind.sh: streams through $name failed: $line" >&2; exit 1; }
  sleep 0.5
  f=$(ls -t "$tmp"/callgrind.out."$name".* | head -1)
  ir=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p;s/^totals: *\([0-9]*\).*/\1/p' "$f" | head -1)
  echo "CALLGRIND_STREAM name=$name streams=$STREAMS chunks=$CHUNKS ir_total=$ir ir_per_stream=$((ir / STREAMS)) ir_per_chunk=$((ir / STREAMS / CHUNKS)) file=$(basename "$f")"
  eval "irs_$name=$((ir / STREAMS / CHUNKS))"
}

mkdir -p "$tmp/zg"
cat >"$tmp/zg/config.json" <<JSON
{"node": {"id": "cg", "zone": "A"},
 "listen": {"gateway": "127.0.0.1:$port_zg", "admin": "127.0.0.1:$adm", "raft": "127.0.0.1:$raft"},
 "cluster": {"data_dir": "$tmp/zg/data"},
 "endpoint": "http://127.0.0.1:$port_mock", "api_key": "env:ZG_BENCH_UPSTREAM_KEY",
 "auth": {"mode": "none"},
 "performance": {"max_concurrent": 1000, "max_queue": 10000, "cache_size": 0${UPSTREAM_CLIENT:+, \"upstream_client\": \"$UPSTREAM_CLIENT\"}},
 "logging": {"level": "warn"}${ZG_EXTRA_CONFIG:-}}
JSON
ZG_BENCH_UPSTREAM_KEY=bench-key valgrind --tool=callgrind --callgrind-out-file="$tmp/callgrind.out.zonegate.%p" \
  "$build/zonegate" serve --config "$tmp/zg/config.json" >"$tmp/zg/log" 2>&1 &
zg_pid=$!
pids+=($zg_pid)
wait_http "http://127.0.0.1:$port_zg/health/live"
measure zonegate "$port_zg" "$zg_pid"
measure_streams zonegate "$port_zg" "$zg_pid"

mkdir -p "$tmp/nginx/logs"
cat >"$tmp/nginx/nginx.conf" <<CONF
worker_processes 1; master_process off; daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $tmp/nginx/body; proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi; uwsgi_temp_path $tmp/nginx/uwsgi; scgi_temp_path $tmp/nginx/scgi;
  keepalive_requests 1000000;
  upstream mockllm { server 127.0.0.1:$port_mock; keepalive 256; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$port_ngx; access_log off;
    client_body_buffer_size 4m; client_max_body_size 16m;
    location / { proxy_pass http://mockllm; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {   # for streams: each upstream read goes to the client at once
    listen 127.0.0.1:$port_ngx_sse backlog=4096; access_log off; proxy_buffering off;
    location / { proxy_pass http://mockllm; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
valgrind --tool=callgrind --callgrind-out-file="$tmp/callgrind.out.nginx.%p" \
  nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -g "user $(id -un) $(id -gn);" >"$tmp/nginx/out" 2>&1 &
ngx_pid=$!
pids+=($ngx_pid)
wait_http "http://127.0.0.1:$port_ngx/"
measure nginx "$port_ngx" "$ngx_pid"
measure_streams nginx "$port_ngx_sse" "$ngx_pid"
python3 -c "print(f'CALLGRIND ratio zonegate/nginx = {$ir_zonegate / $ir_nginx:.2f}')"
if (( STREAMS > 0 )); then
  python3 -c "print(f'CALLGRIND_STREAM ratio zonegate/nginx per chunk = {$irs_zonegate / $irs_nginx:.2f}')"
fi
