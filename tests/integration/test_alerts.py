"""Alerts end to end (DESIGN.md, Alerts; GUIDE.md §4.2): a one-voter cluster
(master key, no peers: always active) whose replicated "alerts" section points
a webhook and an SMS channel at a local HTTP receiver and an email channel at
a local SMTP sink, both started here on loopback.

Checked as an operator would: the leader_changed notice arrives when the node
becomes active; a burst of upstream 500s fires error_ratio once on every
channel (webhook JSON, SMS JSON, an email with the FIRING subject), and when
the errors stop a resolved one arrives on every channel; a provider key past
its rotation period raises key_rotation; an invalid alerts section is refused
by PUT /v1/config naming the JSON path; no channel secret reaches the log."""
import base64
import json
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import Stack, TempDir, chat_body, free_port, mock_stats, wait_for
from harness import admin_call as harness_admin_call



MASTER_KEY = base64.b64encode(os.urandom(32)).decode()
ADMIN_TOKEN = "admin-token-" + base64.b16encode(os.urandom(8)).decode()
WEBHOOK_TOKEN = "hook-token-" + base64.b16encode(os.urandom(8)).decode()
WEBHOOK_PATH_SECRET = "pathsecret" + base64.b16encode(os.urandom(6)).decode()


# ---- receivers -------------------------------------------------------------

class HTTPReceiver:
    """Records every POST (path, headers lower-cased, JSON body) and answers 200."""

    def __init__(self):
        self.posts = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(n)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"unparsable": raw.decode("utf-8", "replace")}
                with outer.lock:
                    outer.posts.append({"path": self.path, "body": body,
                                        "headers": {k.lower(): v for k, v in self.headers.items()}})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def matching(self, path, **fields):
        with self.lock:
            return [p for p in self.posts if p["path"].startswith(path)
                    and all(p["body"].get(k) == v for k, v in fields.items())]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class SMTPSink:
    """A minimal SMTP server (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT)
    that keeps every message: {"from", "rcpts", "data"}."""

    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, text):
                self.wfile.write(text.encode() + b"\r\n")
                self.wfile.flush()

            def handle(self):
                self.reply("220 sink.test ESMTP")
                mail_from, rcpts = None, []
                for _ in range(1000):
                    line = self.rfile.readline(65536)
                    if not line:
                        return
                    cmd = line.decode("utf-8", "replace").rstrip("\r\n")
                    verb = cmd.split(" ", 1)[0].upper()
                    if verb == "EHLO":
                        self.wfile.write(b"250-sink.test\r\n250 8BITMIME\r\n")
                        self.wfile.flush()
                    elif verb == "HELO":
                        self.reply("250 sink.test")
                    elif cmd.upper().startswith("MAIL FROM:"):
                        mail_from, rcpts = cmd[10:].strip(), []
                        self.reply("250 OK")
                    elif cmd.upper().startswith("RCPT TO:"):
                        rcpts.append(cmd[8:].strip())
                        self.reply("250 OK")
                    elif verb == "DATA":
                        self.reply("354 end with <CRLF>.<CRLF>")
                        lines = []
                        for _ in range(100000):
                            data_line = self.rfile.readline(65536)
                            if not data_line or data_line == b".\r\n":
                                break
                            if data_line.startswith(b".."):
                                data_line = data_line[1:]
                            lines.append(data_line)
                        with outer.lock:
                            outer.messages.append({"from": mail_from, "rcpts": rcpts,
                                                   "data": b"".join(lines).decode("utf-8", "replace")})
                        self.reply("250 OK queued")
                    elif verb in ("RSET", "NOOP"):
                        self.reply("250 OK")
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("502 not implemented")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def with_subject(self, prefix):
        with self.lock:
            return [m for m in self.messages
                    if any(line.startswith("Subject: " + prefix) for line in m["data"].split("\r\n"))]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ---- helpers ---------------------------------------------------------------

def admin_call(admin_addr, method, path, body=None, timeout=10):
    return harness_admin_call(admin_addr, ADMIN_TOKEN, method, path, body, timeout)


def alerts_section(http_port, smtp_port):
    return {
        "channels": [
            {"type": "webhook", "url": "env:ZG_TEST_ALERT_WEBHOOK_URL",
             "headers": {"X-Token": "env:ZG_TEST_ALERT_WEBHOOK_TOKEN"}},
            {"type": "sms", "url": f"http://127.0.0.1:{http_port}/sms", "to": "+15550100"},
            {"type": "email", "smtp_url": f"smtp://127.0.0.1:{smtp_port}", "from": "zonegate@example.test",
             "to": ["ops@example.test"]},
        ],
        # CPU and memory are off: a busy CI machine must not add alerts.
        "rules": {"cpu_percent": 0, "memory_percent": 0, "error_ratio": 0.5, "error_window_s": 2,
                  "error_min_requests": 5},
        "eval_interval_ms": 200, "retry_max": 3, "retry_base_ms": 100, "repeat_after_s": 0,
    }


@pytest.fixture
def alert_stack():
    http = HTTPReceiver()
    smtp = SMTPSink()
    with TempDir() as d:
        env = {"ZONEGATE_MASTER_KEY": MASTER_KEY, "ZONEGATE_ADMIN_TOKEN": ADMIN_TOKEN,
               "ZG_TEST_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{http.port}/hook/{WEBHOOK_PATH_SECRET}",
               "ZG_TEST_ALERT_WEBHOOK_TOKEN": WEBHOOK_TOKEN}
        # proxy variables in the node's environment (a dead port) must not
        # carry the alerts and their secret headers: delivered direct
        dead = f"http://127.0.0.1:{free_port()}"
        env.update({name: dead for name in ("http_proxy", "HTTP_PROXY", "https_proxy",
                                            "HTTPS_PROXY", "all_proxy", "ALL_PROXY")})
        stack = Stack(d, env_extra=env, start=False,
                      security={"master_key": "env:ZONEGATE_MASTER_KEY", "admin_token": "env:ZONEGATE_ADMIN_TOKEN"},
                      alerts=alerts_section(http.port, smtp.port))
        try:
            stack.start()
            stack.admin = stack.cfg["listen"]["admin"]
            wait_for(lambda: stack.chat()[0] == 200, timeout=15, what="the one-voter cluster to serve")
            yield stack, http, smtp
        finally:
            stack.stop()
            http.stop()
            smtp.stop()


# ---- the test --------------------------------------------------------------

def test_alerts_fire_and_resolve_on_every_channel(alert_stack):
    stack, http, smtp = alert_stack

    # Becoming active is announced once, as a notice (never resolved).
    notice = wait_for(lambda: http.matching("/hook/", alert="leader_changed"), timeout=10,
                      what="the leader_changed notice")[0]
    assert notice["body"]["status"] == "firing"
    assert notice["body"]["cluster_wide"] is True
    assert notice["body"]["node"] == "gw-a"
    assert "gw-a" in notice["body"]["summary"]
    assert notice["headers"].get("x-token") == WEBHOOK_TOKEN
    assert notice["headers"].get("content-type", "").startswith("application/json")

    # A burst of upstream 500s: one endpoint, so each 500 reaches the client.
    for i in range(10):
        assert stack.chat(chat_body(f"boom {i}"), headers={"X-Mock-Status": "500"})[0] == 500
    assert mock_stats(stack.mock)["by_status"].get("500", 0) >= 10

    fired = wait_for(lambda: http.matching("/hook/", alert="error_ratio", status="firing"), timeout=10,
                     what="the error_ratio firing webhook")[0]["body"]
    assert fired["severity"] == "critical"
    assert fired["cluster_wide"] is True
    assert fired["node"] == "gw-a"
    assert fired["details"]["requests"] >= 5
    assert fired["details"]["ratio"] > 0.5
    assert "started_at" in fired and "resolved_at" not in fired

    sms = wait_for(lambda: [p for p in http.matching("/sms")
                            if "FIRING" in p["body"].get("message", "") and "error_ratio" in p["body"]["message"]],
                   timeout=10, what="the error_ratio SMS")[0]["body"]
    assert sms["to"] == "+15550100"
    assert len(sms["message"]) <= 160

    mail = wait_for(lambda: smtp.with_subject("[zonegate] FIRING: error_ratio"), timeout=10,
                    what="the error_ratio email")[0]
    assert mail["from"] == "<zonegate@example.test>"
    assert mail["rcpts"] == ["<ops@example.test>"]
    assert "\r\nFrom: " in "\r\n" + mail["data"] and "\r\nDate: " in "\r\n" + mail["data"]
    assert "5xx ratio" in mail["data"]

    # The errors stop; once the 2 s window has passed, resolved arrives everywhere.
    resolved = wait_for(lambda: http.matching("/hook/", alert="error_ratio", status="resolved"), timeout=15,
                        what="the error_ratio resolved webhook")[0]["body"]
    assert resolved["resolved_at"] >= resolved["started_at"]
    wait_for(lambda: [p for p in http.matching("/sms") if "RESOLVED" in p["body"].get("message", "")],
             timeout=10, what="the resolved SMS")
    wait_for(lambda: smtp.with_subject("[zonegate] RESOLVED: error_ratio"), timeout=10, what="the resolved email")
    # Deduplicated: one firing and one resolved per channel for that episode.
    assert len(http.matching("/hook/", alert="error_ratio", status="firing")) == 1
    assert len(http.matching("/hook/", alert="error_ratio", status="resolved")) == 1
    assert len(smtp.with_subject("[zonegate] FIRING: error_ratio")) == 1
    assert len(http.matching("/hook/", alert="leader_changed")) == 1

    # A provider key past its rotation period.
    status, key = admin_call(stack.admin, "POST", "/v1/keys", {"secret": "sk-x", "rotate_after_days": 0})
    assert status == 200, key
    rotation = wait_for(lambda: http.matching("/hook/", alert="key_rotation", status="firing"), timeout=10,
                        what="the key_rotation webhook")[0]["body"]
    assert rotation["subject"] == key["id"]
    assert rotation["details"]["key_id"] == key["id"]
    assert rotation["severity"] == "warning"
    assert "sk-x" not in json.dumps(rotation)

    # The firing alert shows in the status document, and the engine's own
    # view of its deliveries succeeded.
    status, doc = admin_call(stack.admin, "GET", "/v1/cluster/status")
    assert status == 200, doc
    firing = [a["alert"] for a in doc["alerts"]["firing"]]
    assert "key_rotation" in firing and "error_ratio" not in firing
    assert all(d["ok"] for d in doc["alerts"]["recent_deliveries"]), doc["alerts"]["recent_deliveries"]

    # An invalid alerts section is refused with its JSON path.
    status, err = admin_call(stack.admin, "PUT", "/v1/config",
                             {"config": {"alerts": {"rules": {"cpu_precent": 50}}}})
    assert status == 400, err
    assert "alerts.rules.cpu_precent" in json.dumps(err)

    # Every change is logged; no channel secret is.
    events = [line.get("event") for line in stack.gw.log_lines()]
    assert "alert_firing" in events and "alert_resolved" in events
    log = stack.gw.output()
    for secret in (WEBHOOK_TOKEN, WEBHOOK_PATH_SECRET, MASTER_KEY, ADMIN_TOKEN, "sk-x\""):
        assert secret not in log, f"a secret reached the log: {secret[:6]}..."


def test_dead_channel_is_retried_and_logged(alert_stack):
    stack, http, smtp = alert_stack
    wait_for(lambda: http.matching("/hook/", alert="leader_changed"), timeout=10, what="the leader_changed notice")
    # Point the webhook at a closed port (live config change) and fire again.
    closed = HTTPReceiver()
    dead_port = closed.port
    closed.stop()
    section = alerts_section(http.port, smtp.port)
    section["channels"] = [{"type": "webhook", "url": f"http://127.0.0.1:{dead_port}/hook"}]
    section["retry_max"] = 2
    status, current = admin_call(stack.admin, "GET", "/v1/config")
    assert status == 200, current
    replicated = current["config"]
    replicated["alerts"] = section
    # The answer comes after the change is committed and applied on this node.
    status, body = admin_call(stack.admin, "PUT", "/v1/config", {"config": replicated})
    assert status == 200, body
    for i in range(10):
        assert stack.chat(chat_body(f"boom {i}"), headers={"X-Mock-Status": "500"})[0] == 500

    def failures():
        return [line for line in stack.gw.log_lines()
                if line.get("event") == "alert_delivery_failed" and line.get("alert") == "error_ratio"]

    wait_for(lambda: len(failures()) >= 3, timeout=15, what="3 failed attempts (1 + retry_max 2)")
    attempts = sorted(line["attempt"] for line in failures())[:3]
    assert attempts == [1, 2, 3]
    assert all(line["channel_type"] == "webhook" for line in failures())
    assert str(dead_port) not in json.dumps(failures())
