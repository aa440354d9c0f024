"""Edges of the admin trust boundary (issue 13: 3, 5, 6b, 6c).

- Replicated config cannot reach into a node's environment or files: an
  env:/file: reference is refused at config apply unless the node's own
  local file has the same reference at the same path, and one that reaches
  a node anyway is ignored with a WARN naming the path only.
- The audit trail records the actor the node derives and the real peer:
  X-Zonegate-* headers from a client are ignored; only a node's
  HMAC-authenticated forward may set them.
- Admin routes match their whole path (404 / 405), never a prefix.
- Failed admin logins are logged with the peer address, rate-limited,
  never with the offered token.
- Core dumps are off: the process is not dumpable, RLIMIT_CORE is 0.
"""
import base64
import json
import os
import signal
import subprocess
import tempfile

import pytest

from cluster import SECRETS, Cluster
from harness import (ZONEGATE_BIN, Proc, Stack, TempDir, admin_call, chat_body, free_port, mock_stats,
                     request, wait_for, write_config)

ADMIN_TOKEN = "admin-token-" + base64.b16encode(os.urandom(8)).decode()
MASTER_KEY = base64.b64encode(os.urandom(32)).decode()
SEED_KEY = "sk-seed-" + base64.b16encode(os.urandom(6)).decode()
SECRET_FILE_TEXT = "file-secret-" + base64.b16encode(os.urandom(6)).decode()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A one-voter cluster (admin API on) whose local file seeds
    api_key = env:ZG_SEED_KEY and a webhook alert channel."""
    d = str(tmp_path_factory.mktemp("edge-admin"))
    secret_file = os.path.join(d, "not-for-admins.txt")
    with open(secret_file, "w") as f:
        f.write(SECRET_FILE_TEXT + "\n")
    env = {"ZG_MASTER_KEY": MASTER_KEY, "ZG_ADMIN_TOKEN": ADMIN_TOKEN, "ZG_SEED_KEY": SEED_KEY,
           "ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook"}
    stack = Stack(d, env_extra=env, api_key="env:ZG_SEED_KEY",
                  security={"master_key": "env:ZG_MASTER_KEY", "admin_token": "env:ZG_ADMIN_TOKEN"},
                  alerts={"channels": [{"type": "webhook", "url": "env:ALERT_WEBHOOK_URL"}]})
    stack.admin = stack.cfg["listen"]["admin"]
    stack.secret_file = secret_file
    wait_for(lambda: admin(stack, "GET", "/v1/cluster/status")[0] == 200, what="admin API")
    wait_for(lambda: current_config(stack)["version"] >= 1, what="the seeded config")
    yield stack
    stack.stop()


def admin(stack, method, path, body=None, headers=None):
    return admin_call(stack.admin, ADMIN_TOKEN, method, path, body, headers=headers)


def current_config(stack):
    status, doc = admin(stack, "GET", "/v1/config")
    assert status == 200, doc
    return doc


def last_auth(stack):
    stats = mock_stats(stack.mock)
    return (stats.get("last_request") or {}).get("headers", {}).get("authorization")


# ---- 1. replicated config and secret references ---------------------------

def test_config_round_trip_keeps_local_references(node):
    doc = current_config(node)
    assert doc["config"]["api_key"] == "env:ZG_SEED_KEY"
    status, answer = admin(node, "PUT", "/v1/config", {"config": doc["config"]},
                           headers={"If-Match": str(doc["version"])})
    assert status == 200, answer
    s, _, _ = node.chat()
    assert s == 200
    assert last_auth(node) == f"Bearer {SEED_KEY}"


@pytest.mark.parametrize("path,mutate", [
    ("api_key", lambda c: c.update(api_key="env:ZG_MASTER_KEY")),
    ("api_key", lambda c: c.update(api_key="env:ZG_ADMIN_TOKEN")),
    ("fallback_endpoints[0].api_key",
     lambda c: c.update(fallback_endpoints=[{"endpoint": "http://127.0.0.1:9", "api_key": "file:%s"}])),
    ("alerts.channels[0].url",
     lambda c: c.update(alerts={"channels": [{"type": "webhook", "url": "env:ZG_MASTER_KEY"}]})),
    ("alerts.channels[1].headers.X-Token",
     lambda c: c["alerts"]["channels"].append(
         {"type": "webhook", "url": "https://hooks.example/x", "headers": {"X-Token": "env:ZG_ADMIN_TOKEN"}})),
    ("alerts.channels[0].password",
     lambda c: c.update(alerts={"channels": [{"type": "email", "smtp_url": "smtp://127.0.0.1:9",
                                              "from": "a@b.c", "to": "d@e.f", "password": "file:%s"}]})),
])
def test_config_apply_refuses_foreign_reference(node, path, mutate):
    doc = current_config(node)
    cfg = json.loads(json.dumps(doc["config"]))
    mutate(cfg)
    text = json.dumps(cfg).replace("file:%s", "file:" + node.secret_file)
    status, answer = admin(node, "PUT", "/v1/config", {"config": json.loads(text)})
    assert status == 400, answer
    err = answer["error"]
    assert err["code"] == "secret_reference_not_local"
    assert path in err["message"]
    assert "local config file" in err["message"] and "zonegate keys add" in err["message"]
    answer_text = json.dumps(answer)
    for secret in (MASTER_KEY, ADMIN_TOKEN, SECRET_FILE_TEXT, SEED_KEY):
        assert secret not in answer_text
    assert current_config(node)["version"] == doc["version"]
    # The upstream still gets the node's own key, never a resolved foreign one.
    s, _, _ = node.chat()
    assert s == 200
    assert last_auth(node) == f"Bearer {SEED_KEY}"


def test_config_apply_via_cli_whole_file_refused(node, tmp_path):
    """The issue's reproduction: `zonegate config apply` of a file whose
    api_key names the master key's variable."""
    path = tmp_path / "evil.json"
    path.write_text(json.dumps({"endpoint": node.mock.url, "api_key": "env:ZG_MASTER_KEY"}))
    env = dict(os.environ, ZONEGATE_ADDR=node.admin, ZONEGATE_ADMIN_TOKEN=ADMIN_TOKEN)
    out = subprocess.run([ZONEGATE_BIN, "config", "apply", str(path)], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode != 0, out.stdout
    assert "api_key" in out.stderr and MASTER_KEY not in out.stderr + out.stdout
    s, _, _ = node.chat()
    assert s == 200
    assert last_auth(node) == f"Bearer {SEED_KEY}"


def test_reference_not_in_local_file_is_ignored_with_warning(node):
    """Defence in depth: the replicated config still says env:ZG_SEED_KEY,
    but this node's local file no longer does (SIGHUP re-reads it): the
    reference is not resolved, and the WARN names the path only."""
    cfg = json.loads(json.dumps(node.cfg))
    cfg["api_key"] = "env:TEST_UPSTREAM_KEY"
    write_config(node.tmpdir, cfg)
    try:
        node.gw.signal(signal.SIGHUP)
        wait_for(lambda: any(l.get("event") == "replicated_secret_ref_ignored" for l in node.gw.log_lines()),
                 what="replicated_secret_ref_ignored")
        lines = [l for l in node.gw.log_lines() if l.get("event") == "replicated_secret_ref_ignored"]
        assert "api_key" in lines[-1]["msg"]
        assert not any("ZG_SEED_KEY" in json.dumps(l) for l in lines)
        assert current_config(node)["config"]["api_key"] == "env:ZG_SEED_KEY"
        node.chat()
        assert SEED_KEY not in (last_auth(node) or "")
    finally:
        write_config(node.tmpdir, node.cfg)
        node.gw.signal(signal.SIGHUP)
    wait_for(lambda: (node.chat()[0] == 200 and last_auth(node) == f"Bearer {SEED_KEY}"),
             what="the node's own reference resolved again")


# ---- 2. audit identity and exact routes ------------------------------------

def audit_note(stack, what, headers):
    status, answer = admin(stack, "POST", "/v1/audit", {"what": what}, headers=headers)
    assert status == 200, answer
    status, doc = admin(stack, "GET", "/v1/audit?limit=20")
    rec = next(r for r in reversed(doc["audit"]) if what in json.dumps(r))
    return rec


def test_client_identity_headers_are_ignored(node):
    rec = audit_note(node, "spoof-probe-1", {"X-Zonegate-Actor": "mallory", "X-Zonegate-Source": "10.9.9.9",
                                             "X-Zonegate-Forwarded": "1"})
    assert rec["actor"] == "admin", rec
    assert rec["source"] == "127.0.0.1", rec


def test_forged_forward_auth_is_refused(node):
    status, answer = admin(node, "POST", "/v1/audit", {"what": "forged"},
                           headers={"X-Zonegate-Actor": "mallory", "X-Zonegate-Source": "10.9.9.9",
                                    "X-Zonegate-Forward-Auth": "v1 1 " + "0" * 64})
    assert status == 401, answer
    _, doc = admin(node, "GET", "/v1/audit?limit=50")
    assert "forged" not in json.dumps(doc)


def test_usage_relay_takes_only_a_node_signature(node):
    """/_zonegate/usage (a former active's usage counts on their way to the
    leader) writes usage.add: the admin token alone, a forged signature or
    another method never add usage."""
    rows = {"at": 1, "rows": [{"token": "relay-forged", "model": "m", "key": "", "requests": 999,
                               "prompt": 1, "completion": 1, "total": 2, "cached": 0, "reasoning": 0,
                               "unknown": 0}], "seconds": []}
    status, answer = admin(node, "POST", "/_zonegate/usage", rows)
    assert status == 401, answer
    status, answer = admin(node, "POST", "/_zonegate/usage", rows,
                           headers={"X-Zonegate-Actor": "gateway", "X-Zonegate-Source": "n1",
                                    "X-Zonegate-Forward-Auth": "v1 1 " + "0" * 64})
    assert status == 401, answer
    status, answer = admin(node, "GET", "/_zonegate/usage")
    assert status == 405, answer
    status, doc = admin(node, "GET", "/v1/usage?token=relay-forged&since=24h")
    assert status == 200 and doc["sum"]["requests"] == 0, doc


def test_keys_and_tokens_routes_match_exactly(node):
    status, key = admin(node, "POST", "/v1/keys", {"secret": "sk-route-" + base64.b16encode(os.urandom(4)).decode()})
    assert status == 200, key
    status, tok = admin(node, "POST", "/v1/tokens", {"name": "route-probe"})
    assert status == 200, tok
    kid, tid = key["id"], tok["id"]

    def key_state():
        return {k["id"]: k for k in admin(node, "GET", "/v1/keys")[1]["keys"]}

    before = key_state()
    # The reproductions: POST /v1/keys/ID (no /rotate), DELETE /v1/tokens/ID/anything.
    status, answer = admin(node, "POST", f"/v1/keys/{kid}", {"secret": "sk-should-not-rotate-1234"})
    assert status == 405, answer
    assert answer["error"]["code"] == "method_not_allowed"
    status, answer = admin(node, "DELETE", f"/v1/tokens/{tid}/anything")
    assert status == 404, answer
    assert answer["error"]["code"] == "not_found" and answer["error"]["type"]
    probes = [("POST", f"/v1/keys/{kid}/rotate/x"), ("POST", f"/v1/keys/{kid}/rotatex"),
              ("DELETE", f"/v1/keys/{kid}/"),
              ("DELETE", "/v1/keys/"), ("DELETE", f"/v1/tokens/{tid}/"), ("DELETE", "/v1/tokens/"),
              ("GET", "/v1/cluster/status/x"), ("GET", "/v1/cluster/statusx"), ("GET", "/v1/configx"),
              ("PUT", "/v1/config/x"), ("GET", "/v1/keys/x/y/z"), ("POST", "/v1/audit/x"),
              ("POST", "/v1/cluster/switchover/now"), ("DELETE", "/v1/cluster/members/gw-a/x"),
              ("POST", "/v1/drills/crash/x"), ("POST", "/v1/drills/"), ("GET", "/v1//keys")]
    for method, path in probes:
        status, answer = admin(node, method, path, {} if method in ("POST", "PUT") else None)
        assert status == 404, (method, path, status, answer)
        assert answer["error"]["code"] == "not_found", (method, path, answer)
    wrong_method = [("POST", "/v1/cluster/status"), ("DELETE", "/v1/config"), ("PUT", "/v1/keys"),
                    ("GET", f"/v1/keys/{kid}/rotate"), ("DELETE", f"/v1/keys/{kid}/rotate"),
                    ("GET", f"/v1/tokens/{tid}"),
                    ("DELETE", "/v1/audit"), ("GET", "/v1/cluster/members"),
                    ("GET", "/v1/cluster/switchover"), ("GET", "/v1/drills/freeze")]
    for method, path in wrong_method:
        status, answer = admin(node, method, path, {} if method in ("POST", "PUT") else None)
        assert status == 405, (method, path, status, answer)
    assert key_state() == before
    tokens = {t["id"]: t for t in admin(node, "GET", "/v1/tokens")[1]["tokens"]}
    assert tid in tokens and tokens[tid].get("state", "active") != "revoked"
    # The exact routes still work.
    status, answer = admin(node, "DELETE", f"/v1/tokens/{tid}")
    assert status == 200, answer


# ---- 3. failed admin authentication ----------------------------------------

def test_failed_admin_auth_logged_rate_limited_without_token(node):
    offered = "wrong-admin-token-" + base64.b16encode(os.urandom(6)).decode()
    before = len([l for l in node.gw.log_lines() if l.get("event") == "admin_auth_failed"])
    for _ in range(30):
        status, _ = admin_call(node.admin, offered, "GET", "/v1/cluster/status")
        assert status == 401
    wait_for(lambda: len([l for l in node.gw.log_lines() if l.get("event") == "admin_auth_failed"]) > before,
             what="admin_auth_failed")
    lines = [l for l in node.gw.log_lines() if l.get("event") == "admin_auth_failed"][before:]
    assert 1 <= len(lines) <= 2, lines
    assert lines[0]["peer_ip"] == "127.0.0.1"
    assert offered not in node.gw.output()


# ---- 4. core dumps ----------------------------------------------------------

def proc_owner_and_core_limit(pid):
    st = os.stat(f"/proc/{pid}/status")
    with open(f"/proc/{pid}/limits") as f:
        core = next(line for line in f if line.startswith("Max core file size")).split()[4:6]
    return st.st_uid, core


class ProcAs(Proc):
    """Proc, started with a preexec hook (to drop to another uid)."""

    def __init__(self, args, env, preexec):
        self.name = "zonegate"
        self.log_path = tempfile.mktemp(prefix="zg-edge-", suffix=".log")
        self.log = open(self.log_path, "wb")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                  preexec_fn=preexec)


def start_standalone(d, env_extra=None):
    os.chmod(d, 0o777)
    port = free_port()
    cfg = {"node": {"id": "gw-a"}, "listen": {"gateway": f"127.0.0.1:{port}"},
           "cluster": {"data_dir": os.path.join(d, "data")}, "endpoint": "http://127.0.0.1:9",
           "auth": {"mode": "none"}}
    path = write_config(d, cfg)
    os.chmod(path, 0o644)
    env = dict(os.environ)
    env.update(env_extra or {})
    # As root, run as nobody: a dumpable process owns the files in its
    # /proc/PID, a non-dumpable one's belong to root. Not root: the same uid cannot
    # read a non-dumpable process's environ.
    preexec = (lambda: (os.setgid(65534), os.setuid(65534))) if os.geteuid() == 0 else None
    proc = ProcAs([ZONEGATE_BIN, "serve", "--config", path], env, preexec)
    wait_for(lambda: request(port, "GET", "/health/live")[0] == 200, what="zonegate live")
    return proc


def test_core_dumps_disabled():
    with TempDir() as d:
        proc = start_standalone(d)
        try:
            pid = proc.p.pid
            owner, core = proc_owner_and_core_limit(pid)
            assert core == ["0", "0"], core
            if os.geteuid() == 0:
                assert owner == 0, "a dumpable process owns its /proc entry"
            else:
                with pytest.raises(PermissionError):
                    open(f"/proc/{pid}/environ").read()
            assert any(l.get("event") == "core_dumps_disabled" and l["level"] == "info"
                       for l in proc.log_lines())
        finally:
            proc.stop()


def test_core_dumps_escape_hatch():
    if os.geteuid() != 0:
        pytest.skip("needs root to run the node as another uid")
    with TempDir() as d:
        proc = start_standalone(d, {"ZONEGATE_ALLOW_CORE_DUMPS": "1"})
        try:
            owner, _ = proc_owner_and_core_limit(proc.p.pid)
            assert owner == 65534
            assert any(l.get("event") == "core_dumps_allowed" for l in proc.log_lines())
        finally:
            proc.stop()


# ---- 2b. authenticated forwarding in a real cluster -------------------------

def test_forwarded_writes_authenticated_and_audited_truthfully():
    with TempDir() as d:
        c = Cluster(d)
        try:
            c.start()
            active = c.active()
            follower = next(n for n in c.nodes if n.role == "gateway" and n is not active)
            spoof = {"X-Zonegate-Actor": "mallory", "X-Zonegate-Source": "10.9.9.9",
                     "X-Zonegate-Forwarded": "1"}
            status, answer = follower.admin_call("POST", "/v1/audit", {"what": "via-follower"}, headers=spoof)
            assert status == 200, answer
            status, doc = follower.admin_call("GET", "/v1/audit?limit=20")
            rec = next(r for r in reversed(doc["audit"]) if "via-follower" in json.dumps(r))
            assert rec["actor"] == "admin" and rec["source"] == "127.0.0.1", rec
            # A forged forward straight at the leader is refused, not audited.
            status, answer = active.admin_call("POST", "/v1/audit", {"what": "forged-at-leader"},
                                               headers=dict(spoof, **{"X-Zonegate-Forward-Auth":
                                                                      "v1 1 " + "ab" * 32}))
            assert status == 401, answer
            # The CLI through the follower still works (config round trip).
            doc = json.loads(follower.cli("config", "get", "--json").stdout)
            cfg_path = os.path.join(d, "roundtrip.json")
            with open(cfg_path, "w") as f:
                json.dump(doc["config"], f)
            follower.cli("config", "apply", cfg_path)
            assert follower.admin_call("GET", "/v1/config")[1]["version"] > doc["version"]
            logs = c.all_logs()
            for secret in SECRETS.values():
                assert secret not in logs
        finally:
            c.stop()
