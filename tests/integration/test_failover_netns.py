"""A true network partition: each node (gw-a, gw-b, witness) runs in its
own network namespace created by this test, joined by veth pairs to a
bridge in a fifth namespace, which also links to the root namespace
(nodes at 10.77.0.1-3, the test at 10.77.0.254; every
node listens on the default ports 18789/18790/18791 of its own address).
The active node's Raft traffic is then dropped by nftables inside its
namespace (tcp dport/sport 18791) while its client and admin ports stay
reachable from the test.

What an operator relies on (DESIGN.md, Fencing): the cut-off active stops
answering 200 on /health/active BEFORE any other node starts answering 200
(the last 200 the old one sent was received before the first 200 request
to the new one was even sent), no sampling round sees two actives, and no
acknowledged admin write is lost. After the cut heals, the old active
rejoins as a standby.

Needs root, `ip netns` and `nft`; skipped with the reason otherwise. The
namespaces, the bridge and the processes are removed in the fixture
finalizer whatever happens. (These are the only non-loopback addresses in
the suites: a private /24 that exists only inside the test's namespaces
and on its bridge; the test skips if 10.77.0.0/24 is already routed.)
"""
import json
import os
import shutil
import subprocess
import time

import pytest

from cluster import SECRETS
from harness import MOCKLLM_BIN, ZONEGATE_BIN, Proc, TempDir, free_port, wait_for
from test_failover import AuditProbe, HealthPoller, http_call

SUBNET = "10.77.0"
GATEWAY_PORT, ADMIN_PORT, RAFT_PORT = 18789, 18790, 18791
ELECTION_TIMEOUT_MS = 600
SUFFIX = str(os.getpid() % 100000)
MEMBERS = [("gw-a", "A", "gateway", "a", 1), ("gw-b", "B", "gateway", "b", 2), ("witness", "C", "witness", "w", 3)]


def sh(*args, check=True):
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def netns_unavailable_reason():
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"zg-probe{SUFFIX}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return f"`ip netns add` does not work here: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    routes = subprocess.run(["ip", "-4", "route", "show", "to", "match", f"{SUBNET}.1"], capture_output=True,
                            text=True, timeout=10).stdout
    if any(line and not line.startswith("default") for line in routes.splitlines()):
        return f"{SUBNET}.0/24 is already routed on this host: {routes.strip()}"
    return None


class NetnsNode:
    def __init__(self, directory, node_id, zone, role, short, host_no):
        self.id, self.zone, self.role = node_id, zone, role
        self.ns = f"zg-{short}{SUFFIX}"
        self.veth_host, self.veth_ns = f"zgh{short}{SUFFIX}", f"zgn{short}{SUFFIX}"
        self.ip = f"{SUBNET}.{host_no}"
        self.data_dir = os.path.join(directory, f"data-{node_id}")
        self.config_path = os.path.join(directory, f"{node_id}.json")
        self.proc = None

    @property
    def admin(self):
        return f"{self.ip}:{ADMIN_PORT}"

    def member(self):
        return {"id": self.id, "zone": self.zone, "role": self.role, "raft": f"{self.ip}:{RAFT_PORT}",
                "admin": self.admin, "gateway": f"{self.ip}:{GATEWAY_PORT}"}

    def write_config(self, peers, upstream_url):
        cfg = {
            "node": {"id": self.id, "zone": self.zone, "role": self.role},
            "listen": {"gateway": f"{self.ip}:{GATEWAY_PORT}", "admin": self.admin, "raft": f"{self.ip}:{RAFT_PORT}"},
            "cluster": {"data_dir": self.data_dir, "peers": [p.member() for p in peers if p is not self],
                        "secret": "env:ZONEGATE_CLUSTER_SECRET", "election_timeout_ms": ELECTION_TIMEOUT_MS,
                        "heartbeat_ms": 100},
            "security": {"master_key": "env:ZONEGATE_MASTER_KEY", "admin_token": "env:ZONEGATE_ADMIN_TOKEN"},
            "endpoint": upstream_url,
            "api_key": "env:UPSTREAM_API_KEY",
            "auth": {"mode": "token"},
            "failover": {"preferred_zone": "A", "failback": "manual"},
        }
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=1)

    def start(self):
        env = dict(os.environ)
        env.update(SECRETS)
        self.proc = Proc(["ip", "netns", "exec", self.ns, ZONEGATE_BIN, "serve", "--config", self.config_path],
                         env=env, name=self.id)

    def health(self):
        try:
            status, _, body = http_call(self.ip, GATEWAY_PORT, "GET", "/health/active", timeout=1)
            return status, json.loads(body)
        except (OSError, ValueError):
            return None, None

    def cut_raft(self):
        rules = f"""table inet zgcut {{
  chain input {{ type filter hook input priority 0; policy accept; tcp dport {RAFT_PORT} drop; tcp sport {RAFT_PORT} drop; }}
  chain output {{ type filter hook output priority 0; policy accept; tcp dport {RAFT_PORT} drop; tcp sport {RAFT_PORT} drop; }}
}}
"""
        out = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=rules, capture_output=True,
                             text=True, timeout=10)
        assert out.returncode == 0, f"nft in {self.ns}: {out.stderr}"

    def heal_raft(self):
        sh("ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", "zgcut", check=False)


class NetnsCluster:
    def __init__(self, directory):
        self.bridge = "zgbr0"
        self.nodes = [NetnsNode(directory, *m) for m in MEMBERS]
        self.mock = None
        self.created_ns, self.root_veth = [], None

    def build_network(self):
        """The bridge lives in a namespace of its own (zg-br...): its
        bridged traffic is then filtered only by that namespace's empty
        tables, not by the host's FORWARD chain (Docker sets its policy to
        DROP and bridge-nf-call-iptables makes it apply to bridges). One
        more veth pair links the root namespace (the test, 10.77.0.254)."""
        br_ns = f"zg-br{SUFFIX}"
        sh("ip", "netns", "add", br_ns)
        self.created_ns.append(br_ns)
        in_br = ("ip", "netns", "exec", br_ns)
        sh(*in_br, "ip", "link", "set", "lo", "up")
        sh(*in_br, "ip", "link", "add", self.bridge, "type", "bridge")
        sh(*in_br, "ip", "link", "set", self.bridge, "up")
        links = [(None, f"zghr{SUFFIX}", f"zgbr{SUFFIX}r", f"{SUBNET}.254")]
        links += [(n.ns, n.veth_ns, n.veth_host, n.ip) for n in self.nodes]
        for ns, end, bridge_end, ip in links:
            if ns:
                sh("ip", "netns", "add", ns)
                self.created_ns.append(ns)
            sh("ip", "link", "add", end, "type", "veth", "peer", "name", bridge_end)
            sh("ip", "link", "set", bridge_end, "netns", br_ns)
            sh(*in_br, "ip", "link", "set", bridge_end, "master", self.bridge)
            sh(*in_br, "ip", "link", "set", bridge_end, "up")
            run_in = ("ip", "netns", "exec", ns) if ns else ()
            if ns:
                sh("ip", "link", "set", end, "netns", ns)
                sh(*run_in, "ip", "link", "set", "lo", "up")
            else:
                self.root_veth = end
            sh(*run_in, "ip", "addr", "add", f"{ip}/24", "dev", end)
            sh(*run_in, "ip", "link", "set", end, "up")

    def start(self):
        self.build_network()
        port = free_port()
        self.mock = Proc([MOCKLLM_BIN, "--listen", f"{SUBNET}.254:{port}"], name="mockllm")
        wait_for(lambda: "listening" in self.mock.output(), what="mockllm to listen")
        for n in self.nodes:
            n.write_config(self.nodes, f"http://{SUBNET}.254:{port}")
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            wait_for(lambda n=n: n.health()[0] is not None, timeout=15, what=f"{n.id} answering in {n.ns}")
        return self

    def active(self):
        found = [n for n in self.nodes if n.health()[0] == 200]
        return found[0] if len(found) == 1 else None

    def wait_active(self, exclude=None, timeout=15):
        def one():
            a = self.active()
            return a if a is not None and a is not exclude else None
        return wait_for(one, timeout=timeout, interval=0.05, what="exactly one active node")

    def stop(self):
        for n in self.nodes:
            if n.proc:
                n.proc.stop()
        if self.mock:
            self.mock.stop()
        for ns in self.created_ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        # Deleting the namespaces deletes their veths; the root one too:
        if self.root_veth:
            subprocess.run(["ip", "link", "del", self.root_veth], capture_output=True, timeout=10)


@pytest.fixture
def netns_cluster():
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with TempDir() as d:
        c = NetnsCluster(d)
        try:
            c.start()
            yield c
        finally:
            c.stop()


def test_partitioned_active_steps_down_before_anyone_else_takes_over(netns_cluster):
    c = netns_cluster
    old = c.wait_active(timeout=20)
    poller = HealthPoller([(n.id, n.ip, GATEWAY_PORT) for n in c.nodes]).start()
    audit = AuditProbe([n.admin for n in c.nodes], prefix="netns-probe").start()
    try:
        # Steady state under the probes first.
        wait_for(lambda: len(audit.acked) >= 3, timeout=10, what="admin writes acknowledged before the cut")
        t_cut = time.monotonic()
        old.cut_raft()
        new = c.wait_active(exclude=old, timeout=15)
        t_new = time.monotonic()
        # The old active keeps its client port: it answers, and not 200.
        status, body = old.health()
        assert status in (429, 503), (status, body)
        # Let the probes run on the new active a moment, then heal.
        wait_for(lambda: poller.first_200(new.id, after=t_cut) is not None, timeout=5, what="poller saw new active")
        old.heal_raft()

        def rejoined():
            st, b = old.health()
            return st == 429 and b["role"] == "standby" and b["leader"] == new.id
        wait_for(rejoined, timeout=15, interval=0.05, what=f"{old.id} back as standby after the cut healed")
    finally:
        old.heal_raft()
        audit.stop()
        poller.stop()

    last_old = poller.last_200(old.id)
    first_new = poller.first_200(new.id, after=t_cut)
    print(f"\npartition of {old.id}: last 200 from it at +{(last_old - t_cut) * 1000:.0f} ms after the cut, "
          f"first 200 from {new.id} at +{(first_new - t_cut) * 1000:.0f} ms "
          f"(gap {(first_new - last_old) * 1000:.0f} ms); new active seen by the test at "
          f"+{(t_new - t_cut) * 1000:.0f} ms; {poller.total_samples()} samples; "
          f"admin writes {len(audit.acked)} acknowledged of {audit.attempted}")
    assert last_old is not None and first_new is not None
    assert last_old < first_new, "the new active answered 200 before the old one stopped"
    assert poller.double_active_rounds() == []
    lost = audit.lost()
    assert lost == [], f"acknowledged writes lost: {lost}"
