"""Logs an auditor can trust: every event documented, exactly one audit event per
request at each audit level, lines that always parse and fit, log file reopening."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.daemon import Daemon, wait_until
from tests.proxyclient import CHECKOUT, OP_NAMES, ProxyClient, errno_of

DOCS = (CHECKOUT / "docs" / "events.md").read_text()
MUTATING = {
    "create",
    "mknod",
    "mkdir",
    "symlink",
    "link",
    "chmod",
    "chown",
    "truncate",
    "utime",
    "rename",
    "remove",
    "lsetxattr",
    "lremovexattr",
}
COMMON = {
    "pid",
    "role",
    "export",
    "worker",
    "conn",
    "peer_pid",
    "peer_uid",
    "peer_gid",
    "event",
    "level",
    "timestamp",
    "op",
    "path",
    "result",
    "dur_us",
}
EXTRA = {  # the documented fields of each op beyond the common ones
    "open": {"flags"},
    "create": {"flags", "mode", "uid", "gid"},
    "mknod": {"mode", "rdev", "uid", "gid"},
    "mkdir": {"mode", "uid", "gid"},
    "symlink": {"path2", "uid", "gid"},
    "link": {"path2"},
    "rename": {"path2"},
    "readlink": {"size"},
    "chmod": {"mode"},
    "chown": {"uid", "gid"},
    "truncate": {"length"},
    "utime": {"atime", "mtime"},
    "lgetxattr": {"name", "size"},
    "llistxattr": {"size"},
    "lsetxattr": {"name", "size", "xattr_flags"},
    "lremovexattr": {"name"},
}


def emitted_events() -> set[str]:
    names = set()
    for source in (CHECKOUT / "proxyd").glob("*.py"):
        text = source.read_text()
        pattern = r"\.(?:debug|info|warning|error|exception|critical)\(\s*\"([^\"]+)\""
        names.update(re.findall(pattern, text))
    return names


def test_every_emitted_event_is_documented() -> None:
    names = emitted_events()
    assert len(names) > 30  # the scan found the code's events
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOCS, re.MULTILINE))
    documented.add("op")  # has its own section
    assert "## The audit event: `op`" in DOCS
    assert names - documented == set(), "events missing from docs/events.md"
    assert documented - names - {"op"} <= {
        # fields tables also use the `| `name` |` form
        "timestamp",
        "level",
        "event",
        "pid",
        "role",
        "export",
        "worker",
        "conn",
        "peer_pid`, `peer_uid`, `peer_gid",
        "truncated",
        "op",
        "path",
        "path2",
        "uid`, `gid",
        "mode",
        "rdev",
        "flags",
        "length",
        "size",
        "name",
        "xattr_flags",
        "atime`, `mtime",
        "result",
        "dur_us",
        "refused",
        "malformed",
    }


class Served:
    """proxyd -f on a socketpair with a chosen audit level; its log lines parsed."""

    def __init__(self, export: Path, audit: str) -> None:
        ours, theirs = socket.socketpair()
        self.log_path = export.parent / f"log-{audit}"
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "proxyd",
                    "-n",
                    "-p",
                    str(export),
                    "-f",
                    str(theirs.fileno()),
                    "--audit",
                    audit,
                ],
                cwd=CHECKOUT,
                pass_fds=[theirs.fileno()],
                stderr=log_file,
            )
        theirs.close()
        self.client = ProxyClient(ours)

    def finish(self) -> list[dict]:
        self.client.close()
        assert self.proc.wait(10) == 0
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines]  # every line parses


def one_of_each(c: ProxyClient, export: Path) -> None:
    (export / "f").write_text("data")
    r = c.open("/f", os.O_RDONLY)
    os.close(r.fd)
    r = c.open("/f", os.O_WRONLY | os.O_APPEND)  # OPEN for writing
    os.close(r.fd)
    r = c.create("/new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640, 1000, 1001)
    os.close(r.fd)
    c.mknod(0, 0, "/fifo", stat.S_IFIFO | 0o600, 0)
    c.mkdir(1000, 1000, "/d", 0o755)
    c.symlink(0, 0, "f", "/l")
    c.link("/f", "/hard")
    c.lstat("/f")
    c.readlink("/l", 100)
    c.statfs("/")
    c.chmod("/f", 0o600)
    c.chown("/f", 1, 2)
    c.truncate("/f", 2)
    c.utime("/f", 1, 2, 3, 4)
    c.rename("/hard", "/moved")
    c.remove("/moved")
    c.lsetxattr("/f", "user.k", b"v")
    c.lgetxattr(10, "/f", "user.k")
    c.llistxattr(0, "/f")
    c.lremovexattr("/f", "user.k")
    c.getversion("/f")
    assert errno_of(c.lstat(b"/\xff-missing")) == errno.ENOENT  # not UTF-8, failing


@pytest.mark.parametrize("audit", ["none", "mutations", "all"])
def test_audit_levels_log_exactly_the_documented_events(tmp_path: Path, audit: str) -> None:
    export = tmp_path / "export"
    export.mkdir()
    served = Served(export, audit)
    one_of_each(served.client, export)
    ops = [e for e in served.finish() if e["event"] == "op"]
    seen = [e["op"] for e in ops]
    if audit == "none":
        assert seen == []
        return
    if audit == "mutations":
        expected = [
            "open",
            "create",
            "mknod",
            "mkdir",
            "symlink",
            "link",
            "chmod",
            "chown",
            "truncate",
            "utime",
            "rename",
            "remove",
            "lsetxattr",
            "lremovexattr",
        ]
    else:
        expected = [
            "open",
            "open",
            "create",
            "mknod",
            "mkdir",
            "symlink",
            "link",
            "lstat",
            "readlink",
            "statfs",
            "chmod",
            "chown",
            "truncate",
            "utime",
            "rename",
            "remove",
            "lsetxattr",
            "lgetxattr",
            "llistxattr",
            "lremovexattr",
            "getversion",
            "lstat",
        ]
    assert seen == expected
    assert set(seen) <= set(OP_NAMES)
    for event in ops:
        assert set(event) <= COMMON | EXTRA.get(event["op"], set()), event
        assert COMMON - {"worker"} <= set(event), event
        assert event["level"] == "info" and event["role"] == "worker"
        assert isinstance(event["dur_us"], int) and event["dur_us"] >= 0
    by_op = {e["op"]: e for e in ops}
    assert by_op["create"] == by_op["create"] | {
        "path": "/new",
        "mode": "0o640",
        "uid": 1000,
        "gid": 1001,
        "flags": "O_WRONLY|O_CREAT|O_EXCL",
        "result": "ok",
    }
    assert by_op["rename"]["path2"] == "/moved" and by_op["symlink"]["path2"] == "f"
    assert by_op["truncate"]["length"] == 2 and by_op["utime"]["mtime"] == [3, 4]
    if audit == "mutations":
        assert by_op["open"]["flags"] == "O_WRONLY|O_APPEND"
    else:
        assert ops[-1]["path"] == "/\\xff-missing" and ops[-1]["result"] == "ENOENT"


def test_security_refusals_are_warnings_at_every_level(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    os.mkfifo(export / "fifo")
    served = Served(export, "none")
    assert errno_of(served.client.open("/fifo", os.O_RDONLY)) == errno.ENXIO
    (event,) = [e for e in served.finish() if e["event"] == "op"]
    assert event["level"] == "warning" and event["refused"] == "special file (fifo)"
    assert event["result"] == "ENXIO" and event["path"] == "/fifo"


def test_huge_fields_are_cut_to_fit_a_pipe_write(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    served = Served(export, "all")
    long_path = "/" + "x" * 60000
    assert errno_of(served.client.lstat(long_path)) == errno.ENAMETOOLONG
    served.client.close()
    served.proc.wait(10)
    lines = served.log_path.read_bytes().splitlines()
    assert max(len(line) for line in lines) < 4096
    (event,) = [json.loads(line) for line in lines if b'"event":"op"' in line]
    assert event["truncated"] == ["path"] and event["path"].endswith("…")
    assert event["result"] == "ENAMETOOLONG"


def test_concurrent_load_every_line_parses_and_every_request_counts_once(
    tmp_path: Path,
) -> None:
    with Daemon(tmp_path, [{"name": "a", "max_workers": 8}], audit="all") as d:
        clients = [d.connect("a") for _ in range(6)]
        per_client = 300

        def work(i: int, c: ProxyClient) -> None:
            for j in range(per_client // 3):
                c.mkdir(0, 0, f"/c{i}-{j}", 0o755)
                c.lstat(f"/c{i}-{j}")
                c.remove(f"/c{i}-{j}")

        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for c in clients:
            c.close()
        d.wait_event("connection closed", count=6)
    lines = d.log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line parses
    ops = [e for e in events if e["event"] == "op"]
    per_conn: dict[int, int] = {}
    for e in ops:
        per_conn[e["conn"]] = per_conn.get(e["conn"], 0) + 1
    assert sorted(per_conn.values()) == [per_client] * 6
    closed = {e["conn"]: e["requests"] for e in events if e["event"] == "connection closed"}
    assert closed == per_conn  # the master's count agrees with the audit trail
    paths = [(e["conn"], e["op"], e["path"]) for e in ops]
    assert len(set(paths)) == len(paths)  # no request logged twice


def test_sigusr1_reopens_the_log_file_in_master_and_workers(tmp_path: Path) -> None:
    log_file = tmp_path / "proxyd.json"
    with Daemon(tmp_path, [{"name": "a", "min_idle": 2}], log_file=str(log_file)) as d:
        busy = d.connect("a")
        busy.mkdir(0, 0, "/before", 0o755)
        wait_until(lambda: '"path":"/before"' in log_file.read_text(), what="the first line")
        rotated = tmp_path / "proxyd.json.1"
        os.rename(log_file, rotated)  # what logrotate does
        d.signal(signal.SIGUSR1)
        wait_until(log_file.exists, what="the reopened file")
        busy.mkdir(0, 0, "/after-busy", 0o755)  # a worker that was busy all along
        idle = d.connect("a")  # a worker that was idle when the signal came
        idle.mkdir(0, 0, "/after-idle", 0o755)
        busy.close()
        idle.close()
        wait_until(
            lambda: log_file.read_text().count('"connection closed"') == 2,
            what="both connections closed in the new file",
        )
    new = [json.loads(line) for line in log_file.read_text().splitlines()]
    old = rotated.read_text()
    assert {e["path"] for e in new if e["event"] == "op"} == {"/after-busy", "/after-idle"}
    assert any(e["event"] == "log reopened" and e["role"] == "master" for e in new)
    assert '"/after' not in old and '"path":"/before"' in old
