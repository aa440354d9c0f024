"""Single-node gateway: concurrency limit and wait queue (429 with
Retry-After), upstream timeouts (504), an unreachable upstream (502), and
fallback endpoints on connect failure or 5xx before the first byte."""
import json
import socket
import time

import pytest

from harness import (Stack, TempDir, chat_body, error_of, free_port, mock_reset, mock_stats, run_parallel,
                     start_mockllm, request, wait_for)


@pytest.fixture
def make_stack(request):
    """Factory: make_stack(**config overrides) -> Stack, stopped at teardown."""
    created = []

    def make(**kw):
        tmp = TempDir()
        path = tmp.__enter__()
        s = Stack(path, **kw)
        created.append((s, tmp))
        return s

    def cleanup():
        for s, tmp in created:
            s.stop()
            tmp.__exit__(None, None, None)

    request.addfinalizer(cleanup)
    return make


def test_max_concurrent_queue_and_queue_timeout_give_429(make_stack):
    s = make_stack(performance={"max_concurrent": 1, "max_queue": 1, "queue_timeout": 400})
    slow = {"X-Mock-Latency-Ms": "1500"}

    def first():
        return s.chat(chat_body("one"), headers=slow)

    def second():
        time.sleep(0.2)
        t0 = time.monotonic()
        r = s.chat(chat_body("two"), headers=slow)
        return r + (time.monotonic() - t0,)

    def third():
        time.sleep(0.4)
        t0 = time.monotonic()
        r = s.chat(chat_body("three"), headers=slow)
        return r + (time.monotonic() - t0,)

    r1, r2, r3 = run_parallel([first, second, third])
    for r in (r1, r2, r3):
        assert not isinstance(r, Exception), r
    assert r1[0] == 200
    # second waited in the queue for queue_timeout, then 429
    assert r2[0] == 429, r2
    assert 0.3 <= r2[3] < 1.4
    assert error_of(r2[2])["code"] == "queue_timeout"
    # third found the queue full: 429 at once
    assert r3[0] == 429, r3
    assert r3[3] < 0.3
    assert error_of(r3[2])["code"] == "queue_full"
    for r in (r2, r3):
        assert int(r[1]["Retry-After"]) >= 1
        assert error_of(r[2])["type"] == "rate_limit_error"
    # Once the slot is free, requests pass again.
    assert s.chat(chat_body("later"))[0] == 200


def test_queued_request_gets_slot_when_one_frees(make_stack):
    s = make_stack(performance={"max_concurrent": 1, "max_queue": 5, "queue_timeout": 3000})

    def delayed():
        time.sleep(0.15)
        return s.chat(chat_body("b"), headers={"X-Mock-Latency-Ms": "100"})

    r1, r2 = run_parallel([lambda: s.chat(chat_body("a"), headers={"X-Mock-Latency-Ms": "500"}), delayed])
    assert r1[0] == 200 and r2[0] == 200


def test_first_byte_timeout_is_504(make_stack):
    s = make_stack(performance={"first_byte_timeout": 300, "request_timeout": 10000})
    t0 = time.monotonic()
    status, _, payload = s.chat(chat_body("slow"), headers={"X-Mock-Latency-Ms": "3000"})
    elapsed = time.monotonic() - t0
    assert status == 504, payload
    err = error_of(payload)
    assert err["code"] == "upstream_timeout"
    assert "first_byte_timeout" in err["message"]
    assert 0.25 <= elapsed < 2.0


def test_request_timeout_total_is_504(make_stack):
    s = make_stack(performance={"first_byte_timeout": 10000, "request_timeout": 500})
    t0 = time.monotonic()
    status, _, payload = s.chat(chat_body("slow"), headers={"X-Mock-Latency-Ms": "3000"})
    elapsed = time.monotonic() - t0
    assert status == 504, payload
    err = error_of(payload)
    assert err["code"] == "upstream_timeout"
    assert "total_timeout" in err["message"]
    assert 0.4 <= elapsed < 2.5


def test_unreachable_endpoint_is_502(make_stack):
    s = make_stack(endpoint=f"http://127.0.0.1:{free_port()}", performance={"connect_timeout": 1000})
    t0 = time.monotonic()
    status, _, payload = s.chat(chat_body("nobody home"))
    assert status == 502, payload
    assert time.monotonic() - t0 < 2.0
    err = error_of(payload)
    assert err["code"] == "upstream_unreachable"
    assert err["type"] == "upstream_error"
    assert "connect_failed" in err["message"]


def test_fallback_on_connect_failure(make_stack):
    fallback = start_mockllm()
    try:
        s = make_stack(endpoint=f"http://127.0.0.1:{free_port()}",
                       fallback_endpoints=[{"endpoint": fallback.url, "api_key": "env:TEST_UPSTREAM_KEY"}])
        status, _, payload = s.chat(chat_body("via fallback"))
        assert status == 200, payload
        assert json.loads(payload)["choices"][0]["message"]["content"] == "mock reply to: via fallback"
        assert mock_stats(fallback)["by_route"]["chat_completions"] == 1
        # The primary mock of the stack was not used at all.
        assert mock_stats(s.mock)["by_route"]["chat_completions"] == 0
    finally:
        fallback.stop()


def test_fallback_on_5xx_before_first_byte(make_stack):
    fallback = start_mockllm()
    failing = start_mockllm("--fail-percent", "100")
    try:
        s = make_stack(endpoint=failing.url,
                       fallback_endpoints=[{"endpoint": fallback.url, "api_key": "env:TEST_UPSTREAM_KEY"}])
        status, _, payload = s.chat(chat_body("after 5xx"))
        assert status == 200, payload
        assert mock_stats(failing)["by_status"].get("500") == 1
        assert mock_stats(fallback)["by_route"]["chat_completions"] == 1
        # A stream is also moved before its first byte reached the client.
        mock_reset(fallback)
        status, headers, payload = s.chat(chat_body("stream after 5xx", stream=True))
        assert status == 200, payload
        assert b"[DONE]" in payload
        assert mock_stats(fallback)["streams_completed"] == 1
    finally:
        failing.stop()
        fallback.stop()


def test_upstream_error_status_without_fallback_is_passed_through(make_stack):
    s = make_stack()
    status, _, payload = s.chat(chat_body("x"), headers={"X-Mock-Status": "503"})
    assert status == 503
    error_of(payload)


def _send_and_drop(port, body, headers, wait_s):
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
               f"Content-Length: {len(data)}\r\n\r\n").encode() + data)
    time.sleep(wait_s)
    s.close()


def test_client_gone_while_queued_or_waiting_frees_everything(make_stack):
    s = make_stack(performance={"max_concurrent": 1, "max_queue": 5, "queue_timeout": 5000})
    mock_reset(s.mock)

    def holder():
        return s.chat(chat_body("holder"), headers={"X-Mock-Latency-Ms": "800"})

    def dropper():
        time.sleep(0.1)
        _send_and_drop(s.port, chat_body("queued then gone"), {}, 0.2)
        return True

    r1, _ = run_parallel([holder, dropper])
    assert r1[0] == 200
    # The dropped request never reached the upstream, and nothing is left queued or in flight.
    assert s.chat(chat_body("next"))[0] == 200
    assert mock_stats(s.mock)["by_route"]["chat_completions"] == 2
    status, _, payload = request(s.metrics_port, "GET", "/metrics")
    text = payload.decode()
    assert "\nzonegate_in_flight 0" in text and "\nzonegate_queue_depth 0" in text
    # A non-stream request whose client leaves is cancelled upstream too.
    mock_reset(s.mock)
    _send_and_drop(s.port, chat_body("slow and gone"), {"X-Mock-Latency-Ms": "1500"}, 0.3)
    wait_for(lambda: (lambda st: st["disconnects"] >= 1 and st["in_flight"] == 0)(mock_stats(s.mock)), timeout=5,
             what="upstream request cancelled")
    assert s.chat(chat_body("still fine"))[0] == 200
