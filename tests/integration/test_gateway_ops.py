"""Single-node gateway, operations: the health endpoints (the guide's exact
POST /health check), /metrics, SIGTERM drain and SIGHUP reload."""
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from harness import (Stack, TempDir, chat_body, decode_chunked, echo_of, error_of, mock_reset, mock_stats,
                     open_stream, raw_chat, request, wait_for)


@pytest.fixture
def stack(request):
    tmp = TempDir()
    path = tmp.__enter__()
    s = Stack(path, model={"temperature": 0.25}, performance={"drain_timeout": 10000})
    request.addfinalizer(lambda: (s.stop(), tmp.__exit__(None, None, None)))
    return s


ROLE_FIELDS = ("role", "node", "zone", "leader", "term", "commit_index", "applied_index")


def test_guide_health_check_command(stack):
    # The guide's §3.2 command, word for word (host and port aside).
    out = subprocess.run(["curl", "-sS", "-i", "-X", "POST", f"http://localhost:{stack.port}/health",
                          "-H", "Content-Type: application/json", "-d", '{"check":"system"}'],
                         capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "content-type: application/json" in head.lower()
    doc = json.loads(body)
    assert doc["status"] == "ok"
    for check in ("loop", "upstream", "memory", "disk"):
        assert check in doc["checks"], doc
        assert doc["checks"][check]["status"] in ("ok", "unknown")
    for field in ROLE_FIELDS:
        assert field in doc, field
    assert doc["role"] == "active"
    assert doc["node"] == "gw-a" and doc["zone"] == "A" and doc["leader"] == "gw-a"


def test_health_unknown_check_lists_valid_ones(stack):
    status, _, payload = request(stack.port, "POST", "/health", body={"check": "everything"})
    assert status == 400
    msg = error_of(payload)["message"]
    for name in ("system", "loop", "upstream", "memory", "disk"):
        assert name in msg
    status, _, payload = request(stack.port, "POST", "/health", body="{not json")
    assert status == 400
    error_of(payload)


def test_health_endpoints_single_node(stack):
    expected = {"/health/live": 200, "/health/ready": 200, "/health/active": 200, "/health/standby": 503,
                "/health": 200, "/health/active?standbyok=true": 200}
    for path, code in expected.items():
        status, headers, payload = request(stack.port, "GET", path)
        assert status == code, (path, payload)
        doc = json.loads(payload)
        for field in ROLE_FIELDS:
            assert field in doc, (path, field)
        assert headers.get("X-Zonegate-Role") == "active", path
        assert headers.get("X-Zonegate-Leader") == "gw-a", path
        # HEAD: same status, no body
        status, headers, payload = request(stack.port, "HEAD", path)
        assert status == code and payload == b"", path
        assert headers.get("X-Zonegate-Role") == "active"


def test_health_needs_no_token_and_never_calls_upstream():
    with TempDir() as path:
        s = Stack(path, auth={"mode": "token", "tokens": []})
        try:
            mock_reset(s.mock)
            before = mock_stats(s.mock)
            for path_ in ("/health", "/health/live", "/health/ready", "/health/active", "/health/standby"):
                status, _, _ = request(s.port, "GET", path_)
                assert status in (200, 503)
            for check in ("system", "upstream", "loop", "memory", "disk"):
                assert request(s.port, "POST", "/health", body={"check": check})[0] == 200
            after = mock_stats(s.mock)
            assert after["total_requests"] == before["total_requests"] == 0
            # only the stats request itself connected in between
            assert after["connections_accepted"] == before["connections_accepted"] + 1
        finally:
            s.stop()


def metric_value(text, name, **labels):
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def test_metrics_prometheus_text(stack):
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "cache"}]}
    assert stack.chat(body)[0] == 200
    assert stack.chat(body)[1].get("X-Cache") == "HIT"
    assert stack.chat(chat_body("boom"), headers={"X-Mock-Status": "500"})[0] == 500
    assert request(stack.port, "GET", "/nope")[0] == 404
    for i in range(3):  # client-chosen paths must not become metric series
        assert request(stack.port, "GET", f"/health/made-up-{i}")[0] == 404
    assert request(stack.port, "GET", "/metrics")[0] == 404  # never on the public client port
    status, headers, payload = request(stack.metrics_port, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = payload.decode()
    assert "# TYPE zonegate_requests_total counter" in text
    assert metric_value(text, "zonegate_requests_total", route="/v1/chat/completions", code="200") == 2
    assert metric_value(text, "zonegate_requests_total", route="/v1/chat/completions", code="500") == 1
    assert "# TYPE zonegate_request_duration_seconds histogram" in text
    assert metric_value(text, "zonegate_request_duration_seconds_bucket", route="/v1/chat/completions",
                        le="+Inf") == 3
    assert metric_value(text, "zonegate_request_duration_seconds_count", route="/v1/chat/completions") == 3
    assert metric_value(text, "zonegate_in_flight") == 0
    assert metric_value(text, "zonegate_queue_depth") == 0
    assert metric_value(text, "zonegate_cache_hits_total") == 1
    assert metric_value(text, "zonegate_cache_misses_total") >= 1
    assert metric_value(text, "zonegate_cache_bytes") > 0
    assert metric_value(text, "zonegate_upstream_errors_total", upstream="default", kind="status_5xx") == 1
    assert metric_value(text, "process_resident_memory_bytes") > 1e6
    assert metric_value(text, "process_cpu_seconds_total") > 0
    assert "zonegate_upstream_ttfb_seconds_bucket" in text
    assert "made-up" not in text
    # /nope, three made-up health paths and /metrics on the client port
    assert metric_value(text, "zonegate_requests_total", route="unknown", code="404") == 5


def test_sigterm_drains_inflight_stream_and_refuses_new_connections(stack):
    conn, resp = open_stream(stack.port, chat_body("drain", stream=True),
                             headers={"X-Mock-Chunks": "4", "X-Mock-Chunk-Interval-Ms": "300"})
    try:
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data:")
        stack.gw.signal(signal.SIGTERM)
        # New connections are refused while the stream goes on.
        def refused():
            try:
                socket.create_connection(("127.0.0.1", stack.port), timeout=1).close()
                return False
            except ConnectionRefusedError:
                return True
        wait_for(refused, timeout=3, what="listener closed after SIGTERM")
        assert stack.gw.p.poll() is None  # still finishing the stream
        rest = resp.read()  # raises IncompleteRead if the stream is cut
    finally:
        conn.close()
    assert b"data: [DONE]" in rest
    assert rest.count(b"chat.completion.chunk") == 3
    assert stack.gw.wait(timeout=10) == 0
    events = [l.get("event") for l in stack.gw.log_lines()]
    assert "draining" in events and "drained" in events


def test_sighup_applies_valid_config_and_keeps_old_on_invalid(stack):
    def temperature():
        status, _, payload = stack.chat(chat_body("t"), headers={"X-Mock-Echo": "1"})
        assert status == 200, payload
        return echo_of(payload)["body"]["temperature"]

    assert temperature() == pytest.approx(0.25)
    cfg = json.loads(json.dumps(stack.cfg))
    cfg["model"] = {"temperature": 1.25}
    stack.rewrite(cfg)
    stack.gw.signal(signal.SIGHUP)
    wait_for(lambda: temperature() == pytest.approx(1.25), timeout=5, what="SIGHUP reload")
    assert any(l.get("event") == "config_reloaded" for l in stack.gw.log_lines())

    bad = json.loads(json.dumps(cfg))
    bad["model"] = {"temperature": "hot"}
    stack.rewrite(bad)
    stack.gw.signal(signal.SIGHUP)
    rejected = wait_for(lambda: [l for l in stack.gw.log_lines() if l.get("event") == "config_reload_rejected"],
                        timeout=5, what="reload rejected log line")
    assert "model.temperature" in rejected[0]["msg"]
    assert stack.gw.p.poll() is None
    assert temperature() == pytest.approx(1.25)

    with open(stack.cfg_path, "w") as f:
        f.write("{ this is not json")
    stack.gw.signal(signal.SIGHUP)
    wait_for(lambda: len([l for l in stack.gw.log_lines() if l.get("event") == "config_reload_rejected"]) >= 2,
             timeout=5, what="second reload rejected")
    assert temperature() == pytest.approx(1.25)
