#!/usr/bin/env bash
# Quick start: install dependencies, build, and run one zonegate node in
# front of the bundled mock upstream (tests/mockllm), so a curl works with
# no model API key. Runs in the foreground; Ctrl-C stops both processes.
#
# Usage: deploy/quickstart.sh [--no-install]
# Env:   ZONEGATE_PORT (default 18789), MOCKLLM_PORT (default 18800),
#        ZONEGATE_QUICKSTART_DIR (default ./quickstart-data)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--no-install" ]; then
  echo "==> installing dependencies (deploy/install-deps.sh)"
  bash deploy/install-deps.sh --no-test-tools
fi
echo "==> building"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target zonegate mockllm >/dev/null

port=${ZONEGATE_PORT:-18789}
mock_port=${MOCKLLM_PORT:-18800}
dir=${ZONEGATE_QUICKSTART_DIR:-$PWD/quickstart-data}
mkdir -p "$dir"
cat > "$dir/config.json" <<JSON
{
  "node": {"id": "quickstart", "zone": "A"},
  "listen": {"gateway": "127.0.0.1:$port"},
  "cluster": {"data_dir": "$dir/data"},
  "endpoint": "http://127.0.0.1:$mock_port",
  "api_key": "",
  "performance": {"max_concurrent": 50, "request_timeout": 30000, "cache_size": "1GB"},
  "model": {"temperature": 0.7, "top_p": 0.95}
}
JSON

build/tests/mockllm --listen "127.0.0.1:$mock_port" --chunks 5 --chunk-interval-ms 200 >"$dir/mockllm.log" 2>&1 &
mock_pid=$!
trap 'kill $mock_pid 2>/dev/null || true' EXIT
build/zonegate serve --config "$dir/config.json" &
zg_pid=$!
trap 'kill $zg_pid $mock_pid 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 50); do
  [ -s "$dir/data/bootstrap-token" ] && curl -sf "127.0.0.1:$port/health/live" >/dev/null && break
  sleep 0.1
done
token=$(cat "$dir/data/bootstrap-token")
cat <<TXT

==> zonegate is running on 127.0.0.1:$port in front of the mock upstream (127.0.0.1:$mock_port).
    The client token was created at first start in $dir/data/bootstrap-token. Try:

  curl -s http://127.0.0.1:$port/v1/chat/completions -H "Authorization: Bearer \$(cat $dir/data/bootstrap-token)" \\
       -d '{"model":"mock","messages":[{"role":"user","content":"hello"}]}'
  curl -sN http://127.0.0.1:$port/v1/chat/completions -H "Authorization: Bearer \$(cat $dir/data/bootstrap-token)" \\
       -d '{"model":"mock","stream":true,"messages":[{"role":"user","content":"hello"}]}'
  curl -X POST http://127.0.0.1:$port/health -H "Content-Type: application/json" -d '{"check":"system"}'

    Ctrl-C stops it.
TXT
: "$token"
wait $zg_pid
