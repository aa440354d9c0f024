"""Client identity (issue 8, items 1, 2 and 5), on real processes.

A loopback cluster (gw-a, gw-b, witness) trusts 127.0.0.1 as its load
balancer (listen.trusted_proxies); clients come from other loopback
addresses (127.0.0.5, 127.0.0.7: the client socket is bound to them).

- The issue's reproduction: a token allowed from 127.0.0.1/32 used from
  127.0.0.5 is refused (403) on the active AND through the standby (which
  used to forward it from its own address, 127.0.0.1, and so let it in); a
  token allowed from 127.0.0.7/32 used from 127.0.0.7 passes on both.
- Through real HAProxy with the shipped deploy/haproxy.cfg (send-proxy-v2)
  the verdicts are the same as direct, and the access lines name the real
  client.
- From an untrusted address, X-Forwarded-For, X-Zonegate-* headers and a
  PROXY header change nothing (a PROXY header closes the connection).
- A trusted proxy's PROXY v1/v2 header and X-Forwarded-For (rightmost
  untrusted entry) are believed.
- A standby's forwarding signature is checked: a forged one, or one for
  another body, is refused with 401.
- /metrics is gone from the client port (and from the LB); it is served
  on the admin port and on listen.metrics.
"""
import hashlib
import hmac
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import time

import pytest

from cluster import SECRETS, Cluster
from harness import (ZONEGATE_BIN, TempDir, admin_call, base_config, chat_body, free_port, request,
                     start_mockllm, start_zonegate, wait_for, write_config)
from test_failover import HAProxy

CLIENT_A = "127.0.0.5"  # allowed by nobody
CLIENT_B = "127.0.0.7"  # allowed by token "only-7"
LB_ADDR = "127.0.0.1"   # the trusted proxy (HAProxy binds and connects from here)


def call(port, method, path, body=None, headers=None, source=None, host="127.0.0.1", timeout=10):
    """One request on a fresh connection from `source` (a loopback address)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        hdrs = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    finally:
        conn.close()


def chat(port, token, source=None, headers=None, body=None):
    hdrs = {"Authorization": "Bearer " + token}
    hdrs.update(headers or {})
    status, _, payload = call(port, "POST", "/v1/chat/completions", body or chat_body("who am i"), hdrs,
                              source=source)
    return status, payload


def raw_exchange(port, data, source=None, timeout=5.0):
    """Sends raw bytes, returns everything received until the server closes
    (b"" when it closed without answering)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                 source_address=(source, 0) if source else None)
    try:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and b"Connection: close" not in out and len(out) > 200:
                # A full answer on a kept-alive connection: enough.
                head, _, rest = out.partition(b"\r\n\r\n")
                clen = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")]
                if clen and len(rest) >= clen[0]:
                    break
        return out
    finally:
        s.close()


def http_bytes(token, body=None):
    body = json.dumps(body or chat_body("raw")).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: zonegate\r\nAuthorization: Bearer " +
            token.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: " +
            str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


def proxy_v1(src, dst="127.0.0.1", sport=40000, dport=18789):
    fam = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def proxy_v2(src, dst="127.0.0.1", sport=40000, dport=18789, tlv=b""):
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    addr = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(addr) + len(tlv)) + addr + tlv


def status_of(raw):
    if not raw.startswith(b"HTTP/1.1 "):
        return None
    return int(raw[9:12])


def access_lines(node, since=0):
    return [l for l in node.proc.log_lines()[since:] if l.get("event") == "access"
            and l.get("route") == "/v1/chat/completions"]


def mark(node):
    return len(node.proc.log_lines())


def last_access(node, since, status=None):
    def find():
        lines = [l for l in access_lines(node, since) if status is None or l["status"] == status]
        return lines[-1] if lines else None
    return wait_for(find, timeout=5, what=f"an access line on {node.id}")


def forward_key():
    return hmac.new(SECRETS["ZONEGATE_CLUSTER_SECRET"].encode(), b"zonegate client forwarding v1",
                    hashlib.sha256).digest()


def forward_auth(method, path, query, client_ip, body, key=None, ts=None):
    ts = int(time.time() * 1000) if ts is None else ts
    msg = "zonegate-client-forward-v1\n%s\n%s\n%s\n%s\n%d\n%s" % (
        method, path, query, client_ip, ts, hashlib.sha256(body).hexdigest())
    mac = hmac.new(key or forward_key(), msg.encode(), hashlib.sha256).hexdigest()
    return f"v1 {ts} {client_ip} {mac}"


# ---- the cluster -----------------------------------------------------------------------------

class Env:
    def __init__(self, directory):
        self.cluster = Cluster(directory, election_timeout_ms=600, heartbeat_ms=100,
                               listen_extra={"trusted_proxies": [LB_ADDR + "/32"]})
        self.haproxy = None
        try:
            self.cluster.start()
            self.active = self.cluster.wait_active()
            self.standby = next(n for n in self.cluster.nodes if n.role == "gateway" and n is not self.active)
            wait_for(lambda: self.standby.health("standby")[0] == 200, timeout=15, what="a caught-up standby")
            self.tok_lb = self.create_token("only-lb", [LB_ADDR + "/32"])
            self.tok_7 = self.create_token("only-7", [CLIENT_B + "/32"])
            self.cluster.wait_caught_up()
            self.haproxy = HAProxy(directory, {n.id: f"127.0.0.1:{n.gateway_port}"
                                               for n in self.cluster.nodes if n.role == "gateway"})
            self.haproxy.wait_routes_to(self.active.id)
        except BaseException:
            self.stop()
            raise

    def create_token(self, name, allow):
        status, answer = self.cluster.nodes[0].admin_call("POST", "/v1/tokens", {"name": name, "allow": allow})
        assert status == 200, answer
        return answer["token"]

    def stop(self):
        if self.haproxy:
            self.haproxy.stop()
        self.cluster.stop()


@pytest.fixture(scope="module")
def env():
    with TempDir() as d:
        e = Env(d)
        try:
            yield e
        finally:
            e.stop()


# ---- the reproduction ---------------------------------------------------------------

def test_allowlist_same_verdict_on_active_and_through_standby(env):
    for node in (env.active, env.standby):
        status, body = chat(node.gateway_port, env.tok_lb, source=CLIENT_A)
        assert status == 403, (node.id, status, body)
        assert json.loads(body)["error"]["code"] == "ip_not_allowed"
        status, body = chat(node.gateway_port, env.tok_7, source=CLIENT_B)
        assert status == 200, (node.id, status, body)


def test_forwarded_request_logs_the_client_on_the_active(env):
    since = mark(env.active)
    status, _ = chat(env.standby.gateway_port, env.tok_7, source=CLIENT_B)
    assert status == 200
    line = last_access(env.active, since, 200)
    assert line["client_ip"] == CLIENT_B, line
    assert line.get("forwarded") is True, line
    assert line.get("peer_ip") == "127.0.0.1", line  # the standby's own address


# ---- through real HAProxy with the shipped config ----------------------------------------

def test_haproxy_send_proxy_v2_same_verdict_and_logged_address(env):
    with open(os.path.join(os.path.dirname(__file__), "../../deploy/haproxy.cfg")) as f:
        shipped = f.read()
    assert "send-proxy-v2" in shipped and "check-send-proxy" in shipped
    lb = env.haproxy.port
    since = mark(env.active)
    status, body = chat(lb, env.tok_lb, source=CLIENT_A)
    assert status == 403, body  # HAProxy's own address (trusted) is not the client
    line = last_access(env.active, since, 403)
    assert line["client_ip"] == CLIENT_A, line
    assert line.get("peer_ip") == LB_ADDR, line
    since = mark(env.active)
    status, body = chat(lb, env.tok_7, source=CLIENT_B)
    assert status == 200, body
    assert last_access(env.active, since, 200)["client_ip"] == CLIENT_B
    # Spoofing through the LB changes nothing either: the PROXY header names
    # the client, which is not trusted, so its X-Forwarded-For is ignored.
    status, body = chat(lb, env.tok_7, source=CLIENT_A, headers={"X-Forwarded-For": CLIENT_B})
    assert status == 403, body
    # The LB's health checks (PROXY v2 too, LOCAL command) keep both nodes known.
    assert env.haproxy.server_up("zonegate_gateways", env.active.id)
    assert env.haproxy.server_up("zonegate_ready", env.standby.id)


def test_metrics_not_exposed_by_the_lb(env):
    status, _, _ = call(env.haproxy.port, "GET", "/metrics", source=CLIENT_A)
    assert status == 404


# ---- spoofing from an untrusted address -----------------------------------------------------

SPOOF_HEADERS = {
    "X-Forwarded-For": "127.0.0.7",
    "X-Real-IP": "127.0.0.7",
    "Forwarded": "for=127.0.0.7",
    "X-Zonegate-Forwarded": "1",
    "X-Zonegate-Client-IP": "127.0.0.7",
    "X-Zonegate-Source": "127.0.0.7",
    "X-Zonegate-Actor": "admin",
}


def test_spoofed_headers_from_untrusted_source_change_nothing(env):
    for node in (env.active, env.standby):
        for token in (env.tok_7, env.tok_lb):
            plain = chat(node.gateway_port, token, source=CLIENT_A)
            since = mark(env.active)
            spoofed = chat(node.gateway_port, token, source=CLIENT_A, headers=SPOOF_HEADERS)
            assert plain[0] == spoofed[0] == 403, (node.id, plain, spoofed)
            line = last_access(env.active, since, 403)
            assert line["client_ip"] == CLIENT_A, line
        # And an allowed client stays allowed (no 503 no_active_node from a
        # spoofed X-Zonegate-Forwarded on the standby).
        status, body = chat(node.gateway_port, env.tok_7, source=CLIENT_B, headers=SPOOF_HEADERS)
        assert status == 200, (node.id, status, body)


def test_internal_headers_never_reach_the_upstream(env):
    # Through the standby: the forwarded request reaches the active, which
    # calls the upstream; no X-Zonegate-* (nor X-Forwarded-For) gets there.
    status, _ = chat(env.standby.gateway_port, env.tok_7, source=CLIENT_B,
                     headers=SPOOF_HEADERS, body=chat_body("internal headers"))
    assert status == 200
    status, _, body = request(env.cluster.mock.port, "GET", "/mock/stats")
    assert status == 200
    seen = json.loads(body)["last_request"]["headers"]
    assert not any(k.startswith("x-zonegate-") for k in seen), seen
    assert "x-forwarded-for" not in seen, seen


@pytest.mark.parametrize("header", [proxy_v1(CLIENT_B), proxy_v2(CLIENT_B)], ids=["v1", "v2"])
def test_proxy_header_from_untrusted_source_closes(env, header):
    for node in (env.active, env.standby):
        since = mark(node)
        got = raw_exchange(node.gateway_port, header + http_bytes(env.tok_7), source=CLIENT_A)
        assert got == b"", (node.id, got[:200])
        # Logged with the address (rate-limited per address: the line of the
        # first refusal may be the one that counts).
        wait_for(lambda: any(l.get("event") == "proxy_header_refused" and CLIENT_A in l.get("msg", "")
                             for l in node.proc.log_lines()), timeout=5, what="proxy_header_refused logged")
        # The same client without the header: answered as before.
        assert status_of(raw_exchange(node.gateway_port, http_bytes(env.tok_7), source=CLIENT_A)) == 403


def test_proxy_header_refusals_are_rate_limited(env):
    node = env.active
    since = mark(node)
    for _ in range(5):
        raw_exchange(node.gateway_port, proxy_v1(CLIENT_B) + http_bytes(env.tok_7), source="127.0.0.9")
    lines = [l for l in node.proc.log_lines()[since:] if l.get("event") == "proxy_header_refused"
             and "127.0.0.9" in l.get("msg", "")]
    assert len(lines) == 1, lines


# ---- a trusted proxy ---------------------------------------------------------------------------

def test_trusted_proxy_header_names_the_client(env):
    port = env.active.gateway_port
    # v1 and v2 from the trusted address: the header's client decides.
    assert status_of(raw_exchange(port, proxy_v1(CLIENT_B) + http_bytes(env.tok_7), source=LB_ADDR)) == 200
    assert status_of(raw_exchange(port, proxy_v2(CLIENT_B) + http_bytes(env.tok_7), source=LB_ADDR)) == 200
    assert status_of(raw_exchange(port, proxy_v2(CLIENT_A) + http_bytes(env.tok_lb), source=LB_ADDR)) == 403
    # TLVs are skipped; a LOCAL header keeps the proxy's own address.
    tlv = bytes([0x02]) + struct.pack("!H", 7) + b"zonegat"
    assert status_of(raw_exchange(port, proxy_v2(CLIENT_B, tlv=tlv) + http_bytes(env.tok_7),
                                  source=LB_ADDR)) == 200
    local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    assert status_of(raw_exchange(port, local + http_bytes(env.tok_lb), source=LB_ADDR)) == 200
    # The header split over several writes still works.
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(LB_ADDR, 0))
    try:
        data = proxy_v2(CLIENT_B) + http_bytes(env.tok_7)
        for piece in (data[:5], data[5:14], data[14:20], data[20:]):
            s.sendall(piece)
            time.sleep(0.05)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        s.close()
    # A trusted proxy may also connect without a header.
    assert status_of(raw_exchange(port, http_bytes(env.tok_lb), source=LB_ADDR)) == 200


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 127.0.0.7 127.0.0.1 040000 80\r\n",      # leading zero
    b"PROXY TCP4 127.0.0.7 127.0.0.1 70000 80\r\n",       # port out of range
    b"PROXY TCP4 ::1 127.0.0.1 1 80\r\n",                 # family mismatch
    b"PROXY TCP4  127.0.0.7 127.0.0.1 1 80\r\n",          # double space
    b"PROXY TCP4 127.0.0.7 127.0.0.1 1 80\n",             # no CR
    b"PROXY " + b"X" * 120 + b"\r\n",                     # too long
    b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x31, 0x11, 0, 12]) + b"\x00" * 12,   # version 3
    b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x12, 0, 12]) + b"\x00" * 12,   # UDP
    b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11, 0, 4]) + b"\x00" * 4,     # address block too short
], ids=["zero", "port", "family", "spaces", "lf", "long", "version", "udp", "short"])
def test_malformed_proxy_header_from_trusted_proxy_closes(env, bad):
    got = raw_exchange(env.active.gateway_port, bad + http_bytes(env.tok_7), source=LB_ADDR)
    assert got == b"", got[:200]


def test_incomplete_proxy_header_times_out(env):
    s = socket.create_connection(("127.0.0.1", env.active.gateway_port), timeout=8,
                                 source_address=(LB_ADDR, 0))
    try:
        s.sendall(b"PROXY TCP4 127.0.0.7")
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 6
    finally:
        s.close()


def test_forwarded_for_believed_only_from_trusted_proxy(env):
    port = env.active.gateway_port
    # From the trusted address: the rightmost untrusted entry is the client.
    assert chat(port, env.tok_7, source=LB_ADDR, headers={"X-Forwarded-For": CLIENT_B})[0] == 200
    assert chat(port, env.tok_7, source=LB_ADDR,
                headers={"X-Forwarded-For": f"{CLIENT_B}, {CLIENT_A}"})[0] == 403
    assert chat(port, env.tok_7, source=LB_ADDR,
                headers={"X-Forwarded-For": f"{CLIENT_A}, {CLIENT_B}, {LB_ADDR}"})[0] == 200
    since = mark(env.active)
    assert chat(port, env.tok_lb, source=LB_ADDR, headers={"X-Forwarded-For": CLIENT_A})[0] == 403
    assert last_access(env.active, since, 403)["client_ip"] == CLIENT_A
    # Through the standby too (nginx-style: both nodes behind the proxy).
    assert chat(env.standby.gateway_port, env.tok_7, source=LB_ADDR,
                headers={"X-Forwarded-For": CLIENT_B})[0] == 200
    assert chat(env.standby.gateway_port, env.tok_lb, source=LB_ADDR,
                headers={"X-Forwarded-For": CLIENT_A})[0] == 403


# ---- the forwarding signature ------------------------------------------------------------

def test_forged_forwarding_signature_is_refused(env):
    port = env.active.gateway_port
    body = json.dumps(chat_body("forged")).encode()
    path = "/v1/chat/completions"
    cases = {
        "zeros": f"v1 {int(time.time() * 1000)} {CLIENT_B} " + "0" * 64,
        "wrong key": forward_auth("POST", path, "", CLIENT_B, body, key=b"k" * 32),
        "other body": forward_auth("POST", path, "", CLIENT_B, b'{"messages":[]}'),
        "other client": forward_auth("POST", path, "", CLIENT_A, body).replace(CLIENT_A, CLIENT_B),
        "stale": forward_auth("POST", path, "", CLIENT_B, body, ts=int(time.time() * 1000) - 120000),
        "garbage": "yes please",
    }
    for what, value in cases.items():
        for node in (env.active, env.standby):
            status, _, payload = call(node.gateway_port, "POST", path, body,
                                      {"Authorization": "Bearer " + env.tok_7,
                                       "X-Zonegate-Forward-Auth": value}, source=CLIENT_A)
            assert status == 401, (what, node.id, status, payload)
            assert json.loads(payload)["error"]["code"] == "invalid_forward_signature"
    assert any(l.get("event") == "forward_auth_failed" for l in env.active.proc.log_lines())
    # A signature made with the cluster's key is believed (what a standby sends).
    good = forward_auth("POST", path, "", CLIENT_B, body)
    status, _, payload = call(port, "POST", path, body, {"Authorization": "Bearer " + env.tok_7,
                                                         "X-Zonegate-Forward-Auth": good}, source=CLIENT_A)
    assert status == 200, payload


# ---- what the load balancer retries (issue 10) ------------------------------------------------

def mock_calls(env):
    status, _, body = request(env.cluster.mock.port, "GET", "/mock/stats")
    assert status == 200
    return json.loads(body)["total_requests"]


def test_provider_503_through_haproxy_reaches_the_client_once(env):
    """A 503 from the model provider is an answer: HAProxy passes it on and
    does not send the prompt again (it retried on 503 and called the
    provider 4 times for one request). Only what no node answered is
    retried."""
    before = mock_calls(env)
    status, headers, payload = call(env.haproxy.port, "POST", "/v1/chat/completions",
                                    chat_body("provider overloaded"),
                                    {"Authorization": "Bearer " + env.tok_lb, "X-Mock-Status": "503"})
    calls = mock_calls(env) - before
    assert status == 503, payload
    assert "x-zonegate-refused" not in headers, headers
    assert calls == 1, f"one client request reached the provider {calls} times"


# ---- /metrics off the client port ----------------------------------------------------------

def test_metrics_on_admin_port_only(env):
    for node in env.cluster.nodes:
        status, _, _ = call(node.gateway_port, "GET", "/metrics")
        assert status == 404, node.id
        host, port = node.admin.split(":")
        status, headers, body = call(int(port), "GET", "/metrics")  # no admin token needed
        assert status == 200, (node.id, body[:200])
        assert headers["content-type"].startswith("text/plain")
        assert b"zonegate_requests_total" in body
        assert b"zonegate_active" in body or node.role == "witness"


def test_listen_metrics_and_config_keys():
    mock = start_mockllm()
    try:
        with TempDir() as d:
            mport = free_port()
            cfg, port = base_config(d, mock.url)
            cfg["listen"]["metrics"] = f"127.0.0.1:{mport}"
            cfg["listen"]["trusted_proxies"] = ["127.0.0.1/32", "::1", "fd00::/8", "10.0.0.0/8"]
            path = write_config(d, cfg)
            zg = start_zonegate(path, port)
            try:
                assert request(port, "GET", "/metrics")[0] == 404
                status, _, body = request(mport, "GET", "/metrics")
                assert status == 200 and b"zonegate_requests_total" in body
                assert request(mport, "GET", "/v1/models")[0] == 404
                assert request(mport, "POST", "/metrics")[0] == 405
            finally:
                zg.stop()
            for bad in (["10.0.0.0/33"], ["not-an-ip"], "10.0.0.0/8", [""], ["::1/129"]):
                cfg["listen"]["trusted_proxies"] = bad
                path = write_config(d, cfg)
                out = subprocess.run([ZONEGATE_BIN, "config", "check", path], capture_output=True, text=True,
                                     timeout=20)
                assert out.returncode != 0, bad
                assert "listen.trusted_proxies" in out.stderr + out.stdout, out.stderr
    finally:
        mock.stop()


def test_default_no_trusted_proxy_refuses_proxy_header():
    mock = start_mockllm()
    try:
        with TempDir() as d:
            cfg, port = base_config(d, mock.url)
            path = write_config(d, cfg)
            zg = start_zonegate(path, port)
            try:
                # Not even loopback is trusted by default.
                req = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                assert raw_exchange(port, proxy_v1(CLIENT_B) + req) == b""
                assert status_of(raw_exchange(port, req)) == 200
                # X-Forwarded-For is ignored: the access line logs the peer.
                call(port, "GET", "/v1/models", headers={"X-Forwarded-For": CLIENT_B}, source=CLIENT_A)
                lines = wait_for(lambda: [l for l in zg.log_lines() if l.get("event") == "access"
                                          and l.get("route") == "/v1/models"], what="an access line")
                assert lines[-1]["client_ip"] == CLIENT_A
            finally:
                zg.stop()
    finally:
        mock.stop()


# ---- last: it leaves the cluster without a quorum ----------------------------------------------

def test_node_that_cannot_serve_closes_an_lb_connection_unanswered(env):
    """A node that can neither serve nor forward a request (here: the only
    node left, no quorum, after holding it for 3 election timeouts) answers
    a client 503 no_active_node, but closes a load balancer's connection (a
    trusted PROXY header or X-Forwarded-For) without a byte, so the LB sends
    the request to another node (retry-on empty-response) instead of
    retrying by status. Logged with status 444 and the client's address."""
    for node in env.cluster.nodes:
        if node is not env.standby:
            node.proc.signal(signal.SIGKILL)
    for node in env.cluster.nodes:
        if node is not env.standby:
            node.proc.wait(timeout=10)
    before = mock_calls(env)
    # A client (no PROXY header, no X-Forwarded-For): the 503 with the
    # node's refusal header.
    answer = raw_exchange(env.standby.gateway_port, http_bytes(env.tok_7), source=CLIENT_B, timeout=10)
    assert status_of(answer) == 503, answer[:200]
    assert b"X-Zonegate-Refused: not_active" in answer and b"no_active_node" in answer, answer[:400]
    # The load balancer, by PROXY header and by X-Forwarded-For: not one
    # byte, the connection closed.
    xff = http_bytes(env.tok_7).replace(b"Connection: close\r\n",
                                        b"Connection: close\r\nX-Forwarded-For: " + CLIENT_B.encode() + b"\r\n")
    for what, data in (("PROXY v2", proxy_v2(CLIENT_B) + http_bytes(env.tok_7)), ("X-Forwarded-For", xff)):
        since = mark(env.standby)
        answer = raw_exchange(env.standby.gateway_port, data, source=LB_ADDR, timeout=10)
        assert answer == b"", (what, answer[:200])
        line = wait_for(lambda: next((l for l in env.standby.proc.log_lines()[since:]
                                      if l.get("event") == "access"
                                      and l.get("upstream_result") == "closed_for_lb_retry"), None),
                        timeout=5, what=f"the access line of the closed request ({what})")
        assert line["client_ip"] == CLIENT_B and line["status"] == 444, line
    assert mock_calls(env) == before, "a refused request reached the provider"


def test_connections_reset_while_a_node_was_frozen_are_not_logged_as_refused_proxies(env):
    """Review finding: after a SIGSTOP, the node accepted HAProxy's health
    checks that had given up (reset) while it was frozen, could not read
    their address, and logged each as `proxy_header_refused` from "" (10
    WARN lines, none rate-limited). A connection that is gone before it is
    served is closed without a line."""
    node = env.standby
    since = mark(node)
    node.proc.signal(signal.SIGSTOP)
    try:
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", node.gateway_port), timeout=5)
            s.sendall(proxy_v2(CLIENT_B) + b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST, as HAProxy closes a check that timed out
    finally:
        node.proc.signal(signal.SIGCONT)
    wait_for(lambda: node.health("live")[0] == 200, timeout=5, what="the node thawed")
    refused = [l for l in node.proc.log_lines()[since:] if l.get("event", "").startswith("proxy_header")]
    assert refused == [], refused
