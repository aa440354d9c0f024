"""A three-voter cluster (gw-a, gw-b, witness) behind HAProxy with
deploy/haproxy.cfg, run with docker-compose (tests/e2e/docker-compose.yml).

What an operator checks: exactly one gateway is active and the LB serves
through it; the witness never is; when the active container is killed the
LB serves from the other zone within seconds and the two gateways are never
active at once; a killed node rejoins as standby; a planned stop (SIGTERM)
fails no client request.
"""
import base64
import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
import uuid

import pytest

from conftest import docker, free_loopback_port, http, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
COMPOSE_FILE = os.path.join(HERE, "docker-compose.yml")
GATEWAYS = ("gw-a", "gw-b")
MEMBERS = {"gw-a": ("A", "gateway"), "gw-b": ("B", "gateway"), "witness": ("C", "witness")}


def node_config(node_id, client_token_sha256):
    zone, role = MEMBERS[node_id]
    peers = []
    for peer_id, (peer_zone, peer_role) in MEMBERS.items():
        if peer_id == node_id:
            continue
        peer = {"id": peer_id, "zone": peer_zone, "role": peer_role, "raft": f"{peer_id}:18791",
                "admin": f"{peer_id}:18790"}
        if peer_role == "gateway":
            peer["gateway"] = f"{peer_id}:18789"
        peers.append(peer)
    return {
        "node": {"id": node_id, "zone": zone, "role": role,
                 "advertise": {"raft": f"{node_id}:18791", "admin": f"{node_id}:18790",
                               "gateway": f"{node_id}:18789"}},
        "listen": {"gateway": "0.0.0.0:18789", "admin": "0.0.0.0:18790", "raft": "0.0.0.0:18791"},
        "cluster": {"data_dir": "/var/lib/zonegate", "peers": peers, "secret": "env:ZONEGATE_CLUSTER_SECRET",
                    "election_timeout_ms": 1000, "heartbeat_ms": 100},
        "security": {"master_key": "env:ZONEGATE_MASTER_KEY", "admin_token": "env:ZONEGATE_ADMIN_TOKEN"},
        "api_key": "env:UPSTREAM_API_KEY",
        "endpoint": "http://mockllm:8080",
        "performance": {"max_concurrent": 50, "request_timeout": 30000, "cache_size": "64MB",
                        "drain_timeout": 30000},
        "model": {"temperature": 0.7, "top_p": 0.95},
        "auth": {"mode": "token", "tokens": [{"name": "e2e", "sha256": client_token_sha256}]},
        "failover": {"preferred_zone": "A", "failback": "manual"},
    }


class Cluster:
    def __init__(self, project, env):
        self.project = project
        self.env = env
        self.lb = f"http://127.0.0.1:{env['ZG_E2E_LB_PORT']}"
        self.token = env["ZG_E2E_CLIENT_TOKEN"]
        self.node_base = {}

    def compose(self, *args, check=True, timeout=300):
        proc = subprocess.run(["docker-compose", "-f", COMPOSE_FILE, "-p", self.project, *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def base(self, node):
        # The published port changes when a container is recreated, not on start.
        if node not in self.node_base:
            out = self.compose("port", node, "18789").stdout.strip()
            self.node_base[node] = "http://" + out.replace("0.0.0.0", "127.0.0.1")
        return self.node_base[node]

    def container(self, node):
        return self.compose("ps", "-q", node).stdout.strip()

    def active_status(self, node):
        status, _, _ = http("GET", self.base(node) + "/health/active", timeout=1)
        return status

    def statuses(self):
        """/health/active answer of every node, e.g. {"gw-a": 200, "gw-b": 429, "witness": 503}."""
        return {n: self.active_status(n) for n in MEMBERS}

    def one_active(self):
        """The single active gateway's name, or None (none, or more than one)."""
        active = self.actives()
        return active[0] if len(active) == 1 else None

    def actives(self, nodes=GATEWAYS):
        return [n for n in nodes if self.active_status(n) == 200]

    def chat(self, timeout=10):
        request = {"model": "mock-gpt", "messages": [{"role": "user", "content": "ping"}]}
        status, _, body = http("POST", self.lb + "/v1/chat/completions", request,
                               headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout)
        return status, body


@pytest.fixture(scope="module")
def cluster(image, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster")
    client_token = "zg-e2e-" + secrets.token_urlsafe(24)
    token_sha = hashlib.sha256(client_token.encode()).hexdigest()
    for node_id in MEMBERS:
        path = workdir / f"{node_id}.json"
        path.write_text(json.dumps(node_config(node_id, token_sha), indent=2))
        path.chmod(0o644)
    env = dict(os.environ)
    env.update({
        "ZONEGATE_IMAGE": image,
        "ZG_E2E_DIR": str(workdir),
        "ZG_E2E_LB_PORT": str(free_loopback_port()),
        "ZONEGATE_CLUSTER_SECRET": secrets.token_urlsafe(24),
        "ZONEGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "ZONEGATE_ADMIN_TOKEN": secrets.token_urlsafe(24),
        "UPSTREAM_API_KEY": "sk-e2e-" + secrets.token_hex(8),
        "ZG_E2E_CLIENT_TOKEN": client_token,
    })
    c = Cluster("zge2e" + uuid.uuid4().hex[:8], env)
    try:
        c.compose("up", "-d", "--build", timeout=600)
        yield c
    finally:
        logs = c.compose("logs", "--no-color", "--tail", "200", check=False).stdout
        with open(workdir / "compose.log", "w") as f:
            f.write(logs)
        c.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)


def test_exactly_one_gateway_active_and_lb_serves(cluster):
    active = wait_until(cluster.one_active, timeout=30, what="exactly one active gateway",
                        describe=cluster.statuses)
    standby = [n for n in GATEWAYS if n != active][0]
    assert cluster.active_status(standby) == 429, "a healthy standby answers 429"
    assert cluster.active_status("witness") != 200, "the witness is never active"
    status, body = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(cluster.chat()), timeout=15,
                              what="chat through the LB")
    assert json.loads(body)["choices"]


def test_kill_active_fails_over_without_double_active(cluster):
    active = wait_until(cluster.one_active, timeout=30, what="exactly one active gateway",
                        describe=cluster.statuses)
    other = [n for n in GATEWAYS if n != active][0]
    docker("kill", cluster.container(active))
    killed_at = time.monotonic()
    double_active = 0
    recovered_after = None
    deadline = killed_at + 30
    while time.monotonic() < deadline:  # bounded sampling loop
        if len(cluster.actives()) > 1:
            double_active += 1
        status, _ = cluster.chat(timeout=3)
        if status == 200:
            recovered_after = time.monotonic() - killed_at
            break
        time.sleep(0.1)
    assert recovered_after is not None, "the LB never served a chat request after the active was killed"
    assert recovered_after < 15, f"failover took {recovered_after:.1f}s"
    assert double_active == 0
    assert cluster.active_status(other) == 200
    # The killed node comes back as a healthy standby.
    cluster.compose("start", active)
    wait_until(lambda: cluster.active_status(active) == 429, timeout=30, what=f"{active} back as standby",
               describe=cluster.statuses)
    assert cluster.actives() == [other]


def test_planned_stop_fails_no_request(cluster):
    active = wait_until(cluster.one_active, timeout=30, what="exactly one active gateway",
                        describe=cluster.statuses)
    wait_until(lambda: [n for n in GATEWAYS if n != active and cluster.active_status(n) == 429], timeout=30,
               what="a caught-up standby", describe=cluster.statuses)
    results = []
    stop = threading.Event()

    def client():
        for _ in range(2000):  # bounded
            if stop.is_set():
                return
            results.append(cluster.chat(timeout=10)[0])
            time.sleep(0.02)

    t = threading.Thread(target=client)
    t.start()
    try:
        time.sleep(1)
        cluster.compose("stop", "-t", "45", active, timeout=120)
        time.sleep(3)
    finally:
        stop.set()
        t.join(timeout=30)
    failed = [s for s in results if s != 200]
    assert len(results) > 20
    assert not failed, f"{len(failed)} of {len(results)} requests failed during a planned stop: {set(failed)}"
    cluster.compose("start", active)
