"""proxyd as a Type=notify service, against a real notify socket.

systemd does not run as PID 1 here, and no test pretends to run systemctl. What systemd
would receive is received instead: an AF_UNIX datagram socket of the test's own, bound
and named to a real proxyd as NOTIFY_SOCKET (SO_PASSCRED tells who sent each datagram,
SCM_RIGHTS brings the descriptors of FDSTORE=1). It keeps a file-descriptor store as
systemd does (FDSTORE=1 adds under FDNAME=, FDSTOREREMOVE=1 closes every descriptor of
that name), and a restarted master is given that store the way systemd passes it: the
descriptors from 3 on, LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set by a launcher that
then executes proxyd with its own pid, as systemd's child does.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxyd.recovery import SIOCOUTQ, queued
from tests.daemon import SYS_RECVFROM, Daemon, children, wait_in_syscall, wait_until
from tests.proxyclient import CHECKOUT, HEADER, MKDIR, marshal

BIN = Path(sys.executable).parent / "proxyd"

# Executes proxyd as systemd's child would on a restart: the descriptors named in
# PASSED (their numbers here) moved to 3, 4, ..., and LISTEN_* naming this very process.
LAUNCHER = """
import fcntl, os, sys
passed = [int(fd) for fd in os.environ.pop("PASSED").split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in passed]
for fd in passed:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(high)), LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "proxyd", *sys.argv[1:]])
"""


def identity(fd: int) -> tuple[int, int]:
    """What tells two descriptors of one file apart from two files (sockets and memfds
    have inodes of their own); systemd compares them so (same_fd())."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# socket(7): SO_TIMESTAMPNS (x86-64; the socket module has no name for it) makes the
# kernel stamp each datagram, CLOCK_REALTIME, when it is queued: the sender's time, not
# the receiving thread's, which a loaded machine may run late.
SO_TIMESTAMPNS = 35


@dataclass
class Message:
    at: float  # monotonic time received
    pid: int  # the sender (SCM_CREDENTIALS)
    fields: dict[str, str]
    fds: list[int] = field(default_factory=list)
    spawned: int = 0  # "worker spawned" lines in the log when it arrived (READY only)
    queued: float = 0.0  # when the kernel queued it (SO_TIMESTAMPNS), seconds since the epoch


class NotifySocket:
    """What systemd listens on: messages kept in order, the fd store kept as systemd
    keeps it. `log`: a file whose "worker spawned" lines are counted the moment a
    READY=1 arrives (the master logs before it notifies: a count below min_idle would
    be a READY sent too early)."""

    def __init__(self, path: Path, log: Path | None = None) -> None:
        self.path = str(path)
        self.log = log
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self.store: list[tuple[str, int]] = []  # (FDNAME, fd), in the order stored
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        creds = struct.calcsize("3i")
        while self.running:
            try:
                data, anc, _, _ = self.sock.recvmsg(
                    4096,
                    socket.CMSG_SPACE(creds)
                    + socket.CMSG_SPACE(64 * 4)
                    + socket.CMSG_SPACE(struct.calcsize("2q")),
                )
            except TimeoutError:
                continue
            except OSError:
                return
            pid, fds, stamp = 0, array.array("i"), 0.0
            for level, kind, cdata in anc:
                if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):  # struct timespec
                    seconds, nanoseconds = struct.unpack("2q", cdata[: struct.calcsize("2q")])
                    stamp = seconds + nanoseconds / 1e9
                elif (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = struct.unpack("3i", cdata[:creds])[0]
                elif (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            message = Message(time.monotonic(), pid, fields, list(fds), queued=stamp)
            if "READY" in fields and self.log is not None:
                message.spawned = self.log.read_text().count('"worker spawned"')
            with self.lock:
                self.messages.append(message)
                if fields.get("FDSTOREREMOVE") == "1":
                    for name, fd in [e for e in self.store if e[0] == fields["FDNAME"]]:
                        os.close(fd)
                        self.store.remove((name, fd))
                held = {identity(fd) for _, fd in self.store}
                for fd in fds:
                    if fields.get("FDSTORE") == "1" and identity(fd) not in held:
                        self.store.append((fields.get("FDNAME", "stored"), fd))
                    else:  # systemd keeps one copy of a file, under its first name
                        os.close(fd)

    def received(self, key: str | None = None) -> list[Message]:
        with self.lock:
            return [m for m in self.messages if key is None or key in m.fields]

    def wait(self, key: str, count: int = 1, timeout: float = 15.0) -> list[Message]:
        return wait_until(
            lambda: len(found := self.received(key)) >= count and found,
            timeout,
            f"{count} x {key}= on the notify socket",
        )

    def since(self, index: int) -> list[Message]:
        with self.lock:
            return self.messages[index:]

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()
        with self.lock:
            for _, fd in self.store:
                os.close(fd)
            self.store.clear()


class NotifiedDaemon(Daemon):
    """A Daemon (tests/daemon.py) started with `env` added to its environment and,
    given `passed` ((name, fd) as a store holds them), through LAUNCHER."""

    def __init__(
        self,
        tmp: Path,
        exports: list[dict[str, Any]],
        env: dict[str, str],
        passed: list[tuple[str, int]] | None = None,
        wait: bool = True,
        **daemon: Any,
    ) -> None:
        self._configure(tmp, exports, daemon)
        self.stderr_path = self.log_path = tmp / f"proxyd.{len(list(tmp.glob('proxyd.*.log')))}.log"
        self._log = open(self.stderr_path, "wb")  # noqa: SIM115
        environment = dict(os.environ, **env)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "FDSTORE", "LISTEN_FDS"):
            if name not in env:
                environment.pop(name, None)
        command = [sys.executable, "-m", "proxyd"]
        fds: list[int] = []
        if passed is not None:
            fds = [fd for _, fd in passed]
            environment["PASSED"] = ",".join(map(str, fds))
            environment["LISTEN_FDNAMES"] = ":".join(name for name, _ in passed)
            command = [sys.executable, "-c", LAUNCHER]
        self.proc = subprocess.Popen(
            [*command, "-n", "--config", str(self.config)],
            cwd=CHECKOUT,
            env=environment,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        if wait:
            self._wait_started()


def statuses(messages: list[Message]) -> list[str]:
    return [m.fields["STATUS"] for m in messages if "STATUS" in m.fields]


def test_ready_only_once_sockets_are_bound_and_min_idle_workers_ready(tmp_path: Path) -> None:
    log = tmp_path / "proxyd.0.log"
    notify = NotifySocket(tmp_path / "notify", log)
    exports = [{"name": "a", "min_idle": 3}, {"name": "b", "min_idle": 2}]
    try:
        with NotifiedDaemon(tmp_path, exports, {"NOTIFY_SOCKET": notify.path}) as d:
            (ready,) = notify.wait("READY")
            # Every min_idle worker had logged its readiness before READY=1 left.
            assert ready.spawned >= 5, d.log_text()
            assert len(d.workers()) >= 5
            assert ready.fields["MAINPID"] == str(d.proc.pid)
            assert ready.fields["STATUS"] == (
                "serving 2 exports (a, b): 0 connections, 5 workers (0 busy)"
            )
            before = notify.since(0)
            assert [m for m in before if "READY" in m.fields] == [ready]
            # Until then the status line said it was starting.
            assert all(s.startswith("starting; ") for s in statuses(before[: before.index(ready)]))
            # The sockets QEMU connects to were bound before (cli binds them first).
            client = d.connect("a")
            assert client.lstat("/").ok
            wait_until(lambda: "1 connection, " in statuses(notify.received())[-1])
            assert "(1 busy)" in statuses(notify.received())[-1]
            client.close()
            wait_until(lambda: "0 connections" in statuses(notify.received())[-1])
            assert d.stop() == 0
        messages = notify.received()
        # Only the master ever spoke: never a worker, whatever it did.
        assert {m.pid for m in messages} == {d.proc.pid}
        (stopping,) = [i for i, m in enumerate(messages) if "STOPPING" in m.fields]
        assert messages.index(ready) < stopping
        assert not notify.received("WATCHDOG")  # no WatchdogSec=: no pings
        assert not notify.received("FDSTORE")  # no FileDescriptorStoreMax=: no store
    finally:
        notify.close()


def test_status_changes_only_when_what_it_says_does(tmp_path: Path) -> None:
    """Between pings of the watchdog (the loop turned two or more times each) nothing
    else is sent while nothing changes."""
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "600000"}
    try:
        with NotifiedDaemon(tmp_path, [{"name": "a"}], env):
            notify.wait("READY")
            first = len(notify.received())
            notify.wait("WATCHDOG", count=len(notify.received("WATCHDOG")) + 5)
            quiet = notify.since(first)
            assert quiet and all(set(m.fields) == {"WATCHDOG"} for m in quiet), quiet
    finally:
        notify.close()


def test_reload_sequences_applied_and_refused(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    control = str(tmp_path / "control.sock")
    exports = [{"name": "a"}]
    try:
        with NotifiedDaemon(
            tmp_path, exports, {"NOTIFY_SOCKET": notify.path}, control_socket=control
        ) as d:
            notify.wait("READY")
            start = len(notify.received())
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            d.signal(signal.SIGHUP)
            notify.wait("READY", count=2)
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            sequence = [m for m in notify.since(start) if {"RELOADING", "READY"} & set(m.fields)]
            assert [("RELOADING" in m.fields, "READY" in m.fields) for m in sequence] == [
                (True, False),
                (False, True),
            ]
            assert before <= int(sequence[0].fields["MONOTONIC_USEC"]) <= after
            assert "refus" not in sequence[1].fields["STATUS"]

            # A broken configuration: what ExecReload= runs gets the daemon's verdict and
            # says why; so does the status line.
            d.config.write_text(d.config.read_text() + "\n[[export]]\nname = 5\n")
            start = len(notify.received())
            done = subprocess.run(
                [BIN, "reload", "--socket", control], capture_output=True, text=True
            )
            assert done.returncode == 1
            assert "reload refused: export[1].name: expected a string" in done.stderr
            notify.wait("READY", count=3)  # it was sent before the answer; read it
            sequence = [m for m in notify.since(start) if {"RELOADING", "READY"} & set(m.fields)]
            assert [("RELOADING" in m.fields, "READY" in m.fields) for m in sequence] == [
                (True, False),
                (False, True),
            ]
            assert "last refusal: reload refused: " in sequence[1].fields["STATUS"]
            assert d.events("reload refused")
    finally:
        notify.close()


def test_stop_sends_stopping_and_empties_the_store(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": notify.path, "FDSTORE": "64"}
    try:
        with NotifiedDaemon(tmp_path, [{"name": "a"}], env) as d:
            notify.wait("READY")
            client = d.connect("a")
            assert client.lstat("/").ok
            wait_until(lambda: any(n.startswith("conn.") for n, _ in notify.store))
            d.signal(signal.SIGTERM)
            assert d.proc.wait(15) == 0
            client.close()
        messages = notify.received()
        stopping = [i for i, m in enumerate(messages) if "STOPPING" in m.fields]
        assert len(stopping) == 1
        assert messages[stopping[0]].fields["STATUS"].startswith("stopping (signal); ")
        assert not [m for m in messages[stopping[0] :] if "READY" in m.fields]
        assert notify.store == []  # nothing keeps a guest's connection open after a stop
    finally:
        notify.close()


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_watchdog_pings_at_half_the_interval_only_while_the_loop_turns(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}  # pings every 0.5 s
    try:
        with NotifiedDaemon(tmp_path, [{"name": "a"}], env) as d:
            pings = notify.wait("WATCHDOG", count=7)
            # Time is the behaviour: the gaps between pings as the kernel queued them
            # (the receiving thread's delays do not count). A ping is due half an
            # interval after the last one was sent, at the first turn of the loop
            # (TICK 0.25 s) after that: never before 0.5 s (0.4: the master may be
            # preempted between reading the clock and sending), on average 0.75 s at
            # most, and under 0.9 s on a loaded machine, inside systemd's 1 s.
            gaps = [b.queued - a.queued for a, b in zip(pings, pings[1:], strict=False)]
            assert min(gaps) > 0.4, gaps
            assert sum(gaps) / len(gaps) < 0.9, gaps

            d.signal(signal.SIGSTOP)
            wait_until(lambda: proc_state(d.proc.pid) == "T", what="master stopped")
            stopped_at = len(notify.received())  # sent before the stop: already queued
            time.sleep(2.0)  # four intervals of pings: the quantity measured, not a sync
            assert notify.since(stopped_at) == []
            d.signal(signal.SIGCONT)
            notify.wait("WATCHDOG", count=len(notify.received("WATCHDOG")) + 2)
    finally:
        notify.close()


def test_watchdog_meant_for_another_process_is_not_answered(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}
    try:
        with NotifiedDaemon(tmp_path, [{"name": "a"}], env) as d:
            notify.wait("READY")
            client = d.connect("a")
            for _ in range(20):  # the loop turns: accepts, hands, housekeeping
                assert client.lstat("/").ok
            client.close()
            wait_until(lambda: "0 connections" in statuses(notify.received())[-1])
        assert notify.received("WATCHDOG") == []
    finally:
        notify.close()


def datagram_sockets(pid: int) -> int:
    """AF_UNIX datagram sockets among `pid`'s descriptors (/proc/net/unix, type 0002)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    lines = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[4] == "0002" and line.split()[6] in inodes)


def test_nothing_happens_without_notify_socket(tmp_path: Path) -> None:
    """WATCHDOG_USEC and FDSTORE alone change nothing: no socket, no message."""
    notify = NotifySocket(tmp_path / "notify")
    control = str(tmp_path / "control.sock")
    env = {"WATCHDOG_USEC": "400000", "FDSTORE": "64"}
    try:
        with NotifiedDaemon(tmp_path, [{"name": "a"}], env, control_socket=control) as d:
            client = d.connect("a")
            assert client.lstat("/").ok
            d.signal(signal.SIGHUP)
            d.wait_event("reload applied")
            assert datagram_sockets(d.proc.pid) == 0
            client.close()
            assert d.stop() == 0
        assert notify.received() == []
        # The same daemon with the socket named does open one: the probe can tell.
        tmp2 = tmp_path / "named"
        tmp2.mkdir()
        with NotifiedDaemon(tmp2, [{"name": "a"}], {"NOTIFY_SOCKET": notify.path}) as d:
            notify.wait("READY")
            assert datagram_sockets(d.proc.pid) == 1
    finally:
        notify.close()


def test_upgrade_is_a_reload_to_systemd_and_keeps_the_pid(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    control = str(tmp_path / "control.sock")
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000", "FDSTORE": "64"}
    try:
        with NotifiedDaemon(tmp_path, [{"name": "a"}], env, control_socket=control) as d:
            notify.wait("READY")
            client = d.connect("a")
            assert client.lstat("/").ok
            wait_until(lambda: any(n.startswith("conn.") for n, _ in notify.store))
            start = len(notify.received())
            done = subprocess.run([BIN, "upgrade", "--socket", control], capture_output=True)
            assert done.returncode == 0, done
            notify.wait("READY", count=2)
            sequence = [m for m in notify.since(start) if {"RELOADING", "READY"} & set(m.fields)]
            assert [("RELOADING" in m.fields, "READY" in m.fields) for m in sequence] == [
                (True, False),
                (False, True),
            ]
            assert sequence[1].fields["MAINPID"] == str(d.proc.pid)
            assert {m.pid for m in notify.received()} == {d.proc.pid}
            # The new program pings the watchdog and keeps the store in line.
            notify.wait("WATCHDOG", count=len(notify.received("WATCHDOG")) + 2)
            assert client.lstat("/").ok
            names = [n for n, _ in notify.store]
            assert len(names) == len(set(names))

            # Refused (the new program cannot load the configuration): READY=1 again.
            good = d.config.read_text()
            d.config.write_text(good + "\n[[export]]\nname = 5\n")
            start = len(notify.received())
            done = subprocess.run([BIN, "upgrade", "--socket", control], capture_output=True)
            assert done.returncode == 1
            d.config.write_text(good)
            notify.wait("READY", count=3)
            sequence = [m for m in notify.since(start) if {"RELOADING", "READY"} & set(m.fields)]
            assert [("RELOADING" in m.fields, "READY" in m.fields) for m in sequence] == [
                (True, False),
                (False, True),
            ]
            assert "last refusal: upgrade refused: " in sequence[1].fields["STATUS"]
            client.close()
    finally:
        notify.close()


def test_a_restarted_master_takes_the_connections_back_from_the_store(tmp_path: Path) -> None:
    """KillMode=mixed after a master's death: SIGKILL for the master and every worker.
    The store kept the connections and the journals; the master started next with them
    (LISTEN_FDS) serves each guest on: one idle, one half-way through sending a MKDIR,
    one that was still waiting for a worker."""
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": notify.path, "FDSTORE": "64"}
    exports = [{"name": "a", "min_idle": 1, "max_workers": 2}]
    first = NotifiedDaemon(tmp_path, [dict(e) for e in exports], env)
    second = None
    try:
        notify.wait("READY")
        idle = first.connect("a")
        assert idle.lstat("/").ok
        half = first.connect("a")
        assert half.lstat("/").ok
        waiting = first.connect("a")  # both workers busy (max_workers): it waits
        first.wait_event("connection accepted", count=3)
        request = marshal("ddsd", 0, 0, "/made", 0o755)
        half.send_raw(HEADER.pack(MKDIR, len(request)) + request[:5])
        worker = first.serving_worker(2)
        # The worker took the header and five bytes (nothing left unread in the socket)
        # and waits for the rest: they are in its journal.
        wait_until(lambda: queued(half.sock, SIOCOUTQ) == 0, what="partial request read")
        wait_in_syscall(worker, SYS_RECVFROM)
        wait_until(
            lambda: (
                any(n.startswith("conn.3.") for n, _ in notify.store)
                and sum(n.startswith("journal.") for n, _ in notify.store) == 2
            ),
            what="three connections and two journals stored",
        )
        dead = [first.proc.pid, *children(first.proc.pid)]
        for pid in dead:
            os.kill(pid, signal.SIGKILL)
        assert first.proc.wait(10) == -signal.SIGKILL
        wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in dead[1:]))

        with notify.lock:
            passed = list(notify.store)
        second = NotifiedDaemon(tmp_path, [dict(e) for e in exports], env, passed=passed)
        restored = second.wait_event("connection restored", count=3)
        assert sorted(r["old_conn"] for r in restored) == [1, 2, 3]
        assert {r["old_conn"]: r["served"] for r in restored} == {1: True, 2: True, 3: False}
        # Each guest goes on where it was; the half-sent MKDIR is completed and runs once.
        half.send_raw(request[5:])
        assert half.recv_header_reply("status").ok
        assert os.path.isdir(first.exports["a"]["path"] + "/made")
        assert idle.lstat("/made").ok
        idle.close()  # a worker free for the one that waited
        assert waiting.lstat("/").ok
        assert half.lstat("/made").ok
        # The old names left the store; the two live connections are there under their
        # new ids.
        new = {r["old_conn"]: r["conn"] for r in restored}
        wait_until(
            lambda: (
                {n for n, _ in notify.store if n.startswith("conn.")}
                == {f"conn.{new[2]}.a", f"conn.{new[3]}.a"}
            ),
            what="the store holding the live connections under their new names",
        )
        for client in (half, waiting):
            client.close()
        assert second.stop() == 0
    finally:
        if first.proc.poll() is None:
            first.stop()
        if second is not None and second.proc.poll() is None:
            second.stop()
        notify.close()


def test_the_shipped_unit_is_a_notify_service_with_a_watchdog_and_a_store() -> None:
    """The directives this file's behaviour answers to (the unit's other checks are in
    tests/test_systemd_unit.py)."""
    from proxyd import upgrade
    from tests.test_systemd_unit import value, values

    assert value("Type") == "notify"
    assert value("NotifyAccess") == "main"
    watchdog = value("WatchdogSec")
    assert watchdog.endswith("s") and float(watchdog[:-1]) >= 2 * upgrade.CHECK_TIMEOUT
    # The running daemon's verdict, through the socket it listens on now (not the one a
    # possibly broken new configuration would name).
    config = tomllib.loads((CHECKOUT / "conf" / "proxyd.toml").read_text())
    control = config["daemon"]["control_socket"]
    assert value("ExecReload") == f"/usr/local/bin/proxyd reload --socket {control}"
    store = int(value("FileDescriptorStoreMax"))
    assert f"FDSTORE={store}" in values("Environment")
    assert store * 2 >= int(value("LimitNOFILE"))  # two per connection the master holds
