"""`zonegate drill crash|freeze|isolate|switchover --lb URL --json` against
the loopback cluster (gw-a, gw-b, witness) behind HAProxy with the shipped
config (see test_failover.py). Each drill's JSON report must show no
double-active sample and no acknowledged write lost; crash and switchover
must name a new active different from the old one. One cluster serves the
whole module; a node a drill crashed is restarted before the next drill.
Each drill runs 8 s (fault at +1.5 s, 3 s fault), bounded by a timeout."""
import json
import os
import subprocess

import pytest

from cluster import SECRETS
from harness import TempDir, ZONEGATE_BIN, wait_for
from test_failover import LBCluster

DRILL_SECONDS = 8


@pytest.fixture(scope="module")
def lbc():
    with TempDir() as d:
        c = LBCluster(d)
        try:
            yield c
        finally:
            c.stop()


def run_drill(lbc, kind):
    # Every node is up and the cluster is steady before the fault.
    for n in lbc.nodes:
        if not n.alive():
            n.start(wait=True)
    active = lbc.wait_steady()
    env = dict(os.environ)
    env["ZONEGATE_ADDR"] = active.admin
    env["ZONEGATE_ADMIN_TOKEN"] = SECRETS["ZONEGATE_ADMIN_TOKEN"]
    if active.cluster.tls:
        env["ZONEGATE_CA"] = active.cluster.ca
    args = [ZONEGATE_BIN, "drill", kind, "--lb", lbc.haproxy.url, "--json", "--duration", str(DRILL_SECONDS),
            "--inject-at", "1.5", "--fault-duration", "3"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=DRILL_SECONDS + 60)
    assert out.stdout.strip(), f"drill {kind} printed no report (exit {out.returncode}): {out.stderr}"
    report = json.loads(out.stdout)
    summary = {k: v for k, v in report.items() if k != "timeline"}
    print(f"\ndrill {kind}: exit {out.returncode} {json.dumps(summary)}")
    if out.stderr.strip():
        print(out.stderr.strip())
    return active, report, out.returncode


def assert_safe(report):
    assert report["health_samples"] > 100, report
    assert report["double_active_samples"] == 0, report
    assert report["admin_writes_acknowledged"] > 0, report
    assert report["acknowledged_writes_lost"] == 0, report


def test_drill_crash(lbc):
    active, report, rc = run_drill(lbc, "crash")
    assert report["old_active"] == active.id
    assert report["new_active"] and report["new_active"] != report["old_active"], report
    assert report["rto_lb_ms"] >= 0, report
    assert_safe(report)
    assert rc == 0
    wait_for(lambda: not active.alive(), timeout=5, what=f"{active.id} exited after the crash drill")


def test_drill_freeze(lbc):
    active, report, rc = run_drill(lbc, "freeze")
    assert report["old_active"] == active.id
    assert_safe(report)
    assert rc == 0
    assert active.alive()


def test_drill_isolate(lbc):
    active, report, rc = run_drill(lbc, "isolate")
    assert report["old_active"] == active.id
    assert_safe(report)
    assert rc == 0
    assert active.alive()


def test_drill_switchover(lbc):
    active, report, rc = run_drill(lbc, "switchover")
    assert report["old_active"] == active.id
    assert report["new_active"] and report["new_active"] != report["old_active"], report
    assert_safe(report)
    assert rc == 0
