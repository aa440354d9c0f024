"""The repository's docker-compose.yml as an operator runs it: gw-a (zone A),
gw-b (zone B), the witness (zone C), mockllm and HAProxy with
deploy/haproxy.cfg, plus the opt-in `ops` profile (admin and per-node ports
on 127.0.0.1) that these tests use to watch each node. Clients use the
official `openai` Python SDK through the LB only.

What an operator checks: one active in the preferred zone, chat and
streaming through the LB; only the LB's port is published; killing gw-a's
container has gw-b serving within 3 s and gw-a, started again, rejoins,
catches up and takes the active role back (`failback: auto`) with no failed
request; cutting the active's zone off (deploy/drill.sh partition-zone A)
never shows two actives and loses no acknowledged write; `down` then `up`
keeps tokens, provider keys and config.

Each run uses its own compose project name, random secrets, random loopback
ports and a copy of deploy/compose/*.json with `failback_after: 5` (instead
of 60) so the failback is seen quickly; everything is removed at the end
(`down -v`). The measured figures are printed (`pytest -s` shows them) and
written to <tmp>/cluster0/figures.json; container logs to compose.log there.
"""
import base64
import json
import os
import secrets
import subprocess
import threading
import time
import uuid

import pytest

from conftest import REPO_ROOT, compose_command, docker, http, wait_until

openai = pytest.importorskip("openai")

GATEWAYS = ("gw-a", "gw-b")
NODES = ("gw-a", "gw-b", "witness")
OPS_PORTS = {"admin": 18790, "gw-a": 18811, "gw-b": 18812, "witness": 18813}
FIGURES = {}


def note_figure(name, value):
    FIGURES[name] = value
    print(f"\n[e2e figure] {name}: {value}")


class Stack:
    def __init__(self, project, env, workdir):
        self.project = project
        self.env = env
        self.workdir = workdir
        self.compose_argv = compose_command()
        self._ports = {}
        self.token = None

    def compose(self, *args, check=True, timeout=300, input_text=None):
        proc = subprocess.run([*self.compose_argv, "--profile", "ops", *args], cwd=REPO_ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout, input=input_text)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(self.compose_argv)} {' '.join(args)} failed "
                                 f"({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    def port(self, service, container_port):
        key = (service, container_port)
        if key not in self._ports:
            out = self.compose("port", service, str(container_port)).stdout.strip()
            self._ports[key] = int(out.rsplit(":", 1)[1])
        return self._ports[key]

    def forget_ports(self):
        self._ports.clear()

    @property
    def lb(self):
        return f"http://127.0.0.1:{self.port('lb', 18789)}"

    def node_url(self, node):
        return f"http://127.0.0.1:{self.port('ops', OPS_PORTS[node])}"

    def active_status(self, node):
        return http("GET", self.node_url(node) + "/health/active", timeout=1)[0]

    def health(self, node):
        status, _, body = http("GET", self.node_url(node) + "/health/active", timeout=1)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {}

    def statuses(self):
        return {n: self.active_status(n) for n in NODES}

    def actives(self):
        return [n for n in GATEWAYS if self.active_status(n) == 200]

    def container(self, service):
        return self.compose("ps", "-q", service).stdout.strip()

    def zonegate(self, *args, input_text=None):
        """`zonegate ARGS` inside gw-b's container (admin token from its environment)."""
        return self.compose("exec", "-T", "gw-b", "zonegate", *args, input_text=input_text).stdout

    def client(self, timeout=5.0):
        return openai.OpenAI(base_url=self.lb + "/v1", api_key=self.token, max_retries=0, timeout=timeout)


def chat_once(client, text="ping"):
    """(ok, node that served it or error text)."""
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="mock-gpt", messages=[{"role": "user", "content": text}])
        reply = raw.parse()
        ok = bool(reply.choices and reply.choices[0].message.content)
        return ok, raw.headers.get("x-zonegate-node", "?")
    except openai.OpenAIError as e:
        return False, f"{type(e).__name__}: {e}"[:200]


class DoubleActiveWatch:
    """Samples /health/active of both gateways (ops ports) in a thread."""

    def __init__(self, stack):
        self.stack = stack
        self.samples = 0
        self.double = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        for _ in range(20000):  # bounded; stopped long before
            if self.stop.is_set():
                return
            if len(self.stack.actives()) > 1:
                self.double += 1
            self.samples += 1
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def stack(image, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster")
    configs = workdir / "configs"
    configs.mkdir()
    for node in NODES:
        doc = json.loads(open(os.path.join(REPO_ROOT, "deploy", "compose", f"{node}.json")).read())
        doc["failover"]["failback_after"] = 5
        path = configs / f"{node}.json"
        path.write_text(json.dumps(doc, indent=2))
        path.chmod(0o644)
    project = "zge2e" + uuid.uuid4().hex[:8]
    env = dict(os.environ)
    env.update({
        "COMPOSE_PROJECT_NAME": project,
        "ZONEGATE_IMAGE": image,
        "ZONEGATE_CONFIG_DIR": str(configs),
        "ZONEGATE_CLUSTER_SECRET": secrets.token_urlsafe(24),
        "ZONEGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "ZONEGATE_ADMIN_TOKEN": secrets.token_urlsafe(24),
        "UPSTREAM_API_KEY": "sk-e2e-" + secrets.token_hex(8),
        "UPSTREAM_ENDPOINT": "http://mockllm:8080",
        "ZONEGATE_LB_ADDR": "127.0.0.1", "ZONEGATE_LB_PORT": "",
        "ZONEGATE_OPS_ADDR": "127.0.0.1", "ZONEGATE_OPS_ADMIN_PORT": "", "ZONEGATE_OPS_GW_A_ADMIN_PORT": "",
        "ZONEGATE_OPS_GW_B_ADMIN_PORT": "", "ZONEGATE_OPS_WITNESS_ADMIN_PORT": "", "ZONEGATE_OPS_GW_A_PORT": "",
        "ZONEGATE_OPS_GW_B_PORT": "", "ZONEGATE_OPS_WITNESS_PORT": "",
    })
    s = Stack(project, env, workdir)
    try:
        started = time.monotonic()
        s.compose("up", "-d", timeout=900)
        wait_until(lambda: s.active_status("gw-a") == 200 and s.active_status("gw-b") == 429, timeout=60,
                   what="gw-a active (preferred zone A) and gw-b standby", describe=s.statuses)
        note_figure("compose up to gw-a active (s)", round(time.monotonic() - started, 1))
        created = json.loads(s.zonegate("tokens", "create", "e2e-app", "--json"))
        s.token = created["token"]
        yield s
    finally:
        logs = s.compose("logs", "--no-color", "--tail", "300", check=False).stdout
        (workdir / "compose.log").write_text(logs)
        (workdir / "figures.json").write_text(json.dumps(FIGURES, indent=2))
        s.compose("down", "-v", "--remove-orphans", "-t", "10", check=False)


def test_one_active_in_zone_a_and_chat_through_the_lb(stack):
    assert stack.active_status("gw-a") == 200
    assert stack.active_status("gw-b") == 429, "a healthy standby answers 429"
    assert stack.active_status("witness") != 200, "the witness is never active"
    client = stack.client(timeout=15)
    ok, served_by = wait_until(lambda: (lambda r: r if r[0] else None)(chat_once(client, "hello zones")),
                               timeout=15, what="chat through the LB")
    assert served_by == "gw-a"
    reply = client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content
    stream = client.chat.completions.create(model="mock-gpt", stream=True,
                                            messages=[{"role": "user", "content": "stream me please"}])
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, pieces
    assert "stream me please" in "".join(pieces)
    bad = openai.OpenAI(base_url=stack.lb + "/v1", api_key="zg-not-a-token", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "x"}])


def test_only_the_lb_port_is_published_and_no_secret_in_the_image(stack):
    for service in ("gw-a", "gw-b", "witness", "mockllm"):
        ports = docker("inspect", "-f", "{{json .HostConfig.PortBindings}}", stack.container(service)).stdout
        assert json.loads(ports) in ({}, None), f"{service} publishes {ports}"
    lb_ports = json.loads(docker("inspect", "-f", "{{json .HostConfig.PortBindings}}",
                                 stack.container("lb")).stdout)
    assert list(lb_ports) == ["18789/tcp"]
    image_env = docker("image", "inspect", "-f", "{{json .Config.Env}}", stack.env["ZONEGATE_IMAGE"]).stdout
    for name in ("ZONEGATE_CLUSTER_SECRET", "ZONEGATE_MASTER_KEY", "ZONEGATE_ADMIN_TOKEN", "UPSTREAM_API_KEY"):
        assert name not in image_env
        assert stack.env[name] not in image_env


def test_kill_gw_a_serves_from_gw_b_within_3s_then_failback_with_no_failure(stack):
    wait_until(lambda: stack.actives() == ["gw-a"], timeout=30, what="gw-a active", describe=stack.statuses)
    client = stack.client(timeout=5)
    assert chat_once(client)[0]
    # A client request every 100 ms, each in its own thread (as many clients
    # would), so one request stuck on the dead node does not hide the others.
    probes = []  # (started, ended, ok, node or error)
    lock = threading.Lock()

    def probe():
        t0 = time.monotonic()
        ok, who = chat_once(client)
        with lock:
            probes.append((t0, time.monotonic(), ok, who))

    with DoubleActiveWatch(stack) as watch:
        killed_at = time.monotonic()
        docker("kill", stack.container("gw-a"))
        threads = []
        for _ in range(150):  # bounded: 15 s of probes at most
            t = threading.Thread(target=probe, daemon=True)
            t.start()
            threads.append(t)
            time.sleep(0.1)
            with lock:
                if any(ok and who == "gw-b" for _, _, ok, who in probes):
                    break
        for t in threads:
            t.join(timeout=10)
    served = [end for _, end, ok, who in probes if ok and who == "gw-b"]
    failed = [who for _, _, ok, who in probes if not ok]
    assert served, f"gw-b never served after gw-a was killed: {failed[-3:]}"
    served_after = min(served) - killed_at
    note_figure("kill gw-a: first request served by gw-b after (s)", round(served_after, 2))
    note_figure("kill gw-a: probes failed / sent", f"{len(failed)}/{len(probes)}")
    note_figure("kill gw-a: slowest probe (s)", round(max(end - start for start, end, _, _ in probes), 2))
    assert served_after < 3.0, f"gw-b served only after {served_after:.2f}s"
    assert watch.double == 0, f"{watch.double} of {watch.samples} samples showed two actives"
    assert stack.actives() == ["gw-b"]

    # Start gw-a again while a client keeps sending: it rejoins as a caught-up
    # standby, then failback (failback_after 5 s) moves the active role back
    # by a planned switchover, and no request fails.
    results = []
    stop = threading.Event()

    def steady_client():
        c = stack.client(timeout=10)
        for _ in range(5000):  # bounded
            if stop.is_set():
                return
            results.append(chat_once(c))
            time.sleep(0.02)

    worker = threading.Thread(target=steady_client, daemon=True)
    worker.start()
    try:
        started_at = time.monotonic()
        docker("start", stack.container("gw-a"))
        wait_until(lambda: stack.active_status("gw-a") == 429, timeout=30, what="gw-a back as a standby",
                   describe=stack.statuses)
        rejoined = time.monotonic() - started_at
        _, a = stack.health("gw-a")
        _, b = stack.health("gw-b")
        assert a.get("leader") == "gw-b" and a.get("term") == b.get("term")
        assert b.get("applied_index", 0) - a.get("applied_index", 0) <= 100, (a, b)
        wait_until(lambda: stack.actives() == ["gw-a"], timeout=60, interval=0.1,
                   what="failback to gw-a", describe=stack.statuses)
        failback = time.monotonic() - started_at
        time.sleep(2)
    finally:
        stop.set()
        worker.join(timeout=30)
    failed = [who for ok, who in results if not ok]
    note_figure("restart gw-a: standby (caught up) after (s)", round(rejoined, 2))
    note_figure("restart gw-a: active again (failback) after (s)", round(failback, 2))
    note_figure("failback: client requests ok/failed", f"{len(results) - len(failed)}/{len(failed)}")
    assert len(results) > 50
    assert not failed, f"{len(failed)} of {len(results)} requests failed during rejoin/failback: {failed[:3]}"
    assert {who for ok, who in results[-10:]} == {"gw-a"}


def test_partition_active_zone_no_double_active_no_lost_write(stack):
    wait_until(lambda: stack.actives() == ["gw-a"], timeout=60, what="gw-a active", describe=stack.statuses)
    wait_until(lambda: stack.active_status("gw-b") == 429, timeout=30, what="gw-b standby")
    drill = [os.path.join(REPO_ROOT, "deploy", "drill.sh"), "partition-zone", "A", "--duration", "12",
             "--fault-duration", "6", "--json"]
    env = dict(stack.env, COMPOSE=" ".join(stack.compose_argv))
    with DoubleActiveWatch(stack) as watch:
        proc = subprocess.run(drill, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    (stack.workdir / "partition-drill.txt").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    start = proc.stdout.find("{")
    assert start >= 0, f"drill printed no report (rc {proc.returncode}): {proc.stderr[-1500:]}"
    report = json.loads(proc.stdout[start:])
    note_figure("partition A: report", {k: report[k] for k in (
        "time_to_detect_ms", "time_to_new_active_ms", "rto_lb_ms", "client_requests", "client_requests_failed",
        "double_active_samples", "admin_writes_acknowledged", "acknowledged_writes_lost")})
    note_figure("partition A: host-side double-active samples", f"{watch.double} of {watch.samples}")
    assert report["old_active"] == "gw-a" and report["new_active"] == "gw-b", report
    assert report["double_active_samples"] == 0
    assert watch.double == 0
    assert report["admin_writes_acknowledged"] > 0
    assert report["acknowledged_writes_lost"] == 0
    assert 0 <= report["rto_lb_ms"] < 3000
    assert proc.returncode == 0, proc.stderr[-1500:]
    # Healed: gw-a rejoins and, being in the preferred zone, becomes active again.
    wait_until(lambda: stack.actives() == ["gw-a"] and stack.active_status("gw-b") == 429, timeout=60,
               what="gw-a active again after the partition healed", describe=stack.statuses)


def test_down_then_up_keeps_tokens_keys_and_config(stack):
    stack.zonegate("keys", "add", "--id", "e2e-key", "--secret-env", "UPSTREAM_API_KEY")
    keys_before = json.loads(stack.zonegate("keys", "list", "--json"))["keys"]
    tokens_before = json.loads(stack.zonegate("tokens", "list", "--json"))["tokens"]
    config_before = json.loads(stack.zonegate("config", "get", "--json"))
    assert [k["id"] for k in keys_before] == ["e2e-key"]
    assert "e2e-app" in [t["name"] for t in tokens_before]

    stack.compose("down", "-t", "45", timeout=300)
    assert not stack.compose("ps", "-q").stdout.strip()
    started = time.monotonic()
    stack.compose("up", "-d", timeout=300)
    stack.forget_ports()
    wait_until(lambda: stack.actives() == ["gw-a"], timeout=60, what="gw-a active after up",
               describe=stack.statuses)
    note_figure("down + up: gw-a active again after up (s)", round(time.monotonic() - started, 1))

    keys_after = json.loads(stack.zonegate("keys", "list", "--json"))["keys"]
    tokens_after = json.loads(stack.zonegate("tokens", "list", "--json"))["tokens"]
    config_after = json.loads(stack.zonegate("config", "get", "--json"))
    assert [k["id"] for k in keys_after] == [k["id"] for k in keys_before]
    assert [t["id"] for t in tokens_after] == [t["id"] for t in tokens_before]
    assert config_after == config_before
    ok, served_by = wait_until(lambda: (lambda r: r if r[0] else None)(chat_once(stack.client(10))),
                               timeout=15, what="the old client token works after down/up")
    assert served_by == "gw-a"
