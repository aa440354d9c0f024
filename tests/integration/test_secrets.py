"""Secrets never reach logs, metrics, health answers, admin API answers or
plaintext on disk. A cluster runs a realistic session (tokens, provider
keys added by API and CLI, a rotation, chat traffic, config changes),
then every log line, every file under every data dir and every API answer
is searched for every secret string used; none may appear."""
import base64
import json
import os

import pytest

from cluster import SECRETS, Cluster
from harness import TempDir, chat_body, request, wait_for


def test_no_secret_in_logs_files_or_answers():
    with TempDir() as d:
        c = Cluster(d, snapshot_threshold=32)
        try:
            c.start()
            active = c.active()
            standby = next(n for n in c.nodes if n.role == "gateway" and n is not active)
            provider_a = "sk-provider-A-" + base64.b16encode(os.urandom(6)).decode()
            provider_b = "sk-provider-B-" + base64.b16encode(os.urandom(6)).decode()
            status, key = standby.admin_call("POST", "/v1/keys", {"secret": provider_a})
            assert status == 200, key
            assert provider_a not in json.dumps(key)
            standby.cli("keys", "rotate", key["id"], input_text=provider_b + "\n")
            status, tok = standby.admin_call("POST", "/v1/tokens", {"name": "secret-test"})
            client_token = tok["token"]
            answers = []
            for i in range(60):  # enough entries for snapshots on every node
                s, _, body = request(active.gateway_port, "POST", "/v1/chat/completions",
                                     chat_body(f"m{i}", stream=(i % 2 == 0)),
                                     {"Authorization": f"Bearer {client_token}"})
                assert s == 200
            s, _, body = request(active.gateway_port, "POST", "/v1/chat/completions", chat_body("x"),
                                 {"Authorization": "Bearer wrong-token-value-123"})
            assert s == 401
            for i in range(40):
                standby.admin_call("POST", "/v1/tokens", {"name": f"filler{i}"})
            c.wait_caught_up()
            for n in c.nodes:
                for path in ("/v1/cluster/status", "/v1/config", "/v1/keys", "/v1/tokens", "/v1/audit?limit=0"):
                    answers.append(json.dumps(n.admin_call("GET", path)[1]))
                for path in ("/health", "/health/active", "/health/standby", "/health/ready"):
                    answers.append(request(n.gateway_port, "GET", path)[2].decode("utf-8", "replace"))
                # /metrics is on the admin port (no token needed there).
                answers.append(request(n.admin_port, "GET", "/metrics")[2].decode("utf-8", "replace"))
                answers.append(n.cli("status", "--json").stdout)
                answers.append(n.cli("keys", "list").stdout)
                answers.append(n.cli("config", "get").stdout)
            logs = c.all_logs()
            files = []
            for n in c.nodes:
                for root, _, names in os.walk(n.data_dir):
                    for name in names:
                        with open(os.path.join(root, name), "rb") as f:
                            files.append((os.path.join(root, name), f.read()))
            assert len(files) >= 6
            secrets = dict(SECRETS)
            secrets.update({"provider_a": provider_a, "provider_b": provider_b, "client_token": client_token})
            master_raw = base64.b64decode(SECRETS["ZONEGATE_MASTER_KEY"])
            for name, value in secrets.items():
                assert value not in logs, f"{name} found in a log"
                for text in answers:
                    assert value not in text, f"{name} found in an API answer"
                for path, data in files:
                    assert value.encode() not in data, f"{name} found in {path}"
            for path, data in files:
                assert master_raw not in data, f"raw master key bytes in {path}"
            # The searches can find: the upstream did see the rotated provider key.
            s, _, body = request(c.mock.port, "GET", "/mock/stats")
            assert provider_b in body.decode()
        finally:
            c.stop()
