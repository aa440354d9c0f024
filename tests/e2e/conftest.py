"""Shared helpers for the end-to-end tests: they drive the Docker CLI and
docker compose (`docker compose` when present, else `docker-compose`;
override with env COMPOSE) against the zonegate image (env ZONEGATE_IMAGE,
default zonegate:dev) and talk to it over published loopback ports only.

Every container, network and volume a test creates carries a unique name
prefix and is removed at teardown, also when the test fails. Tests are
skipped (not failed) when no Docker engine or no image is available.
"""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pytest

IMAGE = os.environ.get("ZONEGATE_IMAGE", "zonegate:dev")
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def docker(*args, check=True, timeout=180, input_text=None):
    """Runs `docker ARGS`; returns the CompletedProcess (text mode)."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          input=input_text)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def compose_command():
    """The compose tool as an argv prefix: env COMPOSE, `docker compose`, or `docker-compose`."""
    if os.environ.get("COMPOSE"):
        return os.environ["COMPOSE"].split()
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


def free_loopback_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=5.0):
    """Returns (status, headers dict, body bytes); status 0 when no answer."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError):
        return 0, {}, b""


def wait_until(predicate, timeout, interval=0.1, what="condition", describe=None):
    """Polls predicate() until it returns a truthy value; bounded by timeout.
    On timeout the error shows describe() (the state a human needs) when given."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    state = describe() if describe else last
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (state: {state!r})")


@pytest.fixture(scope="session")
def image():
    if shutil.which("docker") is None:
        pytest.skip("docker CLI not installed")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no Docker engine reachable")
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.skip(f"image {IMAGE} missing: build it with "
                    f"`docker build -f deploy/Dockerfile -t {IMAGE} .` (see deploy/README.md)")
    return IMAGE


@pytest.fixture
def prefix():
    """A unique name prefix; removes every container and network using it."""
    p = "zge2e-" + uuid.uuid4().hex[:8]
    yield p
    ids = docker("ps", "-aq", "--filter", f"name={p}", check=False).stdout.split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False)
    nets = docker("network", "ls", "-q", "--filter", f"name={p}", check=False).stdout.split()
    if nets:
        docker("network", "rm", *nets, check=False)
