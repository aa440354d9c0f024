"""Process harness for integration tests: starts real zonegate and mockllm
processes on free loopback ports, waits for them with bounded polls, and
stops them with real signals. Every wait is bounded; nothing sleeps
unbounded."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import http.client

ZONEGATE_BIN = os.environ.get("ZONEGATE_BIN", os.path.join(os.path.dirname(__file__), "../../build/zonegate"))
MOCKLLM_BIN = os.environ.get("MOCKLLM_BIN", os.path.join(os.path.dirname(__file__), "../../build/tests/mockllm"))


_handed_out = set()


def free_port():
    """A free TCP port below the kernel's ephemeral range, never handed out
    twice in this process: a port from bind(0) is an ephemeral one, which
    an outgoing connection (curl, raft, a client) can take before the node
    binds it — that made cluster starts fail with "port already in use"."""
    import random
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError):
        low = 32768
    for _ in range(1000):
        port = random.randrange(20000, max(20001, min(low, 32768)))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Proc:
    def __init__(self, args, env=None, name="proc"):
        self.name = name
        self.log_path = tempfile.mktemp(prefix=f"zg-{name}-", suffix=".log")
        self.log = open(self.log_path, "wb")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_lines(self):
        out = []
        for line in self.output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def signal(self, sig):
        self.p.send_signal(sig)

    def wait(self, timeout=15):
        return self.p.wait(timeout=timeout)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()


def start_mockllm(*extra):
    port = free_port()
    proc = Proc([MOCKLLM_BIN, "--listen", f"127.0.0.1:{port}", *extra], name="mockllm")
    wait_for(lambda: "listening" in proc.output(), what="mockllm to listen")
    proc.port = port
    proc.url = f"http://127.0.0.1:{port}"
    return proc


# ZG_UPSTREAM_CLIENT=curl (or auto) runs every zonegate these tests start
# with performance.upstream_client set to it, unless the test sets the key
# itself: CI runs the upstream-heavy suites once per upstream client
# (tests/CMakeLists.txt, the integration-curl/ entries).
UPSTREAM_CLIENT = os.environ.get("ZG_UPSTREAM_CLIENT", "")


def force_upstream_client(cfg):
    """Adds performance.upstream_client from ZG_UPSTREAM_CLIENT to a config
    dict (in place) when that is set and the config has no such key."""
    if UPSTREAM_CLIENT and isinstance(cfg, dict) and "node" in cfg:
        perf = cfg.setdefault("performance", {})
        if isinstance(perf, dict):
            perf.setdefault("upstream_client", UPSTREAM_CLIENT)
    return cfg


def force_upstream_client_file(path):
    """force_upstream_client on a config file, rewritten only if it changes."""
    if not UPSTREAM_CLIENT:
        return
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return
    before = json.dumps(cfg, sort_keys=True)
    force_upstream_client(cfg)
    if json.dumps(cfg, sort_keys=True) != before:
        with open(path, "w") as f:
            json.dump(cfg, f)


def write_config(directory, cfg):
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def base_config(tmpdir, upstream_url, **overrides):
    port = free_port()
    cfg = {
        "node": {"id": "gw-a", "zone": "A"},
        "listen": {"gateway": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
                   "raft": f"127.0.0.1:{free_port()}"},
        "cluster": {"data_dir": os.path.join(tmpdir, "data")},
        "endpoint": upstream_url,
        "api_key": "env:TEST_UPSTREAM_KEY",
        "auth": {"mode": "none"},
    }
    for k, v in overrides.items():
        cfg[k] = v
    return cfg, port


def start_zonegate(config_path, port, env_extra=None, expect_ready=True):
    env = dict(os.environ)
    env.setdefault("TEST_UPSTREAM_KEY", "sk-test-upstream-key-0001")
    if env_extra:
        env.update(env_extra)
    force_upstream_client_file(config_path)
    proc = Proc([ZONEGATE_BIN, "serve", "--config", config_path], env=env, name="zonegate")
    proc.port = port
    if expect_ready:
        wait_for(lambda: request(port, "GET", "/health/live")[0] == 200, what="zonegate /health/live")
    return proc


def http_call(host, port, method, path, body=None, headers=None, timeout=10, lower=True):
    """One request on a fresh connection. Returns (status, headers dict —
    names lower-cased unless lower=False —, body bytes); raises OSError when
    there is no answer."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        got = resp.getheaders()
        return resp.status, {(k.lower() if lower else k): v for k, v in got}, payload
    finally:
        conn.close()


def request(port, method, path, body=None, headers=None, timeout=10):
    """http_call on 127.0.0.1, header names as the server sent them."""
    return http_call("127.0.0.1", port, method, path, body, headers, timeout, lower=False)


def admin_call(admin_addr, admin_token, method, path, body=None, timeout=10, headers=None, ca=None):
    """One admin API call: (status, parsed JSON answer). With ca (the cluster
    CA file) over TLS, verifying the node's certificate."""
    import ssl
    import urllib.error
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    scheme = "https" if ca else "http"
    req = urllib.request.Request(f"{scheme}://{admin_addr}{path}", data=data, method=method)
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    req.add_header("Authorization", "Bearer " + admin_token)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            return e.code, json.loads(payload or b"{}")
        except ValueError:
            return e.code, {"raw": payload.decode("utf-8", "replace")}


def chat_body(content="hello", **extra):
    body = {"model": "mock-model", "messages": [{"role": "user", "content": content}]}
    body.update(extra)
    return body


class TempDir:
    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="zg-test-")
        return self.path

    def __exit__(self, *exc):
        # ZG_KEEP_TMP=1 keeps the directory (configs, data dirs, node logs)
        # of a failed test for a post-mortem.
        if os.environ.get("ZG_KEEP_TMP") == "1" and exc[0] is not None:
            print(f"\nkept {self.path}", flush=True)
            return
        shutil.rmtree(self.path, ignore_errors=True)


# ---- single-node gateway helpers (test_gateway_*.py) ----------------------

import hashlib
import threading

UPSTREAM_KEY = "sk-test-upstream-key-0001"
CLIENT_TOKEN = "zg-test-client-token-7f3a9c"


def token_sha256(token):
    return hashlib.sha256(token.encode()).hexdigest()


def mock_stats(mock):
    status, _, body = request(mock.port, "GET", "/mock/stats", timeout=5)
    assert status == 200, body
    return json.loads(body)


def mock_reset(mock):
    status, _, body = request(mock.port, "POST", "/mock/reset", body=b"", timeout=5)
    assert status == 200, body


def error_of(payload):
    """Asserts OpenAI's error shape and returns the inner error object."""
    doc = json.loads(payload)
    err = doc.get("error")
    assert isinstance(err, dict), doc
    assert isinstance(err.get("message"), str) and err["message"], doc
    assert isinstance(err.get("type"), str) and err["type"], doc
    assert "code" in err, doc
    return err


def echo_of(payload):
    """The {"body", "headers"} mockllm echoed (X-Mock-Echo: 1) in a completion."""
    doc = json.loads(payload)
    return json.loads(doc["choices"][0]["message"]["content"])


class ScriptedUpstream:
    """An upstream that answers every request with a chunked event stream
    of the given pieces, then the terminating chunk; one request per
    connection. Each piece is written on its own, `gap` seconds after the
    last (so the gateway reads them apart); a float in pieces is a pause of
    that many seconds. The request bodies (parsed JSON, else bytes) and
    paths it got are in .bodies and .paths; the monotonic time each head
    went out in .sent_head_at."""

    def __init__(self, pieces, gap=0.05):
        self.pieces = pieces
        self.gap = gap
        self.bodies = []
        self.paths = []
        self.sent_head_at = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += conn.recv(65536)
            self.paths.append(head.split(b" ")[1].decode())
            try:
                self.bodies.append(json.loads(body))
            except ValueError:
                self.bodies.append(body)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            self.sent_head_at.append(time.monotonic())
            try:
                for piece in self.pieces:
                    if isinstance(piece, float):
                        time.sleep(piece)
                        continue
                    time.sleep(self.gap)
                    conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                conn.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the gateway cancelled the transfer

    def stop(self):
        self.sock.close()


class Stack:
    """One mockllm and one zonegate with a config built from overrides.
    stop() kills both (idempotent); use it from a fixture finalizer."""

    def __init__(self, tmpdir, mock_args=(), env_extra=None, mock=None, start=True, **overrides):
        self.tmpdir = tmpdir
        self.own_mock = mock is None
        self.mock = mock or start_mockllm(*mock_args)
        self.procs = [self.mock] if self.own_mock else []
        self.cfg, self.port = base_config(tmpdir, self.mock.url, **overrides)
        self.cfg_path = write_config(tmpdir, self.cfg)
        self.env_extra = env_extra
        self.gw = None
        if start:
            self.start()

    def start(self, expect_ready=True):
        self.gw = start_zonegate(self.cfg_path, self.port, env_extra=self.env_extra, expect_ready=expect_ready)
        self.procs.append(self.gw)
        return self.gw

    @property
    def metrics_port(self):
        """/metrics is not on the client port: a standalone node serves it on
        listen.metrics when set, else on listen.admin's address."""
        addr = self.cfg["listen"].get("metrics") or self.cfg["listen"]["admin"]
        return int(addr.rpartition(":")[2])

    def rewrite(self, cfg):
        self.cfg = cfg
        write_config(self.tmpdir, cfg)

    def chat(self, body=None, headers=None, timeout=10, token=None):
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        return request(self.port, "POST", "/v1/chat/completions", body=body or chat_body(), headers=hdrs,
                       timeout=timeout)

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        self.procs = []


def open_stream(port, body, headers=None, timeout=10):
    """POSTs a chat body and returns (conn, resp) with the response head read;
    read SSE lines with resp.readline()."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=hdrs)
    return conn, conn.getresponse()


def read_sse(resp, max_events=1000):
    """Yields (monotonic receive time, wall ms, data text) for each `data:`
    line until the stream ends. Bounded by max_events."""
    for _ in range(max_events):
        line = resp.readline()
        if not line:
            return
        line = line.decode().rstrip("\r\n")
        if line.startswith("data:"):
            yield time.monotonic(), time.time() * 1000.0, line[5:].strip()


def raw_exchange(port, data, timeout=5.0, until=None, max_bytes=1 << 20):
    """Sends raw bytes and reads until the peer closes, `until(received)` is
    true, or timeout. Returns the bytes received."""
    deadline = time.monotonic() + timeout
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        while time.monotonic() < deadline and len(got) < max_bytes:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
            if until and until(got):
                break
    return got


def parse_responses(data):
    """Splits raw HTTP/1.1 responses with Content-Length bodies; returns a
    list of (status, headers dict lower-cased, body)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


def run_parallel(funcs, timeout=20):
    """Runs callables in threads; returns their results (or exceptions) in order."""
    results = [None] * len(funcs)

    def wrap(i, f):
        try:
            results[i] = f()
        except Exception as e:  # noqa: BLE001 - reported to the caller
            results[i] = e

    threads = [threading.Thread(target=wrap, args=(i, f), daemon=True) for i, f in enumerate(funcs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "parallel requests did not finish in time"
    return results


def zonegate_run(args, env_extra=None, timeout=10):
    """Runs a short zonegate command (config check, serve that must fail)."""
    env = dict(os.environ)
    env.setdefault("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    if env_extra:
        env.update(env_extra)
    return subprocess.run([ZONEGATE_BIN, *args], capture_output=True, text=True, env=env, timeout=timeout)


def decode_chunked(data):
    """Decodes a chunked body. Returns (payload bytes, complete) where
    complete means the terminating zero-length chunk arrived."""
    out = b""
    for _ in range(100000):
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return out, False
        size = int(line.split(b";")[0] or b"x", 16)
        if size == 0:
            return out, True
        if len(rest) < size + 2:
            return out + rest[:size], False
        out += rest[:size]
        data = rest[size + 2:]
    return out, False


def raw_chat(port, body, headers=None, timeout=5.0, until=None):
    """A chat POST over a raw socket (Connection: close). Returns (status,
    headers lower-cased, raw body bytes as received)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {len(data)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    got = raw_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + data, timeout=timeout, until=until)
    head, _, rest = got.partition(b"\r\n\r\n")
    head_lines = head.decode("latin-1").split("\r\n")
    status = int(head_lines[0].split()[1]) if head_lines and head_lines[0] else 0
    hdrs = {}
    for line in head_lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, rest
