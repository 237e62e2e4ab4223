"""End to end: a real Linux guest under QEMU uses a 9p share served over the proxy protocol.

Each test boots the guest of tests/guest.py, runs tests/e2e_workload.sh on the share and then
checks the export on the host. test_guest_workload runs against the reference
virtfs-proxy-helper and against proxyd, each reached by a named socket (-s) and by an inherited
socketpair (-f). The daemon tests run proxyd as the long-running daemon: its workers are killed
under a running guest (waiting for a request, the guest stopped meanwhile, and executing
one), and one daemon serves two guests booted side by side.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import (
    SYS_OPENAT,
    SYS_RECVFROM,
    Daemon,
    children,
    title,
    wait_in_syscall,
    wait_until,
)
from tests.guest import ROOT, Guest, GuestResult, ensure_guest_built, run_command, run_guest

REFERENCE = "/usr/lib/qemu/virtfs-proxy-helper"
WORKLOAD = Path(__file__).with_name("e2e_workload.sh")


@dataclass
class Server:
    export: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    socket_path: str | None  # what QEMU is given: a socket path or an inherited descriptor
    sock_fd: int | None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def guest_images() -> None:
    ensure_guest_built()  # build once, up front, outside any test's timing


@pytest.fixture(params=["reference-s", "reference-f", "proxyd-s", "proxyd-f"])
def server(request: pytest.FixtureRequest, tmp_path: Path, guest_images: None) -> Iterator[Server]:
    """Start one server on a fresh export; stop it and show its stderr afterwards."""
    kind, transport = request.param.split("-")
    export = tmp_path / "export"
    export.mkdir()
    argv = [REFERENCE] if kind == "reference" else [sys.executable, "-m", "proxyd"]
    argv += ["-n", "-p", str(export)]
    stderr_path = tmp_path / "server.stderr"
    # Socket paths must fit sun_path (108 bytes); pytest's tmp_path may not.
    sock_dir = tempfile.TemporaryDirectory(prefix="e2e-")
    sock_path: str | None = None
    ours: socket.socket | None = None
    with stderr_path.open("wb") as stderr:
        if transport == "s":
            sock_path = os.path.join(sock_dir.name, "sock")
            argv += ["-s", sock_path, "-u", "0", "-g", "0"]
            proc = subprocess.Popen(argv, cwd=ROOT, stderr=stderr)
        else:
            # How libvirt does it: a connected pair, one end inherited by each side.
            theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            argv += ["-f", str(theirs.fileno())]
            proc = subprocess.Popen(argv, cwd=ROOT, stderr=stderr, pass_fds=[theirs.fileno()])
            theirs.close()
    srv = Server(export, proc, stderr_path, sock_path, ours.fileno() if ours else None)
    try:
        if sock_path is not None:
            # QEMU refuses to start if nobody listens yet.
            deadline = time.monotonic() + 10
            while not os.path.exists(sock_path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{kind} did not create {sock_path}:\n{srv.stderr()}")
                time.sleep(0.02)
        yield srv
    finally:
        if ours is not None:
            ours.close()
            # -f: the server ends with its connection; give it the time to, rather than
            # cutting its own graceful stop short with a SIGTERM (proxyd: "stopping now").
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sock_dir.cleanup()
        # pytest shows this (captured) output only when the test failed.
        print(f"--- {request.param} exit status {proc.returncode}, stderr ---\n{srv.stderr()}")


def workload(subdir: str | None = None, pause: float | None = None) -> str:
    """tests/e2e_workload.sh, with its parameters (see its head) set by lines put before it."""
    head = ""
    if subdir is not None:
        head += f"E2E_DIR={shlex.quote(subdir)}\n"
    if pause is not None:
        head += f"E2E_PAUSE={pause}\n"
    return head + WORKLOAD.read_text()


def check_host_tree(root: Path, result: GuestResult) -> None:
    """What tests/e2e_workload.sh leaves in the directory it ran in, as the host sees it."""
    keep = root / "keep"
    assert not (root / "scratch").exists(), "scratch/ was not removed"

    assert (keep / "hello.txt").read_bytes() == b"hello\nworld\n"
    hello = (keep / "hello.txt").lstat()
    assert stat.S_IMODE(hello.st_mode) == 0o644
    assert (hello.st_uid, hello.st_gid, hello.st_nlink) == (0, 0, 2)
    assert (keep / "hello.hard").lstat().st_ino == hello.st_ino

    match = re.search(r"^BIG-SHA256=([0-9a-f]{64})$", result.output, re.MULTILINE)
    assert match, "the guest printed no BIG-SHA256"
    big = (keep / "big.bin").read_bytes()
    assert len(big) == 8 << 20
    assert sha256(big).hexdigest() == match.group(1)

    assert stat.S_IMODE((keep / "mode640").lstat().st_mode) == 0o640
    owned = (keep / "owned").lstat()
    assert (owned.st_uid, owned.st_gid) == (1234, 5678)
    link = (keep / "link").lstat()
    assert stat.S_ISLNK(link.st_mode) and os.readlink(keep / "link") == "hello.txt"
    assert (link.st_uid, link.st_gid) == (1234, 5678), "chown -h must not follow the link"
    # touch -d '2001-02-03 04:05:06' in the guest's UTC.
    assert (keep / "dated").lstat().st_mtime_ns == 981173106 * 10**9
    assert (keep / "dated").lstat().st_atime_ns == 981173106 * 10**9
    assert (keep / "mtime-only").lstat().st_mtime_ns == 1012709106 * 10**9
    assert (keep / "sized").read_bytes() == b"abc"

    dir711 = (keep / "dir711").lstat()
    assert stat.S_ISDIR(dir711.st_mode) and stat.S_IMODE(dir711.st_mode) == 0o711
    moved = keep / "moved"
    assert (moved / "d2" / "d3").is_dir() and len(list(moved.glob("file-*"))) == 100
    assert (keep / ("n" * 255)).is_file()
    assert os.path.exists(os.fsencode(keep) + b"/sp ace-\xe9-\x01"), "byte-exact name"

    fifo = (keep / "fifo").lstat()
    assert stat.S_ISFIFO(fifo.st_mode)
    null = (keep / "null").lstat()
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)

    # Created by uid 1234 in the guest: the server created them as that user.
    for name, is_type in [
        ("file", stat.S_ISREG),
        ("dir", stat.S_ISDIR),
        ("link", stat.S_ISLNK),
        ("fifo", stat.S_ISFIFO),
    ]:
        st = (keep / "shared" / name).lstat()
        assert is_type(st.st_mode), name
        assert (st.st_uid, st.st_gid) == (1234, 5678), name


def assert_workload_passed(result: GuestResult, who: str = "the guest") -> None:
    failed = [line for line in result.output.splitlines() if line.startswith("FAIL ")]
    assert result.mounted, f"{who} could not mount the share"
    assert not failed, f"{who}:\n" + "\n".join(failed)
    # Non-zero with no FAIL line: the workload's shell ended early (its output shows where).
    assert result.exit_status == 0, f"{who}: workload exit status {result.exit_status}"
    assert result.qemu_returncode == 0, f"{who}: QEMU exit status {result.qemu_returncode}"


def test_guest_workload(server: Server) -> None:
    result = run_guest(workload(), socket_path=server.socket_path, sock_fd=server.sock_fd)
    print(f"--- guest output ({result.duration:.1f} s) ---\n{result.output}")
    assert_workload_passed(result)
    check_host_tree(server.export, result)


def test_run_command_carries_programs(tmp_path: Path, guest_images: None) -> None:
    """tests/guest.py's run_command with Debian programs carried into the guest (what
    scripts/bench runs): dbench on its client.txt load with 2 clients, then fs_mark, on a
    share served by proxyd; both run to their end and report a throughput."""
    with Daemon(tmp_path, [{"name": "vm"}]) as daemon:
        try:
            run = run_command(
                "dbench -c /usr/share/dbench/client.txt -t 3 2 && "
                "fs_mark -d /mnt/fsm -n 50 -s 4096 -t 1 -L 1",
                socket_path=daemon.exports["vm"]["socket"],
                programs=["dbench", "fs_mark"],
            )
        finally:
            show_log(daemon)
    print(f"--- command output ({run.duration:.1f} s) ---\n{run.output}")
    assert run.status == 0
    assert 0 < run.duration < run.guest.duration
    dbench = re.search(r"^Throughput ([0-9.]+) MB/sec\s+2 clients", run.output, re.MULTILINE)
    assert dbench and float(dbench.group(1)) > 0, "dbench reported no throughput"
    # fs_mark's result row: FSUse% Count Size Files/sec App-Overhead.
    fs_mark = re.search(r"^\s*\d+\s+50\s+4096\s+([0-9.]+)\s+\d+\s*$", run.output, re.MULTILINE)
    assert fs_mark and float(fs_mark.group(1)) > 0, "fs_mark reported no files/s"
    assert "GUEST-RUN" not in run.output  # the markers are not part of the output


# --- proxyd as a long-running daemon --------------------------------------------------------


class FlagsDaemon:
    """proxyd started with the reference's flags, ``-n -p EXPORT -s SOCKET -u 0 -g 0``.

    tests.daemon.Daemon starts proxyd with --config only; this offers the part of its
    interface that the tests below use (exports, proc, log_path, events, wait_event,
    worker_titles, stop), written out rather than borrowed from its internals.
    """

    def __init__(self, tmp: Path, name: str = "vm") -> None:
        path, sock = tmp / name, tmp / f"{name}.sock"
        path.mkdir()
        # The export is named after the directory: that is what the log and titles say.
        self.exports = {name: {"name": name, "path": str(path), "socket": str(sock)}}
        self.log_path = tmp / "proxyd.stderr"  # -n: JSON lines on stderr
        with self.log_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxyd", "-n", "-p", str(path), "-s", str(sock)]
                + ["-u", "0", "-g", "0"],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        try:
            self.wait_event("worker spawned", timeout=30)
        except BaseException:
            self.stop()
            raise

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if (event is None or record.get("event") == event) and all(
                record.get(k) == v for k, v in match.items()
            ):
                found.append(record)
        return found

    def wait_event(
        self, event: str, timeout: float = 10.0, count: int = 1, **match: Any
    ) -> list[dict[str, Any]]:
        try:
            return wait_until(
                lambda: len(found := self.events(event, **match)) >= count and found,
                timeout,
                f"log event {event!r} {match} x{count}",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_path.read_text(errors='replace')}") from None

    def worker_titles(self) -> dict[int, str]:
        return {pid: title(pid) for pid in children(self.proc.pid)}

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def show_log(daemon: Daemon | FlagsDaemon) -> None:
    """The daemon's log, shown by pytest when the test failed."""
    print(f"--- proxyd log ---\n{daemon.log_path.read_text(errors='replace')}")


def show_guest(name: str, guest: Guest, result: GuestResult | None = None) -> None:
    timing = ""
    if result is not None:
        timing = (
            f" (mounted after {result.mount_time or 0:.1f} s, ended at {result.duration:.1f} s)"
        )
    print(f"--- {name} output{timing} ---\n{guest.output()}")


def accepted_from(
    daemon: Daemon | FlagsDaemon, guest: Guest, timeout: float = 60
) -> dict[str, Any]:
    """The "connection accepted" event of this guest's QEMU (SO_PEERCRED pid)."""
    return daemon.wait_event(
        "connection accepted", timeout=timeout, role="master", peer_pid=guest.proc.pid
    )[0]


PAUSE = 1.0  # seconds the guest sleeps, touching nothing on the share, at each pause point


def stopped(pid: int) -> bool:
    """Whether `pid` is stopped (state "T" in /proc/PID/stat)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] == "T"


def test_guest_unaware_of_idle_worker_kills(tmp_path: Path, guest_images: None) -> None:
    """SIGKILL the worker serving a running guest twice, each time while it waits for the
    guest's next request: the guest keeps its mount and its open files, the workload
    passes, and the daemon's log tells what happened.

    What this proves, and what it does not: the deaths of an idle worker (between
    requests) are invisible, the connection moving to a fresh worker with the descriptors
    QEMU holds still valid. A death while a request executes is
    test_guest_unaware_of_a_kill_during_a_read (one read-only request, held in the worker
    by a host lease) and tests/test_guest_soak.py (minutes of stress-ng, kills aimed at
    requests executing). Here the workload announces "GUEST-PAUSE kill-N" on its console
    and then sleeps without touching the share; the test stops QEMU (SIGSTOP) so that no
    request can come, waits for the worker to sit in recvfrom (/proc/PID/syscall: any
    request it was executing is answered), kills it, waits for the master's verdict and
    lets QEMU go on (SIGCONT): the kill lands between two requests however late the test
    saw the line. Pause 1 comes right after the 8 MiB write, pause 2 after the 100-file loop; a
    descriptor opened before pause 1 is read after pause 2.
    """
    with Daemon(tmp_path, [{"name": "vm"}]) as daemon:
        try:
            with Guest(workload(pause=PAUSE), socket_path=daemon.exports["vm"]["socket"]) as guest:
                try:
                    conn = accepted_from(daemon, guest)["conn"]
                    kills = []  # (worker pid, time.monotonic() of the kill)
                    for n in (1, 2):
                        guest.wait_for_line(rf"GUEST-PAUSE kill-{n}$", timeout=120)
                        os.kill(guest.proc.pid, signal.SIGSTOP)
                        try:
                            wait_until(lambda: stopped(guest.proc.pid), what="QEMU stopped")
                            pid = daemon.serving_worker(conn)
                            wait_in_syscall(pid, SYS_RECVFROM)  # idle: waiting for a request
                            os.kill(pid, signal.SIGKILL)
                            kills.append((pid, time.monotonic()))
                            daemon.wait_event("crash recovery", count=n, timeout=30, conn=conn)
                        finally:
                            os.kill(guest.proc.pid, signal.SIGCONT)
                    result = guest.wait()
                finally:
                    show_guest("guest", guest)
            daemon.wait_event("connection closed", timeout=10, role="master", conn=conn)
        finally:
            show_log(daemon)

        assert guest.mounted_at is not None
        print(
            "kills at "
            + ", ".join(f"{at - guest.mounted_at:.2f} s" for _, at in kills)
            + f" after the mount; the guest ended {result.duration:.1f} s after its start"
        )
        assert kills[0][0] != kills[1][0], "the second kill hit the same (dead) worker"

        assert_workload_passed(result)
        check_host_tree(Path(daemon.exports["vm"]["path"]), result)

        died = [(e["worker_pid"], e["conn"], e["signal"]) for e in daemon.events("worker died")]
        assert died == [(pid, conn, "SIGKILL") for pid, _ in kills]
        recovered = [(e["conn"], e["outcome"]) for e in daemon.events("crash recovery")]
        assert recovered == [(conn, "nothing was in flight")] * 2
        for bad in (
            "poison connection closed",
            "connection closed after a crash: reply state unknown",
        ):
            assert not daemon.events(bad), bad
        closed = daemon.events("connection closed", role="master", conn=conn)
        assert closed[0]["reason"] == "eof", closed  # the guest unmounted and powered off
        assert daemon.proc.poll() is None, "the daemon exited"


LEASED = b"leased content\n"
READ_LEASED = """
echo GUEST-OPENING
if got=$(cat leased 2>&1); then echo "GUEST-READ $got"; else echo "GUEST-READ-FAILED $got"; fi
"""


def test_guest_unaware_of_a_kill_during_a_read(tmp_path: Path, guest_images: None) -> None:
    """SIGKILL the worker while it executes a read-only request of the guest's `cat` of a
    file: the guest reads the file and never sees an error (README, "When a worker dies":
    a request that changes nothing is executed again).

    To hold the request inside the worker, a host process (this one) holds a write
    lease on the file: open(2) for reading breaks it and waits for the holder to let go
    (fcntl(2), F_SETLEASE), so the worker sits in openat until the test releases it. The
    first request that opens the file is GETVERSION (measured: QEMU asks for the file's
    generation when the guest looks the file up, and the worker opens the file for the
    FS_IOC_GETVERSION ioctl), else the guest's OPEN; both change nothing. The
    test waits for that state itself (the lease breaking, the worker in openat), kills the
    worker, waits for the fresh worker to sit in the same openat (the request executed
    again), and only then releases the lease. The kernel ends a break by itself after
    /proc/sys/fs/lease-break-time (45 s), far more than these steps take.
    """
    # A request may wait for the lease longer than the default 30 s under load: the
    # lease, not the daemon's timeout, is what this test is about.
    with Daemon(tmp_path, [{"name": "vm"}], request_timeout=120.0) as daemon:
        leased = Path(daemon.exports["vm"]["path"]) / "leased"
        leased.write_bytes(LEASED)
        old = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease-break notice
        fd = os.open(leased, os.O_RDONLY)
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
            with Guest(READ_LEASED, socket_path=daemon.exports["vm"]["socket"]) as guest:
                try:
                    conn = accepted_from(daemon, guest)["conn"]
                    # Breaking: F_GETLEASE gives the type the lease is being broken to.
                    wait_until(
                        lambda: fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_WRLCK,
                        120,
                        "the guest's open breaking the lease",
                    )
                    victim = daemon.serving_worker(conn)
                    wait_in_syscall(victim, SYS_OPENAT)
                    os.kill(victim, signal.SIGKILL)
                    daemon.wait_event("crash recovery", timeout=30, conn=conn)
                    fresh = daemon.serving_worker(conn)
                    wait_in_syscall(fresh, SYS_OPENAT, timeout=30)  # waits for the lease too
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
                    result = guest.wait()
                finally:
                    show_guest("guest", guest)
            daemon.wait_event("connection closed", timeout=10, role="master", conn=conn)
        finally:
            os.close(fd)  # the lease goes with it, if still held
            signal.signal(signal.SIGIO, old)
            show_log(daemon)

    assert victim != fresh
    assert "GUEST-READ leased content" in result.output, result.output
    assert "GUEST-READ-FAILED" not in result.output
    assert result.exit_status == 0 and result.qemu_returncode == 0
    died = [(e["worker_pid"], e["conn"], e["signal"]) for e in daemon.events("worker died")]
    assert died == [(victim, conn, "SIGKILL")]
    recovered = [(e["op"], e["outcome"]) for e in daemon.events("crash recovery", conn=conn)]
    print(f"killed in openat, then: {recovered}")
    assert len(recovered) == 1 and recovered[0][0] in ("getversion", "open"), recovered
    assert recovered[0][1] == "request executed again"
    closed = daemon.events("connection closed", role="master", conn=conn)
    assert closed[0]["reason"] == "eof", closed
    assert leased.read_bytes() == LEASED


@pytest.mark.parametrize("layout", ["one-socket", "two-exports"])
def test_two_guests_one_daemon(layout: str, tmp_path: Path, guest_images: None) -> None:
    """One daemon serves two guests booted side by side, each running the whole workload.

    one-socket: proxyd with the reference's flags (-s). QEMU unlinks the socket path once it
    has connected, so the second guest starts only when the daemon has bound the path again;
    both guests then work in their own sub-directory of the one export. two-exports: --config
    with two exports, a socket each, both guests started at once, each at the top of its own
    export, and neither sees the other's files.
    """
    started = time.monotonic()
    daemon: Daemon | FlagsDaemon
    plan: list[tuple[str, str | None, Path]]  # per guest: socket, E2E_DIR, where keep/ lands
    if layout == "one-socket":
        daemon = FlagsDaemon(tmp_path)
        sock, export = daemon.exports["vm"]["socket"], Path(daemon.exports["vm"]["path"])
        plan = [(sock, "g1", export / "g1"), (sock, "g2", export / "g2")]
    else:
        daemon = Daemon(tmp_path, [{"name": "a"}, {"name": "b"}])
        plan = [(e["socket"], None, Path(e["path"])) for e in daemon.exports.values()]
    guests: list[Guest] = []
    results: list[GuestResult] = []
    try:
        for n, (sock, subdir, _) in enumerate(plan):
            if layout == "one-socket" and n > 0:
                # The first QEMU connected and unlinked the path; wait for it to come back.
                daemon.wait_event("export socket re-bound", timeout=30, count=n)
                wait_until(lambda sock=sock: os.path.exists(sock), 10, f"{sock} bound again")
            guests.append(Guest(workload(subdir=subdir), socket_path=sock))
            if layout == "one-socket":
                accepted_from(daemon, guests[-1])
        conns = [accepted_from(daemon, g)["conn"] for g in guests]
        assert len(set(conns)) == 2

        def serving() -> bool:  # at the same time: a worker busy with each guest
            titles = daemon.worker_titles().values()
            return all(any(f" conn={c} " in t + " " for t in titles) for c in conns)

        wait_until(serving, what=f"a worker serving each of the connections {conns}")
        results = [g.wait() for g in guests]
        for c in conns:
            daemon.wait_event("connection closed", timeout=10, role="master", conn=c)
        wall = time.monotonic() - started
    finally:
        for n, g in enumerate(guests, start=1):
            g.kill()
            show_guest(f"guest {n}", g, results[n - 1] if len(results) >= n else None)
        daemon.stop()
        show_log(daemon)

    print(
        f"{layout}: {wall:.1f} s in all; "
        + "; ".join(
            f"guest {n}: mounted after {r.mount_time or 0:.1f} s, ended at {r.duration:.1f} s"
            for n, r in enumerate(results, start=1)
        )
    )
    for n, ((_, _, root), result) in enumerate(zip(plan, results, strict=True), start=1):
        assert_workload_passed(result, f"guest {n}")
        check_host_tree(root, result)
    if layout == "one-socket":
        assert sorted(os.listdir(export)) == ["g1", "g2"]
        # Bound again after each guest: the daemon was ready for a third VM.
        assert len(daemon.events("export socket re-bound")) == 2
    else:
        for _, _, root in plan:
            assert sorted(os.listdir(root)) == ["keep"]
    assert len({r["peer_pid"] for r in daemon.events("connection accepted")}) == 2
