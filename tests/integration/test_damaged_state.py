"""Damaged Raft state on a real node: it never crashes and never comes up
silently wrong. A snapshot with one flipped byte stops the node with one
line naming the file and the reason (its SHA-256 no longer matches); an
open segment damaged in the middle (further valid batches after the bad
one) stops it with one line naming the file and the offset. A follower
whose acknowledged tail was cut catches up by itself (the leader hands
leadership over) and the leader says so in one line."""
import os
import signal
import time
import struct

import pytest

from cluster import Cluster
from harness import TempDir


def batches(buf):
    """(offset, header length, data length, entries) of each batch of a
    raft_uv segment, and where the batches end."""
    off, out = 8, []
    while off + 16 <= len(buf):
        if buf[off:off + 16] == b"\0" * 16:
            break
        n = struct.unpack_from("<Q", buf, off + 8)[0]
        if n == 0 or n > 262144:
            break
        hdr = 16 + 16 * n
        data = sum(struct.unpack_from("<I", buf, off + 16 + i * 16 + 12)[0] for i in range(n))
        out.append((off, hdr, data, n))
        off += hdr + data
    return out, off


def error_lines(out):
    """The start-up error (printed once for the operator, once as the JSON
    event start_failed) and any other error event."""
    return [l for l in out.splitlines() if l.startswith("error:") or '"level":"error"' in l]


@pytest.fixture
def cluster():
    with TempDir() as d:
        c = Cluster(d, election_timeout_ms=600, snapshot_threshold=16)
        try:
            c.start()
            c.wait_caught_up()
            yield c
        finally:
            c.stop()


def test_flipped_byte_in_a_snapshot_stops_the_node_naming_the_file(cluster):
    a = cluster.wait_active()
    for i in range(40):
        a.admin_call("POST", "/v1/audit", {"what": "n%d" % i})
    cluster.wait_caught_up()
    b = cluster.node("gw-b")
    b.kill(signal.SIGKILL)
    rd = os.path.join(b.data_dir, "raft")
    snaps = sorted((f for f in os.listdir(rd) if f.startswith("snapshot-") and not f.endswith(".meta")),
                   key=lambda f: tuple(int(x) for x in f.split("-")[1:]))
    assert snaps
    path = os.path.join(rd, snaps[-1])
    data = bytearray(open(path, "rb").read())
    at = data.find(b'"audit":[') + 12  # inside the document, not the header
    data[at] ^= 0x01
    open(path, "wb").write(bytes(data))
    b.start(wait=False)
    code = b.proc.wait(timeout=20)
    out = b.proc.output()
    assert code == 1, out[-2000:]
    errs = error_lines(out)
    assert len(errs) == 2 and '"start_failed"' in errs[1], out[-2000:]
    assert path in errs[0] and "checksum mismatch" in errs[0], errs


def test_flipped_byte_mid_open_segment_stops_the_node_naming_file_and_offset():
    with TempDir() as d:
        c = Cluster(d, election_timeout_ms=600)
        try:
            c.start()
            a = c.wait_active()
            for i in range(30):
                a.admin_call("POST", "/v1/audit", {"what": "m%d" % i})
            c.wait_caught_up()
            b = c.node("gw-b")
            b.kill(signal.SIGKILL)
            rd = os.path.join(b.data_dir, "raft")
            opens = [os.path.join(rd, f) for f in os.listdir(rd) if f.startswith("open-")]
            path = max(opens, key=lambda p: len(batches(open(p, "rb").read())[0]))
            bl, _ = batches(open(path, "rb").read())
            assert len(bl) > 10, bl
            off, hdr, data, n = bl[len(bl) // 2]
            with open(path, "r+b") as f:
                f.seek(off + hdr + 1)
                x = f.read(1)
                f.seek(off + hdr + 1)
                f.write(bytes([x[0] ^ 0x55]))
            size = os.path.getsize(path)
            b.start(wait=False)
            code = b.proc.wait(timeout=20)
            out = b.proc.output()
            assert code == 1, out[-2000:]  # libraft 0.22.1 would cut the log here silently
            errs = error_lines(out)
            assert len(errs) == 2 and '"start_failed"' in errs[1], out[-2000:]
            assert path in errs[0] and f"at byte {off}" in errs[0], errs
            assert "data checksum mismatch" in errs[0] and "members add" in errs[0], errs
            assert os.path.getsize(path) == size  # nothing was changed
        finally:
            c.stop()


def test_follower_whose_acknowledged_tail_was_cut_catches_up():
    """The follower's last batch was fully written and acknowledged, then
    cut short (the reviewer's torn tail): the repair drops it, so the
    leader's match index for the follower is above the follower's log.
    libraft 0.22.1 alone never resends those entries (the follower stayed
    behind, answering /health/standby 200). The leader notices, says so in
    one ERROR line and hands leadership over: the follower catches up."""
    with TempDir() as d:
        c = Cluster(d, election_timeout_ms=600)
        try:
            c.start()
            a = c.wait_active()
            for i in range(30):
                a.admin_call("POST", "/v1/audit", {"what": "t%d" % i})
            c.wait_caught_up()
            b = next(n for n in c.nodes if n.role == "gateway" and n is not a)
            b.kill(signal.SIGKILL)
            rd = os.path.join(b.data_dir, "raft")
            opens = [os.path.join(rd, f) for f in os.listdir(rd) if f.startswith("open-")]
            path = max((p for p in opens if batches(open(p, "rb").read())[0]),
                       key=lambda p: int(p.rsplit("-", 1)[1]))
            bl, _ = batches(open(path, "rb").read())
            os.truncate(path, bl[-1][0] + bl[-1][1] + 3)  # acknowledged, then torn
            b.start(wait=True)
            for i in range(5):
                c.wait_active().admin_call("POST", "/v1/audit", {"what": "after-%d" % i})
            def caught_up():
                leader = c.wait_active()
                _, s = leader.admin_call("GET", "/v1/cluster/status")
                _, mine = b.admin_call("GET", "/v1/cluster/status")
                return mine["applied_index"] >= s["commit_index"] - 1
            deadline = time.monotonic() + 15
            while not caught_up():
                assert time.monotonic() < deadline, "the follower never caught up"
                time.sleep(0.2)
            logs = "".join(n.proc.output() for n in c.nodes)
            assert "raft_torn_tail_repaired" in b.proc.output()
            lost = [l for l in logs.splitlines() if '"raft_follower_lost_entries"' in l]
            assert len(lost) == 1 and b.id in lost[0], lost
            assert b.health("live")[1]["log_behind_leader"] is False
        finally:
            c.stop()
