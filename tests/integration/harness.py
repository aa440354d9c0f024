"""Process harness for integration tests: starts real zonegate and mockllm
processes on free loopback ports, waits for them with bounded polls, and
stops them with real signals. Every wait is bounded; nothing sleeps
unbounded."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import http.client

ZONEGATE_BIN = os.environ.get("ZONEGATE_BIN", os.path.join(os.path.dirname(__file__), "../../build/zonegate"))
MOCKLLM_BIN = os.environ.get("MOCKLLM_BIN", os.path.join(os.path.dirname(__file__), "../../build/tests/mockllm"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Proc:
    def __init__(self, args, env=None, name="proc"):
        self.name = name
        self.log_path = tempfile.mktemp(prefix=f"zg-{name}-", suffix=".log")
        self.log = open(self.log_path, "wb")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_lines(self):
        out = []
        for line in self.output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def signal(self, sig):
        self.p.send_signal(sig)

    def wait(self, timeout=15):
        return self.p.wait(timeout=timeout)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()


def start_mockllm(*extra):
    port = free_port()
    proc = Proc([MOCKLLM_BIN, "--listen", f"127.0.0.1:{port}", *extra], name="mockllm")
    wait_for(lambda: "listening" in proc.output(), what="mockllm to listen")
    proc.port = port
    proc.url = f"http://127.0.0.1:{port}"
    return proc


def write_config(directory, cfg):
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def base_config(tmpdir, upstream_url, **overrides):
    port = free_port()
    cfg = {
        "node": {"id": "gw-a", "zone": "A"},
        "listen": {"gateway": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
                   "raft": f"127.0.0.1:{free_port()}"},
        "cluster": {"data_dir": os.path.join(tmpdir, "data")},
        "endpoint": upstream_url,
        "api_key": "env:TEST_UPSTREAM_KEY",
        "auth": {"mode": "none"},
    }
    for k, v in overrides.items():
        cfg[k] = v
    return cfg, port


def start_zonegate(config_path, port, env_extra=None, expect_ready=True):
    env = dict(os.environ)
    env.setdefault("TEST_UPSTREAM_KEY", "sk-test-upstream-key-0001")
    if env_extra:
        env.update(env_extra)
    proc = Proc([ZONEGATE_BIN, "serve", "--config", config_path], env=env, name="zonegate")
    proc.port = port
    if expect_ready:
        wait_for(lambda: request(port, "GET", "/health/live")[0] == 200, what="zonegate /health/live")
    return proc


def request(port, method, path, body=None, headers=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, dict(resp.getheaders()), payload
    finally:
        conn.close()


def chat_body(content="hello", **extra):
    body = {"model": "mock-model", "messages": [{"role": "user", "content": content}]}
    body.update(extra)
    return body


class TempDir:
    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="zg-test-")
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)
