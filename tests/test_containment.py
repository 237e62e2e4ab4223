"""One export, one worker, one client or a stuck log reader never takes the other guests
down (issue 11). Every test runs a real daemon on real sockets with real clients."""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import (
    SYS_OPENAT,
    SYS_RECVFROM,
    SYS_RECVMSG,
    Daemon,
    wait_in_syscall,
    wait_until,
    write_config,
)
from tests.proxyclient import CHECKOUT, LSTAT, OPEN, ConnectionClosed, ProxyClient, marshal

O_CREAT_EXCL_RDWR = os.O_CREAT | os.O_EXCL | os.O_RDWR


def error_lines(d: Daemon) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("level") in ("error", "critical")]


# --- verified I/O clients, one process each (as VMs are) --------------------------------


def verified_io(socket_path: str, index: int, seconds: float, results: Any) -> None:
    """CREATE + write, OPEN + read back, LSTAT, REMOVE, again and again; report every
    round (its completion time and its slowest request), the slowest request of all and
    any error."""
    import socket as socket_module

    rng = random.Random(index)
    sock = socket_module.socket(socket_module.AF_UNIX)
    sock.connect(socket_path)
    client = ProxyClient(sock, timeout=30)
    done: list[tuple[float, float]] = []
    worst, errors = 0.0, []
    deadline = time.monotonic() + seconds
    n = 0
    try:
        while time.monotonic() < deadline:
            name = f"/v{index}-{n}"
            data = rng.randbytes(rng.randint(1, 4096))
            steps = []
            t = time.monotonic()
            reply = client.create(name, O_CREAT_EXCL_RDWR, 0o600, 0, 0)
            steps.append(time.monotonic() - t)
            if reply.fd is None:
                errors.append(f"create {name}: {reply}")
                break
            os.write(reply.fd, data)
            os.close(reply.fd)
            t = time.monotonic()
            reply = client.open(name, os.O_RDONLY)
            steps.append(time.monotonic() - t)
            if reply.fd is None or os.read(reply.fd, 8192) != data:
                errors.append(f"read back {name}: {reply}")
                break
            os.close(reply.fd)
            t = time.monotonic()
            ok = client.lstat(name).ok and client.remove(name).ok
            steps.append((time.monotonic() - t) / 2)
            if not ok:
                errors.append(f"lstat/remove {name}")
                break
            worst = max(worst, *steps)
            done.append((time.time(), max(steps)))
            n += 1
    except Exception as e:  # reported to the test, which fails on it
        errors.append(repr(e))
    finally:
        sock.close()
    results.put((index, done, worst, errors))


def run_clients(d: Daemon, export: str, count: int, seconds: float) -> list[tuple]:
    results: Any = multiprocessing.get_context("fork").Queue()
    socket_path = d.exports[export]["socket"]
    procs = [
        multiprocessing.get_context("fork").Process(
            target=verified_io, args=(socket_path, i, seconds, results)
        )
        for i in range(count)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
    return out


def rounds_in(out: list[tuple], windows: list[tuple[float, float]]) -> list[float]:
    """The rounds completed in `windows`, each as its slowest request (seconds)."""
    return [
        slowest
        for _, done, _, _ in out
        for t, slowest in done
        for lo, hi in windows
        if lo <= t < hi
    ]


def logged_at(event: dict[str, Any]) -> float:
    """When `event` was logged, in seconds since the epoch (its timestamp)."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


# --- 11.4 reloads cost nothing to exports they do not change ------------------------------

STORM_HZ = 20
WINDOW = 4.0  # seconds: quiet and storm windows alternate, so load drifts hit both alike
WINDOWS = 6


def test_reload_storm_keeps_throughput_and_workers(tmp_path: Path) -> None:
    """SIGHUP 20 times a second, in alternating windows, while 8 clients do verified I/O:
    the storm windows keep >= 80 % of the quiet windows' throughput, no request in them
    waits a second or three times the quiet windows' slowest (time is the behaviour
    under test here), no error line is written, and no worker is replaced (the
    configuration is unchanged)."""
    with Daemon(tmp_path, [{"name": "a", "min_idle": 2, "max_workers": 12}]) as d:
        start = time.time() + 1.0  # the clients connect and warm up first
        windows = [(start + i * WINDOW, start + (i + 1) * WINDOW) for i in range(WINDOWS)]
        quiet, storm = windows[0::2], windows[1::2]
        stop = threading.Event()

        def storm_signals() -> None:
            while not stop.is_set():
                now = time.time()
                if any(lo <= now < hi for lo, hi in storm):
                    d.signal(signal.SIGHUP)
                time.sleep(1 / STORM_HZ)  # the storm's rate: the behaviour under test

        stormer = threading.Thread(target=storm_signals)
        stormer.start()
        try:
            out = run_clients(d, "a", 8, seconds=1.0 + WINDOW * WINDOWS)
        finally:
            stop.set()
            stormer.join()
        errors = [e for _, _, _, errs in out for e in errs]
        assert not errors, errors
        during, before = rounds_in(out, storm), rounds_in(out, quiet)
        reloads = len(d.events("reload applied"))
        slowest = {"quiet": max(before, default=0.0), "storm": max(during, default=0.0)}
        print(
            f"reload storm: {reloads} reloads; rounds quiet {len(before)}, storm {len(during)};"
            f" slowest request {slowest}"
        )
        assert reloads >= STORM_HZ * WINDOW  # the storm really happened
        assert len(during) >= 0.8 * len(before), (len(during), len(before))
        # Time is the behaviour: a storm must hold no request up. Load alone makes some
        # request slow in quiet and storm windows alike (beside a CPU hog: over 1 s), so
        # the bound is 1 s (50x a loaded request) or 3x the quiet windows' slowest.
        assert slowest["storm"] < max(1.0, 3 * slowest["quiet"]), slowest
        assert not error_lines(d), error_lines(d)
        # No worker left while the clients ran (each runs past the last window's end).
        # After that the clients close, and spares idle since the start may be retired
        # (IDLE_TRIM, 30 s after their spawn: a loaded machine gets there).
        ended = windows[-1][1]
        left = [e for e in d.events("worker exited") if logged_at(e) < ended]
        assert not left and not d.events("worker died"), left
        assert all(e["replaced"] == [] for e in d.events("reload applied"))


def test_reload_replaces_only_the_export_it_changes(tmp_path: Path) -> None:
    """Reloads that flip export b between read-only and writable, one after another
    (each waited for in the log) while a's clients work: b's workers are replaced each
    time, a's are never touched, a's clients see nothing,
    workers retired before they were ready leave without an error line."""
    exports = [{"name": "a", "min_idle": 1, "max_workers": 8}, {"name": "b", "min_idle": 2}]
    with Daemon(tmp_path, exports) as d:
        a_workers = {p for p, t in d.worker_titles().items() if " a#" in t}
        stop = threading.Event()

        def flip() -> None:  # one reload after another, each waited for in the log
            readonly = False
            try:
                while not stop.is_set():
                    readonly = not readonly
                    b = dict(d.exports["b"], readonly=readonly)
                    write_config(d.config, d.daemon_settings, [d.exports["a"], b])
                    d.signal(signal.SIGHUP)
                    # Counted in the raw log: parsing every line of a log that the
                    # clients' audit lines grow would take longer than a reload.
                    wait_until(
                        lambda: (
                            d.log_path.read_bytes().count(b'"event":"reload applied"') > len(flips)
                        ),
                        30,
                        "the reload applied",
                    )
                    flips.append(readonly)
            except AssertionError as e:  # shown by the test, not lost in the thread
                flip_errors.append(str(e))

        flips: list[bool] = []
        flip_errors: list[str] = []
        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            out = run_clients(d, "a", 4, seconds=8.0)
        finally:
            stop.set()
            flipper.join()
        errors = [e for _, _, _, errs in out for e in errs]
        assert not errors, errors
        replaced = [e["replaced"] for e in d.events("reload applied")]
        print(f"{len(flips)} reloads while a's clients worked")
        assert not flip_errors, flip_errors
        assert len(flips) >= 20, flips  # while a's clients worked
        assert replaced == [["b"]] * len(flips)  # b changed every time, a never
        a_now = {p for p, t in d.worker_titles().items() if " a#" in t}
        assert a_workers <= a_now, "a's spare worker was replaced"
        assert not [e for e in d.events("worker exited") if e.get("export") == "a"]
        assert [e for e in d.events("worker exited") if e.get("export") == "b"]
        assert not error_lines(d), error_lines(d)


# --- 11.5 a worker that stops answering is replaced ----------------------------------------


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_stopped_worker_is_replaced_and_the_request_answered(tmp_path: Path) -> None:
    """SIGSTOP the worker serving a guest, and the spare that would take the next one;
    requests sent to either are answered once the watchdog (request_timeout) has
    replaced the stopped worker, with no EIO: the request never started."""
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1}], request_timeout=2.0) as d:
        client = d.connect("a")
        assert client.lstat("/").ok
        conn = d.wait_event("connection accepted")[-1]["conn"]
        victim = d.serving_worker(conn)
        wait_in_syscall(victim, SYS_RECVFROM)  # waiting for the next request
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda: stopped(victim), what="the worker stopped")
        sent = time.monotonic()
        reply = client.lstat("/")
        waited = time.monotonic() - sent
        assert reply.ok
        event = d.wait_event("worker unresponsive", worker_pid=victim)[-1]
        assert event["conn"] == conn
        assert not Path(f"/proc/{victim}").exists() or not d.worker_titles().get(victim)
        assert d.serving_worker(conn) != victim
        # The timeout is what is tested: replaced after 2 s of silence, well before 30.
        assert 2.0 <= waited < 30.0, waited
        print(f"unresponsive worker replaced after {waited:.2f} s (request_timeout 2 s)")

        spare = wait_until(
            lambda: next((p for p, t in d.worker_titles().items() if t.endswith(" idle")), None),
            what="a spare worker",
        )
        wait_in_syscall(spare, SYS_RECVMSG)  # waiting on its channel for a connection
        os.kill(spare, signal.SIGSTOP)
        wait_until(lambda: stopped(spare), what="the spare stopped")
        second = d.connect("a")  # handed to the stopped spare
        assert second.lstat("/").ok
        d.wait_event("worker unresponsive", worker_pid=spare)
        assert not d.events("crash recovery", outcome="answered EIO")
        assert client.lstat("/").ok


# --- 11.3 an export that breaks is that export's problem alone -----------------------------


def break_export(how: str, path: Path, aside: Path) -> None:
    if how == "renamed away":
        path.rename(aside)
    elif how == "deleted":
        path.rename(aside)  # what a guest may still hold open stays intact ...
        aside.rename(aside.with_name("gone"))  # ... but the export's inode is gone from view
    else:  # replaced by another directory
        path.rename(aside)
        path.mkdir()


def restore_export(how: str, d: Daemon, path: Path, aside: Path) -> None:
    if how == "renamed away":
        aside.rename(path)  # the same directory again: served without a reload
        return
    if how == "deleted":
        path.mkdir()
    # A new directory at the path: served after a reload accepts it.
    d.signal(signal.SIGHUP)


@pytest.mark.parametrize("how", ["renamed away", "deleted", "replaced by another directory"])
def test_broken_export_is_its_own_problem(tmp_path: Path, how: str) -> None:
    exports = [{"name": "a", "min_idle": 1}, {"name": "b", "min_idle": 1}]
    control = str(tmp_path / "control.sock")
    with Daemon(tmp_path, exports, control_socket=control) as d:
        path, aside = Path(d.exports["a"]["path"]), tmp_path / "aside"
        a, b = d.connect("a"), d.connect("b")
        assert a.lstat("/").ok and b.lstat("/").ok
        break_export(how, path, aside)
        event = d.wait_event("export unavailable", export="a")[-1]
        assert event["reason"]
        for _ in range(3):  # new connections to the broken export are refused ...
            with pytest.raises((ConnectionClosed, OSError)):
                d.connect("a", timeout=5).lstat("/")
            assert b.lstat("/").ok  # ... and the other export never notices
        d.wait_event("connection refused", export="a")
        assert d.proc.poll() is None
        status = json.loads(
            subprocess.run(
                [sys.executable, "-m", "proxyd", "status", "--json", "--socket", control],
                capture_output=True,
                check=True,
                cwd=CHECKOUT,
            ).stdout
        )
        state = {e["name"]: e for e in status["exports"]}
        assert not state["a"]["available"] and state["a"]["unavailable_reason"]
        assert state["b"]["available"]
        restore_export(how, d, path, aside)
        d.wait_event("export available again", export="a", timeout=20)
        again = d.connect("a")
        assert again.lstat("/").ok and b.lstat("/").ok
        assert not d.events("export cannot be served, giving up")


# --- 11.2 running out of descriptors is handled, not fatal --------------------------------


def test_descriptor_exhaustion_refuses_instead_of_failing(tmp_path: Path) -> None:
    """RLIMIT_NOFILE 64 (soft and hard, so proxyd cannot raise it), max_workers 100,
    150 connections: the master never fails; it serves what its descriptors allow, stops
    accepting before the limit (the rest wait in the listen backlog or in connect), the
    other export's live guest keeps being served, and the waiting ones are served as
    soon as descriptors are freed."""
    exports = [{"name": "a", "min_idle": 1, "max_workers": 100}, {"name": "b", "min_idle": 1}]
    with Daemon(tmp_path, exports, nofile=64) as d:
        d.wait_event("descriptor limit too low for max_workers")
        other = d.connect("b", unlink=False)
        assert other.lstat("/").ok
        path = d.exports["a"]["socket"]
        clients = []
        for _ in range(150):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)  # with the listen backlog full, connect(2) says EAGAIN
            try:
                sock.connect(path)
            except BlockingIOError:
                sock.close()
                continue
            client = ProxyClient(sock, timeout=2)
            client.send_request(LSTAT, marshal("s", "/"))
            clients.append(client)
        # Replies come to the accepted ones; wait until none has come for 2 s.
        served, waiting = [], list(clients)
        while waiting:
            ready, _, _ = select.select([c.sock for c in waiting], [], [], 2.0)
            if not ready:
                break
            for client in [c for c in waiting if c.sock in ready]:
                client.sock.settimeout(10)
                assert client.recv_header_reply("data").ok
                served.append(client)
                waiting.remove(client)
        low = d.wait_event("descriptors low, not accepting")[-1]
        print(
            f"{len(clients)} connected, {len(served)} served, {len(waiting)} waiting; "
            f"stopped accepting at {low['open']} of {low['limit']} descriptors"
        )
        assert d.proc.poll() is None
        assert served and waiting
        assert low["open"] < low["limit"]
        assert other.lstat("/").ok  # the other export's guest never noticed
        for client in served:
            assert client.lstat("/").ok
        for client in served:  # descriptors freed: the waiting connections get served ...
            client.close()
        for client in waiting:  # ... each in turn, as the ones before it free theirs
            client.sock.settimeout(30)
            assert client.recv_header_reply("data").ok
            client.close()
        d.wait_event("accepting again")
        assert not error_lines(d), error_lines(d)


# --- 11.6 / 11.7 a read-only request is run again; poison is one request ------------------


@contextlib.contextmanager
def write_lease(path: Path) -> Iterator[None]:
    """A host process's write lease on `path` (fcntl F_SETLEASE F_WRLCK): any other open
    of it waits in the kernel for the lease to be broken (here: until we release it)."""
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease-break notice
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        signal.signal(signal.SIGIO, old)


def blocked_in_open(d: Daemon, conn: int) -> int:
    """The pid of the worker serving `conn`, once it is blocked in openat(2)."""
    pid = d.serving_worker(conn)
    wait_in_syscall(pid, SYS_OPENAT)
    return pid


def test_killed_while_executing_a_read_only_request_the_guest_notices_nothing(
    tmp_path: Path,
) -> None:
    """An OPEN for reading held in the kernel by a host lease: its worker is SIGKILLed
    while executing it, twice; each time the request runs again on a fresh worker, and
    once the lease goes the guest gets its descriptor. No EIO, no closed connection."""
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1}]) as d:
        host_file = Path(d.exports["a"]["path"]) / "leased"
        host_file.write_text("data")
        client = d.connect("a")
        assert client.lstat("/").ok
        conn = d.wait_event("connection accepted")[-1]["conn"]
        with write_lease(host_file):
            client.send_request(OPEN, marshal("sd", "/leased", os.O_RDONLY))
            for kill in range(1, 3):
                victim = blocked_in_open(d, conn)
                os.kill(victim, signal.SIGKILL)
                d.wait_event(
                    "crash recovery", count=kill, conn=conn, outcome="request executed again"
                )
            blocked_in_open(d, conn)  # the third worker runs it again, and waits too
        reply = client.recv_fd_reply()
        assert reply.fd is not None, reply
        assert os.read(reply.fd, 10) == b"data"
        os.close(reply.fd)
        assert client.lstat("/leased").ok
        assert not d.events("crash recovery", outcome="answered EIO")


def test_an_idle_worker_dying_with_a_busy_one_is_never_handed_its_connection(
    tmp_path: Path,
) -> None:
    """The spare and the busy worker die together (the master stopped meanwhile): the
    master reads the spare's channel close first, then reaps the busy one, whose
    connection it hands on at once. The spare, idle but on its way out, must not take
    it (the master crashed on an assertion there, taking every guest's share down):
    the guest is answered by a fresh worker and both deaths are logged."""
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1}]) as d:
        client = d.connect("a")
        assert client.lstat("/").ok
        conn = d.wait_event("connection accepted")[-1]["conn"]
        busy = d.serving_worker(conn)
        spawned = d.wait_event("worker spawned", count=2)  # at ready: the spare is idle
        spare = next(e["worker_pid"] for e in spawned if e["worker_pid"] != busy)
        d.signal(signal.SIGSTOP)
        try:
            os.kill(spare, signal.SIGKILL)  # its channel's end is read first
            os.kill(busy, signal.SIGKILL)  # the older child: reaped first
            time.sleep(0.2)
        finally:
            d.signal(signal.SIGCONT)
        assert client.lstat("/").ok
        assert d.proc.poll() is None
        died = {e["worker_pid"] for e in d.wait_event("worker died", count=2)}
        assert died == {busy, spare}
        assert d.serving_worker(conn) not in (busy, spare)


def test_workers_killed_together_in_any_order_cost_no_guest_its_mount(tmp_path: Path) -> None:
    """The class of the test above: rounds of random sets of workers, busy and spare,
    SIGKILLed in random order while the master is stopped, so that it finds their
    channels closed and their exits in one batch. Every quiet guest is answered after
    every round, the master lives, and every death is logged as one."""
    rng = random.Random(1130)
    with Daemon(tmp_path, [{"name": "a", "min_idle": 2, "max_workers": 8}]) as d:
        clients = [d.connect("a") for _ in range(3)]
        assert all(c.lstat("/").ok for c in clients)
        killed: set[int] = set()

        def all_ready() -> list[int] | None:  # 3 busy, 2 spares, each seen ready
            ready = {e["worker_pid"] for e in d.events("worker spawned")}
            workers = d.workers()
            return workers if len(workers) == 5 and set(workers) <= ready else None

        for _ in range(12):
            workers = wait_until(all_ready, what="five workers ready")
            victims = rng.sample(workers, rng.randint(1, len(workers)))
            d.signal(signal.SIGSTOP)
            try:
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
            finally:
                d.signal(signal.SIGCONT)
            killed.update(victims)
            assert all(c.lstat("/").ok for c in clients)
            assert d.proc.poll() is None
        died = d.wait_event("worker died", count=len(killed))
        assert {e["worker_pid"] for e in died} == killed


def test_a_request_that_kills_every_worker_ends_its_connection(tmp_path: Path) -> None:
    """The same read-only request in flight at three worker deaths (run again after each)
    is poison: its connection is closed at the third; the daemon and its other guests
    go on."""
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1}]) as d:
        host_file = Path(d.exports["a"]["path"]) / "leased"
        host_file.write_text("data")
        client, other = d.connect("a"), d.connect("a")
        assert client.lstat("/").ok and other.lstat("/").ok
        conn = d.wait_event("connection accepted", count=2)[0]["conn"]
        with write_lease(host_file):
            client.send_request(OPEN, marshal("sd", "/leased", os.O_RDONLY))
            for kill in range(1, 4):
                os.kill(blocked_in_open(d, conn), signal.SIGKILL)
                if kill < 3:  # reaped and recovered before the next worker is looked for
                    again = "request executed again"
                    d.wait_event("crash recovery", count=kill, conn=conn, outcome=again)
            with pytest.raises(ConnectionClosed):
                client.recv_fd_reply()
        event = d.wait_event("poison connection closed", conn=conn)[-1]
        assert event["deaths"] == 3
        assert len(d.events("crash recovery", conn=conn, outcome="request executed again")) == 2
        assert other.lstat("/leased").ok
