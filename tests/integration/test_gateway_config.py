"""Single-node gateway, configuration: port conflicts, unknown keys and
wrong types, `zonegate config check`, literal-secret warnings, the
bootstrap token of a config with no auth section, auth mode none, and
secrets never reaching the log."""
import json
import os
import signal
import socket
import stat

import pytest

from harness import (CLIENT_TOKEN, UPSTREAM_KEY, Stack, TempDir, base_config, chat_body, echo_of, free_port,
                     mock_stats, raw_chat, request, start_mockllm, start_zonegate, token_sha256, wait_for, write_config,
                     zonegate_run)


@pytest.fixture
def tmp(request):
    t = TempDir()
    path = t.__enter__()
    request.addfinalizer(lambda: t.__exit__(None, None, None))
    return path


@pytest.fixture
def mock(request):
    m = start_mockllm()
    request.addfinalizer(m.stop)
    return m


def test_port_in_use_exits_with_one_clear_line(tmp, mock):
    cfg, port = base_config(tmp, mock.url)
    path = write_config(tmp, cfg)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        out = zonegate_run(["serve", "--config", path])
    assert out.returncode != 0
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if str(port) in l]
    assert len(errors) == 1, out.stderr
    assert "listen.gateway" in errors[0]
    assert "in use" in errors[0]


def test_unknown_key_names_path_and_nearest_key(tmp, mock):
    cfg, _ = base_config(tmp, mock.url, performance={"max_concurent": 5})
    path = write_config(tmp, cfg)
    for args in (["serve", "--config", path], ["config", "check", path]):
        out = zonegate_run(args)
        assert out.returncode == 1, out
        assert "performance.max_concurent" in out.stderr
        assert '"max_concurrent"' in out.stderr
        assert path in out.stderr


def test_wrong_type_names_path_expected_and_found(tmp, mock):
    cfg, _ = base_config(tmp, mock.url, performance={"max_concurrent": "many"})
    path = write_config(tmp, cfg)
    out = zonegate_run(["serve", "--config", path])
    assert out.returncode == 1
    err = out.stderr
    assert "performance.max_concurrent" in err
    assert "expected a number" in err
    assert '"many" (a string)' in err


def test_config_check_masks_literal_secrets(tmp, mock):
    literal = "sk-literal-provider-secret-9d8c"
    cfg, _ = base_config(tmp, mock.url, api_key=literal,
                         fallback_endpoints=[{"endpoint": mock.url, "api_key": "sk-literal-fallback-5e6f"}])
    cfg["security"] = {"admin_token": "literal-admin-token-0123456789"}
    path = write_config(tmp, cfg)
    out = zonegate_run(["config", "check", path])
    assert out.returncode == 0, out.stderr
    assert literal not in out.stdout + out.stderr
    assert "sk-literal-fallback-5e6f" not in out.stdout + out.stderr
    assert "literal-admin-token-0123456789" not in out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["api_key"] == "****"
    assert doc["fallback_endpoints"][0]["api_key"] == "****"
    assert doc["security"]["admin_token"] == "****"
    # defaults are filled in: it is the effective config
    assert doc["performance"]["max_concurrent"] == 50
    assert doc["endpoint"] == mock.url
    assert "api_key" in out.stderr and "literal" in out.stderr
    # env: references are shown as they are, not secrets
    cfg["api_key"] = "env:TEST_UPSTREAM_KEY"
    write_config(tmp, cfg)
    out = zonegate_run(["config", "check", path])
    assert json.loads(out.stdout)["api_key"] == "env:TEST_UPSTREAM_KEY"


def test_literal_secret_warns_at_startup_and_is_never_logged(tmp, mock):
    literal = "sk-guide-literal-key-4242"
    cfg, port = base_config(tmp, mock.url, api_key=literal)
    path = write_config(tmp, cfg)
    gw = start_zonegate(path, port)
    try:
        status, _, payload = request(port, "POST", "/v1/chat/completions", body=chat_body("x"),
                                     headers={"X-Mock-Echo": "1"})
        assert status == 200
        assert echo_of(payload)["headers"]["authorization"] == f"Bearer {literal}"
        warnings = [l for l in gw.log_lines() if l.get("event") == "config_warning" and "api_key" in l.get("msg", "")]
        assert warnings and "literal" in warnings[0]["msg"]
    finally:
        gw.signal(signal.SIGTERM)
        gw.wait(10)
        gw.stop()
    assert literal not in gw.output()


GUIDE_TEMPLATE = {"api_key": "", "endpoint": "",
                  "performance": {"max_concurrent": 50, "request_timeout": 30000, "cache_size": "1GB"},
                  "model": {"temperature": 0.7, "top_p": 0.95}}


def test_bootstrap_token_for_config_without_auth(tmp, mock):
    cfg = json.loads(json.dumps(GUIDE_TEMPLATE))
    cfg["endpoint"] = mock.url
    cfg["api_key"] = "env:TEST_UPSTREAM_KEY"
    port = free_port()
    # Only what a test needs to run beside others: loopback ports and a temp data dir.
    cfg["listen"] = {"gateway": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
                     "raft": f"127.0.0.1:{free_port()}"}
    data_dir = os.path.join(tmp, "data")
    cfg["cluster"] = {"data_dir": data_dir}
    path = write_config(tmp, cfg)
    gw = start_zonegate(path, port)
    try:
        token_path = os.path.join(data_dir, "bootstrap-token")
        assert os.path.exists(token_path)
        assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
        token = open(token_path).read().strip()
        assert len(token) >= 20
        log = gw.output()
        assert token_path in log
        assert token not in log
        assert request(port, "POST", "/v1/chat/completions", body=chat_body("x"))[0] == 401
        status, _, payload = request(port, "POST", "/v1/chat/completions", body=chat_body("boot"),
                                     headers={"Authorization": f"Bearer {token}", "X-Mock-Echo": "1"})
        assert status == 200, payload
        echo = echo_of(payload)
        assert token not in json.dumps(echo)
        assert echo["body"]["temperature"] == pytest.approx(0.7)
        gw.signal(signal.SIGTERM)
        assert gw.wait(10) == 0
    finally:
        gw.stop()
    # A restart keeps the same token.
    gw = start_zonegate(path, port)
    try:
        assert open(token_path).read().strip() == token
        assert request(port, "POST", "/v1/chat/completions", body=chat_body("x"),
                       headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        gw.stop()
    assert token not in gw.output()


def test_auth_mode_none_turns_auth_off(tmp, mock):
    cfg, port = base_config(tmp, mock.url, auth={"mode": "none"})
    path = write_config(tmp, cfg)
    gw = start_zonegate(path, port)
    try:
        assert request(port, "POST", "/v1/chat/completions", body=chat_body("open"))[0] == 200
        assert not os.path.exists(os.path.join(tmp, "data", "bootstrap-token"))
        assert any(l.get("event") == "config_warning" and "auth.mode" in l.get("msg", "") for l in gw.log_lines())
    finally:
        gw.stop()


def test_secrets_never_in_logs(tmp, mock):
    cfg, port = base_config(tmp, mock.url,
                            auth={"mode": "token", "tokens": [{"name": "tests", "sha256": token_sha256(CLIENT_TOKEN)}]},
                            logging={"level": "debug"}, performance={"first_byte_timeout": 300})
    path = write_config(tmp, cfg)
    gw = start_zonegate(path, port)
    auth = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    try:
        chat = lambda body, h: request(port, "POST", "/v1/chat/completions", body=body, headers={**auth, **h})
        assert chat(chat_body("a"), {})[0] == 200
        assert chat(chat_body("b", stream=True), {})[0] == 200
        assert chat(chat_body("c"), {"X-Mock-Status": "401"})[0] >= 400
        assert chat(chat_body("d"), {"X-Mock-Status": "500"})[0] == 500
        assert chat(chat_body("e"), {"X-Mock-Latency-Ms": "1000"})[0] == 504
        assert raw_chat(port, chat_body("f", stream=True), headers={**auth, "X-Mock-Disconnect-After": "1"})[0] == 200
        assert request(port, "POST", "/v1/chat/completions", body="{bad",
                       headers={"Authorization": f"Bearer {CLIENT_TOKEN}x"})[0] == 401
        assert request(port, "GET", "/v1/models", headers=auth)[0] == 200
        assert mock_stats(mock)["last_auth"] == f"Bearer {UPSTREAM_KEY}"
        gw.signal(signal.SIGHUP)
        wait_for(lambda: any(l.get("event") == "config_reloaded" for l in gw.log_lines()), timeout=5,
                 what="reload")
        gw.signal(signal.SIGTERM)
        assert gw.wait(10) == 0
    finally:
        gw.stop()
    log = gw.output()
    assert any(l.get("event") == "access" for l in gw.log_lines())
    for secret in (UPSTREAM_KEY, CLIENT_TOKEN):
        offending = [l for l in log.splitlines() if secret in l]
        assert not offending, offending


def test_readme_config_reference_matches_the_schema():
    """The README's key table is `zonegate config reference`: it cannot drift."""
    import subprocess
    from harness import ZONEGATE_BIN
    out = subprocess.run([ZONEGATE_BIN, "config", "reference"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    assert out.stdout.strip() in readme, "README.md config reference is stale: paste `zonegate config reference`"


def test_duplicate_keys_are_refused_naming_the_path():
    """A key written twice means two things (the parser would keep the
    first): refused anywhere in the file, with its JSON path."""
    import subprocess
    from harness import ZONEGATE_BIN
    with TempDir() as d:
        for text, path in (('{"node":{"id":"a","id":"b"},"auth":{"mode":"none"}}', "node.id"),
                           ('{"auth":{"mode":"none"},"alerts":{"channels":[{"type":"webhook",'
                            '"url":"http://x","url":"env:HOME"}]}}', "alerts.channels[0].url"),
                           ('{"api_key":"env:A","api_key":"env:B","auth":{"mode":"none"}}', "api_key")):
            p = os.path.join(d, "dup.json")
            with open(p, "w") as f:
                f.write(text)
            out = subprocess.run([ZONEGATE_BIN, "config", "check", p], capture_output=True, text=True,
                                 timeout=10)
            assert out.returncode != 0, text
            assert f"{path}: expected each key once" in out.stderr, out.stderr
