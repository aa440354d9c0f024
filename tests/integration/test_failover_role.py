"""One owner for the role (issue 12, item 1): the failover role table is
what the data plane, the health answers, the metrics and the alert engine
read.

The reproduction: a one-voter cluster, `POST /v1/cluster/switchover
{"to": "nonexistent"}` (now refused with 400 before the drain starts; `{}`,
no other voter, takes the same path). The transfer fails at once; the node must go back
to ACTIVE legally (DRAINING -> ACTIVE), keep serving, answer 200 on
/health/active, report role active everywhere, log no error line, no
role_transition_refused, no per-heartbeat role_changed, and raise no
no_active alert on itself.
"""
import base64
import json
import os
import time

import pytest

from harness import Stack, admin_call, chat_body, request, wait_for

ADMIN_TOKEN = "admin-token-" + base64.b16encode(os.urandom(8)).decode()
MASTER_KEY = base64.b64encode(os.urandom(32)).decode()


@pytest.fixture()
def node(tmp_path):
    env = {"ZG_MASTER_KEY": MASTER_KEY, "ZG_ADMIN_TOKEN": ADMIN_TOKEN}
    stack = Stack(str(tmp_path), env_extra=env,
                  security={"master_key": "env:ZG_MASTER_KEY", "admin_token": "env:ZG_ADMIN_TOKEN"},
                  cluster={"data_dir": os.path.join(str(tmp_path), "data"),
                           "election_timeout_ms": 300, "heartbeat_ms": 50},
                  alerts={"eval_interval_ms": 100, "rules": {"no_active_for_s": 1}})
    stack.admin = stack.cfg["listen"]["admin"]
    wait_for(lambda: request(stack.port, "GET", "/health/active")[0] == 200, timeout=15,
             what="the one-voter cluster to be active")
    yield stack
    stack.stop()


def admin(stack, method, path, body=None):
    return admin_call(stack.admin, ADMIN_TOKEN, method, path, body)


def role_lines(stack):
    return [l for l in stack.gw.log_lines() if l.get("event") in ("role_changed", "role_transition_refused")]


def test_aborted_switchover_leaves_role_consistent(node):
    # A target that is no member is refused before anything starts.
    moves_before = len(role_lines(node))
    status, doc = admin(node, "POST", "/v1/cluster/switchover", {"to": "nonexistent"})
    assert status == 400 and "nonexistent is not a member" in json.dumps(doc), (status, doc)
    assert len(role_lines(node)) == moves_before
    # No other voter: the drain starts, the transfer fails, back to active.
    status, doc = admin(node, "POST", "/v1/cluster/switchover", {})
    assert status == 409, (status, doc)
    assert doc.get("ok") is False, doc
    moves_after_switchover = len(role_lines(node))
    # Many heartbeats and alert evaluations later...
    time.sleep(2.5)
    lines = node.gw.log_lines()
    # ...the role is active everywhere:
    status, headers, body = request(node.port, "GET", "/health/active")
    assert status == 200, body
    assert json.loads(body)["role"] == "active"
    assert headers.get("X-Zonegate-Role") == "active"
    status, doc = admin(node, "GET", "/v1/cluster/status")
    assert status == 200
    assert doc["failover"]["role"] == "active", doc["failover"]
    assert doc["failover"]["draining"] is False
    status, _, metrics = request(node.metrics_port, "GET", "/metrics")
    assert b"zonegate_active 1" in metrics
    assert b'zonegate_role{role="active"} 1' in metrics
    assert b"zonegate_role_moves_refused_total 0" in metrics
    # it serves,
    status, _, body = node.chat(chat_body())
    assert status == 200, body
    # with no error line, no refused move, no move per heartbeat...
    errors = [l for l in lines if l.get("level") == "error"]
    assert errors == [], errors
    assert not [l for l in lines if l.get("event") == "role_transition_refused"]
    moves = [(l.get("from"), l.get("to")) for l in role_lines(node)]
    assert ("draining", "active") in moves, moves
    assert len(role_lines(node)) == moves_after_switchover, moves
    assert not [m for m in moves if m[0] == m[1]], moves
    # ...and no no_active alert raised by the active node on itself.
    assert not [l for l in lines if l.get("event") == "alert_firing" and l.get("alert") == "no_active"]


def test_second_aborted_switchover_and_failback_still_work(node):
    """After an aborted switchover the next one is accepted again (the
    node is not stuck in a non-active role)."""
    for _ in range(2):
        status, doc = admin(node, "POST", "/v1/cluster/switchover", {})
        assert status == 409, (status, doc)  # no other voter: refused, back to active
    status, doc = admin(node, "POST", "/v1/cluster/switchover", {})
    assert status == 409, (status, doc)
    wait_for(lambda: request(node.port, "GET", "/health/active")[0] == 200, timeout=5,
             what="active again")
    assert not [l for l in node.gw.log_lines() if l.get("level") == "error"]
