"""Model routing (the replicated `models` table): client-visible names and
aliases go to their own upstream endpoints, with the upstream's model name
written into the body (nothing else changes), per-model fallbacks, an
unknown model is a 404 naming the known ones, /v1/models answers from the
table, and a table that holds a secret is refused naming the path."""
import json
import os
import subprocess

import pytest

from harness import (ZONEGATE_BIN, Stack, TempDir, error_of, mock_stats, request, start_mockllm,
                     write_config)

KEY = "sk-test-upstream-key-0001"


@pytest.fixture(scope="module")
def two():
    a = start_mockllm("--require-key", KEY, "--model", "upstream-a-default")
    b = start_mockllm("--require-key", KEY)
    with TempDir() as d:
        models = [
            {"name": "gpt-a", "endpoints": [{"endpoint": a.url, "model": "upstream-a"}]},
            {"name": "gpt-b", "aliases": ["default"],
             "endpoints": [{"endpoint": "http://127.0.0.1:9/v1"}, {"endpoint": b.url + "/v1"}]},
        ]
        s = Stack(d, mock=a, models=models, performance={"connect_timeout": 500})
        s.a, s.b = a, b
        try:
            yield s
        finally:
            s.stop()
            a.stop()
            b.stop()


def sent_body(mock):
    status, _, payload = request(mock.port, "GET", "/mock/requests")
    assert status == 200
    import base64
    return json.loads(base64.b64decode(json.loads(payload)["requests"][-1]["body_b64"]))


def chat(s, model, extra=""):
    body = '{"model":"%s","seed":9007199254740993,"messages":[{"role":"user","content":"hi"}]%s}' % (
        model, extra)
    return request(s.port, "POST", "/v1/chat/completions", body)


def test_each_model_goes_to_its_upstream_with_its_upstream_name(two):
    s = two
    before_a = mock_stats(s.a)["by_route"]["chat_completions"]
    before_b = mock_stats(s.b)["by_route"]["chat_completions"]
    st, _, payload = chat(s, "gpt-a")
    assert st == 200, payload
    assert mock_stats(s.a)["by_route"]["chat_completions"] == before_a + 1
    raw = request(s.a.port, "GET", "/mock/requests")[2]
    import base64
    last = json.loads(raw)["requests"][-1]
    body = base64.b64decode(last["body_b64"]).decode()
    # the model value is the upstream's; every other byte is the client's
    assert body == '{"model":"upstream-a","seed":9007199254740993,"messages":[{"role":"user","content":"hi"}]}'
    st, _, payload = chat(s, "default")  # an alias of gpt-b; its first endpoint is down
    assert st == 200, payload
    assert mock_stats(s.b)["by_route"]["chat_completions"] == before_b + 1
    assert sent_body(s.b)["model"] == "default"  # no upstream name set: the client's


def test_unknown_model_is_404_naming_the_known_ones(two):
    st, _, payload = chat(two, "gpt-z")
    assert st == 404
    err = error_of(payload)
    assert err["code"] == "model_not_found"
    assert "gpt-a" in err["message"] and "gpt-b" in err["message"] and "gpt-z" in err["message"]


def test_models_list_answers_from_the_table(two):
    st, _, payload = request(two.port, "GET", "/v1/models")
    assert st == 200, payload
    ids = [m["id"] for m in json.loads(payload)["data"]]
    assert ids == ["gpt-a", "gpt-b", "default"]
    st, _, payload = request(two.port, "GET", "/v1/models/gpt-b")
    assert st == 200 and json.loads(payload)["id"] == "gpt-b"
    st, _, payload = request(two.port, "GET", "/v1/models/nope")
    assert st == 404 and error_of(payload)["code"] == "model_not_found"


@pytest.mark.parametrize("models,path", [
    ([{"name": "m", "endpoints": [{"endpoint": "https://x.example", "api_key": "sk-1"}]}],
     "models[0].endpoints[0].api_key"),
    ([{"name": "m", "endpoints": [{"endpoint": "https://x.example", "keys": ["env:HOME"]}]}],
     "models[0].endpoints[0].keys"),
    ([{"name": "m", "endpoints": []}], "models[0].endpoints"),
    ([{"name": "m", "endpoints": [{"endpoint": "ftp://x"}]}], "models[0].endpoints[0].endpoint"),
    ([{"name": "m", "endpoints": [{"endpoint": "https://x"}]},
      {"name": "n", "aliases": ["m"], "endpoints": [{"endpoint": "https://x"}]}], "models[1]"),
])
def test_bad_table_refused_naming_the_path(models, path):
    with TempDir() as d:
        cfg = {"node": {"id": "gw-a"}, "endpoint": "https://api.example.com", "models": models,
               "auth": {"mode": "none"}}
        p = write_config(d, cfg)
        out = subprocess.run([ZONEGATE_BIN, "config", "check", p], capture_output=True, text=True,
                             timeout=10)
        assert out.returncode != 0
        assert path in out.stderr, out.stderr


def test_cluster_routes_with_key_ids_and_skips_a_bad_key():
    """In a cluster: a model's endpoint lists key ids from the sealed store;
    a revoked key is skipped, a key the upstream refuses is retired once and
    the next one serves; the table changes live with config apply."""
    from cluster import SECRETS, Cluster
    with TempDir() as d:
        c = Cluster(d, mock_args=("--require-key", SECRETS["UPSTREAM_API_KEY"]))
        try:
            c.start()
            active = c.active()
            good = SECRETS["UPSTREAM_API_KEY"]
            for kid, secret in (("key-bad", "sk-wrong-000000000000"), ("key-good", good),
                                ("key-revoked", good)):
                st, k = active.admin_call("POST", "/v1/keys", {"id": kid, "secret": secret})
                assert st == 200, k
            st, _ = active.admin_call("DELETE", "/v1/keys/key-revoked")
            assert st == 200
            st, doc = active.admin_call("GET", "/v1/config")
            assert st == 200, doc
            cfg = doc.get("config", doc)
            cfg["models"] = [{"name": "routed", "endpoints": [
                {"endpoint": c.mock.url, "keys": ["key-revoked", "key-bad", "key-good"],
                 "model": "upstream-name"}]}]
            st, ans = active.admin_call("PUT", "/v1/config", {"config": cfg} if "config" in doc else cfg)
            assert st == 200, ans
            st, tok = active.admin_call("POST", "/v1/tokens", {"name": "router"})
            token = tok["token"]
            hdr = {"Authorization": f"Bearer {token}"}
            body = {"model": "routed", "messages": [{"role": "user", "content": "x"}]}
            from harness import wait_for
            wait_for(lambda: request(c.active().gateway_port, "POST", "/v1/chat/completions", body,
                                     hdr)[0] == 200, timeout=10, what="routed model served")
            # The retirement is a replicated write the active makes after the
            # probe: it may land a moment after the answer.
            def states():
                st, keys = c.active().admin_call("GET", "/v1/keys")
                return {k["id"]: k["state"] for k in keys["keys"]}
            wait_for(lambda: states()["key-bad"] == "invalid", timeout=5, interval=0.05,
                     what="key-bad retired")
            assert states()["key-good"] == "active", states()
            st, _, payload = request(c.active().gateway_port, "POST", "/v1/chat/completions",
                                     {"model": "gpt-unknown", "messages": [{"role": "user", "content": "x"}]}, hdr)
            assert st == 404 and "routed" in error_of(payload)["message"]
        finally:
            c.stop()
