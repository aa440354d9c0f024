"""A three-node zonegate cluster (gw-a, gw-b, witness) on loopback plus
mockllm, as real processes with real on-disk data dirs. Used by the
cluster, failover and secrets suites. Every wait is bounded."""
import base64
import json
import os
import signal
import subprocess

from harness import (ZONEGATE_BIN, Proc, admin_call, force_upstream_client, free_port, request,
                     start_mockllm, wait_for)

SECRETS = {
    "ZONEGATE_CLUSTER_SECRET": "cluster-secret-" + base64.b16encode(os.urandom(8)).decode(),
    "ZONEGATE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
    "ZONEGATE_ADMIN_TOKEN": "admin-token-" + base64.b16encode(os.urandom(8)).decode(),
    "UPSTREAM_API_KEY": "sk-upstream-" + base64.b16encode(os.urandom(8)).decode(),
}


class Node:
    def __init__(self, cluster, node_id, zone, role):
        self.cluster = cluster
        self.id = node_id
        self.zone = zone
        self.role = role
        self.gateway_port = free_port()
        self.admin_port = free_port()
        self.raft_port = free_port()
        self.data_dir = os.path.join(cluster.dir, f"data-{node_id}")
        self.config_path = os.path.join(cluster.dir, f"{node_id}.json")
        self.proc = None
        self.env_overrides = {}

    @property
    def admin(self):
        return f"127.0.0.1:{self.admin_port}"

    def member(self):
        return {"id": self.id, "zone": self.zone, "role": self.role,
                "raft": f"127.0.0.1:{self.raft_port}", "admin": self.admin,
                "gateway": f"127.0.0.1:{self.gateway_port}"}

    def write_config(self, extra=None):
        cfg = {
            "node": {"id": self.id, "zone": self.zone, "role": self.role},
            "listen": {"gateway": f"127.0.0.1:{self.gateway_port}", "admin": self.admin,
                       "raft": f"127.0.0.1:{self.raft_port}"},
            "cluster": {"data_dir": self.data_dir,
                        "peers": [n.member() for n in self.cluster.nodes if n is not self],
                        "secret": "env:ZONEGATE_CLUSTER_SECRET",
                        "election_timeout_ms": self.cluster.election_timeout_ms,
                        "heartbeat_ms": self.cluster.heartbeat_ms,
                        "snapshot_threshold": self.cluster.snapshot_threshold,
                        "snapshot_trailing": 32},
            "security": {"master_key": "env:ZONEGATE_MASTER_KEY", "admin_token": "env:ZONEGATE_ADMIN_TOKEN"},
            "endpoint": self.cluster.mock.url,
            "api_key": "env:UPSTREAM_API_KEY",
            "auth": {"mode": "token"},
            "failover": {"preferred_zone": "A", "failback": self.cluster.failback},
            "drills": {"enabled": True},
            "performance": {"drain_timeout": 5000},
        }
        cfg["listen"].update(self.cluster.listen_extra)
        if self.cluster.tls:
            d = self.cluster.cert_dir
            if not os.path.exists(f"{d}/{self.id}.crt"):  # a member added later: same CA
                subprocess.run([ZONEGATE_BIN, "certs", "init", d, "--nodes", self.id],
                               check=True, capture_output=True, timeout=30)
            cfg["security"]["tls"] = {"cert": f"{d}/{self.id}.crt", "key": f"{d}/{self.id}.key",
                                      "ca": f"{d}/ca.crt"}
        for k, v in (extra or {}).items():
            cfg[k] = v
        force_upstream_client(cfg)
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=1)

    def start(self, wait=True):
        env = dict(os.environ)
        env.update(SECRETS)
        env.update(self.env_overrides)
        self.proc = Proc([ZONEGATE_BIN, "serve", "--config", self.config_path], env=env, name=self.id)
        if wait:
            wait_for(lambda: request(self.gateway_port, "GET", "/health/live", timeout=1)[0] == 200,
                     timeout=15, what=f"{self.id} live")
        return self

    def alive(self):
        return self.proc is not None and self.proc.p.poll() is None

    def kill(self, sig=signal.SIGKILL):
        self.proc.signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(timeout=30)

    def health(self, which="active"):
        try:
            status, headers, body = request(self.gateway_port, "GET", f"/health/{which}", timeout=1)
            return status, json.loads(body)
        except OSError:
            return None, None

    def admin_call(self, method, path, body=None, timeout=10, headers=None):
        return admin_call(self.admin, SECRETS["ZONEGATE_ADMIN_TOKEN"], method, path, body, timeout, headers,
                          ca=self.cluster.ca if self.cluster.tls else None)

    def cli(self, *args, input_text=None, check=True):
        env = dict(os.environ)
        env["ZONEGATE_ADDR"] = self.admin
        env["ZONEGATE_ADMIN_TOKEN"] = SECRETS["ZONEGATE_ADMIN_TOKEN"]
        if self.cluster.tls:
            env["ZONEGATE_CA"] = self.cluster.ca
        out = subprocess.run([ZONEGATE_BIN, *args], env=env, input=input_text, capture_output=True, text=True,
                             timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"zonegate {' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return out


class Cluster:
    def __init__(self, tmpdir, election_timeout_ms=1000, heartbeat_ms=100, snapshot_threshold=1024,
                 failback="manual", mock_args=(), listen_extra=None, tls=None):
        self.dir = tmpdir
        # Extra local "listen" keys for every node, e.g. trusted_proxies.
        self.listen_extra = dict(listen_extra or {})
        # ZG_TLS=1 runs any cluster suite with mutual TLS between nodes.
        self.tls = tls if tls is not None else os.environ.get("ZG_TLS") == "1"
        self.cert_dir = os.path.join(tmpdir, "certs")
        self.ca = os.path.join(self.cert_dir, "ca.crt")
        if self.tls:
            subprocess.run([ZONEGATE_BIN, "certs", "init", self.cert_dir, "--nodes", "gw-a,gw-b,witness"],
                           check=True, capture_output=True, timeout=30)
        self.election_timeout_ms = election_timeout_ms
        self.heartbeat_ms = heartbeat_ms
        self.snapshot_threshold = snapshot_threshold
        self.failback = failback
        self.mock = start_mockllm(*mock_args)
        self.nodes = [Node(self, "gw-a", "A", "gateway"), Node(self, "gw-b", "B", "gateway"),
                      Node(self, "witness", "C", "witness")]

    def node(self, node_id):
        return next(n for n in self.nodes if n.id == node_id)

    def start(self):
        for n in self.nodes:
            n.write_config()
        for n in self.nodes:
            n.start(wait=False)
        for n in self.nodes:
            wait_for(lambda n=n: request(n.gateway_port, "GET", "/health/live", timeout=1)[0] == 200,
                     timeout=15, what=f"{n.id} live")
        self.wait_active()
        return self

    def active(self):
        found = [n for n in self.nodes if n.alive() and n.health("active")[0] == 200]
        return found[0] if len(found) == 1 else None

    def wait_active(self, timeout=15, exclude=None):
        def one_active():
            a = self.active()
            return a if a is not None and a is not exclude else None
        return wait_for(one_active, timeout=timeout, interval=0.05, what="exactly one active node")

    def wait_caught_up(self, timeout=15):
        def caught_up():
            idx = [n.health("live")[1]["applied_index"] for n in self.nodes if n.alive()]
            return len(set(idx)) == 1
        wait_for(caught_up, timeout=timeout, what="all nodes at the same applied index")

    def stop(self):
        for n in self.nodes:
            if n.proc:
                n.proc.stop()
        self.mock.stop()

    def all_logs(self):
        return "\n".join(n.proc.output() for n in self.nodes if n.proc)
