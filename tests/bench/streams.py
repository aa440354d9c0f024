#!/usr/bin/env python3
"""tests/bench/streams.py: streaming figures of one zonegate build, with the
lean upstream client ("auto") and with libcurl ("curl") side by side.

For each upstream client (performance.upstream_client) it starts mockllm and
one zonegate (auth none, cache off, log warn), then:
  1. TTFT: STREAMS_TTFT streams one after the other at TTFT_RATE/s, each a
     fresh-headers request over a kept-alive client connection; the time to
     the first SSE byte through zonegate minus the same straight to mockllm
     (median and p90 of the added time, in microseconds).
  2. Concurrent streams: N streams opened together, each CHUNKS chunks
     INTERVAL_MS apart; zonegate's RSS at the peak (all open) minus its RSS
     before, per stream, its CPU time over the run, and the chunk delivery
     delay (arrival wall clock minus mockllm's mock_sent_at_ms), p50/p99.
Prints one line per figure and a markdown table. Not a pass/fail test.

The TTFT figure here is an asyncio client's (a new connection per stream,
~200 µs of its own noise): for TTFT against nginx use suite.sh's TTFT step
(pacedload --stream, a C open-loop client, zonegate and nginx in the same
interleaved rounds).

Usage: tests/bench/streams.py [BUILD_DIR]  (default: <repo>/build-rel)
Env: N (1000) CHUNKS (20) INTERVAL_MS (500) STREAMS_TTFT (400) TTFT_RATE (20)
     CLIENTS ("auto curl")
"""
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "build-rel")
N = int(os.environ.get("N", "1000"))
CHUNKS = int(os.environ.get("CHUNKS", "20"))
INTERVAL_MS = int(os.environ.get("INTERVAL_MS", "500"))
STREAMS_TTFT = int(os.environ.get("STREAMS_TTFT", "400"))
TTFT_RATE = float(os.environ.get("TTFT_RATE", "20"))
CLIENTS = os.environ.get("CLIENTS", "auto curl").split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"streams.py: nothing listens on {port}")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def request_bytes(port, chunks, interval):
    body = json.dumps({"model": "mock-gpt", "stream": True,
                       "messages": [{"role": "user", "content": "stream please"}]}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Mock-Chunks: {chunks}\r\nX-Mock-Chunk-Interval-Ms: {interval}\r\n\r\n").encode() + body


async def one_stream(port, chunks, interval, delays, ttft=None):
    """One streamed answer over a new connection; appends chunk delays
    (ms). Returns the time to the first body byte (s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(request_bytes(port, chunks, interval))
    first = None
    buf = b""
    done = False
    while not done:
        data = await reader.read(65536)
        if not data:
            break
        now_ms = time.time() * 1000
        if first is None and b"data:" in data:
            first = time.perf_counter() - t0
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            i = event.find(b"data: ")
            if i < 0:
                continue
            payload = event[i + 6:]
            if payload.startswith(b"[DONE]"):
                done = True
                break
            j = payload.find(b'"mock_sent_at_ms":')
            if j >= 0:
                k = j + len(b'"mock_sent_at_ms":')
                end = k
                while end < len(payload) and payload[end:end + 1].isdigit():
                    end += 1
                delays.append(now_ms - int(payload[k:end]))
    writer.close()
    return first


async def ttft_run(port):
    out = []
    period = 1.0 / TTFT_RATE
    start = time.perf_counter()
    for i in range(STREAMS_TTFT):
        due = start + i * period
        await asyncio.sleep(max(0, due - time.perf_counter()))
        t = await one_stream(port, 2, 0, [])
        if t is not None:
            out.append(t * 1e6)
    return out


async def concurrent_run(port, pid):
    delays = []
    before = rss_kb(pid)
    cpu0 = cpu_s(pid)
    peak = before
    tasks = [asyncio.create_task(one_stream(port, CHUNKS, INTERVAL_MS, delays)) for _ in range(N)]
    while not all(t.done() for t in tasks):
        peak = max(peak, rss_kb(pid))
        await asyncio.sleep(0.2)
    cpu = cpu_s(pid) - cpu0
    return before, peak, cpu, delays


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="zonegate-streams.")
    mock_port = free_port()
    mock = subprocess.Popen([os.path.join(BUILD, "tests", "mockllm"), "--listen", f"127.0.0.1:{mock_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [mock]
    rows = []
    try:
        wait_port(mock_port)
        direct = asyncio.run(ttft_run(mock_port))
        for client in CLIENTS:
            port = free_port()
            d = os.path.join(tmp, client)
            os.makedirs(d)
            cfg = {"node": {"id": "bench", "zone": "A"},
                   "listen": {"gateway": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
                              "raft": f"127.0.0.1:{free_port()}"},
                   "cluster": {"data_dir": os.path.join(d, "data")},
                   "endpoint": f"http://127.0.0.1:{mock_port}", "api_key": "env:ZG_BENCH_KEY",
                   "auth": {"mode": "none"}, "logging": {"level": "warn"},
                   "performance": {"max_concurrent": 100000, "max_queue": 100000, "cache_size": 0,
                                   "upstream_client": client}}
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f)
            zg = subprocess.Popen([os.path.join(BUILD, "zonegate"), "serve", "--config",
                                   os.path.join(d, "config.json")], env=dict(os.environ, ZG_BENCH_KEY="k"),
                                  stdout=open(os.path.join(d, "log"), "w"), stderr=subprocess.STDOUT)
            procs.append(zg)
            wait_port(port)
            via = asyncio.run(ttft_run(port))
            added = [v - statistics.median(direct) for v in via]
            before, peak, cpu, delays = asyncio.run(concurrent_run(port, zg.pid))
            row = {"client": client, "ttft_added_p50_us": statistics.median(added),
                   "ttft_added_p90_us": pct(added, 0.9),
                   "rss_before_mb": before / 1024, "rss_peak_mb": peak / 1024,
                   "kb_per_stream": (peak - before) / N, "cpu_s": cpu,
                   "chunk_delay_p50_ms": pct(delays, 0.5), "chunk_delay_p99_ms": pct(delays, 0.99),
                   "chunks": len(delays)}
            print("STREAMS " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.items()), flush=True)
            rows.append(row)
            zg.send_signal(signal.SIGKILL)
            zg.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"\nN={N} CHUNKS={CHUNKS} INTERVAL_MS={INTERVAL_MS} STREAMS_TTFT={STREAMS_TTFT} "
          f"TTFT_RATE={TTFT_RATE} (direct TTFT p50 {statistics.median(direct):.0f} us)\n")
    print("| upstream client | added TTFT p50 / p90 µs | RSS before → peak MB | KB per stream | CPU s | chunk delay p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['client']} | {r['ttft_added_p50_us']:.0f} / {r['ttft_added_p90_us']:.0f} | "
              f"{r['rss_before_mb']:.1f} → {r['rss_peak_mb']:.1f} | {r['kb_per_stream']:.1f} | {r['cpu_s']:.2f} | "
              f"{r['chunk_delay_p50_ms']:.1f} / {r['chunk_delay_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
