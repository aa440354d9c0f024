# tests/bench/lib.sh: what the benchmark scripts here share. Sourced, never
# run: `source "$repo/tests/bench/lib.sh"; bench_tmp NAME`.
#
# bench_tmp NAME  makes $tmp (/tmp/zonegate-NAME.XXXXXX) and an empty
#                 $pids; on exit every pid in $pids gets SIGTERM, then
#                 SIGKILL after 10 s, and $tmp is removed (KEEP_TMP=1 keeps
#                 it). Ctrl-C exits 130 through the same cleanup.
# free_ports N    prints N free loopback ports.
# wait_http URL   waits up to WAIT_HTTP_S (10) seconds for any HTTP answer;
#                 1 with a line naming the URL when none came.
bench_name=bench

bench_cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ ${KEEP_TMP:-0} == 1 ]]; then echo "temp dir kept: $tmp" >&2; else rm -rf "$tmp"; fi
}

bench_tmp() {
  bench_name=$1
  tmp=$(mktemp -d "/tmp/zonegate-$1.XXXXXX")
  pids=()
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
s = [socket.socket() for _ in range(int(sys.argv[1]))]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))
PY
}

wait_http() {
  for _ in $(seq $((${WAIT_HTTP_S:-10} * 10))); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true) != 000 ]] && return 0
    sleep 0.1
  done
  echo "$bench_name.sh: nothing answers at $1" >&2
  return 1
}

# bench_stream_fds NAME: raises the open-file limit to the hard one (set
# in nofile, for nginx's worker_rlimit_nofile) and lowers N (the streams
# to open) to what it allows: each proxy holds two descriptors per stream,
# 200 are kept for everything else.
bench_stream_fds() {
  ulimit -n "$(ulimit -Hn)"
  local n_max
  nofile=$(ulimit -n)
  n_max=$(( (nofile - 200) / 2 ))
  if (( N > n_max )); then
    echo "$1: RLIMIT_NOFILE is $nofile (hard); each proxy needs 2 per stream: N $N -> $n_max" >&2
    N=$n_max
  fi
}

# bench_pin: on_proxy / on_side, the taskset prefixes for the proxy under
# test (core 0) and everything else (core 1) when PIN=1 on 2+ cores.
bench_pin() {
  if [[ $PIN == 1 && $(nproc) -ge 2 ]]; then
    on_proxy=(taskset -c 0); on_side=(taskset -c 1)
  else
    on_proxy=(); on_side=()
  fi
}

# bench_streamload: compiles tests/bench/streamload.c into $tmp/streamload.
bench_streamload() {
  gcc -std=gnu11 -O2 -Wall -Wextra -Werror -o "$tmp/streamload" "$repo/tests/bench/streamload.c"
}
