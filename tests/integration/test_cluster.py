"""The Raft group as an operator sees it: three real processes on
loopback (gw-a, gw-b, witness) with on-disk raft_uv storage, mockllm as
the upstream. A change made through any node applies on every node;
killing the leader loses no acknowledged write; a lagging node catches up
by snapshot; a peer without the cluster secret never joins; a corrupt
data dir is a clear error."""
import concurrent.futures
import json
import os
import signal
import time

import pytest

from cluster import SECRETS, Cluster
from harness import TempDir, chat_body, request, wait_for


@pytest.fixture
def cluster():
    with TempDir() as d:
        c = Cluster(d, snapshot_threshold=64)
        try:
            c.start()
            # every node has applied the seed (a follower read right after
            # start may otherwise see version 0: stale reads are allowed,
            # If-Match then refuses the write)
            c.wait_caught_up()
            yield c
        finally:
            c.stop()


def chat(node, token, **headers):
    hdrs = {"Authorization": f"Bearer {token}"}
    hdrs.update(headers)
    return request(node.gateway_port, "POST", "/v1/chat/completions", chat_body("hi"), hdrs)


def test_token_created_on_one_node_works_on_every_node(cluster):
    standby = next(n for n in cluster.nodes if n.role == "gateway" and n is not cluster.active())
    status, answer = standby.admin_call("POST", "/v1/tokens", {"name": "app1"})
    assert status == 200, answer
    token = answer["token"]
    # Read-your-writes: the node that answered already has it.
    for node in [n for n in cluster.nodes if n.role == "gateway"]:
        status, _, body = chat(node, token)
        assert status == 200, (node.id, body)
    # Stored hashed only: no node's token listing carries the token.
    status, listing = cluster.nodes[2].admin_call("GET", "/v1/tokens")
    assert token not in json.dumps(listing)
    # Revoked once: refused everywhere on the next request.
    status, _ = cluster.nodes[2].admin_call("DELETE", f"/v1/tokens/{answer['id']}")
    assert status == 200
    for node in [n for n in cluster.nodes if n.role == "gateway"]:
        wait_for(lambda node=node: chat(node, token)[0] == 401, timeout=5, what="revoked token refused")


def test_config_applied_once_changes_behaviour_on_every_node(cluster):
    status, answer = cluster.nodes[1].admin_call("POST", "/v1/tokens", {"name": "cfg"})
    token = answer["token"]
    status, current = cluster.nodes[0].admin_call("GET", "/v1/config")
    version = current["version"]
    new = dict(current["config"])
    new["model"] = {"temperature": 0.25}
    # Compare-and-set with a stale version is refused.
    status, _ = cluster.nodes[1].admin_call("PUT", "/v1/config", {"config": new},
                                            headers={"If-Match": str(version + 7)})
    assert status == 412
    status, answer = cluster.nodes[1].admin_call("PUT", "/v1/config", {"config": new},
                                                 headers={"If-Match": str(version)})
    assert status == 200, answer
    for node in [n for n in cluster.nodes if n.role == "gateway"]:
        def sees_default(node=node):
            s, _, body = chat(node, token, **{"X-Mock-Echo": "1"})
            echoed = json.loads(json.loads(body)["choices"][0]["message"]["content"])
            return s == 200 and echoed["body"].get("temperature") == 0.25
        wait_for(sees_default, timeout=5, what=f"{node.id} applies the new default")
    # A misspelled key is refused with the nearest known key, and changes nothing.
    status, answer = cluster.nodes[0].admin_call("PUT", "/v1/config", {"endpoit": "http://x"})
    assert status == 400 and "did you mean" in answer["error"]["message"], answer
    # Read on the node that took the write (read-your-writes): unchanged.
    status, after = cluster.nodes[1].admin_call("GET", "/v1/config")
    assert after["version"] == version + 1


def test_sigkill_leader_during_500_writes_loses_no_acknowledged_write(cluster):
    leader = cluster.active()
    survivors = [n for n in cluster.nodes if n is not leader]
    acked = []
    targets = [n for n in cluster.nodes]

    def write(i):
        node = targets[i % len(targets)]
        if not node.alive():
            node = survivors[i % len(survivors)]
        for attempt in range(3):
            try:
                status, answer = node.admin_call("POST", "/v1/tokens", {"name": f"w{i}"}, timeout=10)
            except OSError:
                return None
            if status == 200:
                return f"w{i}"
            if status != 503:
                return None
            time.sleep(0.2)
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(write, i) for i in range(500)]
        time.sleep(0.3)
        leader.kill(signal.SIGKILL)
        for f in futures:
            name = f.result(timeout=120)
            if name:
                acked.append(name)
    new_active = cluster.wait_active(exclude=leader)
    assert new_active is not leader
    assert len(acked) > 100, f"only {len(acked)} writes acknowledged"
    for node in survivors:
        def has_all(node=node):
            status, listing = node.admin_call("GET", "/v1/tokens")
            names = {t["name"] for t in listing.get("tokens", [])}
            return set(acked) <= names
        wait_for(has_all, timeout=15, what=f"every acknowledged write on {node.id}")
    print(f"\nacknowledged writes: {len(acked)} of 500; lost: 0")


def test_node_down_for_2000_writes_catches_up_by_snapshot(cluster):
    down = cluster.node("gw-b") if cluster.active() is not cluster.node("gw-b") else cluster.node("gw-a")
    down.kill(signal.SIGKILL)
    writer = next(n for n in cluster.nodes if n.alive())

    def write(i):
        status, _ = writer.admin_call("POST", "/v1/tokens", {"name": f"bulk{i}"})
        return status

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(write, range(2000)))
    assert statuses.count(200) == 2000
    down.start()

    def caught_up():
        status, listing = down.admin_call("GET", "/v1/tokens")
        return status == 200 and len(listing["tokens"]) >= 2000
    wait_for(caught_up, timeout=30, what="restarted node has all 2000 writes")
    assert "snapshot" in down.proc.output().lower()


def test_peer_with_wrong_cluster_secret_is_refused(cluster):
    intruder = cluster.node("witness")
    intruder.kill(signal.SIGKILL)
    # Fresh data dir and the wrong secret: it must never join nor learn the leader.
    import shutil
    shutil.rmtree(intruder.data_dir)
    intruder.env_overrides = {"ZONEGATE_CLUSTER_SECRET": "not-the-cluster-secret-at-all"}
    intruder.start()
    time.sleep(3)
    status, body = intruder.health("live")
    assert body["leader"] == "", body
    logs = "".join(n.proc.output() for n in cluster.nodes if n is not intruder)
    assert "peer_auth_failed" in logs
    # The group still commits writes.
    writer = cluster.active()
    status, _ = writer.admin_call("POST", "/v1/tokens", {"name": "after-intruder"})
    assert status == 200


def test_corrupt_data_dir_is_a_clear_error(cluster):
    node = cluster.node("witness")
    node.kill(signal.SIGKILL)
    raft_dir = os.path.join(node.data_dir, "raft")
    for name in ("metadata1", "metadata2"):
        path = os.path.join(raft_dir, name)
        if os.path.exists(path):
            with open(path, "r+b") as f:
                f.write(b"\xde\xad\xbe\xef" * 4)
    node.start(wait=False)
    code = node.proc.wait(timeout=20)
    out = node.proc.output()
    assert code == 1, (code, out[-2000:])
    assert "error:" in out and node.data_dir in out, out[-2000:]
    assert "restore it from a backup" in out


def test_data_dir_that_is_a_file_is_a_clear_error(cluster):
    node = cluster.node("witness")
    node.kill(signal.SIGKILL)
    import shutil
    shutil.rmtree(node.data_dir)
    with open(node.data_dir, "w") as f:
        f.write("not a directory")
    node.start(wait=False)
    code = node.proc.wait(timeout=20)
    out = node.proc.output()
    assert code == 1, out[-2000:]
    assert "cluster.data_dir" in out and node.data_dir in out, out[-2000:]


def test_wrong_master_key_refuses_to_start(cluster):
    node = cluster.node("witness")
    node.kill(signal.SIGTERM)
    import base64
    node.env_overrides = {"ZONEGATE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    node.start(wait=False)
    code = node.proc.wait(timeout=20)
    assert code == 1
    assert "master key" in node.proc.output()


def test_cli_as_an_operator(cluster):
    node = cluster.node("gw-b")
    out = node.cli("status")
    assert "gw-a" in out.stdout and "witness" in out.stdout
    key_out = node.cli("keys", "add", "--upstream", "default", input_text="sk-cli-key-123456\n")
    assert "added key" in key_out.stdout
    listing = node.cli("keys", "list", "--json")
    keys = json.loads(listing.stdout)["keys"]
    assert any(k["state"] == "active" for k in keys)
    assert "sk-cli-key-123456" not in listing.stdout
    tok = node.cli("tokens", "create", "cli-app", "--rpm", "100")
    token = tok.stdout.strip()
    assert token.startswith("zg-")
    s, _, body = chat(cluster.active(), token, **{"X-Mock-Echo": "1"})
    assert s == 200
    assert "sk-cli-key-123456" in json.loads(body)["choices"][0]["message"]["content"]
    audit = node.cli("audit", "--json")
    actions = [r["action"] for r in json.loads(audit.stdout)["audit"]]
    assert "key.add" in actions and "token.create" in actions
    bad = node.cli("status", "--token", "wrong-token-1234567", check=False)
    assert bad.returncode == 1 and "admin token was rejected" in bad.stderr
    down = node.cli("status", "--addr", "127.0.0.1:1", check=False)
    assert down.returncode == 1 and "cannot reach" in down.stderr


def test_recover_force_rebuilds_one_node_cluster_after_quorum_loss(cluster):
    import subprocess
    from harness import ZONEGATE_BIN
    survivor = cluster.node("gw-a")
    status, answer = cluster.node("gw-b").admin_call("POST", "/v1/tokens", {"name": "before-disaster"})
    assert status == 200
    token = answer["token"]
    cluster.wait_caught_up()
    survivor.kill(signal.SIGKILL)
    env = dict(os.environ)
    env.update(SECRETS)
    # A majority (gw-b + witness) is still reachable: refused, nothing changed.
    out = subprocess.run([ZONEGATE_BIN, "recover", "--force", "--yes", "--config", survivor.config_path],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "refused" in out.stderr, out
    cluster.node("gw-b").kill(signal.SIGKILL)
    cluster.node("witness").kill(signal.SIGKILL)
    # Without --yes it asks, and a "no" changes nothing.
    out = subprocess.run([ZONEGATE_BIN, "recover", "--force", "--config", survivor.config_path], input="no\n",
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "aborted" in out.stdout and "last index" in out.stdout, out
    out = subprocess.run([ZONEGATE_BIN, "recover", "--force", "--yes", "--config", survivor.config_path],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out
    assert "only voter" in out.stdout
    survivor.start()
    wait_for(lambda: survivor.health("active")[0] == 200, timeout=15, what="recovered node active alone")
    s, _, body = chat(survivor, token)
    assert s == 200, body
    status, answer = survivor.admin_call("POST", "/v1/tokens", {"name": "after-recovery"})
    assert status == 200


def test_member_joins_as_non_voter_then_voter_and_can_be_removed(cluster):
    from cluster import Node
    status, answer = cluster.node("gw-a").admin_call("POST", "/v1/tokens", {"name": "before-join"})
    assert status == 200
    newcomer = Node(cluster, "gw-c", "A", "gateway")
    newcomer.write_config()
    with open(newcomer.config_path) as f:
        cfg = json.load(f)
    cfg["cluster"]["join"] = True
    with open(newcomer.config_path, "w") as f:
        json.dump(cfg, f)
    newcomer.start()
    try:
        out = cluster.node("gw-b").cli("members", "add", "gw-c", "--raft", newcomer.member()["raft"], "--zone", "A",
                                       "--admin", newcomer.admin, "--gateway", newcomer.member()["gateway"])
        assert "added gw-c" in out.stdout

        def promoted():
            status, st = cluster.active().admin_call("GET", "/v1/cluster/status")
            m = [m for m in st["members"] if m["id"] == "gw-c"]
            return m and m[0]["voter"]
        wait_for(promoted, timeout=20, what="gw-c promoted to voter")

        def caught_up():
            status, listing = newcomer.admin_call("GET", "/v1/tokens")
            return status == 200 and any(t["name"] == "before-join" for t in listing["tokens"])
        wait_for(caught_up, timeout=20, what="gw-c has the replicated state")
        out = cluster.node("gw-a").cli("members", "remove", "gw-c")
        assert "removed gw-c" in out.stdout
        status, st = cluster.active().admin_call("GET", "/v1/cluster/status")
        assert all(m["id"] != "gw-c" for m in st["members"])
    finally:
        newcomer.proc.stop()


def recover_on(cluster, survivor):
    """Every node SIGKILLed, `zonegate recover --force` on survivor, which
    then runs alone as the active of a new incarnation."""
    import subprocess
    from harness import ZONEGATE_BIN
    for n in cluster.nodes:
        n.kill(signal.SIGKILL)
    env = dict(os.environ)
    env.update(SECRETS)
    out = subprocess.run([ZONEGATE_BIN, "recover", "--force", "--yes", "--config", survivor.config_path],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out
    assert "new cluster incarnation" in out.stdout, out.stdout
    survivor.start()
    wait_for(lambda: survivor.health("active")[0] == 200, timeout=15, what="recovered node active alone")


def test_node_from_before_recover_is_refused_then_rejoins_with_an_empty_data_dir(cluster):
    """Issue 10 item 6b: after `recover --force`, a node that comes back with
    its old data dir made libraft abort (double free in the receive path).
    The recovered cluster has a new incarnation; the old node is refused at
    the peer handshake on both sides with a line that says what to do, nobody
    crashes, and once its data dir is emptied `members add` brings it back."""
    import shutil
    survivor, old = cluster.node("gw-a"), cluster.node("gw-b")
    status, answer = old.admin_call("POST", "/v1/tokens", {"name": "before-disaster"})
    assert status == 200, answer
    token = answer["token"]
    cluster.wait_caught_up()
    status, st = survivor.admin_call("GET", "/v1/cluster/status")
    old_incarnation = st["incarnation"]
    assert len(old_incarnation) == 32, st
    recover_on(cluster, survivor)
    status, st = survivor.admin_call("GET", "/v1/cluster/status")
    assert st["incarnation"] != old_incarnation, st
    # The logs diverge: the recovered node commits what the old one never saw.
    status, answer = survivor.admin_call("POST", "/v1/tokens", {"name": "after-recovery"})
    assert status == 200, answer

    old.start()  # its old data dir, its old 3-voter configuration
    refused_here = "is from another incarnation of this cluster (recovered with zonegate recover --force): " \
                   "empty its data dir and add it again with `zonegate members add`"
    wait_for(lambda: refused_here in survivor.proc.output(), timeout=20,
             what="the recovered node refuses the old one")
    wait_for(lambda: "this node is from an older incarnation of the cluster" in old.proc.output(), timeout=20,
             what="the old node says it is the stale one")
    lines = [l for l in survivor.proc.log_lines() if l.get("event") == "peer_incarnation_mismatch"]
    assert lines[0]["level"] == "error", lines[0]
    assert lines[0]["peer_raft_address"] == old.member()["raft"], lines[0]
    time.sleep(3)  # the old node keeps retrying: both stay up, the line is rate-limited
    assert survivor.alive() and old.alive()
    lines = [l for l in survivor.proc.log_lines() if l.get("event") == "peer_incarnation_mismatch"]
    assert len(lines) <= 2, lines
    assert "peer_auth_failed" not in survivor.proc.output()
    status, body = old.health("live")
    assert body["leader"] == "", body
    assert survivor.health("active")[0] == 200
    s, _, body = chat(survivor, token)
    assert s == 200, body
    status, answer = survivor.admin_call("POST", "/v1/tokens", {"name": "while-refused"})
    assert status == 200, answer
    status, st = survivor.admin_call("GET", "/v1/cluster/status")
    assert [m["id"] for m in st["members"] if m.get("voter")] == ["gw-a"], st

    # What the line says: empty its data dir, add it again.
    old.kill(signal.SIGTERM)
    shutil.rmtree(old.data_dir)
    with open(old.config_path) as f:
        cfg = json.load(f)
    cfg["cluster"]["join"] = True
    with open(old.config_path, "w") as f:
        json.dump(cfg, f)
    old.start()
    out = survivor.cli("members", "add", "gw-b", "--raft", old.member()["raft"], "--zone", "B",
                       "--admin", old.admin, "--gateway", old.member()["gateway"])
    assert "added gw-b" in out.stdout

    def rejoined():
        status, listing = old.admin_call("GET", "/v1/tokens")
        return status == 200 and any(t["name"] == "while-refused" for t in listing["tokens"])
    wait_for(rejoined, timeout=30, what="gw-b has the recovered cluster's state")
    status, st_old = old.admin_call("GET", "/v1/cluster/status")
    status, st_new = survivor.admin_call("GET", "/v1/cluster/status")
    assert st_old["incarnation"] == st_new["incarnation"], (st_old, st_new)
    with open(os.path.join(old.data_dir, "incarnation")) as f:
        assert f.read().strip() == st_new["incarnation"]
    assert survivor.alive() and old.alive()
    assert survivor.health("active")[0] == 200


def test_two_stale_nodes_after_recover_never_serve_beside_the_recovered_one(cluster):
    """Review finding: after `recover --force` on gw-a, gw-b AND the witness
    came back with their old data dirs (restart: unless-stopped after a zone
    outage). They are a majority of the old configuration: gw-b logged that
    it was the stale one, then won an election with the witness's vote and
    answered /health/active 200 beside gw-a, taking writes that the recovered
    cluster never saw. A node that meets a peer of a newer incarnation now
    refuses every raft peer and serves nothing; its next start refuses the
    data dir with one line."""
    survivor, gw_b, witness = cluster.node("gw-a"), cluster.node("gw-b"), cluster.node("witness")
    for i in range(5):
        assert survivor.admin_call("POST", "/v1/audit", {"what": f"before-{i}"})[0] == 200
    cluster.wait_caught_up()
    recover_on(cluster, survivor)
    gw_b.start(wait=False)
    witness.start(wait=False)
    stale_active = []
    deadline = time.monotonic() + 6  # well past an election of the old pair (600 ms timers)
    while time.monotonic() < deadline:
        if gw_b.health("active")[0] == 200:
            stale_active.append(time.monotonic())
        time.sleep(0.02)
    assert stale_active == [], f"gw-b (stale) answered /health/active 200 {len(stale_active)} times"
    assert survivor.health("active")[0] == 200
    for node in (gw_b, witness):
        wait_for(lambda node=node: "node_superseded" in node.proc.output(), timeout=10,
                 what=f"{node.id} says its data is from an older incarnation")
    for node in (gw_b, witness):
        for check in ("ready", "live"):
            status, body = node.health(check)
            assert status == 503 and "older cluster incarnation" in body["reason"], (node.id, check, body)
    t = time.monotonic()
    status, answer = gw_b.admin_call("POST", "/v1/audit", {"what": "written-on-the-stale-side"}, timeout=15)
    assert status == 503 and "older incarnation" in answer["error"]["message"], answer
    assert time.monotonic() - t < 2, "the stale node should say so at once, not wait for a leader"
    status, st = gw_b.admin_call("GET", "/v1/cluster/status")
    assert st["superseded"] is True, st
    # A client sent there is told the same, not "retry shortly".
    status, headers, body = request(gw_b.gateway_port, "POST", "/v1/chat/completions", chat_body("x"),
                                    {"Authorization": "Bearer sk-any"})
    assert status == 503 and b"older incarnation" in body and "Retry-After" not in headers, (status, body)
    # The next start refuses the marked data dir with one line.
    gw_b.kill(signal.SIGTERM)
    gw_b.start(wait=False)
    rc = gw_b.proc.p.wait(timeout=15)
    assert rc == 1, rc
    errors = [l for l in gw_b.proc.output().splitlines() if "older incarnation" in l]
    assert errors and "members add" in errors[-1], gw_b.proc.output()[-1500:]


def signed_usage_relay(body, source="gw-b"):
    """Headers of a usage relay signed as node.c's node_usage_relay signs it
    (HMAC under the key derived from the cluster secret)."""
    import hashlib
    import hmac
    key = hmac.new(SECRETS["ZONEGATE_CLUSTER_SECRET"].encode(), b"zonegate admin forwarding v1",
                   hashlib.sha256).digest()
    ts = int(time.time() * 1000)
    msg = "zonegate-admin-forward-v1\nPOST\n/_zonegate/usage\n\ngateway\n%s\n%d\n%s" % (
        source, ts, hashlib.sha256(body).hexdigest())
    mac = hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()
    return {"X-Zonegate-Actor": "gateway", "X-Zonegate-Source": source,
            "X-Zonegate-Forward-Auth": f"v1 {ts} {mac}", "Content-Type": "application/json"}


def test_a_usage_batch_counts_once_however_often_it_arrives(cluster):
    """Review finding: usage.add had no id, so a flush whose answer was lost
    (written after all) was sent again and counted twice (+76 % under
    one-way Raft cuts), and a captured relay could be replayed to inflate a
    tenant's usage. Every batch now carries its source and sequence number
    and the replicated store applies each once."""
    active = cluster.active()
    at = int(time.time())
    def batch(seq):
        return json.dumps({"at": at, "rows": [{"token": "relay-once", "model": "m", "key": "",
                                               "requests": 1, "prompt": 5, "completion": 5, "total": 10,
                                               "cached": 0, "reasoning": 0, "unknown": 0}],
                           "seconds": [], "batch": {"source": "g-test", "seq": seq}}).encode()
    from harness import http_call
    host, port = active.admin.split(":")
    for body in (batch(1), batch(1), batch(1), batch(2)):
        status, _, answer = http_call(host, int(port), "POST", "/_zonegate/usage", body,
                                      signed_usage_relay(body), timeout=10)
        assert status == 200, answer
    status, usage = active.admin_call("GET", "/v1/usage?token=relay-once&since=1h")
    assert status == 200 and usage["sum"]["requests"] == 2 and usage["sum"]["total"] == 20, usage
    # Not the leader: refused, so the sender keeps the batch for the leader.
    standby = next(n for n in cluster.nodes if n.role == "gateway" and n is not active)
    host, port = standby.admin.split(":")
    body = batch(3)
    status, _, answer = http_call(host, int(port), "POST", "/_zonegate/usage", body, signed_usage_relay(body),
                                  timeout=10)
    assert status == 503 and b"not_leader" in answer, (status, answer)


def test_provider_503_through_a_standby_is_answered_once_not_resent(cluster):
    """A 503 the model provider gives the active is the provider's answer: the
    standby that forwarded the request passes it on, it does not take it for
    "that node is not active" and send the request (and the bill) again. The
    node's own refusal carries X-Zonegate-Refused and is still retried."""
    active = cluster.active()
    standby = next(n for n in cluster.nodes if n.role == "gateway" and n is not active)
    status, answer = standby.admin_call("POST", "/v1/tokens", {"name": "app503"})
    assert status == 200, answer
    token = answer["token"]
    before = request(cluster.mock.port, "GET", "/mock/stats")[2]
    before = json.loads(before)["total_requests"]
    status, headers, body = chat(standby, token, **{"X-Mock-Status": "503"})
    after = json.loads(request(cluster.mock.port, "GET", "/mock/stats")[2])["total_requests"]
    assert status == 503, body
    assert "X-Zonegate-Refused" not in {k.title() for k in dict(headers)}, headers
    # one request from the client: the active tries its key once (one
    # configured key), and nobody sends it again
    assert after - before == 1, f"provider called {after - before} times for one request"


def forward_to_dying_active(cluster, headers):
    """A chat sent to the standby (forwarded to the active), the active
    SIGKILLed while the slow provider holds it. Returns (status, headers,
    body) or the OSError, and the provider calls it cost."""
    active = cluster.active()
    standby = next(n for n in cluster.nodes if n.role == "gateway" and n is not active)
    status, answer = standby.admin_call("POST", "/v1/tokens", {"name": "app-dies"})
    assert status == 200, answer
    token = answer["token"]
    cluster.wait_caught_up()
    before = json.loads(request(cluster.mock.port, "GET", "/mock/stats")[2])["total_requests"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, standby, token, **{"X-Mock-Latency-Ms": "1500", **headers})
        time.sleep(0.4)
        active.proc.signal(signal.SIGKILL)
        active.proc.wait(timeout=10)
        try:
            outcome = pending.result(timeout=30)
        except OSError as e:
            outcome = e
    after = json.loads(request(cluster.mock.port, "GET", "/mock/stats")[2])["total_requests"]
    return standby, outcome, after - before


def test_forward_broken_by_a_dying_active_is_a_502_naming_the_active_not_a_replay(cluster):
    """A standby forwarding a request to an active that dies before one
    byte of its answer does not send it again itself: replaying it spread a
    request that crashes its node to the last gateway, and asked a live
    active whose answer it could not read again every 20 ms (review). A
    client gets 502 naming the active node (it said "the upstream model
    API"); the provider was called once."""
    _, outcome, calls = forward_to_dying_active(cluster, {})
    status, _, body = outcome
    assert status == 502, body[:300]
    assert b"the active node" in body, body[:300]
    assert calls == 1, f"provider called {calls} times"


def test_forward_broken_by_a_dying_active_closes_the_lb_connection_for_its_retry():
    """The same through a trusted load balancer: the standby closes the
    LB's connection without a byte (444), as the dying active's own
    connections close, so the LB's retry-on empty-response decides."""
    with TempDir() as d:
        c = Cluster(d, listen_extra={"trusted_proxies": ["127.0.0.1/32"]})
        try:
            c.start()
            c.wait_caught_up()
            standby, outcome, calls = forward_to_dying_active(c, {"X-Forwarded-For": "127.0.0.7"})
            assert isinstance(outcome, OSError), outcome
            assert calls == 1, f"provider called {calls} times"
            line = wait_for(lambda: next((l for l in standby.proc.log_lines()
                                          if l.get("event") == "access"
                                          and l.get("upstream_result") == "closed_for_lb_retry"), None),
                            timeout=5, what="the access line of the closed request")
            assert line["status"] == 444 and line["client_ip"] == "127.0.0.7", line
        finally:
            c.stop()
