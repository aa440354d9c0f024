"""Single-node gateway, HTTP layer: bad input answered in OpenAI's error
shape while other clients are unaffected (malformed JSON, oversized body and
headers, slowloris, unknown route, wrong method, missing/wrong token), and
keep-alive, pipelining and chunked request bodies."""
import http.client
import json
import socket
import threading
import time

import pytest

from harness import (CLIENT_TOKEN, Stack, TempDir, chat_body, decode_chunked, echo_of, error_of, parse_responses,
                     raw_exchange, request, token_sha256)


@pytest.fixture(scope="module")
def stack():
    tmp = TempDir()
    path = tmp.__enter__()
    s = Stack(path, auth={"mode": "token", "tokens": [{"name": "tests", "sha256": token_sha256(CLIENT_TOKEN)}]},
              performance={"max_body_bytes": "8KiB", "max_header_bytes": "4KiB", "client_timeout": 700})
    yield s
    s.stop()
    tmp.__exit__(None, None, None)


AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}


def assert_other_client_fine(s):
    status, _, payload = s.chat(chat_body("bystander"), headers=AUTH)
    assert status == 200, payload
    assert json.loads(payload)["choices"][0]["message"]["content"] == "mock reply to: bystander"


def test_malformed_json_400_names_problem(stack):
    status, _, payload = stack.chat('{"model": "m", "messages": [', headers=AUTH)
    assert status == 400
    err = error_of(payload)
    assert err["type"] == "invalid_request_error"
    assert "not valid JSON" in err["message"]
    status, _, payload = stack.chat({"model": "m", "messages": "hi"}, headers=AUTH)
    assert status == 400
    assert "messages" in error_of(payload)["message"]
    status, _, payload = stack.chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
                                    headers=AUTH)
    assert status == 400
    assert "stream" in error_of(payload)["message"]
    assert_other_client_fine(stack)


def test_body_too_large_413(stack):
    big = chat_body("x" * 20000)
    status, _, payload = stack.chat(big, headers=AUTH)
    assert status == 413
    error_of(payload)
    # chunked body without a Content-Length is bounded as well
    data = json.dumps(big).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer " + CLIENT_TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(data), 4096):
        part = data[i:i + 4096]
        req += b"%x\r\n" % len(part) + part + b"\r\n"
    req += b"0\r\n\r\n"
    responses = parse_responses(raw_exchange(stack.port, req, timeout=5))
    assert responses and responses[0][0] == 413
    error_of(responses[0][2])
    assert_other_client_fine(stack)


def test_headers_too_large_431(stack):
    status, _, payload = stack.chat(chat_body("h"), headers={**AUTH, "X-Padding": "p" * 8000})
    assert status == 431
    error_of(payload)
    assert_other_client_fine(stack)


def test_slowloris_gets_408_and_others_are_served(stack):
    result = {}

    def trickle():
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as s:
            got = b""
            for piece in [b"POST /v1/chat/completions HTTP/1.1\r\n", b"Host: x\r\n", b"Content-Length: 50\r\n",
                          b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n", b"X-D: 4\r\n", b"X-E: 5\r\n"]:
                try:
                    s.sendall(piece)
                except OSError:
                    break
                s.settimeout(0.25)
                try:
                    chunk = s.recv(65536)
                    got += chunk
                    if not chunk or b"\r\n\r\n" in got:
                        break
                except socket.timeout:
                    pass
            s.settimeout(3)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    chunk = s.recv(65536)
                except (socket.timeout, OSError):
                    break
                if not chunk:
                    break
                got += chunk
        result["elapsed"] = time.monotonic() - t0
        result["data"] = got

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert_other_client_fine(stack)
    assert time.monotonic() - t0 < 0.5
    t.join(10)
    assert not t.is_alive()
    responses = parse_responses(result["data"])
    assert responses, result
    assert responses[0][0] == 408
    error_of(responses[0][2])
    # client_timeout (700 ms) bounds the whole request, not the gap between pieces
    assert 0.6 <= result["elapsed"] < 1.3, result["elapsed"]


def test_unknown_route_404_and_wrong_method_405(stack):
    # outside /v1 nothing is proxied
    for path in ("/nope", "/v2/chat/completions", "/v1", "/admin"):
        status, _, payload = request(stack.port, "GET", path, headers=AUTH)
        assert status == 404, path
        assert error_of(payload)["code"] == "not_found"
    # under /v1 the upstream answers for what it does not know, after auth
    status, _, payload = request(stack.port, "GET", "/v1/nope")
    assert status == 401
    status, _, payload = request(stack.port, "GET", "/v1/nope", headers=AUTH)
    assert status == 404
    error_of(payload)
    status, _, payload = request(stack.port, "DELETE", "/metrics")
    assert status == 404  # /metrics is not on the client port at all
    error_of(payload)
    status, _, payload = request(stack.metrics_port, "DELETE", "/metrics")
    assert status == 405
    error_of(payload)


def test_a_fragment_in_the_request_target_is_refused(stack):
    """'#' never belongs in a request line (RFC 9112 §3.2); the upstream
    clients cut it off while routing saw it, so /v1/chat/completions#x went
    upstream as chat completions without being read as one (review: not
    asked for usage). It is refused with 400, before anything else."""
    body = json.dumps(chat_body("fragment", stream=True)).encode()
    for target in (b"/v1/chat/completions#x", b"/v1/models#", b"/health#live"):
        got = raw_exchange(stack.port, b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                           % (target, CLIENT_TOKEN.encode(), len(body), body),
                           until=lambda b: b"\r\n\r\n" in b and b"}}" in b)
        assert got.startswith(b"HTTP/1.1 400 "), (target, got[:200])
        assert b"fragment" in got, got
    assert_other_client_fine(stack)


def test_missing_or_wrong_token_401(stack):
    status, _, payload = stack.chat(chat_body("no token"))
    assert status == 401
    assert error_of(payload)["code"] == "invalid_api_key"
    status, _, payload = stack.chat(chat_body("bad token"), headers={"Authorization": "Bearer not-the-token"})
    assert status == 401
    assert error_of(payload)["code"] == "invalid_api_key"
    status, _, payload = request(stack.port, "GET", "/v1/models", headers={"Authorization": "Basic abc"})
    assert status == 401
    error_of(payload)
    assert_other_client_fine(stack)


def test_keep_alive_two_requests_one_connection(stack):
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=5)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(chat_body("first")),
                     headers={**AUTH, "Content-Type": "application/json"})
        r1 = conn.getresponse()
        b1 = r1.read()
        sock = conn.sock
        assert r1.status == 200 and sock is not None
        assert r1.getheader("Connection") == "keep-alive"
        conn.request("GET", "/health/live")
        r2 = conn.getresponse()
        r2.read()
        assert r2.status == 200
        assert conn.sock is sock  # no reconnect happened
    finally:
        conn.close()
    assert json.loads(b1)["choices"][0]["message"]["content"] == "mock reply to: first"


def test_pipelined_requests_answered_in_order(stack):
    body = json.dumps(chat_body("piped")).encode()
    reqs = (b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Mock-Latency-Ms: 200\r\nAuthorization: Bearer " + CLIENT_TOKEN.encode() +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body +
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    responses = parse_responses(raw_exchange(stack.port, reqs, timeout=5))
    assert [r[0] for r in responses] == [200, 200, 404, 200]
    assert json.loads(responses[0][2])["role"] == "active"
    assert json.loads(responses[1][2])["choices"][0]["message"]["content"] == "mock reply to: piped"
    error_of(responses[2][2])


def test_chunked_request_body(stack):
    body = json.dumps(chat_body("chunked body")).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"X-Mock-Echo: 1\r\nAuthorization: Bearer " + CLIENT_TOKEN.encode() +
           b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    for i in range(0, len(body), 10):
        part = body[i:i + 10]
        req += b"%x\r\n" % len(part) + part + b"\r\n"
    req += b"0\r\n\r\n"
    responses = parse_responses(raw_exchange(stack.port, req, timeout=5))
    assert responses and responses[0][0] == 200, responses
    echo = echo_of(responses[0][2])
    assert echo["body"]["messages"] == [{"role": "user", "content": "chunked body"}]
    assert "transfer-encoding" not in echo["headers"]


def test_expect_100_continue_answered_at_once(stack):
    # curl sends "Expect: 100-continue" with bodies over 1 MB and otherwise stalls a second.
    body = json.dumps(chat_body("expecting")).encode()
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + CLIENT_TOKEN.encode() + b"\r\nExpect: 100-continue\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
        s.settimeout(0.5)
        interim = s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        s.settimeout(5)
        s.sendall(body)
        got = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    responses = parse_responses(got)
    assert responses and responses[0][0] == 200, got
    assert json.loads(responses[0][2])["choices"][0]["message"]["content"] == "mock reply to: expecting"
