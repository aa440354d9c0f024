"""HTTPS upstreams (issue 14, part 5): an https:// upstream behind a private
CA works with upstream.ca_file (and fails without it: the system's store
does not trust it); with upstream.http_version "2" (the default) concurrent
streams to an upstream that offers HTTP/2 share one TCP connection; with
"1.1" each concurrent stream has its own kept-alive connection, whose TLS
handshake resumes the cached session; a bad ca_file or http_version is a
config error that names the key. The upstream is nginx (`listen ... ssl
http2`, one worker) in front of mockllm; its access log says which
connection carried each request ($connection), over which protocol and
whether its handshake resumed a session ($ssl_session_reused)."""
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from harness import (ZONEGATE_BIN, TempDir, base_config, chat_body, free_port, open_stream, read_sse, request,
                     start_mockllm, start_zonegate, wait_for, write_config)

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None or shutil.which("openssl") is None,
                                reason="needs nginx (with http_v2 and ssl) and openssl")


def make_pki(d):
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30, cwd=d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-days", "2", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.crt")
    run("req", *ec, "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "server.crt")
    return os.path.join(d, "ca.crt")


class Nginx:
    """nginx with TLS and HTTP/2 on `port`, proxying to `mock_port`."""

    def __init__(self, d, mock_port, protocols="TLSv1.2 TLSv1.3"):
        self.dir = os.path.join(d, "nginx")
        os.makedirs(os.path.join(self.dir, "logs"))
        self.port = free_port()
        self.access_log = os.path.join(self.dir, "logs", "access.log")
        conf = f"""
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
  client_body_temp_path {self.dir}/body; proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fastcgi; uwsgi_temp_path {self.dir}/uwsgi; scgi_temp_path {self.dir}/scgi;
  log_format conn '$connection $ssl_session_reused $ssl_protocol $server_protocol $status';
  keepalive_timeout 60s;
  server {{
    listen 127.0.0.1:{self.port} ssl http2;
    ssl_certificate {d}/server.crt; ssl_certificate_key {d}/server.key;
    ssl_protocols {protocols};
    ssl_session_cache shared:SSL:1m; ssl_session_tickets on;
    access_log {self.access_log} conn;
    location / {{ proxy_pass http://127.0.0.1:{mock_port}; proxy_http_version 1.1; proxy_buffering off; }}
  }}
}}
"""
        path = os.path.join(self.dir, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
        self.log = open(os.path.join(self.dir, "stdout.log"), "w")
        self.p = subprocess.Popen(["nginx", "-p", self.dir, "-c", path, "-g", f"user {user} {group};"],
                                  stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.listening() or self.p.poll() is not None, what="nginx to listen")
        assert self.p.poll() is None, open(os.path.join(self.dir, "stdout.log")).read()

    def listening(self):
        import socket
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def entries(self):
        """[(connection, reused, tls protocol, http protocol, status)] of the access log."""
        with open(self.access_log) as f:
            return [tuple(line.split()) for line in f if line.strip()]

    def entries_after(self, seen, timeout=5):
        """The entries once there are more than `seen`: nginx writes a
        request's line as it closes it, which may be a moment after
        zonegate has answered the client."""
        wait_for(lambda: len(self.entries()) > seen, timeout=timeout, interval=0.02,
                 what="nginx's access line")
        return self.entries()

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=5)
        self.log.close()


@pytest.fixture
def tls_upstream(request):
    """(CA file, Nginx, start(upstream section) -> zonegate). nginx offers
    TLS 1.2 and 1.3 unless the test parametrizes it (indirect)."""
    with TempDir() as d:
        ca = make_pki(d)
        mock = start_mockllm()
        ngx = Nginx(d, mock.port, getattr(request, "param", "TLSv1.2 TLSv1.3"))
        procs = []

        def start(upstream=None, expect_ready=True):
            sub = os.path.join(d, f"zg{len(procs)}")
            os.makedirs(sub)
            extra = {"upstream": upstream} if upstream is not None else {}
            cfg, port = base_config(sub, f"https://localhost:{ngx.port}", **extra)
            path = write_config(sub, cfg)
            gw = start_zonegate(path, port, expect_ready=expect_ready)
            gw.cfg, gw.cfg_dir = cfg, sub
            procs.append(gw)
            return gw

        try:
            yield ca, ngx, start
        finally:
            for p in procs:
                p.stop()
            ngx.stop()
            mock.stop()


def stream(port, text, chunks=5, interval_ms=100):
    conn, resp = open_stream(port, chat_body(text, stream=True),
                             headers={"X-Mock-Chunks": str(chunks), "X-Mock-Chunk-Interval-Ms": str(interval_ms)},
                             timeout=20)
    try:
        assert resp.status == 200
        events = [data for _, _, data in read_sse(resp)]
    finally:
        conn.close()
    assert events[-1] == "[DONE]", events[-3:]
    return events


def concurrent_streams(port, n):
    """n streams open at the same time (each lasts ~1 s); all must end well."""
    errors = []

    def one(i):
        try:
            stream(port, f"s{i}", chunks=5, interval_ms=200)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads), "a stream did not end within 30 s"


def log_after(ngx, before, n):
    """The access-log entries after the first `before`, once n are there."""
    wait_for(lambda: len(ngx.entries()) >= before + n, timeout=10, what=f"{n} access-log lines")
    return ngx.entries()[before:]


def test_private_ca_upstream_works_with_ca_file_and_not_without(tls_upstream):
    ca, ngx, start = tls_upstream
    gw = start({"ca_file": ca})
    status, _, body = request(gw.port, "POST", "/v1/chat/completions", chat_body("over tls"), timeout=10)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == "mock reply to: over tls"
    assert stream(gw.port, "tls stream")[-1] == "[DONE]"
    entries = ngx.entries()
    assert entries and all(e[4] == "200" and e[3] == "HTTP/2.0" for e in entries), entries

    # Without the knob the system's store is used, which does not trust the
    # private CA: the upstream is unreachable, and the log says why.
    plain = start()
    status, _, body = request(plain.port, "POST", "/v1/chat/completions", chat_body("no ca"), timeout=10)
    assert status == 502, body
    wait_for(lambda: any("certificate" in (e.get("msg") or "") for e in plain.log_lines()
                         if e.get("event") == "upstream_failed"), what="a certificate error in the log")


def test_http2_carries_concurrent_streams_on_one_connection(tls_upstream):
    ca, ngx, start = tls_upstream
    gw = start({"ca_file": ca})  # http_version defaults to "2"
    assert stream(gw.port, "warm-up")[-1] == "[DONE]"
    before = len(ngx.entries())
    concurrent_streams(gw.port, 20)
    run = log_after(ngx, before, 20)
    assert all(e[3] == "HTTP/2.0" for e in run), run
    assert len({e[0] for e in run}) == 1, f"20 concurrent streams over {len({e[0] for e in run})} connections"
    # ... and the one connection is the warm-up's: kept alive and reused.
    assert run[0][0] == ngx.entries()[0][0]


@pytest.mark.parametrize("tls_upstream", ["TLSv1.2", "TLSv1.3"], indirect=True)
def test_http1_opens_a_connection_per_concurrent_stream_and_resumes_tls(tls_upstream):
    ca, ngx, start = tls_upstream
    gw = start({"ca_file": ca, "http_version": "1.1"})
    for i in range(3):  # one after the other: one kept-alive connection
        assert stream(gw.port, f"seq{i}", chunks=2, interval_ms=10)[-1] == "[DONE]"
    first = ngx.entries()
    assert len({e[0] for e in first}) == 1 and all(e[3] == "HTTP/1.1" for e in first), first
    before = len(first)
    concurrent_streams(gw.port, 10)
    run = log_after(ngx, before, 10)
    conns = {e[0]: e for e in run}
    assert all(e[3] == "HTTP/1.1" for e in run), run
    protocol = first[0][2]
    assert len(conns) == 10, f"10 concurrent HTTP/1.1 streams over {len(conns)} connections"
    new = [e for c, e in conns.items() if c != first[0][0]]
    resumed = [e for e in new if e[1] == "r"]
    # Each new connection offers the client's cached session. TLS 1.2:
    # every one resumes. TLS 1.3: not every one of a burst of concurrent
    # handshakes does (38-97 % resumed in tests/bench/tls_upstream.sh with
    # libcurl 7.88; the cause is not pinned down): at least one must.
    assert len(new) >= 9, new
    if protocol == "TLSv1.2":
        assert len(resumed) == len(new), f"{protocol}: new connections {new}: handshakes not resumed"
    else:
        assert protocol == "TLSv1.3" and resumed, f"{protocol}: new connections {new}: none resumed"


def test_http2_paused_stream_stalls_no_other_stream_on_its_connection(tls_upstream):
    """A client that stops reading pauses its own stream (DESIGN: never the
    others), also when its stream shares an HTTP/2 connection with them;
    a reader that pauses and reads on gets its whole stream."""
    from test_edge_memory import open_slow_stream, slow_reader_gets_whole_stream
    ca, ngx, start = tls_upstream
    gw = start({"ca_file": ca})
    seen = len(ngx.entries())
    assert stream(gw.port, "warm-up")[-1] == "[DONE]"
    warm = ngx.entries_after(seen)[-1][0]
    slow = [open_slow_stream(gw.port) for _ in range(2)]
    try:
        time.sleep(1.0)  # their client write queues fill; their transfers pause
        t0 = time.monotonic()
        seen = len(ngx.entries())
        assert stream(gw.port, "beside paused streams", chunks=10, interval_ms=50)[-1] == "[DONE]"
        elapsed = time.monotonic() - t0
        slow_mode = os.environ.get("ZG_TEST_SLOW") == "1"
        assert elapsed < (10.0 if slow_mode else 3.0), f"a 0.5 s stream took {elapsed:.1f} s"
        assert ngx.entries_after(seen)[-1][0] == warm  # it shared the connection with the paused ones
        slow_reader_gets_whole_stream(gw.port, chunks=200)
    finally:
        for s in slow:
            s.close()


def test_http_version_change_applies_to_the_next_request(tls_upstream):
    """A reload (SIGHUP on a standalone node; config apply in a cluster)
    that changes upstream.http_version applies to every request started
    after it, also on a handle that served a transfer still running at the
    change; the transfer that was running ends normally."""
    ca, ngx, start = tls_upstream
    gw = start({"ca_file": ca})
    seen = len(ngx.entries())
    assert stream(gw.port, "warm-up")[-1] == "[DONE]"
    assert ngx.entries_after(seen)[-1][3] == "HTTP/2.0"
    seen = len(ngx.entries())
    long_done = []
    t = threading.Thread(target=lambda: long_done.append(stream(gw.port, "long", chunks=15, interval_ms=100)),
                         daemon=True)
    t.start()
    time.sleep(0.3)  # the long stream is under way
    gw.cfg["upstream"]["http_version"] = "1.1"
    write_config(gw.cfg_dir, gw.cfg)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "config_reloaded" for e in gw.log_lines()), what="the reload")
    t.join(20)
    assert long_done and long_done[0][-1] == "[DONE]"
    assert ngx.entries_after(seen)[-1][3] == "HTTP/2.0"  # the long one, started before
    for i in range(3):
        seen = len(ngx.entries())
        status, _, body = request(gw.port, "POST", "/v1/chat/completions", chat_body(f"after {i}"), timeout=10)
        assert status == 200, body
        assert ngx.entries_after(seen)[-1][3] == "HTTP/1.1", ngx.entries()[-3:]


@pytest.mark.parametrize("upstream,needle", [
    ({"ca_file": "/nonexistent/ca.pem"},
     'upstream.ca_file: expected a readable PEM file of CA certificates, found "/nonexistent/ca.pem" '
     '(No such file or directory)'),
    ({"ca_file": "NOT_PEM"}, "upstream.ca_file: expected a PEM file of CA certificates"),
    ({"ca_file": "/dev/zero"}, 'found "/dev/zero" (not a regular file)'),
    ({"ca_file": ""}, "upstream.ca_file: expected a string of 1 to 511 characters"),
    ({"http_version": "3"}, 'upstream.http_version: expected one of 1.1|2, found "3"'),
    ({"http_version": 2}, "upstream.http_version: expected a string"),
    ({"http_verison": "2"}, 'unknown key "http_verison" (did you mean "http_version"?)'),
])
def test_bad_https_knob_is_a_config_error(upstream, needle):
    with TempDir() as d:
        if upstream.get("ca_file") == "NOT_PEM":
            path = os.path.join(d, "not.pem")
            with open(path, "w") as f:
                f.write("this is no certificate\n")
            upstream = {"ca_file": path}
        cfg, _ = base_config(d, "https://api.example.com", upstream=upstream)
        path = write_config(d, cfg)
        out = subprocess.run([ZONEGATE_BIN, "config", "check", path], capture_output=True, text=True, timeout=10)
        assert out.returncode != 0
        assert needle in out.stderr, out.stderr
        assert path in out.stderr, out.stderr  # the message names the file
        # serve refuses it the same way, before listening
        run = subprocess.run([ZONEGATE_BIN, "serve", "--config", path], capture_output=True, text=True, timeout=10)
        assert run.returncode != 0 and needle in run.stderr, run.stderr
