"""Single-node gateway: chat passthrough, provider key handling, model
defaults, the official openai SDK, SSE streaming (timing, headers, broken
streams, client disconnects) and the response cache."""
import http.client
import json
import socket
import time

import pytest

from harness import (CLIENT_TOKEN, UPSTREAM_KEY, ScriptedUpstream, Stack, TempDir, chat_body, echo_of, mock_reset, mock_stats,
                     open_stream, raw_chat, decode_chunked, read_sse, request, token_sha256, wait_for)


@pytest.fixture
def stack(request):
    """Token auth, model defaults temperature 0.3 / top_p 0.9."""
    tmp = TempDir()
    path = tmp.__enter__()
    s = Stack(path, auth={"mode": "token", "tokens": [{"name": "tests", "sha256": token_sha256(CLIENT_TOKEN)}]},
              model={"temperature": 0.3, "top_p": 0.9},
              performance={"request_timeout": 5000, "first_byte_timeout": 5000})
    request.addfinalizer(lambda: (s.stop(), tmp.__exit__(None, None, None)))
    return s


AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}


def test_chat_passthrough_uses_provider_key_not_client_token(stack):
    status, headers, payload = stack.chat(chat_body("hi there"), headers=AUTH)
    assert status == 200, payload
    doc = json.loads(payload)
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["content"] == "mock reply to: hi there"

    status, _, payload = stack.chat(chat_body("echo"), headers={**AUTH, "X-Mock-Echo": "1"})
    assert status == 200, payload
    echo = echo_of(payload)
    assert echo["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_TOKEN not in json.dumps(echo)
    stats = mock_stats(stack.mock)
    assert CLIENT_TOKEN not in json.dumps(stats)
    assert stats["last_auth"] == f"Bearer {UPSTREAM_KEY}"


def test_model_defaults_fill_only_missing_fields(stack):
    status, _, payload = stack.chat(chat_body("x"), headers={**AUTH, "X-Mock-Echo": "1"})
    assert status == 200, payload
    body = echo_of(payload)["body"]
    assert body["temperature"] == pytest.approx(0.3)
    assert body["top_p"] == pytest.approx(0.9)

    status, _, payload = stack.chat(chat_body("x", temperature=1.5), headers={**AUTH, "X-Mock-Echo": "1"})
    body = echo_of(payload)["body"]
    assert body["temperature"] == pytest.approx(1.5)
    assert body["top_p"] == pytest.approx(0.9)

    status, _, payload = stack.chat(chat_body("x", top_p=0.1, temperature=0), headers={**AUTH, "X-Mock-Echo": "1"})
    body = echo_of(payload)["body"]
    assert body["temperature"] == 0
    assert body["top_p"] == pytest.approx(0.1)
    assert body["messages"] == [{"role": "user", "content": "x"}]


def test_openai_sdk_non_stream_and_stream(stack):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=CLIENT_TOKEN, max_retries=0,
                           timeout=10)
    resp = client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "sdk"}])
    assert resp.choices[0].message.content == "mock reply to: sdk"

    parts = []
    chunks = client.chat.completions.create(model="mock-model", stream=True,
                                            messages=[{"role": "user", "content": "streamed"}])
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == "mock reply to: streamed"
    assert len(parts) > 1

    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key="wrong-token", max_retries=0,
                        timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "sdk"}])


def test_stream_chunks_arrive_as_sent(stack):
    body = chat_body("timing test", stream=True)
    conn, resp = open_stream(stack.port, body,
                             headers={**AUTH, "X-Mock-Chunks": "4", "X-Mock-Chunk-Interval-Ms": "300"})
    try:
        assert resp.status == 200
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        assert resp.getheader("Cache-Control") == "no-cache"
        events = list(read_sse(resp))
    finally:
        conn.close()
    assert events[-1][2] == "[DONE]"
    chunks = [(mono, wall, json.loads(d)) for mono, wall, d in events if d != "[DONE]"]
    assert len(chunks) == 4
    sent = [c["mock_sent_at_ms"] for _, _, c in chunks]
    # The mock spaced them ~300 ms apart; each reached us shortly after it was sent.
    assert sent[-1] - sent[0] >= 800
    for _, wall, c in chunks:
        assert wall - c["mock_sent_at_ms"] < 200, (wall, c["mock_sent_at_ms"])
    # The first chunk was here long before the last one was even sent.
    first_mono, last_mono = chunks[0][0], chunks[-1][0]
    assert last_mono - first_mono >= 0.8
    assert chunks[0][1] < sent[-1] - 600


def test_upstream_disconnect_mid_stream_is_incomplete_with_error_event(stack):
    status, headers, raw = raw_chat(stack.port, chat_body("break", stream=True),
                                    headers={**AUTH, "X-Mock-Chunks": "5", "X-Mock-Disconnect-After": "2"})
    assert status == 200
    assert headers.get("transfer-encoding") == "chunked"
    payload, complete = decode_chunked(raw)
    # The gateway closed the connection without the terminating chunk: the
    # client sees an incomplete transfer, not a clean-looking finish.
    assert not complete
    text = payload.decode()
    assert "[DONE]" not in text
    events = [json.loads(l[5:]) for l in text.splitlines() if l.startswith("data:")]
    assert len([e for e in events if "choices" in e]) == 2
    assert "error" in events[-1], events[-1]
    assert events[-1]["error"]["code"] == "upstream_broken"
    assert events[-1]["error"]["type"] and events[-1]["error"]["message"]


def test_client_disconnect_cancels_upstream_stream(stack):
    mock_reset(stack.mock)
    body = json.dumps(chat_body("long", stream=True)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n"
            f"Content-Type: application/json\r\nX-Mock-Chunks: 50\r\nX-Mock-Chunk-Interval-Ms: 200\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    s = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
    try:
        s.sendall(head + body)
        got = b""
        deadline = time.monotonic() + 5
        while b"chat.completion.chunk" not in got and time.monotonic() < deadline:
            got += s.recv(65536)
        assert b"chat.completion.chunk" in got
        assert mock_stats(stack.mock)["in_flight"] == 1
    finally:
        s.close()
    stats = wait_for(lambda: (lambda st: st if st["in_flight"] == 0 and st["disconnects"] >= 1 else None)(
        mock_stats(stack.mock)), timeout=5, what="upstream stream cancelled")
    assert stats["streams_completed"] == 0
    # The gateway still serves afterwards.
    assert stack.chat(chat_body("after"), headers=AUTH)[0] == 200


def _data_segments_in(sock):
    """Segments with data this socket has received (Linux tcp_info
    tcpi_data_segs_in, at byte 152 since Linux 4.6)."""
    import struct
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < 156:
        pytest.skip("tcp_info has no tcpi_data_segs_in on this kernel")
    return struct.unpack_from("I", info, 152)[0]


def _raw_stream_request(port, extra=""):
    body = json.dumps(chat_body("one packet", stream=True)).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {CLIENT_TOKEN}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_stream_head_and_first_event_leave_in_one_packet(stack):
    """mockllm sends a stream's head and first event in one write; zonegate
    passes both on in one write too (the head is corked until the first
    chunk of the same loop iteration), so the client's first data segment
    holds the head and the first event. Before, the head went alone: two
    segments, two write syscalls per stream."""
    s = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(_raw_stream_request(stack.port, "X-Mock-Chunks: 3\r\nX-Mock-Chunk-Interval-Ms: 700\r\n"))
        got = b""
        deadline = time.monotonic() + 5
        while b"data: " not in got and time.monotonic() < deadline:
            got += s.recv(65536)
        segments = _data_segments_in(s)  # the second event is 700 ms away
        assert got.startswith(b"HTTP/1.1 200 ") and b"data: " in got, got[:300]
        assert segments == 1, f"head and first event came in {segments} segments"
        while not got.endswith(b"0\r\n\r\n") and time.monotonic() < deadline:
            more = s.recv(65536)
            if not more:
                break
            got += more
    finally:
        s.close()
    payload, complete = decode_chunked(got[got.index(b"\r\n\r\n") + 4:])
    assert complete
    events = [l for l in payload.decode().splitlines() if l.startswith("data: ")]
    assert len(events) == 4 and events[-1] == "data: [DONE]", events


# A model thinking before its first token: the events come `delay` s after the head.
LATE_EVENTS = [b'data: {"id":"late-1","object":"chat.completion.chunk","choices":[{"index":0,'
               b'"delta":{"content":"late"}}]}\n\n', b"data: [DONE]\n\n"]


def test_stream_head_is_not_held_for_a_late_first_event():
    """The corked head goes out at the end of the loop iteration it was
    made in, not with the first chunk: a client sees the head of a stream
    whose first event is 1.5 s late at once, and the stream's bytes are the
    upstream's, unchanged."""
    upstream = ScriptedUpstream([1.5] + LATE_EVENTS, gap=0)
    tmp = TempDir()
    path = tmp.__enter__()
    s = Stack(path, mock=upstream, performance={"request_timeout": 10000, "first_byte_timeout": 5000})
    try:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        with sock:
            t0 = time.monotonic()
            sock.sendall(_raw_stream_request(s.port))
            got = b""
            while b"\r\n\r\n" not in got:
                more = sock.recv(65536)
                assert more, got
                got += more
            head_after = time.monotonic() - t0
            # the head arrived alone: no event yet
            assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n"), got
            while not got.endswith(b"0\r\n\r\n"):
                more = sock.recv(65536)
                if not more:
                    break
                got += more
            end_after = time.monotonic() - t0
    finally:
        s.stop()
        upstream.stop()
        tmp.__exit__(None, None, None)
    assert len(upstream.sent_head_at) == 1
    assert head_after < 1.0, f"the head waited {head_after:.2f} s for the first event"
    assert end_after >= 1.4
    head, _, rest = got.partition(b"\r\n\r\n")
    assert b"text/event-stream" in head.lower() and b"transfer-encoding: chunked" in head.lower()
    payload, complete = decode_chunked(rest)
    assert complete
    assert payload == b"".join(LATE_EVENTS)


@pytest.mark.parametrize("lines", [1, 8, 9, 12])
def test_answer_headers_named_in_any_connection_line_are_dropped(stack, lines):
    """Every Connection line of the upstream's answer counts, however many
    there are (zonegate reads up to eight apart, more the slow way): the
    header the last one names does not reach the client, the others pass."""
    c = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    body = json.dumps(chat_body("hops")).encode()
    c.putrequest("POST", "/v1/chat/completions")
    hdrs = [("Authorization", f"Bearer {CLIENT_TOKEN}"), ("Content-Type", "application/json"),
            ("Content-Length", str(len(body)))]
    hdrs += [("X-Mock-Response-Header", f"Connection: x-hop-{i}") for i in range(lines)]
    hdrs += [("X-Mock-Response-Header", f"x-hop-{lines - 1}: leaked"), ("X-Mock-Response-Header", "x-kept: yes"),
             ("X-Mock-Response-Header", "Keep-Alive: timeout=5")]
    for k, v in hdrs:
        c.putheader(k, v)
    c.endheaders(body)
    r = c.getresponse()
    r.read()
    names = [k.lower() for k, _ in r.getheaders()]
    c.close()
    assert r.status == 200, names
    assert "x-kept" in names and f"x-hop-{lines - 1}" not in names and "keep-alive" not in names, names


@pytest.fixture
def cache_stack(request):
    tmp = TempDir()
    path = tmp.__enter__()
    s = Stack(path, performance={"cache_size": "1MB"})
    request.addfinalizer(lambda: (s.stop(), tmp.__exit__(None, None, None)))
    return s


def test_cache_temperature_zero_miss_then_hit(cache_stack):
    s = cache_stack
    mock_reset(s.mock)
    body = {"model": "mock-model", "temperature": 0, "messages": [{"role": "user", "content": "cache me"}]}
    st1, h1, p1 = s.chat(body)
    st2, h2, p2 = s.chat(body)
    assert (st1, st2) == (200, 200)
    assert h1.get("X-Cache") == "MISS"
    assert h2.get("X-Cache") == "HIT"
    assert p1 == p2
    assert mock_stats(s.mock)["by_route"]["chat_completions"] == 1

    # The key is what the upstream would see, byte for byte: the same
    # members in another order are another request (the upstream is asked).
    reordered = '{"messages":[{"content":"cache me","role":"user"}],"temperature":0,"model":"mock-model"}'
    st3, h3, p3 = s.chat(reordered)
    assert st3 == 200 and h3.get("X-Cache") == "MISS"
    assert mock_stats(s.mock)["by_route"]["chat_completions"] == 2


def test_cache_skips_other_temperatures_and_streams(cache_stack):
    s = cache_stack
    mock_reset(s.mock)
    body = {"model": "mock-model", "temperature": 0.7, "messages": [{"role": "user", "content": "warm"}]}
    for _ in range(2):
        status, headers, _ = s.chat(body)
        assert status == 200
        assert headers.get("X-Cache") != "HIT"
    stream_body = {"model": "mock-model", "temperature": 0, "stream": True,
                   "messages": [{"role": "user", "content": "warm"}]}
    for _ in range(2):
        status, headers, _ = s.chat(stream_body)
        assert status == 200
        assert headers.get("X-Cache") != "HIT"
    assert mock_stats(s.mock)["by_route"]["chat_completions"] == 4
