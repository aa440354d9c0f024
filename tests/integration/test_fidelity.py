"""zonegate is a faithful proxy for the whole OpenAI API: the differential test.

Every request shape below is sent twice with the same method, target, header
lines (names, order, values) and body bytes: once straight to mockllm and once
through zonegate (auth mode none). mockllm records every request exactly as it
arrived (GET /mock/requests), so the test compares what the upstream received
in both cases, and compares the two answers. Two gateways share one mockllm:
one with model defaults (`model: {temperature: 0.7, top_p: 0.95}`), one
without (pure passthrough). The direct request carries the provider key as
its bearer token (what a client of the provider itself would send); the one
through zonegate carries the client's token.

The ONLY allowed differences:

Request (what the upstream receives through zonegate, compared with what it
receives directly):
- `Authorization` is the provider key (the client's bearer token is not sent).
- `Host` is the upstream's.
- Hop-by-hop headers are removed: Connection, Keep-Alive, TE, Trailer,
  Transfer-Encoding, Upgrade, Proxy-Connection, Proxy-Authorization, and every
  header named in the client's Connection header.
- `Expect`, `Cookie` and `X-Zonegate-*` are not sent.
- `Accept-Encoding` is not the client's: zonegate sends `Accept-Encoding: identity`.
- `Content-Length` is present with the body's length.
- With model defaults configured, a chat completions body that lacks
  `temperature` / `top_p` gets `,"temperature":0.7,"top_p":0.95` (the missing
  ones) inserted right before its final `}`, and nothing else changes.
- No `X-Forwarded-For` is sent (unless the config turns `upstream.forwarded_for` on).
Everything else (method, path and query, every other header with its name,
value and position, the body bytes) is identical.

Answer (what the client receives through zonegate, compared with what it
receives directly):
- Status and body bytes are identical (a gzip answer arrives decoded, without
  `Content-Encoding`).
- End-to-end headers are identical (x-request-id, openai-processing-ms,
  x-ratelimit-*, retry-after, retry-after-ms, x-should-retry, custom ones).
- Hop-by-hop headers, `Content-Length` / `Transfer-Encoding` (framing: zonegate
  may answer chunked), `Date`, `Server` and `Set-Cookie` may differ.
- zonegate may add `X-Cache` and `X-Zonegate-*` headers.
- Header order and name case may differ.

After the differential cases, one test per case of the issue asserts the
user-visible result (numbers, 429 retries, gzip, hop-by-hop smuggling, broken
streams, X-Forwarded-For, paths outside /v1 and metrics labels, a JSON answer
to a stream request).
"""
import base64
import gzip
import json
import os
import re
import socket
import struct
import subprocess
import time

import pytest

from harness import (UPSTREAM_KEY, ZONEGATE_BIN, ScriptedUpstream, Stack, TempDir, request, start_mockllm)

CLIENT_TOKEN = "zg-fidelity-client-token-5d1e"
DEFAULTS_SUFFIX = {"temperature": b'"temperature":0.7', "top_p": b'"top_p":0.95'}

# ---- the allowed differences, as code -------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection",
              "proxy-authorization"}
REQUEST_NOT_SENT = {"expect", "cookie"}  # and every x-zonegate-* header
REQUEST_REPLACED = {"authorization", "host", "accept-encoding", "content-length", "x-forwarded-for"}
ANSWER_MAY_DIFFER = HOP_BY_HOP | {"content-length", "date", "server", "set-cookie"}


def connection_tokens(headers):
    return {t.strip().lower() for n, v in headers if n.lower() == "connection" for t in v.split(",") if t.strip()}


def expected_upstream_headers(client_headers):
    """The client's header lines zonegate forwards unchanged, in order, names as sent
    (the replaced ones, Authorization, Host, Accept-Encoding, Content-Length, are checked apart)."""
    named = connection_tokens(client_headers)
    out = []
    for name, value in client_headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in named or low in REQUEST_NOT_SENT or low.startswith("x-zonegate-"):
            continue
        if low in REQUEST_REPLACED:
            continue
        out.append([name, value])
    return out


def with_defaults(path, body, defaults_on):
    """The body the upstream must receive: with model defaults on, a chat completions
    JSON object lacking temperature / top_p gets them inserted before its final '}'."""
    if not defaults_on or path.split("?")[0] != "/v1/chat/completions":
        return body
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not isinstance(doc, dict):
        return body
    missing = [DEFAULTS_SUFFIX[k] for k in ("temperature", "top_p") if k not in doc]
    if not missing:
        return body
    end = body.rindex(b"}")
    return body[:end] + b"," + b",".join(missing) + body[end:]


def upstream_request_problems(direct, via, client_headers, upstream_port, expected_body):
    """direct / via: the requests mockllm recorded (directly / through zonegate). Returns
    every difference beyond the allowed ones, as readable lines."""
    problems = []
    via_body = base64.b64decode(via["body_b64"])
    direct_body = base64.b64decode(direct["body_b64"])
    # The recording itself is exact (the direct request is what the test sent).
    assert direct_body == expected_body
    assert [list(h) for h in direct["headers"]] == [list(h) for h in client_headers], "mockllm records exactly"
    if via["method"] != direct["method"]:
        problems.append(f"method {via['method']} != {direct['method']}")
    if via["path"] != direct["path"]:
        problems.append(f"path+query upstream {via['path']!r}, client sent {direct['path']!r}")
    if via_body != expected_body:
        problems.append(f"upstream body differs beyond the allowed model defaults: got {via_body[:300]!r}, "
                        f"expected {expected_body[:300]!r}")
    got = via["headers"]
    low = [(n.lower(), v) for n, v in got]
    auth = [v for n, v in low if n == "authorization"]
    if auth != [f"Bearer {UPSTREAM_KEY}"]:
        problems.append(f"Authorization upstream must be the provider key only: {auth}")
    if CLIENT_TOKEN in json.dumps(got):
        problems.append("the client's token reached the upstream")
    hosts = [v for n, v in low if n == "host"]
    if hosts != [f"127.0.0.1:{upstream_port}"]:
        problems.append(f"Host upstream {hosts}, expected the upstream's")
    encodings = [v for n, v in low if n == "accept-encoding"]
    if encodings != ["identity"]:
        problems.append(f"Accept-Encoding upstream {encodings}, expected ['identity']")
    lengths = [v for n, v in low if n == "content-length"]
    if (via_body and lengths != [str(len(via_body))]) or (not via_body and lengths not in ([], ["0"])):
        problems.append(f"Content-Length upstream {lengths}, body is {len(via_body)} bytes")
    xff = [v for n, v in low if n == "x-forwarded-for"]
    if xff:
        problems.append(f"X-Forwarded-For sent upstream: {xff}")
    rest = [[n, v] for n, v in got if n.lower() not in REQUEST_REPLACED]
    want = expected_upstream_headers(client_headers)
    if rest != want:
        problems.append(f"other headers upstream (names, values, order) differ:\n      got  {rest}\n      want {want}")
    return problems


def comparable_answer_headers(headers, gateway):
    out = []
    for name, value in headers:
        low = name.lower()
        if low in ANSWER_MAY_DIFFER:
            continue
        if gateway and (low == "x-cache" or low.startswith("x-zonegate-")):
            continue
        out.append((low, value))
    return sorted(out)


def answer_problems(direct, via):
    problems = []
    if not via.complete:
        problems.append(f"the answer through zonegate is incomplete: ...{via.raw[-200:]!r}")
    if via.status != direct.status:
        problems.append(f"status {via.status} != {direct.status}: {via.body[:200]!r}")
    body = direct.body
    direct_headers = direct.headers
    if direct.header("content-encoding") == "gzip":
        body = gzip.decompress(body)
        direct_headers = [(n, v) for n, v in direct.headers if n.lower() != "content-encoding"]
        if via.header("content-encoding") is not None:
            problems.append(f"a gzip answer must arrive decoded, got Content-Encoding: {via.header('content-encoding')}")
    if via.body != body:
        problems.append(f"answer body differs: got {via.body[:200]!r}, expected {body[:200]!r}")
    got, want = comparable_answer_headers(via.headers, True), comparable_answer_headers(direct_headers, False)
    if got != want:
        problems.append(f"answer headers differ: missing {sorted(set(want) - set(got))}, "
                        f"extra {sorted(set(got) - set(want))}" + ("" if set(got) != set(want) else f" (multiplicity: {got})"))
    return problems


# ---- a raw HTTP/1.1 client: the test controls every byte ------------------

class Answer:
    def __init__(self, status, headers, body, complete, raw):
        self.status, self.headers, self.body, self.complete, self.raw = status, headers, body, complete, raw

    def header(self, name):
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[0] if values else None


class Reader:
    def __init__(self, sock):
        self.sock, self.buf, self.raw, self.eof = sock, b"", b"", False

    def _fill(self):
        if self.eof:
            return False
        data = self.sock.recv(262144)
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.raw += data
        return True

    def readline(self):
        while b"\n" not in self.buf:
            if not self._fill():
                line, self.buf = self.buf, b""
                return line
        i = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def read(self, n):
        while len(self.buf) < n and self._fill():
            pass
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_all(self):
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out


def read_answer(reader, method):
    while True:
        line = reader.readline()
        if not line:
            return Answer(0, [], b"", False, reader.raw)
        status = int(line.split()[1])
        headers = []
        while True:
            h = reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").rstrip("\r\n").partition(":")
            headers.append((name.strip(), value.strip()))
        if 100 <= status < 200:
            continue
        break
    ans = Answer(status, headers, b"", True, None)
    te = (ans.header("transfer-encoding") or "").lower()
    if method == "HEAD" or status in (204, 304):
        pass
    elif "chunked" in te:
        body = b""
        complete = False
        while True:
            size_line = reader.readline()
            if not size_line.endswith(b"\n"):
                break
            try:
                size = int(size_line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                break
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                complete = True
                break
            data = reader.read(size)
            body += data
            if len(data) < size or reader.read(2) != b"\r\n":
                break
        ans.body, ans.complete = body, complete
    elif ans.header("content-length") is not None:
        n = int(ans.header("content-length"))
        ans.body = reader.read(n)
        ans.complete = len(ans.body) == n
    else:
        ans.body = reader.read_all()
    ans.raw = reader.raw
    return ans


def chunk_body(body, pieces=3):
    out = b""
    step = max(1, len(body) // pieces)
    for i in range(0, len(body), step):
        part = body[i:i + step]
        out += b"%x\r\n" % len(part) + part + b"\r\n"
    return out + b"0\r\n\r\n"


def exchange(port, method, target, headers, body=b"", chunked=False, timeout=30):
    """Sends the request line, the header lines exactly as given (plus Content-Length
    or the chunked framing), the body; reads one answer. Returns Answer."""
    lines = list(headers)
    if chunked:
        lines.append(("Transfer-Encoding", "chunked"))
        payload = chunk_body(body)
    else:
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(("Content-Length", str(len(body))))
        payload = body
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in lines) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("utf-8") + payload)
        return read_answer(Reader(s), method), lines


def recorded(mock):
    status, _, payload = request(mock.port, "GET", "/mock/requests", timeout=10)
    assert status == 200, payload
    return json.loads(payload)


def new_requests(mock, before):
    doc = recorded(mock)
    n = doc["total"] - before
    return doc["requests"][len(doc["requests"]) - n:] if n > 0 else []


def upstream_calls(mock):
    return recorded(mock)["total"]


# ---- the stacks ---------------------------------------------------------------

@pytest.fixture(scope="module")
def mock():
    m = start_mockllm("--require-key", UPSTREAM_KEY)
    yield m
    m.stop()


def _stack(mock, **overrides):
    tmp = TempDir()
    path = tmp.__enter__()
    # usage accounting off: it asks streams for usage (stream_options), the
    # one documented change to a stream request; test_stream_usage_* below
    # covers it with accounting on
    s = Stack(path, mock=mock, performance={"cache_size": 0, "request_timeout": 20000},
              usage={"enabled": False}, **overrides)
    s.tmp = tmp
    return s


@pytest.fixture(scope="module")
def stacks(mock):
    plain = _stack(mock)
    defaults = _stack(mock, model={"temperature": 0.7, "top_p": 0.95})
    yield {"plain": plain, "defaults": defaults}
    for s in (plain, defaults):
        s.stop()
        s.tmp.__exit__(None, None, None)


# ---- the request shapes ---------------------------------------------------

SDK_HEADERS = [("Accept", "application/json"), ("User-Agent", "OpenAI/Python 3.57.0"),
               ("X-Stainless-Lang", "python"), ("X-Stainless-Package-Version", "3.57.0"),
               ("X-Stainless-Retry-Count", "0")]
JSON = [("Content-Type", "application/json")]


def jbody(doc):
    return json.dumps(doc, separators=(",", ":")).encode()


def chat(content="hello", **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


def multipart(boundary, fields, file_field, filename, file_bytes, file_type):
    out = b""
    for name, value in fields:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {file_type}\r\n\r\n").encode() + file_bytes + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


# A binary "audio" file: every byte value, CRLFs, a fake boundary and NULs.
AUDIO = b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 8 + b"\r\n--notreally\r\n\x00\x00" + bytes(range(255, -1, -1))
FILE_JSONL = b'{"prompt":"a","completion":"b"}\n{"prompt":"\xc3\xa9","completion":"\xf0\x9f\x98\x80"}\n'
BOUNDARY = "----zgfidelity7MA4YWxkTrZu0gW"

PRETTY = (b'{\r\n\t"model" :\t"gpt-4o-mini" ,\n  "messages" : [\n    {  "role":"user",\n'
          b'       "content":  "spaced   out"  }\n  ]  \n}\n\n  ')
REORDERED = b'{"messages":[{"content":"order","role":"user"}],"stream":false,"n":1,"model":"gpt-4o-mini"}'
NUMBERS = (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"numbers"}],'
           b'"seed":9007199254740993,"metadata":{"order_id":4634343214213523454},'
           b'"max_tokens":1e2,"frequency_penalty":-0.0,"presence_penalty":1E-2,"logit_bias":{"50256":-100.0}}')
ESCAPES = (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":'
           b'"caf\\u00e9 \\u4e2d\\u6587 \\ud83d\\ude00 \\\\ \\"q\\" \\/ \\t\\n"}]}')
RAW_UTF8 = ('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"héllo 中文 😀 עברית ﷺ \u2028"}]}'
            ).encode("utf-8")
TOOLS = chat("weather in Paris?", tools=[{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
    tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
IMAGE = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
    {"type": "text", "text": "what is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(bytes(range(256))).decode(),
                                        "detail": "low"}}]}]}
JSON_SCHEMA = chat("give json", response_format={"type": "json_schema", "json_schema": {
    "name": "answer", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                 "required": ["a"], "additionalProperties": False}}})


def case(name, method, target, body=b"", headers=(), chunked=False, stacks=("plain", "defaults")):
    return pytest.param({"method": method, "target": target, "body": body, "headers": list(headers),
                         "chunked": chunked}, id=name, marks=()), stacks


CASES = [
    case("chat", "POST", "/v1/chat/completions", jbody(chat()), JSON),
    case("chat-sdk-headers", "POST", "/v1/chat/completions", jbody(chat("sdk")),
         JSON + SDK_HEADERS + [("OpenAI-Organization", "org-123"), ("OpenAI-Project", "proj_abc"),
                               ("Idempotency-Key", "stainless-python-retry-1")]),
    case("chat-tools", "POST", "/v1/chat/completions", jbody(TOOLS), JSON),
    case("chat-image-parts", "POST", "/v1/chat/completions", jbody(IMAGE), JSON),
    case("chat-n2", "POST", "/v1/chat/completions", jbody(chat("two", n=2)), JSON),
    case("chat-logprobs", "POST", "/v1/chat/completions", jbody(chat("lp", logprobs=True, top_logprobs=5)), JSON),
    case("chat-json-schema", "POST", "/v1/chat/completions", jbody(JSON_SCHEMA), JSON),
    case("chat-big-numbers", "POST", "/v1/chat/completions", NUMBERS, JSON),
    case("chat-unicode-escapes", "POST", "/v1/chat/completions", ESCAPES, JSON),
    case("chat-raw-utf8-emoji", "POST", "/v1/chat/completions", RAW_UTF8, [("Content-Type", "application/json; charset=utf-8")]),
    case("chat-300kb", "POST", "/v1/chat/completions", jbody(chat("x" * 300_000)), JSON),
    case("chat-odd-whitespace", "POST", "/v1/chat/completions", PRETTY, JSON),
    case("chat-member-order", "POST", "/v1/chat/completions", REORDERED, JSON),
    case("chat-has-temperature", "POST", "/v1/chat/completions", jbody(chat("t", temperature=1.3)), JSON),
    case("chat-has-both", "POST", "/v1/chat/completions", jbody(chat("tp", top_p=0.5, temperature=0.2)), JSON),
    case("chat-query-string", "POST", "/v1/chat/completions?api-version=2024-06-01&x=a%20b", jbody(chat("q")), JSON),
    case("chat-chunked-upload", "POST", "/v1/chat/completions", jbody(chat("chunked")), JSON, chunked=True),
    case("chat-hop-by-hop-and-private", "POST", "/v1/chat/completions", jbody(chat("hop")),
         JSON + [("Connection", "keep-alive, X-Hop-Secret"), ("Keep-Alive", "timeout=5"), ("X-Hop-Secret", "s3cret"),
                 ("TE", "trailers"), ("Cookie", "session=abc"), ("X-Zonegate-Forwarded", "1"),
                 ("Expect", "100-continue"), ("Accept-Encoding", "gzip, deflate, br"), ("X-Custom-Client", "kept")]),
    case("chat-custom-answer-headers", "POST", "/v1/chat/completions", jbody(chat("hdr")),
         JSON + [("X-Mock-Response-Header", "X-Custom-Upstream: one"),
                 ("X-Mock-Response-Header", "openai-organization: org-up"),
                 ("X-Mock-Response-Header", "x-ratelimit-remaining-tokens: 149984"),
                 ("X-Mock-Response-Header", "Retry-After: 7")]),
    case("chat-429-no-retry", "POST", "/v1/chat/completions", jbody(chat("limit")),
         JSON + [("X-Mock-Status", "429"), ("X-Mock-Should-Retry", "false")]),
    case("chat-503", "POST", "/v1/chat/completions", jbody(chat("down")), JSON + [("X-Mock-Status", "503")]),
    case("chat-400-bad-json-upstream", "POST", "/v1/chat/completions", jbody({"model": "gpt-4o-mini"}), JSON),
    case("chat-gzip", "POST", "/v1/chat/completions", jbody(chat("zip")), JSON + [("X-Mock-Gzip", "1")]),
    case("chat-stream", "POST", "/v1/chat/completions", jbody(chat("streamed", stream=True)),
         JSON + [("Accept", "text/event-stream")]),
    case("chat-stream-usage", "POST", "/v1/chat/completions",
         jbody(chat("usage", stream=True, stream_options={"include_usage": True})), JSON),
    case("chat-stream-gzip", "POST", "/v1/chat/completions", jbody(chat("zip stream", stream=True)),
         JSON + [("X-Mock-Gzip", "1")]),
    case("chat-stream-as-json", "POST", "/v1/chat/completions", jbody(chat("json please", stream=True)),
         JSON + [("X-Mock-Stream-As-Json", "1")]),
    case("completions", "POST", "/v1/completions", jbody({"model": "gpt-3.5-turbo-instruct", "prompt": "Say this",
                                                          "max_tokens": 7, "echo": False, "suffix": None}), JSON),
    case("completions-stream", "POST", "/v1/completions",
         jbody({"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"], "stream": True}), JSON),
    case("responses", "POST", "/v1/responses", jbody({"model": "gpt-4o-mini", "input": "Tell me a joke",
                                                      "metadata": {"n": "9007199254740993"}}), JSON),
    case("responses-stream", "POST", "/v1/responses",
         jbody({"model": "gpt-4o-mini", "stream": True, "input": [{"role": "user", "content": [
             {"type": "input_text", "text": "stream it"}]}]}), JSON),
    case("embeddings-float", "POST", "/v1/embeddings",
         jbody({"model": "text-embedding-3-small", "input": ["one", "two"], "encoding_format": "float"}), JSON),
    case("embeddings-base64", "POST", "/v1/embeddings",
         jbody({"model": "text-embedding-3-small", "input": "one", "encoding_format": "base64", "dimensions": 16}),
         JSON),
    case("moderations", "POST", "/v1/moderations", jbody({"input": ["fine", "mock-flag this"]}), JSON),
    case("models-list", "GET", "/v1/models", b"", SDK_HEADERS),
    case("models-list-query", "GET", "/v1/models?limit=2&order=desc", b"", []),
    case("model-retrieve", "GET", "/v1/models/gpt-4o-mini", b"", SDK_HEADERS),
    case("audio-transcription-multipart", "POST", "/v1/audio/transcriptions",
         multipart(BOUNDARY, [("model", "whisper-1"), ("language", "fr")], "file", "clip.wav", AUDIO, "audio/wav"),
         [("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")] + SDK_HEADERS[1:]),
    case("file-upload-multipart", "POST", "/v1/files",
         multipart(BOUNDARY, [("purpose", "fine-tune")], "file", "train.jsonl", FILE_JSONL, "application/jsonl"),
         [("Content-Type", f"multipart/form-data; boundary=\"{BOUNDARY}\"")]),
    case("file-get", "GET", "/v1/files/{file_id}", b"", []),
    case("file-get-missing", "GET", "/v1/files/file-doesnotexist?x=1", b"", []),
]


def fnv1a(data, seed=0):
    """mockllm's body hash (ids of X-Mock-Deterministic answers)."""
    mask = (1 << 64) - 1
    h = 0xcbf29ce484222325 ^ seed
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & mask
    h ^= h >> 33
    h = (h * 0xff51afd7ed558ccd) & mask
    return h ^ (h >> 33)


UPLOAD_FOR_GET = multipart(BOUNDARY, [("purpose", "assistants")], "file", "kept.txt", b"kept\x00bytes", "text/plain")


@pytest.fixture(scope="module")
def file_id(mock):
    ans, _ = exchange(mock.port, "POST", "/v1/files",
                      [("Authorization", f"Bearer {UPSTREAM_KEY}"), ("X-Mock-Deterministic", "1"),
                       ("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")], UPLOAD_FOR_GET)
    assert ans.status == 200, ans.body
    doc = json.loads(ans.body)
    assert doc["id"] == "file-%016x" % fnv1a(UPLOAD_FOR_GET) and doc["bytes"] == 10
    return doc["id"]


def params():
    out = []
    for param, which in CASES:
        for stack_name in which:
            out.append(pytest.param(param.values[0], stack_name, id=f"{param.id}-{stack_name}"))
    return out


@pytest.mark.parametrize("shape,stack_name", params())
def test_differential(shape, stack_name, stacks, mock, file_id):
    stack = stacks[stack_name]
    target = shape["target"].replace("{file_id}", file_id)
    common = [("Host", "api.client.example"), ("X-Mock-Deterministic", "1")]
    expected_body = with_defaults(target, shape["body"], stack_name == "defaults")

    before = upstream_calls(mock)
    direct, direct_lines = exchange(mock.port, shape["method"], target,
                                    common + [("Authorization", f"Bearer {UPSTREAM_KEY}")] + shape["headers"],
                                    expected_body, shape["chunked"])
    (direct_rec,) = new_requests(mock, before)
    assert direct.complete and direct.status != 401, direct.body[:300]

    before = upstream_calls(mock)
    via, _ = exchange(stack.port, shape["method"], target,
                      common + [("Authorization", f"Bearer {CLIENT_TOKEN}")] + shape["headers"],
                      shape["body"], shape["chunked"])
    got = new_requests(mock, before)
    assert len(got) == 1, (f"expected exactly one upstream request through zonegate, got {len(got)}; "
                           f"answer {via.status} {via.body[:300]!r}")
    problems = upstream_request_problems(direct_rec, got[0], direct_lines, mock.port, expected_body)
    problems += answer_problems(direct, via)
    assert not problems, "differences beyond the allowed ones:\n  - " + "\n  - ".join(problems)


@pytest.mark.parametrize("shape", [p.values[0] for p, _ in CASES], ids=[p.id for p, _ in CASES])
def test_mockllm_answers_are_reproducible(shape, mock, file_id):
    """The differential relies on this: the same request straight to mockllm twice
    gets the same status, headers and body bytes."""
    target = shape["target"].replace("{file_id}", file_id)
    lines = [("Host", "api.client.example"), ("X-Mock-Deterministic", "1"),
             ("Authorization", f"Bearer {UPSTREAM_KEY}")] + shape["headers"]
    one, _ = exchange(mock.port, shape["method"], target, lines, shape["body"], shape["chunked"])
    two, _ = exchange(mock.port, shape["method"], target, lines, shape["body"], shape["chunked"])
    assert one.complete and two.complete
    assert (one.status, one.headers, one.body) == (two.status, two.headers, two.body)
    assert one.header("x-request-id").startswith("req_") and one.header("openai-processing-ms") == "1"


# ---- one test per case of the issue ----------------------------------------

def test_numbers_reach_upstream_byte_for_byte_with_defaults(stacks, mock):
    body = (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"n"}],"seed":9007199254740993,'
            b'"metadata":{"order_id":4634343214213523454},"max_tokens":1e2,"frequency_penalty":-0.0,'
            b'"presence_penalty":0.10,"n":1.0,"logit_bias":{"1":1E+2,"2":123456789012345678901234567890}}')
    before = upstream_calls(mock)
    ans, _ = exchange(stacks["defaults"].port, "POST", "/v1/chat/completions", JSON, body)
    assert ans.status == 200, ans.body
    (rec,) = new_requests(mock, before)
    assert base64.b64decode(rec["body_b64"]) == body[:-1] + b',"temperature":0.7,"top_p":0.95}'


def test_429_should_retry_false_is_one_upstream_call_like_direct(stacks, mock):
    openai = pytest.importorskip("openai")
    hdrs = {"X-Mock-Status": "429", "X-Mock-Should-Retry": "false"}
    calls = {}
    for name, url, key in (("direct", mock.url, UPSTREAM_KEY),
                           ("zonegate", f"http://127.0.0.1:{stacks['plain'].port}", CLIENT_TOKEN)):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2, timeout=15, default_headers=hdrs)
        before = upstream_calls(mock)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "429"}])
        calls[name] = (upstream_calls(mock) - before, err.value.response.headers.get("x-should-retry"),
                       err.value.response.headers.get("retry-after-ms"))
    assert calls["direct"] == (1, "false", "1000")
    assert calls["zonegate"][0] == 1, f"the SDK retried through zonegate: {calls}"
    assert calls["zonegate"] == calls["direct"], calls


def test_gzip_upstream_answers_parse_with_the_sdk(stacks, mock):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stacks['plain'].port}/v1", api_key=CLIENT_TOKEN,
                           max_retries=0, timeout=15, default_headers={"X-Mock-Gzip": "1"})
    try:
        resp = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "gz"}])
    except (ValueError, openai.APIError) as e:  # UnicodeDecodeError / JSONDecodeError are ValueErrors
        pytest.fail(f"the SDK cannot parse a gzip upstream answer through zonegate: {e!r}")
    assert resp.choices[0].message.content == "mock reply to: gz"
    try:
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "gz stream"}]) if c.choices]
    except (ValueError, openai.APIError) as e:
        pytest.fail(f"the SDK cannot parse a gzip upstream stream through zonegate: {e!r}")
    assert "".join(parts) == "mock reply to: gz stream"
    # A client that asked for identity gets plain JSON, not gzip bytes.
    ans, _ = exchange(stacks["plain"].port, "POST", "/v1/chat/completions",
                      JSON + [("Accept-Encoding", "identity"), ("X-Mock-Gzip", "1")], jbody(chat("plain")))
    assert ans.status == 200 and ans.header("content-encoding") is None
    assert json.loads(ans.body)["choices"][0]["message"]["content"] == "mock reply to: plain"


@pytest.mark.parametrize("lines", [1, 8, 9, 12])
def test_connection_named_header_never_reaches_upstream(stacks, mock, lines):
    """The header may be named in any of several Connection lines (one list,
    RFC 9110 §5.3): the first, or the last of 8 (all kept apart) or of 9 and
    12 (more than are kept apart: looked up again)."""
    before = upstream_calls(mock)
    conn = [("Connection", f"x-filler-{k}") for k in range(lines - 1)]
    conn.append(("Connection", "keep-alive, X-Hop-Secret"))
    ans, _ = exchange(stacks["plain"].port, "POST", "/v1/chat/completions",
                      JSON + conn + [("X-Hop-Secret", "s3cret")], jbody(chat("hop")))
    assert ans.status == 200, ans.body
    (rec,) = new_requests(mock, before)
    names = [n.lower() for n, _ in rec["headers"]]
    assert "x-hop-secret" not in names, rec["headers"]
    assert "s3cret" not in json.dumps(rec["headers"])
    assert "connection" not in names, "hop-by-hop headers are not forwarded"


def _sse_events(payload):
    return [e for e in payload.split(b"\n\n") if e]


def test_upstream_cut_mid_event_gives_error_event_on_boundary(stacks, mock):
    openai = pytest.importorskip("openai")
    hdrs = JSON + [("X-Mock-Partial-Close", "1"), ("X-Mock-Deterministic", "1"), ("X-Mock-Chunks", "5")]
    body = jbody(chat("cut me", stream=True))
    direct, _ = exchange(mock.port, "POST", "/v1/chat/completions",
                         hdrs + [("Authorization", f"Bearer {UPSTREAM_KEY}")], body)
    first_event = direct.body[:direct.body.index(b"\n\n") + 2]
    half = direct.body[len(first_event):]
    assert half and not half.endswith(b"\n\n") and not direct.complete

    via, _ = exchange(stacks["plain"].port, "POST", "/v1/chat/completions", hdrs, body)
    assert via.status == 200
    assert not via.complete, "a broken stream must not look complete"
    assert via.body.startswith(first_event), via.body[:400]
    rest = via.body[len(first_event):]
    assert rest.startswith(b"data: {\"error\""), f"the error event must start on an event boundary: {rest[:200]!r}"
    assert rest.endswith(b"\n\n") and rest.count(b"\n\n") == 1, rest
    err = json.loads(rest[len(b"data: "):].strip())["error"]
    assert err["message"] and err["type"]
    assert b"[DONE]" not in via.body

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stacks['plain'].port}/v1", api_key=CLIENT_TOKEN,
                           max_retries=0, timeout=15,
                           default_headers={"X-Mock-Partial-Close": "1", "X-Mock-Chunks": "5"})
    with pytest.raises(openai.APIError) as raised:
        for _ in client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                messages=[{"role": "user", "content": "cut me"}]):
            pass
    assert not isinstance(raised.value, openai.APIConnectionError), repr(raised.value)


def _forwarded_for_key_exists():
    out = subprocess.run([ZONEGATE_BIN, "config", "reference"], capture_output=True, text=True, timeout=10).stdout
    return "upstream.forwarded_for" in out


def test_no_x_forwarded_for_upstream_by_default(stacks, mock):
    for extra in ([], [("X-Forwarded-For", "203.0.113.9")]):
        before = upstream_calls(mock)
        ans, _ = exchange(stacks["plain"].port, "POST", "/v1/chat/completions", JSON + extra, jbody(chat("xff")))
        assert ans.status == 200, ans.body
        (rec,) = new_requests(mock, before)
        assert not [v for n, v in rec["headers"] if n.lower() == "x-forwarded-for"], rec["headers"]


def test_x_forwarded_for_when_configured(mock):
    if not _forwarded_for_key_exists():
        pytest.skip("upstream.forwarded_for is not a config key (yet)")
    s = _stack(mock, upstream={"forwarded_for": True})
    try:
        before = upstream_calls(mock)
        ans, _ = exchange(s.port, "POST", "/v1/chat/completions", JSON, jbody(chat("xff on")))
        assert ans.status == 200, ans.body
        (rec,) = new_requests(mock, before)
        assert [v for n, v in rec["headers"] if n.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    finally:
        s.stop()
        s.tmp.__exit__(None, None, None)


def test_paths_outside_v1_never_reach_the_upstream_and_metrics_use_templates(stacks, mock):
    port = stacks["plain"].port
    auth = [("Authorization", f"Bearer {CLIENT_TOKEN}")]
    before = upstream_calls(mock)
    for target in ("/v2/models", "/admin/keys", "/mock/requests"):
        ans, _ = exchange(port, "GET", target, auth)
        assert ans.status == 404, (target, ans.status, ans.body[:200])
    assert upstream_calls(mock) == before, "a path outside /v1 reached the upstream"

    for target in ("/v1/../health", "/v1/%2e%2e/x", "/v1/%2E%2E/mock/requests", "/v1/..%2fhealth"):
        before = upstream_calls(mock)
        ans, _ = exchange(port, "GET", target, auth)
        for rec in new_requests(mock, before):
            path = rec["path"].split("?")[0]
            assert path.startswith("/v1/") and ".." not in path and "%2e" not in path.lower(), \
                f"{target} reached {rec['path']} upstream"
        assert ans.status in (400, 404), (target, ans.status, ans.body[:200])
        assert b'"role"' not in ans.body, f"{target} was served by a route outside /v1"

    ans, _ = exchange(port, "GET", "/v1/files/file-abc", auth)
    assert ans.status == 404  # mockllm knows no such file; the answer is the upstream's
    status, _, metrics = request(stacks["plain"].metrics_port, "GET", "/metrics")
    assert status == 200
    text = metrics.decode()
    assert "file-abc" not in text, "a raw id in a metrics label (unbounded cardinality)"
    assert re.search(r'zonegate_requests_total\{[^}]*route="/v1/files/\{id\}"', text), \
        [line for line in text.splitlines() if line.startswith("zonegate_requests_total")]


def test_json_answer_to_a_stream_request_reaches_the_client_unchanged(stacks, mock):
    hdrs = JSON + [("X-Mock-Stream-As-Json", "1"), ("X-Mock-Deterministic", "1")]
    body = jbody(chat("json not sse", stream=True))
    direct, _ = exchange(mock.port, "POST", "/v1/chat/completions",
                         hdrs + [("Authorization", f"Bearer {UPSTREAM_KEY}")], body)
    via, _ = exchange(stacks["plain"].port, "POST", "/v1/chat/completions", hdrs, body)
    assert direct.header("content-type") == "application/json"
    assert via.status == 200, via.body[:300]
    assert via.header("content-type") == "application/json"
    assert via.body == direct.body
    assert json.loads(via.body)["object"] == "chat.completion"


# ---- usage accounting on (the default) -----------------------------------

STREAM_IDS = re.compile(rb'"id":"(chatcmpl|cmpl)-[0-9a-f]+"|"created":[0-9]+')


def _events(body):
    return [e for e in body.split(b"\n\n") if e.strip()]


@pytest.mark.parametrize("path,doc", [
    ("/v1/chat/completions", chat("count me", stream=True)),
    ("/v1/chat/completions", chat("count me too", stream=True, stream_options={})),
    ("/v1/chat/completions", chat("and me", stream=True, stream_options={"include_usage": False})),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": "complete me", "stream": True}),
])
def test_stream_usage_is_asked_for_and_removed_again(mock, path, doc):
    """With accounting on, the upstream is asked for usage; the client's
    stream is what it would get without the gateway (no usage chunk, no
    "usage":null members), ids and timestamps aside (the mock derives them
    from the body it received)."""
    tmp = TempDir()
    d = tmp.__enter__()
    s = Stack(d, mock=mock, performance={"cache_size": 0})
    try:
        hdrs = JSON + [("X-Mock-Deterministic", "1"), ("X-Mock-Chunks", "4")]
        body = jbody(doc)
        direct, _ = exchange(mock.port, "POST", path,
                             hdrs + [("Authorization", f"Bearer {UPSTREAM_KEY}")], body)
        via, _ = exchange(s.port, "POST", path, hdrs, body)
        seen = json.loads(base64.b64decode(recorded(mock)["requests"][-1]["body_b64"]))
        assert seen["stream_options"]["include_usage"] is True
        assert via.status == 200 and direct.status == 200
        assert b'"usage"' not in via.body, via.body[-300:]
        assert STREAM_IDS.sub(b"", via.body) == STREAM_IDS.sub(b"", direct.body)
        assert len(_events(via.body)) == len(_events(direct.body))
    finally:
        s.stop()
        tmp.__exit__(None, None, None)


def _tokens_counted(stack):
    """zonegate_tokens_total by kind, summed over its other labels."""
    _, _, text = request(stack.metrics_port, "GET", "/metrics")
    counted = {}
    for line in text.decode().splitlines():
        m = re.match(r'zonegate_tokens_total\{.*kind="(\w+)".*\} ([0-9.e+]+)$', line)
        if m:
            counted[m.group(1)] = counted.get(m.group(1), 0) + float(m.group(2))
    return counted


def _scripted_stream(pieces, doc, path="/v1/chat/completions"):
    """Sends doc as a stream request through a node (accounting on) whose
    upstream sends pieces: (client's payload, request body the upstream got,
    tokens counted)."""
    upstream = ScriptedUpstream(pieces)
    tmp = TempDir()
    d = tmp.__enter__()
    s = Stack(d, mock=upstream, performance={"cache_size": 0})
    try:
        via, _ = exchange(s.port, "POST", path, JSON, jbody(doc))
        assert via.status == 200, via.body[:300]
        assert upstream.paths[-1] == path
        counted = wait_for_tokens(s)
        return via.body, upstream.bodies[-1], counted
    finally:
        s.stop()
        upstream.stop()
        tmp.__exit__(None, None, None)


def wait_for_tokens(stack, timeout=5):
    deadline = time.monotonic() + timeout
    while True:
        counted = _tokens_counted(stack)
        if counted.get("completion") or counted.get("unknown_requests") or \
                time.monotonic() > deadline:
            return counted
        time.sleep(0.1)


CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]'
USAGE_CHUNK = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],'
               b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}')


def test_dropped_usage_chunk_takes_its_crlf_along_when_reads_split_it():
    """The gateway asked for usage and drops the usage chunk again. When
    the upstream's CRLF after that chunk comes in two reads (CR, then LF),
    the LF goes with the chunk: the client's bytes are the stream without
    the usage, not one stray LF more (review of issue 14). An event the
    client keeps passes its split CRLF whole."""
    pieces = [CHUNK + b',"usage":null}\r\n\r\n', USAGE_CHUNK + b"}\r\n\r", b"\n",
              b"data: [DONE]\r\n\r\n"]
    got, sent, counted = _scripted_stream(pieces, chat("split", stream=True))
    assert sent["stream_options"] == {"include_usage": True}
    assert got == CHUNK + b"}\r\n\r\n" + b"data: [DONE]\r\n\r\n", got
    assert counted.get("prompt") == 5 and counted.get("completion") == 2, counted

    pieces = [CHUNK + b',"usage":null}\r\n\r', b"\n", USAGE_CHUNK + b"}\r\n\r\n",
              b"data: [DONE]\r", b"\n\r\n"]
    got, _, _ = _scripted_stream(pieces, chat("split kept", stream=True))
    assert got == CHUNK + b"}\r\n\r\n" + b"data: [DONE]\r\n\r\n", got


def test_usage_on_every_chunk_counts_the_last_not_the_sum():
    """vLLM's continuous_usage_stats: every chunk carries the answer's usage
    so far. The count is the last object's, not their sum (review of issue
    14: 5/7 was counted 10/14), and the client, who asked, gets every byte."""
    pieces = [CHUNK + b',"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}\n\n',
              CHUNK + b',"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n',
              USAGE_CHUNK + b"}\n\n", b"data: [DONE]\n\n"]
    got, sent, counted = _scripted_stream(
        pieces, chat("continuous", stream=True,
                     stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert got == b"".join(pieces)
    assert counted.get("prompt") == 5 and counted.get("completion") == 2, counted


@pytest.mark.parametrize("options,names", [
    ("yes", "'stream_options': expected an object, but got a string"),
    ([], "'stream_options': expected an object, but got an array"),
    (True, "'stream_options': expected an object, but got a boolean"),
    ({"include_usage": "yes"}, "'stream_options.include_usage': expected a boolean, but got a string"),
    ({"include_usage": 1}, "'stream_options.include_usage': expected a boolean, but got a number"),
])
def test_stream_options_of_another_type_is_refused_not_sent_uncounted(mock, options, names):
    """With accounting on, a stream the gateway cannot ask for usage (its
    stream_options is not an object, or include_usage not a boolean) would
    go uncounted past budgets if a lenient upstream took it: it is refused
    as OpenAI refuses it (400 invalid_type), and never sent upstream."""
    tmp = TempDir()
    d = tmp.__enter__()
    s = Stack(d, mock=mock, performance={"cache_size": 0})
    try:
        before = len(recorded(mock)["requests"])
        via, _ = exchange(s.port, "POST", "/v1/chat/completions", JSON,
                          jbody(chat("uncounted?", stream=True, stream_options=options)))
        assert via.status == 400, via.body[:300]
        err = json.loads(via.body)["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_type", err
        assert names in err["message"], err
        assert len(recorded(mock)["requests"]) == before
        # include_usage null is "not asked": the gateway asks, and hides it again
        via, _ = exchange(s.port, "POST", "/v1/chat/completions", JSON + [("X-Mock-Chunks", "2")],
                          jbody(chat("null", stream=True, stream_options={"include_usage": None})))
        assert via.status == 200 and b'"usage"' not in via.body, via.body[-300:]
        seen = json.loads(base64.b64decode(recorded(mock)["requests"][-1]["body_b64"]))
        assert seen["stream_options"] == {"include_usage": True}
    finally:
        s.stop()
        tmp.__exit__(None, None, None)


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1//chat/completions",
                                  "/v1/chat//completions/"])
def test_path_variants_of_chat_completions_are_asked_and_counted(path):
    """An upstream that merges slashes serves /v1/chat/completions/ as chat
    completions: the gateway treats it as one too (review: it went upstream
    unasked and counted as an unknown request), and passes the path as sent."""
    pieces = [CHUNK + b',"usage":null}\n\n', USAGE_CHUNK + b"}\n\n", b"data: [DONE]\n\n"]
    got, sent, counted = _scripted_stream(pieces, chat("variant", stream=True), path=path)
    assert sent["stream_options"] == {"include_usage": True}
    assert got == CHUNK + b"}\n\n" + b"data: [DONE]\n\n", got
    assert counted.get("prompt") == 5 and counted.get("completion") == 2, counted
    assert not counted.get("unknown_requests"), counted


def _leave_after_content(stack, doc):
    """A client that reads a stream until its finish_reason chunk, then
    closes the connection."""
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    body = jbody(doc)
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        got = b""
        while b"finish_reason" not in got:
            more = sock.recv(65536)
            assert more, got
            got += more
    return got


@pytest.mark.parametrize("continuous", [False, True])
def test_a_client_that_leaves_before_the_usage_chunk_is_still_counted(continuous):
    """A client that closes once the content is in, before the usage chunk,
    was not counted at all (review: budgets passed by leaving early). It is
    counted with the usage read so far (vLLM's continuous usage), else as an
    unknown request."""
    usage = b',"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}' if continuous \
        else b',"usage":null'
    final = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
             b'"delta":{},"finish_reason":"stop"}]' + usage + b"}\n\n")
    upstream = ScriptedUpstream([CHUNK + usage + b"}\n\n", final, 2.0, USAGE_CHUNK + b"}\n\n",
                                 b"data: [DONE]\n\n"])
    tmp = TempDir()
    d = tmp.__enter__()
    s = Stack(d, mock=upstream, performance={"cache_size": 0})
    try:
        options = {"include_usage": True, "continuous_usage_stats": True} if continuous else None
        _leave_after_content(s, chat("leaving", stream=True, stream_options=options))
        counted = wait_for_tokens(s)
        if continuous:
            assert counted.get("prompt") == 5 and counted.get("completion") == 2, counted
        else:
            assert counted.get("unknown_requests") == 1, counted
    finally:
        s.stop()
        upstream.stop()
        tmp.__exit__(None, None, None)
