#!/usr/bin/env bash
# tests/bench/suite.sh: the issue-14 benchmark suite in one command.
#
# Interleaved rounds (the order of the targets rotates every round, so a
# noisy neighbour hits every target alike) of:
#   1. small chat requests, wrk closed loop: zonegate vs nginx (ratio), and
#      zonegate with usage accounting on (default) vs off (ratio);
#   2. added latency at a fixed RATE (pacedload, open loop): zonegate and
#      nginx against mockllm directly;
#   3. added time to first token (TTFT) of SSE streams at TTFT_RATE streams/s
#      (pacedload --stream, open loop): zonegate and nginx (a server with
#      proxy_buffering off) against mockllm directly;
#   4. big prompts: 300 KB throughput (wrk) zonegate vs nginx, 300 KB with
#      model defaults on vs off, and the added latency of a 2 MB prompt at a
#      low fixed rate (zonegate - nginx, ms);
# then callgrind instructions per small request (tests/bench/callgrind.sh),
# and LiteLLM's throughput and TTFT when LITELLM (a `litellm` binary) is
# given (one more round: direct, zonegate, nginx and LiteLLM); then the
# 10,000-stream run (tests/bench/streams10k.sh) and HTTPS upstreams over
# HTTP/1.1 and HTTP/2 (tests/bench/tls_upstream.sh), and last the issue's
# "done when" checks from this run in one table.
# Each ratio is printed as median [min..max] over the rounds.
#
# Usage: tests/bench/suite.sh [BUILD_DIR]   (default: <repo>/build-rel)
# Env:   ROUNDS (3) DURATION (wrk s, 8) WARMUP (2) CONNS (64) RATE (2000)
#        PACED_SECONDS (8) BIG_RATE (20 req/s for the 2 MB prompt)
#        TTFT_RATE (20 streams/s) TTFT_SECONDS (PACED_SECONDS)
#        CALLGRIND (1: run callgrind.sh) PIN (1) KEEP_TMP (1 keeps the temp dir)
#        LITELLM (path to the litellm binary; empty: skipped, said so)
#        STREAMS10K (1, the default: then tests/bench/streams10k.sh, STREAMS10K_ROUNDS
#        rounds, 4; 0 skips it) TLS_UPSTREAM (1, the default: then
#        tests/bench/tls_upstream.sh, HTTP/1.1 vs HTTP/2; 0 skips it)
#        UPSTREAM_CLIENT (unset: the build's default; auto: the lean client for the
#        http:// mock; curl: libcurl)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$repo/build-rel}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
RATE=${RATE:-2000}
PACED_SECONDS=${PACED_SECONDS:-8}
BIG_RATE=${BIG_RATE:-20}
TTFT_RATE=${TTFT_RATE:-20}
TTFT_SECONDS=${TTFT_SECONDS:-$PACED_SECONDS}
CALLGRIND=${CALLGRIND:-1}
PIN=${PIN:-1}
LITELLM=${LITELLM:-}
STREAMS10K=${STREAMS10K:-1}
STREAMS10K_ROUNDS=${STREAMS10K_ROUNDS:-4}
TLS_UPSTREAM=${TLS_UPSTREAM:-1}
command_line="STREAMS10K=$STREAMS10K STREAMS10K_ROUNDS=$STREAMS10K_ROUNDS TLS_UPSTREAM=$TLS_UPSTREAM ROUNDS=$ROUNDS DURATION=$DURATION CONNS=$CONNS RATE=$RATE PACED_SECONDS=$PACED_SECONDS BIG_RATE=$BIG_RATE TTFT_RATE=$TTFT_RATE TTFT_SECONDS=$TTFT_SECONDS${LITELLM:+ LITELLM=$LITELLM} $0 $*"

for bin in "$build/zonegate" "$build/tests/mockllm"; do
  [[ -x $bin ]] || { echo "suite.sh: $bin not found; build first:" >&2
    echo "  cmake -S $repo -B $build -DCMAKE_BUILD_TYPE=Release && cmake --build $build -j2" >&2; exit 1; }
done
for tool in wrk nginx gcc curl python3 timeout taskset; do
  command -v "$tool" >/dev/null || { echo "suite.sh: $tool is not installed" >&2; exit 1; }
done

source "$repo/tests/bench/lib.sh"
bench_tmp suite

if [[ $PIN == 1 && $(nproc) -ge 2 ]]; then
  on_proxy=(taskset -c 0); on_side=(taskset -c 1); on_direct=(taskset -c 0)
else
  on_proxy=(); on_side=(); on_direct=()
fi


# ---- bodies ----------------------------------------------------------------
small='{"model":"mock-gpt","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in one short sentence."}],"temperature":0,"stream":false}'
printf '%s' "$small" >"$tmp/small.json"
# streams.py's stream request; mockllm (started with --chunks 3
# --chunk-interval-ms 10, so that LiteLLM, which does not pass the client's
# X-Mock-* headers on, gets the same) answers 3 events 10 ms apart: the head
# and the first event in one write, as a provider's first token
printf '%s' '{"model":"mock-gpt","stream":true,"messages":[{"role":"user","content":"stream please"}]}' \
  >"$tmp/stream.json"
python3 - "$tmp" <<'EOF'
import json, sys
tmp = sys.argv[1]
words = "the quick brown fox jumps over the lazy dog while a model reads a long prompt ".split()
def prompt(size):
    text = " ".join(words)
    return (text * (size // len(text) + 1))[:size]
for name, size in (("big300k", 300 * 1024), ("big2m", 2 * 1024 * 1024)):
    # no temperature/top_p: with model defaults on, both are spliced in
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": prompt(size)}], "stream": False}
    open(f"{tmp}/{name}.json", "w").write(json.dumps(body))
EOF

# ---- processes ---------------------------------------------------------------
"${on_side[@]}" "$build/tests/mockllm" --listen 127.0.0.1:0 --chunks 3 --chunk-interval-ms 10 >"$tmp/mockllm.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$tmp/mockllm.out" && break; sleep 0.1; done
port_mock=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/mockllm.out")
[[ -n $port_mock ]] || { echo "suite.sh: mockllm did not start" >&2; exit 1; }

declare -A port
start_zonegate() { # NAME EXTRA-JSON
  local name=$1 extra=$2 p a r
  read -r p a r <<<"$(free_ports 3)"
  mkdir -p "$tmp/$name"
  cat >"$tmp/$name/config.json" <<EOF
{"node": {"id": "bench", "zone": "A"},
 "listen": {"gateway": "127.0.0.1:$p", "admin": "127.0.0.1:$a", "raft": "127.0.0.1:$r"},
 "cluster": {"data_dir": "$tmp/$name/data"},
 "endpoint": "http://127.0.0.1:$port_mock", "api_key": "env:ZG_BENCH_UPSTREAM_KEY",
 "auth": {"mode": "none"},
 "performance": {"max_concurrent": 1000, "max_queue": 10000, "cache_size": 0, "max_body_bytes": 8388608${UPSTREAM_CLIENT:+, \"upstream_client\": \"$UPSTREAM_CLIENT\"}},
 "logging": {"level": "warn"}$extra}
EOF
  ZG_BENCH_UPSTREAM_KEY=bench-key "${on_proxy[@]}" "$build/zonegate" serve --config "$tmp/$name/config.json" \
    >"$tmp/$name/zonegate.log" 2>&1 &
  pids+=($!)
  port[$name]=$p
  wait_http "http://127.0.0.1:$p/health/live"
}
start_zonegate zonegate ''
start_zonegate zg-nousage ', "usage": {"enabled": false}'
start_zonegate zg-defaults ', "model": {"temperature": 0.7, "top_p": 0.95}'

read -r port_ngx port_ngx_sse <<<"$(free_ports 2)"
mkdir -p "$tmp/nginx/logs"
cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/logs/error.log warn;
events { worker_connections 20000; }
http {
  client_body_temp_path $tmp/nginx/body; proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi; uwsgi_temp_path $tmp/nginx/uwsgi; scgi_temp_path $tmp/nginx/scgi;
  keepalive_requests 1000000; keepalive_timeout 60s;
  upstream mockllm { server 127.0.0.1:$port_mock; keepalive 256; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$port_ngx; access_log off;
    client_max_body_size 8m; client_body_buffer_size 8m;   # bodies stay in memory, as in zonegate
    location / { proxy_pass http://mockllm; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {   # for streams: each upstream read goes to the client at once
    listen 127.0.0.1:$port_ngx_sse; access_log off; proxy_buffering off;
    client_max_body_size 8m; client_body_buffer_size 8m;
    location / { proxy_pass http://mockllm; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
"${on_proxy[@]}" nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -g "user $(id -un) $(id -gn);" \
  >"$tmp/nginx/stdout.log" 2>&1 &
pids+=($!)
port[nginx]=$port_ngx
port[nginx-sse]=$port_ngx_sse
port[direct]=$port_mock
wait_http "http://127.0.0.1:$port_ngx/"

for name in direct zonegate zg-nousage zg-defaults nginx; do
  for b in small big300k big2m; do
    code=$(curl -s -o "$tmp/sanity.out" -w '%{http_code}' --max-time 10 -H 'Content-Type: application/json' \
      --data-binary @"$tmp/$b.json" "http://127.0.0.1:${port[$name]}/v1/chat/completions" || true)
    [[ $code == 200 ]] || { echo "suite.sh: $b through $name answered $code: $(head -c 300 "$tmp/sanity.out")" >&2; exit 1; }
  done
done
for name in direct zonegate nginx-sse; do
  curl -s -N --max-time 10 -H 'Content-Type: application/json' \
    --data-binary @"$tmp/stream.json" "http://127.0.0.1:${port[$name]}/v1/chat/completions" >"$tmp/sanity.out" || true
  grep -q '^data: \[DONE\]' "$tmp/sanity.out" ||
    { echo "suite.sh: no complete stream through $name: $(head -c 300 "$tmp/sanity.out")" >&2; exit 1; }
done

# ---- measurements --------------------------------------------------------------
for b in small big300k; do
  cat >"$tmp/$b.lua" <<EOF
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$tmp/$b.json", "rb"); wrk.body = f:read("*a"); f:close()
done = function(s, lat, req)
  io.write(string.format("WRK rps=%.1f p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
    s.requests / (s.duration / 1e6), lat:percentile(50), lat:percentile(99),
    s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout, s.errors.status))
end
EOF
done
gcc -std=gnu11 -O2 -Wall -Wextra -Werror -o "$tmp/pacedload" "$repo/tests/bench/pacedload.c"

results="$tmp/results.txt" # lines: KIND NAME ROUND VALUE
: >"$results"
wrk_rps() { # BODY NAME ROUND CONNS
  local b=$1 name=$2 round=$3 conns=$4 pin line
  if [[ $name == direct ]]; then pin=("${on_direct[@]}"); else pin=("${on_side[@]}"); fi
  timeout $((WARMUP + 10)) "${pin[@]}" wrk -t1 -c"$conns" -d"${WARMUP}s" --timeout 10s -s "$tmp/$b.lua" \
    "http://127.0.0.1:${port[$name]}" >/dev/null 2>&1 || true
  line=$(timeout $((DURATION + 20)) "${pin[@]}" wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 10s -s "$tmp/$b.lua" \
    "http://127.0.0.1:${port[$name]}" 2>&1 | grep '^WRK ' || true)
  [[ -n $line ]] || { echo "suite.sh: wrk $b against $name printed nothing" >&2; exit 1; }
  printf '  round %d %-8s %-12s %s\n' "$round" "$b" "$name" "$line"
  echo "rps_$b $name $round $(sed 's/.*rps=\([0-9.]*\).*/\1/' <<<"$line")" >>"$results"
}
paced() { # BODY NAME ROUND RATE SECONDS
  local b=$1 name=$2 round=$3 rate=$4 secs=$5 pin line
  if [[ $name == direct ]]; then pin=("${on_direct[@]}"); else pin=("${on_side[@]}"); fi
  line=$(timeout $((secs + 30)) "${pin[@]}" "$tmp/pacedload" --port "${port[$name]}" --body "$tmp/$b.json" \
    --rate "$rate" --duration "$secs" --warmup 2 --connections 16 2>&1 || true)
  [[ $line == PACED* ]] || { echo "suite.sh: pacedload $b against $name failed: $line" >&2; exit 1; }
  [[ $line == *" non2xx=0 errors=0 "* ]] || { echo "suite.sh: pacedload $b against $name had failures: $line" >&2; exit 1; }
  printf '  round %d %-8s %-12s %s\n' "$round" "$b" "$name" "$line"
  echo "p50_$b $name $round $(sed 's/.* p50_us=\([0-9.]*\).*/\1/' <<<"$line")" >>"$results"
}
ttft() { # NAME ROUND: TTFT of SSE streams at TTFT_RATE (keep-alive connections)
  local name=$1 round=$2 pin line
  if [[ $name == direct ]]; then pin=("${on_direct[@]}"); else pin=("${on_side[@]}"); fi
  line=$(timeout $((TTFT_SECONDS + 30)) "${pin[@]}" "$tmp/pacedload" --port "${port[$name]}" --body "$tmp/stream.json" \
    --rate "$TTFT_RATE" --duration "$TTFT_SECONDS" --warmup 1 --connections 4 --stream 2>&1 || true)
  [[ $line == PACED* ]] || { echo "suite.sh: pacedload --stream against $name failed: $line" >&2; return 1; }
  [[ $line == *" non2xx=0 errors=0 "* && $line == *" no_data=0"* ]] ||
    { echo "suite.sh: pacedload --stream against $name had failures: $line" >&2; return 1; }
  printf '  round %d %-8s %-12s %s\n' "$round" stream "$name" "$(sed 's/.*\(ttft_p50_us.*\)/\1/' <<<"$line")"
  echo "ttft50 $name $round $(sed 's/.* ttft_p50_us=\([0-9.]*\).*/\1/' <<<"$line")" >>"$results"
  echo "ttft90 $name $round $(sed 's/.* ttft_p90_us=\([0-9.]*\).*/\1/' <<<"$line")" >>"$results"
}
rotate() { # ROUND NAMES...: the names rotated by ROUND
  local r=$1; shift
  local a=("$@") n=$# i
  for ((i = 0; i < n; i++)); do echo "${a[(i + r) % n]}"; done
}

echo "== $ROUNDS interleaved rounds (proxy on core 0; mockllm and client on core 1)"
for ((round = 1; round <= ROUNDS; round++)); do
  for name in $(rotate "$round" zonegate nginx zg-nousage); do wrk_rps small "$name" "$round" "$CONNS"; done
  for name in $(rotate "$round" direct zonegate nginx); do paced small "$name" "$round" "$RATE" "$PACED_SECONDS"; done
  for name in $(rotate "$round" direct zonegate nginx-sse); do ttft "$name" "$round" || exit 1; done
  for name in $(rotate "$round" zonegate nginx zg-defaults); do wrk_rps big300k "$name" "$round" 8; done
  for name in $(rotate "$round" direct zonegate nginx); do paced big2m "$name" "$round" "$BIG_RATE" "$PACED_SECONDS"; done
done

# ---- LiteLLM (one more round, when given) ---------------------------------------------
# LiteLLM is a Python proxy: it gets one round of its own (round 0) of small
# requests (wrk: zonegate, nginx, LiteLLM) and TTFT (direct, zonegate, nginx,
# LiteLLM), printed apart from the issue-14 table. When it cannot run, the
# summary says so and why, and the rest of the suite stands.
litellm_note="LiteLLM: skipped (set LITELLM=/path/to/venv/bin/litellm, from pip install 'litellm[proxy]')"
litellm_start() {
  [[ -x $LITELLM ]] || { litellm_note="LiteLLM: NOT measured: $LITELLM is not an executable"; return 1; }
  local port_ll pid up=0 code
  read -r port_ll <<<"$(free_ports 1)"
  cat >"$tmp/litellm.yaml" <<EOF
model_list:
  - model_name: mock-gpt
    litellm_params: {model: openai/mock-gpt, api_base: "http://127.0.0.1:$port_mock/v1", api_key: bench-key}
general_settings: {dangerously_permit_weak_or_unset_master_key: true}   # no client auth, as zonegate here
EOF
  echo "== LiteLLM: starting $LITELLM (one worker, on the proxy core)"
  LITELLM_LOCAL_MODEL_COST_MAP=True "${on_proxy[@]}" "$LITELLM" --config "$tmp/litellm.yaml" --host 127.0.0.1 --port "$port_ll" --num_workers 1 \
    >"$tmp/litellm.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 600); do
    kill -0 "$pid" 2>/dev/null || break
    if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$port_ll/health/liveliness" || true) == 200 ]]; then
      up=1
      break
    fi
    sleep 0.2
  done
  if [[ $up != 1 ]]; then
    litellm_note="LiteLLM: NOT measured: it did not answer /health/liveliness within 2 minutes; its log ends: $(tail -c 400 "$tmp/litellm.log" | tr '\n' ' ')"
    return 1
  fi
  port[litellm]=$port_ll
  code=$(curl -s -o "$tmp/sanity.out" -w '%{http_code}' --max-time 30 -H 'Content-Type: application/json' \
    --data-binary @"$tmp/small.json" "http://127.0.0.1:$port_ll/v1/chat/completions" || true)
  if [[ $code != 200 ]]; then
    litellm_note="LiteLLM: NOT measured: a small request answered $code: $(head -c 300 "$tmp/sanity.out")"
    return 1
  fi
  litellm_note="LiteLLM $("$(dirname "$LITELLM")/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null || echo '(version unknown)'): one uvicorn worker on the proxy core"
  return 0
}
if [[ -n $LITELLM ]] && litellm_start; then
  echo "== LiteLLM round (round 0)"
  # LiteLLM last in each step: it goes on working through the requests wrk
  # left queued for seconds after wrk stops, on the proxy core, which slowed
  # whichever target came next (zonegate at 0.66-0.74x nginx in that round)
  for name in zonegate nginx litellm; do # a subshell: a failure here ends only this round
    (wrk_rps small "$name" 0 "$CONNS") || litellm_note="$litellm_note; wrk through $name failed (see above)"
  done
  for name in direct zonegate nginx-sse litellm; do
    ttft "$name" 0 || { litellm_note="$litellm_note; TTFT through $name failed (see above)"; break; }
  done
fi

# ---- summary -----------------------------------------------------------------------
python3 - "$results" "$ROUNDS" "$litellm_note" "$CONNS" "$tmp/done.txt" <<'EOF' | tee "$tmp/summary.md"
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1])]
val = {}
for kind, name, rnd, v in rows: val[(kind, name, int(rnd))] = float(v)
rounds = range(1, int(sys.argv[2]) + 1)
def series(f): return [f(r) for r in rounds]
def fmt(xs, d=2): return f"{st.median(xs):.{d}f} [{min(xs):.{d}f}..{max(xs):.{d}f}]"
def ratio(kind, a, b): return series(lambda r: val[(kind, a, r)] / val[(kind, b, r)])
def diff(kind, a, b, scale=1.0): return series(lambda r: (val[(kind, a, r)] - val[(kind, b, r)]) / scale)
def med(kind, name): return st.median(series(lambda r: val[(kind, name, r)]))
t_small = ratio("rps_small", "zonegate", "nginx")
t_usage = ratio("rps_small", "zonegate", "zg-nousage")
add_zg = diff("p50_small", "zonegate", "direct"); add_ngx = diff("p50_small", "nginx", "direct")
add_vs = diff("p50_small", "zonegate", "nginx")
t_300 = ratio("rps_big300k", "zonegate", "nginx")
t_def = ratio("rps_big300k", "zg-defaults", "zonegate")
big_add = diff("p50_big2m", "zonegate", "nginx", 1000.0)
ttft_zg = diff("ttft50", "zonegate", "direct"); ttft_ngx = diff("ttft50", "nginx-sse", "direct")
ttft_vs = diff("ttft50", "zonegate", "nginx-sse")
ttft90_zg = diff("ttft90", "zonegate", "direct"); ttft90_ngx = diff("ttft90", "nginx-sse", "direct")
ttft90_vs = diff("ttft90", "zonegate", "nginx-sse")
print("\n| check (issue 14) | median [min..max] over rounds | target | |")
print("|---|---|---|---|")
def line(name, xs, target, ok, d=2): print(f"| {name} | {fmt(xs, d)} | {target} | {'met' if ok else 'NOT met'} |")
line("small requests: zonegate / nginx req/s", t_small, "≥ 0.90", st.median(t_small) >= 0.9)
line(f"added p50 at fixed rate, zonegate µs (nginx: {fmt(add_ngx, 0)}; zonegate − nginx: {fmt(add_vs, 0)})",
     add_zg, "≤ nginx's", st.median(add_vs) <= 0, 0)
line(f"added TTFT p50, zonegate µs (nginx: {fmt(ttft_ngx, 0)}; zonegate − nginx: {fmt(ttft_vs, 0)})", ttft_zg,
     "≤ nginx + 20 µs", st.median(ttft_vs) <= 20, 0)
line(f"added TTFT p90, zonegate µs (nginx: {fmt(ttft90_ngx, 0)}; zonegate − nginx: {fmt(ttft90_vs, 0)})", ttft90_zg,
     "≤ nginx + 20 µs", st.median(ttft90_vs) <= 20, 0)
line("300 KB prompt: zonegate / nginx req/s", t_300, "≥ 0.95", st.median(t_300) >= 0.95)
line("2 MB prompt: zonegate p50 − nginx p50, ms", big_add, "≤ 1 ms", st.median(big_add) <= 1.0)
line("300 KB prompt: defaults on / off req/s", t_def, "≥ 0.90", st.median(t_def) >= 0.9)
line("small: usage accounting on / off req/s", t_usage, "≥ 0.95", st.median(t_usage) >= 0.95)
print(f"\nmedian req/s: zonegate {med('rps_small','zonegate'):.0f}, nginx {med('rps_small','nginx'):.0f}, "
      f"usage off {med('rps_small','zg-nousage'):.0f}; 300 KB: zonegate {med('rps_big300k','zonegate'):.0f}, "
      f"nginx {med('rps_big300k','nginx'):.0f}, defaults on {med('rps_big300k','zg-defaults'):.0f}; "
      f"2 MB p50 µs: direct {med('p50_big2m','direct'):.0f}, zonegate {med('p50_big2m','zonegate'):.0f}, "
      f"nginx {med('p50_big2m','nginx'):.0f}; TTFT p50 µs: direct {med('ttft50','direct'):.0f}, "
      f"zonegate {med('ttft50','zonegate'):.0f}, nginx {med('ttft50','nginx-sse'):.0f}")
print(f"\n{sys.argv[3]}")
with open(sys.argv[5], "w") as done:  # for the "done when" block at the end
    done.write(f"small {st.median(t_small):.2f} {sum(x >= 0.9 for x in t_small)}/{len(t_small)} {fmt(t_small)}\n"
               f"big2m {st.median(big_add):.2f} {sum(x <= 1.0 for x in big_add)}/{len(big_add)} {fmt(big_add)}\n")
if all(("rps_small", n, 0) in val for n in ("zonegate", "nginx", "litellm")):
    v = lambda k, n: val[(k, n, 0)]
    print("\n| LiteLLM round (round 0, same processes) | zonegate | nginx | LiteLLM |")
    print("|---|---:|---:|---:|")
    print(f"| small requests, req/s (wrk -c{sys.argv[4]}) | {v('rps_small','zonegate'):.0f} | "
          f"{v('rps_small','nginx'):.0f} | {v('rps_small','litellm'):.0f} |")
    print(f"| req/s / nginx | {v('rps_small','zonegate')/v('rps_small','nginx'):.2f} | 1 | "
          f"{v('rps_small','litellm')/v('rps_small','nginx'):.3f} |")
    if all((k, n, 0) in val for k in ("ttft50", "ttft90") for n in ("direct", "zonegate", "nginx-sse", "litellm")):
        d50, d90 = v("ttft50", "direct"), v("ttft90", "direct")
        print(f"| added TTFT p50 / p90, µs | {v('ttft50','zonegate')-d50:.0f} / {v('ttft90','zonegate')-d90:.0f} | "
              f"{v('ttft50','nginx-sse')-d50:.0f} / {v('ttft90','nginx-sse')-d90:.0f} | "
              f"{v('ttft50','litellm')-d50:.0f} / {v('ttft90','litellm')-d90:.0f} |")
EOF

if [[ $CALLGRIND == 1 ]]; then
  echo "== callgrind: instructions per small request"
  # a failure here is said and the suite goes on to the runs below and the table
  "$repo/tests/bench/callgrind.sh" "$build" >"$tmp/callgrind.txt" 2>&1 ||
    echo "suite.sh: callgrind.sh failed: $(tail -c 400 "$tmp/callgrind.txt")" >&2
  grep '^CALLGRIND' "$tmp/callgrind.txt" || true
fi
# The heavy runs, each its own script with its own processes (run after
# the rounds above, never beside them): the 10k-stream check (target 3)
# and HTTPS upstreams over HTTP/1.1 and HTTP/2 (target 5).
if [[ $STREAMS10K == 1 ]]; then
  echo "== 10,000 streams: tests/bench/streams10k.sh (ROUNDS=$STREAMS10K_ROUNDS)"
  ROUNDS=$STREAMS10K_ROUNDS "$repo/tests/bench/streams10k.sh" "$build" >"$tmp/streams10k.txt" 2>&1 ||
    echo "suite.sh: streams10k.sh failed: $(tail -c 400 "$tmp/streams10k.txt")" >&2
  sed -n '/^| round | proxy/,/^Command:/p' "$tmp/streams10k.txt" | grep -v '^STREAMS10K_RESULT' || true
  grep '^STREAMS10K_RESULT' "$tmp/streams10k.txt" >>"$tmp/done.txt" || echo "STREAMS10K_FAILED" >>"$tmp/done.txt"
fi
if [[ $TLS_UPSTREAM == 1 ]]; then
  echo "== HTTPS upstreams: tests/bench/tls_upstream.sh"
  "$repo/tests/bench/tls_upstream.sh" "$build" >"$tmp/tls_upstream.txt" 2>&1 ||
    echo "suite.sh: tls_upstream.sh failed: $(tail -c 400 "$tmp/tls_upstream.txt")" >&2
  sed -n '/^| upstream.http_version/,$p' "$tmp/tls_upstream.txt"
fi

# ---- the issue's "done when", from this run -----------------------------------------
echo
echo "== Done when (issue 14), this run"
python3 - "$tmp/done.txt" <<'EOF'
import sys, re
small = big = s10k = None
s10k_failed = False
for line in open(sys.argv[1]):
    w = line.split(" ", 3)
    if w[0] == "small": small = (float(w[1]), w[2], w[3].strip())
    elif w[0] == "big2m": big = (float(w[1]), w[2], w[3].strip())
    elif w[0] == "STREAMS10K_RESULT": s10k = dict(re.findall(r"(\w+)=(\S+)", line))
    elif w[0].strip() == "STREAMS10K_FAILED": s10k_failed = True
# "met" is the median's verdict; how many rounds met it on their own is said beside it
print("| check | this run: median [min..max] over rounds | target | verdict (rounds meeting it) |\n|---|---|---|---|")
def row(name, fig, target, ok, rounds=""):
    print(f"| {name} | {fig} | {target} | {'met' if ok else 'NOT met'}{f' ({rounds})' if rounds else ''} |")
row("small requests, zonegate / nginx req/s", small[2], "≥ 0.90", small[0] >= 0.9, small[1])
row("2 MB prompt, zonegate p50 − nginx p50, ms", big[2], "≤ 1 ms", big[0] <= 1.0, big[1])
if s10k:
    n, mb, rss, r = s10k["n"], float(s10k["zg_peak_mb"]), float(s10k["rss_ratio"]), s10k["rounds"]
    failed = float(s10k.get("failed", "0"))
    clean = failed == 0  # a run with failed streams meets nothing
    row(f"{n} streams ({r} rounds), zonegate peak RSS", f"{mb:.1f} MB ({rss:.2f}× nginx's)",
        "≤ 150 MB and < nginx's", clean and mb <= 150 and rss < 1)
    row(f"{n} streams, chunk delay p99, zonegate / nginx", f"{s10k['p99_ratio']} [{s10k['p99_range']}]",
        "≤ 1", clean and float(s10k["p99_ratio"]) <= 1, f"{s10k['p99_rounds_met']}/{r}")
    print(f"| {n} streams, chunk delay p99 while all were open (no ramp, no teardown), zonegate / nginx | "
          f"{s10k['steady_ratio']} [{s10k['steady_range']}] | (not a target: the steady state alone) | |")
    row(f"{n} streams, CPU, zonegate / nginx", f"{s10k['cpu_ratio']} [{s10k['cpu_range']}]", "≤ 1",
        clean and float(s10k["cpu_ratio"]) <= 1, f"{s10k['cpu_rounds_met']}/{r}")
    if not clean: print(f"\n{failed:.0f} streams failed in the 10k runs: the 10k checks are NOT met")
elif s10k_failed:
    print("| 10,000 streams | streams10k.sh FAILED (see its error above) | ≤ 150 MB, p99 ≤ nginx's | NOT met |")
else:
    print("| 10,000 streams | not run here (STREAMS10K=1 runs them) | ≤ 150 MB, p99 ≤ nginx's | NOT shown |")
EOF
echo
echo "Command: $command_line"
