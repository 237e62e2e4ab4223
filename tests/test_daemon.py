"""The long-running daemon: pools, many VMs per socket, allow-lists, read-only exports,
signals and reload, against a real proxyd (crash recovery: tests/test_verdicts.py)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tests.daemon import (
    Daemon,
    title,
    wait_until,
    write_config,
)
from tests.proxyclient import (
    CHECKOUT,
    LSTAT,
    ConnectionClosed,
    ProxyClient,
    errno_of,
    marshal,
)


def ok(reply) -> None:  # type: ignore[no-untyped-def]
    assert reply.ok, f"expected success, got {os.strerror(errno_of(reply))}"


# --- pools -----------------------------------------------------------------------------


def test_concurrent_clients_on_two_exports(tmp_path: Path) -> None:
    exports = [{"name": "a", "max_workers": 8}, {"name": "b", "max_workers": 8}]
    with Daemon(tmp_path, exports) as d:
        clients = [d.connect("a") for _ in range(5)] + [d.connect("b") for _ in range(3)]
        errors: list[str] = []

        def work(i: int, client: ProxyClient) -> None:
            try:
                for j in range(50):
                    name = f"/c{i}-{j}"
                    ok(client.mkdir(0, 0, name, 0o755))
                    ok(client.lstat(name))
                    ok(client.remove(name))
            except Exception as e:  # reported below, with the client
                errors.append(f"client {i}: {e!r}")

        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        busy = [t for t in d.worker_titles().values() if " conn=" in t]
        assert len(busy) == 8  # one worker per live connection
        assert sum(" a#" in t for t in busy) == 5 and sum(" b#" in t for t in busy) == 3
        for c in clients:
            c.close()
        d.wait_event("connection closed", count=8)
        spawned = len(d.events("worker spawned"))
        # Workers are reused: the next connections need no new process.
        again = [d.connect("a") for _ in range(2)]
        for c in again:
            ok(c.lstat("/"))
        assert len(d.events("worker spawned")) == spawned  # no fork for them


def test_max_workers_bounds_the_pool(tmp_path: Path) -> None:
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1, "max_workers": 2}]) as d:
        first, second = d.connect("a"), d.connect("a")
        ok(first.lstat("/"))
        ok(second.lstat("/"))
        # (Imported here: the file's head belongs to other changes too.)
        from proxyd.recovery import SIOCOUTQ, queued

        third = d.connect("a")
        payload = marshal("s", "/")
        third.send_request(LSTAT, payload)
        # The master holds the third connection: no worker is free, none is started,
        # and nobody has read the request (SIOCOUTQ: the memory of what the peer has
        # not taken, 0 once it is read), however long the test took to look.
        d.wait_event("pool exhausted", export="a", max_workers=2, waiting=1)
        assert len(d.workers()) == 2
        assert queued(third.sock, SIOCOUTQ) > 0
        first.close()
        ok(third.recv_header_reply("data"))  # served once a worker is free
        assert len(d.workers()) <= 2


def test_socket_path_recreated_for_the_next_vm(tmp_path: Path) -> None:
    with Daemon(tmp_path, [{"name": "a"}]) as d:
        path = d.exports["a"]["socket"]
        clients = []
        for _ in range(4):  # VM after VM on one socket path, all served at once
            clients.append(d.connect("a"))  # unlinks the path, as QEMU does
            wait_until(lambda: os.path.exists(path), what="the socket path to come back")
        for c in clients:
            ok(c.lstat("/"))
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o770
        assert len(d.events("export socket re-bound", export="a")) == 4  # once per unlink


def test_peers_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    public = Path(tempfile.mkdtemp(prefix="proxyd-test-"))  # pytest's tmp is root-only
    public.chmod(0o755)
    exports = [
        {"name": "a", "allow_uids": [4242], "socket_mode": "0777", "socket": str(public / "a")}
    ]
    with Daemon(tmp_path, exports) as d:
        refused = d.connect("a", unlink=False)
        # Closed before the request is sent, or after: either way no reply.
        with pytest.raises((ConnectionClosed, BrokenPipeError, ConnectionResetError)):
            refused.lstat("/")
        event = d.wait_event("connection refused", export="a")[-1]
        assert event["level"] == "warning" and event["peer_uid"] == 0
        # The allowed uid is served (a child process that becomes uid 4242).
        code = f"""
import os, socket, sys
sys.path.insert(0, {str(CHECKOUT)!r})
from tests.proxyclient import ProxyClient
os.setgid(4242); os.setuid(4242)
s = socket.socket(socket.AF_UNIX); s.connect({d.exports["a"]["socket"]!r})
sys.exit(0 if ProxyClient(s).lstat("/").ok else 1)
"""
        assert subprocess.run([sys.executable, "-c", code], timeout=20).returncode == 0


def test_read_only_export(tmp_path: Path) -> None:
    with Daemon(tmp_path, [{"name": "ro", "readonly": True}]) as d:
        export = Path(d.exports["ro"]["path"])
        (export / "f").write_text("content")
        c = d.connect("ro")
        ok(c.lstat("/f"))
        reply = c.open("/f", os.O_RDONLY)
        ok(reply)
        assert os.read(reply.fd, 100) == b"content"
        os.close(reply.fd)
        # A directory opened to be listed (as a guest's readdir does) is no change.
        reply = c.open("/", os.O_RDONLY | os.O_DIRECTORY)
        ok(reply)
        assert "f" in os.listdir(reply.fd)
        os.close(reply.fd)
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND):
            assert errno_of(c.open("/f", flags)) == errno.EROFS
        assert errno_of(c.open("/", os.O_RDWR | os.O_TMPFILE)) == errno.EROFS
        refusals = [
            c.create("/new", os.O_CREAT | os.O_WRONLY, 0o644, 0, 0),
            c.mkdir(0, 0, "/d", 0o755),
            c.mknod(0, 0, "/n", stat.S_IFREG | 0o644, 0),
            c.symlink(0, 0, "f", "/l"),
            c.link("/f", "/h"),
            c.chmod("/f", 0o600),
            c.chown("/f", 1, 1),
            c.truncate("/f", 0),
            c.utime("/f", 0, 0, 0, 0),
            c.rename("/f", "/g"),
            c.remove("/f"),
            c.lsetxattr("/f", "user.a", b"v"),
            c.lremovexattr("/f", "user.a"),
        ]
        assert [errno_of(r) for r in refusals] == [errno.EROFS] * len(refusals)
        assert sorted(os.listdir(export)) == ["f"] and (export / "f").read_text() == "content"


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("daemon", "export", "message", "code"),
    [
        ({"audit": "some"}, {}, "daemon.audit: 'some' is not one of", 2),
        ({"stop_timeout": "5"}, {}, "daemon.stop_timeout: expected", 2),
        ({"bogus": 1}, {}, "daemon: unknown key 'bogus'", 2),
        ({}, {"min_idle": 5, "max_workers": 2}, "min_idle: 5 is more than max_workers 2", 2),
        ({}, {"socket_mode": "0999"}, "socket_mode: '0999' is not an octal mode", 2),
        ({}, {"allow_uids": ["root"]}, "allow_uids: 'root' is not a valid id", 2),
        ({}, {"readonly": "yes"}, "readonly: expected true or false", 2),
        ({}, {"sockt": "/x"}, "unknown key 'sockt'", 2),
        ({}, {"path": "/nonexistent/export"}, "export 'a'.path '/nonexistent/export'", 3),
    ],
)
def test_invalid_configuration_names_the_key(
    tmp_path: Path, daemon: dict, export: dict, message: str, code: int
) -> None:
    (tmp_path / "a").mkdir()
    table = {"name": "a", "path": str(tmp_path / "a"), "socket": str(tmp_path / "a.sock")}
    config = write_config(tmp_path / "bad.toml", daemon, [{**table, **export}])
    result = subprocess.run(
        [sys.executable, "-m", "proxyd", "-n", "--config", str(config)],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


# --- crashes ----------------------------------------------------------------------------------


# Each row of README's "When a worker dies" table, the watchdog's and poison's, with the
# worker held at exactly that point: tests/test_verdicts.py.


def test_export_that_can_never_serve_exits_3(tmp_path: Path) -> None:
    d = Daemon(tmp_path, [{"name": "a", "min_idle": 0}])
    try:
        d.wait_event("export bound", export="a")
        os.rmdir(d.exports["a"]["path"])  # gone after validation: chroot will fail
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(d.exports["a"]["socket"])
        assert d.proc.wait(30) == 3
        d.wait_event("export cannot be served, giving up", export="a")
        assert len(d.events("worker failed to start")) == 5
        sock.close()
    finally:
        d.stop()


# --- signals -------------------------------------------------------------------------------------


def test_sigterm_stops_gracefully_and_removes_sockets(tmp_path: Path) -> None:
    with Daemon(tmp_path, [{"name": "a"}, {"name": "b"}]) as d:
        c = d.connect("a")
        ok(c.lstat("/"))
        d.signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        # Graceful: every worker, the one serving a connection between two requests too,
        # left on its own; none was killed at stop_timeout.
        (stopping,) = d.events("stopping", connections=1)
        assert len(d.events("worker exited", exit_code=0)) == stopping["workers"] == 3
        assert not d.events("killing worker still running at stop")
        assert not os.path.exists(d.exports["a"]["socket"])
        assert not os.path.exists(d.exports["b"]["socket"])
        with pytest.raises((ConnectionClosed, BrokenPipeError)):
            c.lstat("/")
        assert d.events("stop", exit_code=0)


def test_sigquit_stops_now(tmp_path: Path) -> None:
    with Daemon(tmp_path, [{"name": "a", "min_idle": 3, "max_workers": 3}]) as d:
        workers = d.workers()
        d.signal(signal.SIGQUIT)
        assert d.proc.wait(5) == 0
        for pid in workers:
            wait_until(lambda pid=pid: not title(pid).startswith("proxyd"), 5, "workers gone")


def test_ttin_ttou_change_the_spare_workers(tmp_path: Path) -> None:
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1, "max_workers": 4}]) as d:
        assert len(d.workers()) == 1
        d.signal(signal.SIGTTIN)
        wait_until(lambda: len(d.workers()) == 2, what="a second spare worker")
        d.signal(signal.SIGTTOU)  # one at a time: signals of one kind do not queue
        wait_until(lambda: len(d.workers()) == 1, what="one spare worker")
        d.signal(signal.SIGTTOU)
        wait_until(lambda: len(d.workers()) == 0, what="no spare worker")


def test_reload_under_load_is_invisible_to_clients(tmp_path: Path) -> None:
    """A reload that changes what workers are forked with (the audit level) replaces
    every worker at a request boundary while 4 clients keep working; one that changes
    nothing replaces none."""
    with Daemon(tmp_path, [{"name": "a", "max_workers": 8}]) as d:
        clients = [d.connect("a") for _ in range(4)]
        for c in clients:
            ok(c.lstat("/"))
        before = set(d.workers())
        stop = threading.Event()
        errors: list[str] = []
        counts = [0] * len(clients)

        def work(i: int, client: ProxyClient) -> None:
            try:
                while not stop.is_set():
                    name = f"/r{i}-{counts[i]}"
                    ok(client.mkdir(0, 0, name, 0o700))
                    ok(client.remove(name))
                    counts[i] += 1
            except Exception as e:
                errors.append(f"client {i} after {counts[i]} rounds: {e!r}")

        def progress(rounds: int) -> None:
            marks = list(counts)
            moved = lambda: all(n >= m + rounds for n, m in zip(counts, marks, strict=True))  # noqa: E731
            wait_until(moved, 30, "progress")

        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        progress(10)
        for generation, audit in ((1, "all"), (2, "mutations")):
            write_config(d.config, dict(d.daemon_settings, audit=audit), [d.exports["a"]])
            d.signal(signal.SIGHUP)
            d.wait_event("reload applied", generation=generation, replaced=["a"])
            progress(10)  # clients go on while their workers are replaced
        wait_until(lambda: not before & set(d.workers()), 30, "every worker replaced")
        progress(10)
        replaced = set(d.workers())
        d.signal(signal.SIGHUP)  # the same configuration again: nothing to replace
        d.wait_event("reload applied", generation=3, replaced=[])
        progress(10)
        stop.set()
        for t in threads:
            t.join(10)
        assert not errors, errors
        assert set(d.workers()) == replaced
        assert sum(" conn=" in t for t in d.worker_titles().values()) == 4


def test_reload_adds_removes_and_refuses(tmp_path: Path) -> None:
    with Daemon(tmp_path, [{"name": "a"}]) as d:
        b_path, b_sock = tmp_path / "b", tmp_path / "b.sock"
        b_path.mkdir()
        a = d.exports["a"]
        write_config(
            d.config, d.daemon_settings, [{"name": "b", "path": str(b_path), "socket": str(b_sock)}]
        )
        d.signal(signal.SIGHUP)
        d.wait_event("reload applied", added=["b"], removed=["a"])
        wait_until(lambda: b_sock.exists(), what="the new export's socket")
        assert not os.path.exists(a["socket"])
        client = ProxyClient(socket.socket(socket.AF_UNIX))
        client.sock.connect(str(b_sock))
        ok(client.lstat("/"))
        d.config.write_text("[daemon]\naudit = 'sometimes'\n")
        d.signal(signal.SIGHUP)
        refused = d.wait_event("reload refused")[-1]
        assert "daemon.audit" in refused["error"]
        ok(client.lstat("/"))  # the old configuration keeps running
        assert b_sock.exists()
