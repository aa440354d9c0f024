"""The operations guide's single-container flow (GUIDE.md §3), run against
the real image: the bare template filled with the guide's sed commands,
mounted at /app/config.json, one container published on a loopback port.
The model API is a mockllm container on a user-defined network.

What a user checks: `docker ps` shows it, the POST /health system check
answers, the logs say where the bootstrap token is (never the token or the
key), chat works with the token, the Docker health check turns healthy,
state survives a restart and `docker stop` ends it cleanly.
"""
import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import REPO_ROOT, docker, free_loopback_port, http, wait_until

TEMPLATE = os.path.join(REPO_ROOT, "deploy", "examples", "guide-config_template.json")


@pytest.fixture(scope="module")
def guide_bot(image, tmp_path_factory):
    prefix = "zge2e-" + uuid.uuid4().hex[:8]
    workdir = tmp_path_factory.mktemp("guide")
    config = workdir / "config_template.json"
    shutil.copy(TEMPLATE, config)
    # §3.1, word for word for the key; the endpoint points at the mock (the
    # guide's own endpoint line cannot work as written: see deploy/README.md).
    subprocess.run(["sed", "-i", 's/"api_key": ""/"api_key": "YOUR_KEY"/g', str(config)], check=True)
    subprocess.run(["sed", "-i", f's|"endpoint": ""|"endpoint": "http://{prefix}-mock:8080"|g', str(config)],
                   check=True)
    config.chmod(0o644)
    port = free_loopback_port()
    net = f"{prefix}-net"
    try:
        docker("network", "create", net)
        docker("run", "-d", "--name", f"{prefix}-mock", "--network", net, "--entrypoint", "mockllm", image,
               "--listen", "0.0.0.0:8080")
        docker("run", "-d", "--name", f"{prefix}-ai-bot", "--network", net, "-p", f"127.0.0.1:{port}:18789",
               "-v", f"{config}:/app/config.json", image)
        yield {"prefix": prefix, "name": f"{prefix}-ai-bot", "base": f"http://127.0.0.1:{port}",
               "config": config}
    finally:
        for name in (f"{prefix}-ai-bot", f"{prefix}-mock"):
            docker("rm", "-f", "-v", name, check=False)
        docker("network", "rm", net, check=False)


def system_check(base):
    status, headers, body = http("POST", base + "/health", {"check": "system"})
    return (status, body) if status == 200 else None


def bootstrap_token(bot):
    return docker("exec", bot["name"], "cat", "/var/lib/zonegate/bootstrap-token").stdout.strip()


def test_template_filled_by_guide_sed(guide_bot):
    doc = json.loads(guide_bot["config"].read_text())
    assert doc["api_key"] == "YOUR_KEY"
    assert doc["endpoint"].startswith("http://")
    assert doc["performance"] == {"max_concurrent": 50, "request_timeout": 30000, "cache_size": "1GB"}


def test_docker_ps_lists_the_container(guide_bot):
    ps = docker("ps", "--filter", f"name={guide_bot['name']}", "--format", "{{.Names}} {{.Status}}").stdout
    assert guide_bot["name"] in ps and " Up " in f" {ps}", ps


def test_system_health_check_answers_active(guide_bot):
    status, body = wait_until(lambda: system_check(guide_bot["base"]), timeout=20, what="POST /health 200")
    doc = json.loads(body)
    assert doc["role"] == "active"
    assert doc["status"] == "ok"
    for field in ("node", "zone", "leader", "term", "commit_index", "applied_index"):
        assert field in doc, field


def test_logs_name_the_token_file_but_no_secret(guide_bot):
    wait_until(lambda: system_check(guide_bot["base"]), timeout=20, what="node up")
    logs = docker("logs", guide_bot["name"])
    text = logs.stdout + logs.stderr
    assert "/var/lib/zonegate/bootstrap-token" in text
    assert "YOUR_KEY" not in text
    assert bootstrap_token(guide_bot) not in text
    for line in text.splitlines():  # every log line is a JSON object
        json.loads(line)


def test_client_api_needs_the_bootstrap_token(guide_bot):
    wait_until(lambda: system_check(guide_bot["base"]), timeout=20, what="node up")
    status, _, body = http("GET", guide_bot["base"] + "/v1/models")
    assert status == 401
    assert "error" in json.loads(body)
    token = bootstrap_token(guide_bot)
    status, _, body = http("GET", guide_bot["base"] + "/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert status == 200, body
    assert json.loads(body)["object"] == "list"


def test_chat_completion_through_the_container(guide_bot):
    wait_until(lambda: system_check(guide_bot["base"]), timeout=20, what="node up")
    token = bootstrap_token(guide_bot)
    request = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hello"}]}
    status, _, body = http("POST", guide_bot["base"] + "/v1/chat/completions", request,
                           headers={"Authorization": f"Bearer {token}"}, timeout=15)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"]


def test_streamed_chat_completion_through_the_container(guide_bot):
    wait_until(lambda: system_check(guide_bot["base"]), timeout=20, what="node up")
    token = bootstrap_token(guide_bot)
    request = {"model": "mock-gpt", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    status, headers, body = http("POST", guide_bot["base"] + "/v1/chat/completions", request,
                                 headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert status == 200, body
    assert headers.get("Content-Type", "").startswith("text/event-stream")
    events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
    assert len(events) >= 2 and events[-1] == "data: [DONE]"


def test_docker_healthcheck_turns_healthy(guide_bot):
    # HEALTHCHECK interval is 10 s: the first result arrives after ~10 s.
    def health():
        state = docker("inspect", "-f", "{{.State.Health.Status}}", guide_bot["name"]).stdout.strip()
        return state if state == "healthy" else None
    wait_until(health, timeout=45, interval=1, what="docker health status healthy")


def test_runs_as_non_root(guide_bot):
    assert docker("exec", guide_bot["name"], "id", "-u").stdout.strip() != "0"


def test_restart_keeps_state_and_stop_is_clean(guide_bot):
    wait_until(lambda: system_check(guide_bot["base"]), timeout=20, what="node up")
    token_before = bootstrap_token(guide_bot)
    started = time.monotonic()
    docker("stop", "-t", "45", guide_bot["name"])
    assert time.monotonic() - started < 10, "an idle node should drain and exit at once on SIGTERM"
    assert docker("inspect", "-f", "{{.State.ExitCode}}", guide_bot["name"]).stdout.strip() == "0"
    docker("start", guide_bot["name"])
    wait_until(lambda: system_check(guide_bot["base"]), timeout=20, what="node back after restart")
    assert bootstrap_token(guide_bot) == token_before
