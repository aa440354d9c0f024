"""The official openai SDK, unchanged, through a zonegate node with token auth:
every OpenAI endpoint the gateway proxies (chat, completions, responses,
embeddings, moderations, models, audio transcriptions, files), streaming and
not. mockllm (requiring the provider key) is the upstream; each answer's
content is asserted, and where it helps, compared with the same call made
straight to mockllm."""
import base64
import struct

import pytest

from harness import CLIENT_TOKEN, UPSTREAM_KEY, Stack, TempDir, start_mockllm, token_sha256

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def stack():
    mock = start_mockllm("--require-key", UPSTREAM_KEY)
    tmp = TempDir()
    path = tmp.__enter__()
    s = Stack(path, mock=mock, auth={"mode": "token", "tokens": [{"name": "sdk", "sha256": token_sha256(CLIENT_TOKEN)}]},
              performance={"request_timeout": 15000})
    yield s
    s.stop()
    mock.stop()
    tmp.__exit__(None, None, None)


@pytest.fixture(scope="module", params=["zonegate", "direct"])
def client(stack, request):
    """Each test runs through zonegate, and straight against mockllm with the provider
    key (which shows the test itself is right: the direct run always passes)."""
    if request.param == "direct":
        return openai.OpenAI(base_url=f"{stack.mock.url}/v1", api_key=UPSTREAM_KEY, max_retries=0, timeout=15)
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=CLIENT_TOKEN, max_retries=0,
                         timeout=15)


@pytest.fixture(scope="module")
def direct(stack):
    """The same SDK straight to mockllm with the provider key: the reference."""
    return openai.OpenAI(base_url=f"{stack.mock.url}/v1", api_key=UPSTREAM_KEY, max_retries=0, timeout=15)


def test_chat(client):
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "sdk chat"}])
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content == "mock reply to: sdk chat"
    assert resp.usage.total_tokens > 0


def test_chat_stream(client):
    parts, usage = [], None
    for chunk in client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "sdk stream"}]):
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == "mock reply to: sdk stream"
    assert len(parts) > 1 and usage and usage.total_tokens > 0


def test_completions(client):
    resp = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this")
    assert resp.object == "text_completion"
    assert resp.choices[0].text == "mock completion for: Say this"
    texts = [c.choices[0].text for c in client.completions.create(model="gpt-3.5-turbo-instruct",
                                                                    prompt="streamed", stream=True) if c.choices]
    assert "".join(texts) == "mock completion for: streamed" and len(texts) > 1


def test_embeddings(client, direct):
    # The SDK asks for base64 by default and decodes it: the floats must match the
    # floats mockllm gives for the same input straight.
    got = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    want = direct.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"],
                                    encoding_format="float")
    assert [d.embedding for d in got.data] == [d.embedding for d in want.data]
    assert len(got.data) == 2 and len(got.data[0].embedding) == 8
    as_float = client.embeddings.create(model="text-embedding-3-small", input="alpha", encoding_format="float",
                                        dimensions=16)
    assert len(as_float.data[0].embedding) == 16
    assert as_float.data[0].embedding[:8] == want.data[0].embedding[:8]


def test_embeddings_base64_raw(client):
    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="alpha",
                                                     encoding_format="base64")
    data = raw.http_response.json()["data"][0]["embedding"]
    floats = struct.unpack("<8f", base64.b64decode(data))
    assert all(-1 <= f < 1 and f * 128 == int(f * 128) for f in floats)


def test_moderations(client):
    resp = client.moderations.create(model="omni-moderation-latest", input=["a calm sentence", "mock-flag this"])
    assert [r.flagged for r in resp.results] == [False, True]
    assert resp.results[1].categories.violence is True
    assert resp.results[0].categories.violence is False


def test_responses(client):
    resp = client.responses.create(model="gpt-4o-mini", input="sdk responses")
    assert resp.object == "response" and resp.status == "completed"
    assert resp.output_text == "mock reply to: sdk responses"
    assert resp.usage.total_tokens > 0


def test_responses_stream_typed_events(client):
    events = list(client.responses.create(model="gpt-4o-mini", input="typed events", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == "mock reply to: typed events"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "mock reply to: typed events"
    # The SDK's stream helper (which tracks state across events) works too.
    with client.responses.stream(model="gpt-4o-mini", input="helper") as stream:
        final = stream.get_final_response()
    assert final.output_text == "mock reply to: helper"


def test_models(client):
    listed = [m.id for m in client.models.list()]
    assert "mock-gpt" in listed
    model = client.models.retrieve("gpt-4o-mini")
    assert model.id == "gpt-4o-mini" and model.object == "model"


def test_audio_transcription(client):
    audio = b"RIFF\x00\x00\x00\x00WAVE" + bytes(range(256)) * 4 + b"\r\n--x\r\n"
    resp = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio, "audio/wav"))
    assert resp.text == f"received {len(audio)} bytes"


def test_files_create_and_retrieve(client):
    content = b'{"prompt":"p","completion":"c"}\n' * 100 + b"\x00\xff"
    created = client.files.create(file=("train.jsonl", content, "application/jsonl"), purpose="fine-tune")
    assert created.object == "file" and created.bytes == len(content)
    assert created.filename == "train.jsonl" and created.purpose == "fine-tune"
    again = client.files.retrieve(created.id)
    assert again.id == created.id and again.bytes == len(content)


def test_every_endpoint_needs_the_client_token(stack):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key="not-a-token", max_retries=0,
                        timeout=15)
    calls = [lambda: bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]),
             lambda: bad.embeddings.create(model="m", input="x"),
             lambda: bad.responses.create(model="m", input="x"),
             lambda: bad.completions.create(model="m", prompt="x"),
             lambda: bad.moderations.create(input="x"),
             lambda: bad.models.retrieve("m"),
             lambda: bad.files.create(file=("f.txt", b"x", "text/plain"), purpose="assistants")]
    for call in calls:
        with pytest.raises(openai.AuthenticationError):
            call()
