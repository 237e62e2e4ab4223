"""Every row of README's "When a worker dies" table, and the watchdog's, on a real daemon.

Each test holds the worker serving a guest at exactly the point its row is about and
kills it there, then checks what the guest gets (its reply, an errno, a connection
that goes on or is closed) and the master's verdict in the log. The point is reached
by what the kernel says, never by a sleep: ptrace(2) stops at the entry or exit of the
system call that marks it (tests/ptrace.py; the worker's journal stores sit between
those calls, server.py), a host lease that blocks the operation in the kernel, or
SIGSTOP; the socket queues (SIOCINQ / SIOCOUTQ of the guest's end) confirm what is
left where. tests/test_recovery.py checks the same verdicts on a journal without a
daemon; tests/test_containment.py the read-only request run again and poison.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxyd.recovery import REPLY_VERDICT_WAIT
from tests.daemon import Daemon, wait_in_syscall, wait_until
from tests.proxyclient import (
    CREATE,
    LSTAT,
    MKDIR,
    OPEN,
    REMOVE,
    TRUNCATE,
    ConnectionClosed,
    ProxyClient,
    Reply,
    decode_stat,
    errno_of,
    marshal,
)
from tests.ptrace import (
    SYS_EPOLL_CTL,
    SYS_IOCTL,
    SYS_MKDIR,
    SYS_NEWFSTATAT,
    SYS_OPENAT,
    SYS_RECVFROM,
    SYS_RECVMSG,
    SYS_SENDMSG,
    SYS_SENDTO,
    SYS_TRUNCATE,
    Tracer,
)

HEADER = struct.Struct("=II")
SIOCINQ, SIOCOUTQ = 0x541B, 0x5411  # linux/sockios.h; unix(7)
SENDS = (SYS_SENDTO, SYS_SENDMSG)  # the reply's system calls (libc send(), sendmsg())
CLOSED = "connection closed after a crash: reply state unknown"
CONTENT = b"data"


def request(code: int, fmt: str, *args: Any) -> bytes:
    payload = marshal(fmt, *args)
    return HEADER.pack(code, len(payload)) + payload


LSTAT_F = request(LSTAT, "s", "/f")


def queued(client: ProxyClient) -> tuple[int, bool]:
    """What waits in the guest's end of the connection: (bytes for the guest to read,
    whether bytes it sent wait untaken by any worker). SIOCINQ counts bytes; SIOCOUTQ
    of a unix socket counts the memory of the buffers the peer has not read, so only
    whether it is 0 says something (unix(7), net/unix/af_unix.c)."""
    counts = []
    for request_code in (SIOCINQ, SIOCOUTQ):
        buf = bytearray(4)
        fcntl.ioctl(client.sock.fileno(), request_code, buf)
        counts.append(int.from_bytes(buf, sys.byteorder))
    return counts[0], counts[1] > 0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1}]) as d:
        (export(d) / "f").write_bytes(CONTENT)
        yield d


def export(d: Daemon) -> Path:
    return Path(d.exports["a"]["path"])


def serve(d: Daemon) -> tuple[ProxyClient, int, int]:
    """A guest served: (its client, its connection id, the pid of its worker)."""
    client = d.connect("a")
    assert client.lstat("/").ok
    conn = d.wait_event("connection accepted")[-1]["conn"]
    return client, conn, d.serving_worker(conn)


def held_waiting(pid: int) -> Tracer:
    """The worker `pid` held at the entry of the recvfrom that waits for the guest's
    next request (its journal says RECEIVING, nothing of it consumed)."""
    tracer = Tracer(pid)
    try:
        tracer.until(SYS_RECVFROM, entry=True)
    except BaseException:
        tracer.release()
        raise
    return tracer


def is_lstat_of_f(d: Daemon, reply: Reply) -> bool:
    """The reply is the LSTAT of /f: the request the test sent, answered once."""
    host = os.lstat(export(d) / "f")
    record = decode_stat(reply.data) if reply.ok and reply.data else {}
    return record.get("ino") == host.st_ino and record.get("size") == len(CONTENT)


def recovered(d: Daemon, conn: int, victim: int, outcome: str, op: str | None) -> None:
    """The master logged the death of `victim` and exactly this verdict for `conn`."""
    d.wait_event("worker died", worker_pid=victim, signal="SIGKILL")
    d.wait_event("crash recovery", conn=conn, outcome=outcome, op=op)
    assert len(d.events("crash recovery", conn=conn)) == 1, d.events("crash recovery")
    assert not d.events(CLOSED)


def goes_on(d: Daemon, client: ProxyClient, conn: int, victim: int) -> None:
    """The connection is in step and served by a fresh worker: the next request's
    reply is its own (a directory: not a stale or repeated reply about /f)."""
    reply = client.lstat("/")
    assert reply.ok and stat.S_ISDIR(decode_stat(reply.data)["mode"])
    assert d.serving_worker(conn) != victim
    assert queued(client) == (0, False)


# --- idle, or waiting for a request --------------------------------------------------------


def test_waiting_for_a_request_costs_nothing(daemon: Daemon) -> None:
    """Killed in the recvfrom that waits for the next request: the guest never notices."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        assert queued(client) == (0, False)
        worker.kill()
    recovered(daemon, conn, victim, "nothing was in flight", None)
    assert is_lstat_of_f(daemon, client.lstat("/f"))
    goes_on(daemon, client, conn, victim)


def test_spare_killed_as_it_takes_a_connection_costs_nothing(daemon: Daemon) -> None:
    """The spare worker held at the exit of the recvmsg that brought it a new connection
    (the master has handed it over; the worker has not looked at it yet), the guest's
    first request already sent: killed there, a fresh worker answers it."""
    [spare] = daemon.workers()
    with Tracer(spare) as worker:
        client = daemon.connect("a")
        client.send_raw(LSTAT_F)
        brought = worker.until(SYS_RECVMSG, entry=False, where=lambda stop: stop.rval > 0)
        conn = daemon.wait_event("connection accepted")[-1]["conn"]
        assert queued(client) == (0, True), brought  # none of it taken
        worker.kill()
    recovered(daemon, conn, spare, "nothing was in flight", None)
    assert is_lstat_of_f(daemon, client.recv_header_reply("data"))
    goes_on(daemon, client, conn, spare)


# --- part way through receiving ------------------------------------------------------------


def test_partly_received_request_goes_on_with_its_bytes(daemon: Daemon) -> None:
    """The guest sends 10 of its request's 12 bytes; the worker takes them, records
    them, and is held back in recvfrom for the rest: killed there, the fresh worker
    starts from those 10 bytes, and the guest's last 2 complete the request."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(LSTAT_F[:10])
        part = worker.until(SYS_RECVFROM, entry=False, where=lambda stop: stop.rval > 0)
        assert part.rval == 10
        worker.until(SYS_RECVFROM, entry=True, not_past=(SYS_NEWFSTATAT, *SENDS))
        worker.kill()
    recovered(daemon, conn, victim, "partly received request handed on", "lstat")
    client.send_raw(LSTAT_F[10:])
    assert is_lstat_of_f(daemon, client.recv_header_reply("data"))
    goes_on(daemon, client, conn, victim)


# --- killed as its recv returned, before recording it --------------------------------------


def test_request_received_but_not_recorded_is_handed_on_whole(daemon: Daemon) -> None:
    """Held at the exit of the recvfrom that returned the whole request, before the
    worker recorded it (a kill arriving as the recv is woken lands there): nothing is
    left in the socket, so the fresh worker executes the request from the buffer."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(LSTAT_F)
        got = worker.until(SYS_RECVFROM, entry=False, where=lambda stop: stop.rval > 0)
        assert got.rval == len(LSTAT_F)
        assert queued(client) == (0, False)
        worker.kill()
    recovered(daemon, conn, victim, "received request handed on", "lstat")
    assert is_lstat_of_f(daemon, client.recv_header_reply("data"))
    goes_on(daemon, client, conn, victim)


def test_request_received_in_part_but_not_recorded_closes_the_connection(daemon: Daemon) -> None:
    """The guest writes its request in two parts; the worker is held at the exit of
    the recvfrom that returned the first, and the second arrives meanwhile: how much
    the dead worker had taken cannot be known, so the connection is closed."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(LSTAT_F[:10])
        got = worker.until(SYS_RECVFROM, entry=False, where=lambda stop: stop.rval > 0)
        assert got.rval == 10
        client.send_raw(LSTAT_F[10:])
        assert queued(client) == (0, True)  # the rest waits in the socket
        worker.kill()
    event = daemon.wait_event(CLOSED, conn=conn)[-1]
    assert (event["op"], event["detail"]) == ("lstat", "died while receiving")
    with pytest.raises(ConnectionClosed):
        client.recv_header_reply("data")
    daemon.wait_event("connection closed", conn=conn, reason="crash, reply state unknown")
    assert not daemon.events("crash recovery", conn=conn)


# --- executing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "sent", "call", "entry"),
    [
        ("lstat", LSTAT_F, SYS_NEWFSTATAT, True),  # before its lstat(2)
        ("open", request(OPEN, "sd", "/f", os.O_RDONLY), SYS_OPENAT, False),  # after open(2)
    ],
    ids=["lstat-before-the-call", "open-after-the-call"],
)
def test_executing_a_request_that_changes_nothing_runs_it_again(
    daemon: Daemon, op: str, sent: bytes, call: int, entry: bool
) -> None:
    """Held at the operation's system call (its entry: not made; its exit: made, the
    reply not built): killed there, the fresh worker runs the request again and the
    guest gets its one reply as if nothing happened."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(sent)
        worker.until(call, entry=entry, not_past=SENDS)
        worker.kill()
    recovered(daemon, conn, victim, "request executed again", op)
    if op == "open":
        reply = client.recv_fd_reply()
        assert reply.fd is not None, reply
        assert os.read(reply.fd, 100) == CONTENT
        os.close(reply.fd)
    else:
        assert is_lstat_of_f(daemon, client.recv_header_reply("data"))
    goes_on(daemon, client, conn, victim)


@pytest.mark.parametrize(
    ("op", "sent", "call", "entry"),
    [
        ("mkdir", request(MKDIR, "ddsd", 0, 0, "/new", 0o755), SYS_MKDIR, True),
        ("mkdir", request(MKDIR, "ddsd", 0, 0, "/new", 0o755), SYS_MKDIR, False),
        ("create", request(CREATE, "sdddd", "/new", os.O_CREAT | os.O_RDWR, 0o644, 0, 0),
         SYS_OPENAT, False),
    ],
    ids=["mkdir-before-the-call", "mkdir-after-the-call", "create-after-the-call"],
)  # fmt: skip
def test_executing_a_request_that_may_change_the_export_is_answered_eio(
    daemon: Daemon, op: str, sent: bytes, call: int, entry: bool
) -> None:
    """Held at the operation's system call: killed before it (nothing changed) or after
    it (the directory or file exists), the guest gets -EIO in its reply's form either
    way (it may or may not have happened), and the connection goes on."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(sent)
        worker.until(call, entry=entry, not_past=SENDS)
        worker.kill()
    recovered(daemon, conn, victim, "answered EIO", op)
    if op == "create":
        reply = client.recv_fd_reply()
        assert (reply.value, reply.fd) == (-errno.EIO, None)
    else:
        assert errno_of(client.recv_header_reply("status")) == errno.EIO
    assert (export(daemon) / "new").exists() is not entry  # made or not: EIO says "maybe"
    # The worker never wrote this mutation's op event (audit = mutations): the
    # recovery line names what may have changed, with the fields the op event has.
    (event,) = daemon.events("crash recovery", conn=conn)
    assert event["path"] == "/new" and event["uid"] == 0 and event["gid"] == 0, event
    assert event["mode"] == ("0o755" if op == "mkdir" else "0o644"), event
    assert event.get("flags") == (None if op == "mkdir" else "O_RDWR|O_CREAT"), event
    goes_on(daemon, client, conn, victim)


def test_request_cut_short_is_named_only_where_the_audit_level_logs_it(tmp_path: Path) -> None:
    """audit = none: the recovery line of a mutation answered EIO names the op and no
    path (the host chose not to log what guests touch)."""
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1}], audit="none") as d:
        client, conn, victim = serve(d)
        with held_waiting(victim) as worker:
            client.send_raw(request(MKDIR, "ddsd", 0, 0, "/new", 0o755))
            worker.until(SYS_MKDIR, entry=False, not_past=SENDS)
            worker.kill()
        recovered(d, conn, victim, "answered EIO", "mkdir")
        assert errno_of(client.recv_header_reply("status")) == errno.EIO
        (event,) = d.events("crash recovery", conn=conn)
        assert "path" not in event and "mode" not in event, event


# --- sending a reply ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "sent", "call"),
    [("lstat", LSTAT_F, SYS_SENDTO), ("open", request(OPEN, "sd", "/f", os.O_RDONLY), SYS_SENDMSG)],
    ids=["status-reply", "fd-reply"],
)
def test_reply_still_queued_counts_as_sent(daemon: Daemon, op: str, sent: bytes, call: int) -> None:
    """Held at the exit of the send of the reply, the guest not having read it: it is
    in the guest's socket queue, so the master knows it left; the guest reads it once
    (the fd reply with its descriptor) and goes on."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(sent)
        reply = worker.until(call, entry=False)
        assert queued(client) == (reply.rval, False)
        worker.kill()
    recovered(daemon, conn, victim, "reply had been sent", op)
    if op == "open":
        fd_reply = client.recv_fd_reply()
        assert fd_reply.fd is not None and os.read(fd_reply.fd, 100) == CONTENT
        os.close(fd_reply.fd)
    else:
        assert is_lstat_of_f(daemon, client.recv_header_reply("data"))
    goes_on(daemon, client, conn, victim)


def test_next_request_waiting_means_the_reply_was_read(daemon: Daemon) -> None:
    """Held at the exit of the reply's send; the guest reads the reply and sends its
    next request, which waits in the socket: killed there, the master knows the reply
    was read, and a fresh worker answers the next request."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(LSTAT_F)
        worker.until(SYS_SENDTO, entry=False)
        assert is_lstat_of_f(daemon, client.recv_header_reply("data"))
        client.send_raw(request(LSTAT, "s", "/"))
        assert queued(client) == (0, True)
        worker.kill()
    recovered(daemon, conn, victim, "reply had been sent", "lstat")
    reply = client.recv_header_reply("data")
    assert reply.ok and stat.S_ISDIR(decode_stat(reply.data)["mode"])
    goes_on(daemon, client, conn, victim)


def test_next_request_arriving_after_the_verdict_means_the_reply_was_read(
    daemon: Daemon,
) -> None:
    """The guest read the reply before the kill, so the master finds nothing queued
    either way and waits for the guest's next request. The master is held by ptrace
    right after judge() looked at both queues (its SIOCOUTQ and SIOCINQ ioctls) while
    the guest's next request arrives; let go, it sees the request and hands on.
    (proxyd's own 200 ms wait then only has to cover its own steps from the look to
    its next select, as for any guest.)"""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(LSTAT_F)
        worker.until(SYS_SENDTO, entry=False)
        assert is_lstat_of_f(daemon, client.recv_header_reply("data"))
        assert queued(client) == (0, False)
        with Tracer(daemon.proc.pid) as master:
            worker.kill()
            out = master.until(SYS_IOCTL, entry=False, where=lambda s: s.args[1] == SIOCOUTQ)
            fd = out.args[0]  # the master's descriptor of the connection
            master.until(SYS_IOCTL, entry=False, where=lambda s: s.args[:2] == (fd, SIOCINQ))
            client.send_raw(request(LSTAT, "s", "/"))
    recovered(daemon, conn, victim, "reply had been sent", "lstat")
    reply = client.recv_header_reply("data")
    assert reply.ok and stat.S_ISDIR(decode_stat(reply.data)["mode"])
    goes_on(daemon, client, conn, victim)


@pytest.mark.parametrize("sent", [False, True], ids=["never-sent", "sent-and-read"])
def test_reply_state_unknown_when_the_guest_sends_nothing_more(daemon: Daemon, sent: bool) -> None:
    """Held at the entry of the reply's send (nothing sent) or at its exit with the
    guest having read the reply: either way nothing is queued, the guest sends nothing
    more, and the master cannot tell the two apart: the connection is closed (answering
    again could desynchronise the stream)."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(LSTAT_F)
        worker.until(SYS_SENDTO, entry=not sent)
        if sent:
            assert is_lstat_of_f(daemon, client.recv_header_reply("data"))
        assert queued(client) == (0, False)
        worker.kill()
    event = daemon.wait_event(CLOSED, conn=conn)[-1]
    assert event["op"] == "lstat"
    assert event["detail"] == "died sending a reply; the guest sent nothing since"
    with pytest.raises(ConnectionClosed, match="EOF after 0 of 8 bytes"):
        client.recv_header_reply("data")  # no reply (or no second one): closed
    daemon.wait_event("connection closed", conn=conn, reason="crash, reply state unknown")
    assert not daemon.events("crash recovery", conn=conn)


# --- the watchdog ---------------------------------------------------------------------------


def lease(path: Path, kind: int) -> int:
    """A lease on `path` held by this process (fcntl F_SETLEASE): a read lease blocks
    another process's truncate(2), a write lease its open(2), in the kernel, until the
    lease is released or broken (the kernel's lease-break time, 45 s by default)."""
    fd = os.open(path, os.O_RDONLY if kind == fcntl.F_RDLCK else os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, kind)
    return fd


@pytest.mark.parametrize(
    ("op", "sent", "call", "kind"),
    [
        ("truncate", request(TRUNCATE, "sq", "/f", 0), SYS_TRUNCATE, fcntl.F_RDLCK),
        ("open", request(OPEN, "sd", "/f", os.O_RDONLY), SYS_OPENAT, fcntl.F_WRLCK),
    ],
    ids=["truncate", "read-only-open"],
)
def test_hung_request_is_killed_and_answered_eio(
    tmp_path: Path, op: str, sent: bytes, call: int, kind: int
) -> None:
    """A request held in the kernel by a host lease past request_timeout: the watchdog
    kills its worker and the guest gets -EIO, even for the OPEN that changes nothing
    (run again it would most likely hang again); the connection goes on."""
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease-break notice
    try:
        with Daemon(tmp_path, [{"name": "a", "min_idle": 1}], request_timeout=1.0) as d:
            (export(d) / "f").write_bytes(CONTENT)
            client, conn, victim = serve(d)
            client.sock.settimeout(30)
            fd = lease(export(d) / "f", kind)
            try:
                client.send_raw(sent)
                wait_in_syscall(victim, call)  # executing it, blocked in the kernel
                if op == "open":
                    reply = client.recv_fd_reply()
                    assert (reply.value, reply.fd) == (-errno.EIO, None)
                else:
                    assert errno_of(client.recv_header_reply("status")) == errno.EIO
            finally:
                os.close(fd)
            event = d.wait_event("request timed out, killing worker", conn=conn)[-1]
            assert (event["worker_pid"], event["op"], event["timeout_s"]) == (victim, op, 1.0)
            d.wait_event("crash recovery", conn=conn, outcome="answered EIO", op=op)
            assert len(d.events("crash recovery", conn=conn)) == 1
            assert (export(d) / "f").read_bytes() == CONTENT  # the truncate never ran
            goes_on(d, client, conn, victim)
    finally:
        signal.signal(signal.SIGIO, old)


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_unresponsive_worker_is_killed_and_the_request_handed_on(tmp_path: Path) -> None:
    """The worker stopped (SIGSTOP) while it waits for the next request; the guest's
    request then waits in the socket, untaken, past request_timeout: the watchdog kills
    the worker and a fresh one answers the request, which had not started (no EIO)."""
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1}], request_timeout=1.0) as d:
        (export(d) / "f").write_bytes(CONTENT)
        client, conn, victim = serve(d)
        client.sock.settimeout(30)
        wait_in_syscall(victim, SYS_RECVFROM)  # the reply sent, waiting for the next one
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda: stopped(victim), what="the worker stopped")
        client.send_raw(LSTAT_F)
        assert queued(client) == (0, True)
        assert is_lstat_of_f(d, client.recv_header_reply("data"))
        event = d.wait_event("worker unresponsive", conn=conn)[-1]
        assert (event["worker_pid"], event["timeout_s"]) == (victim, 1.0)
        d.wait_event("crash recovery", conn=conn, outcome="nothing was in flight", op=None)
        assert len(d.events("crash recovery", conn=conn)) == 1
        goes_on(d, client, conn, victim)


# --- poison is one request ------------------------------------------------------------------


def test_deaths_during_different_requests_are_not_poison(daemon: Daemon) -> None:
    """Two workers killed waiting for a request, then four killed each at the entry of
    the mkdir(2) of an identical MKDIR (the same bytes, at four places in the stream):
    the idle deaths cost nothing, each MKDIR gets EIO (and was not made), and the
    connection is never closed: poison is the same request killing again and again."""
    client, conn, _ = serve(daemon)
    mkdir = request(MKDIR, "ddsd", 0, 0, "/d", 0o755)
    for _ in range(2):
        with held_waiting(daemon.serving_worker(conn)) as worker:
            worker.kill()
        assert client.lstat("/").ok
    for _ in range(4):
        with held_waiting(daemon.serving_worker(conn)) as worker:
            client.send_raw(mkdir)
            worker.until(SYS_MKDIR, entry=True, not_past=SENDS)
            worker.kill()
        assert errno_of(client.recv_header_reply("status")) == errno.EIO
    assert client.lstat("/").ok
    assert not (export(daemon) / "d").exists()
    outcomes = [e["outcome"] for e in daemon.events("crash recovery", conn=conn)]
    assert outcomes == ["nothing was in flight"] * 2 + ["answered EIO"] * 4
    assert not daemon.events("poison connection closed")
    assert not daemon.events(CLOSED)


# --- a recv that returned, not yet recorded ----------------------------------------------


def test_request_cut_after_its_header_is_not_completed_from_stale_bytes(daemon: Daemon) -> None:
    """A client that writes a request's header and its payload apart, its worker killed
    as the recv that returned the header alone returns (before it recorded it). The
    buffer after the header still held the payload of an earlier request of the same
    length (LSTAT /victim), and the guest was sending REMOVE /other1: how much of the
    request was taken cannot be told, so the connection is closed, and the request the
    guest never sent (REMOVE /victim) never runs."""
    (export(daemon) / "victim").write_bytes(CONTENT)
    client, conn, victim = serve(daemon)
    assert client.lstat("/victim").ok  # its payload was in the worker's buffer
    remove = request(REMOVE, "s", "/other1")  # as long as "/victim"
    with held_waiting(victim) as worker:
        client.send_raw(remove[: HEADER.size])
        got = worker.until(SYS_RECVFROM, entry=False, where=lambda stop: stop.rval > 0)
        assert got.rval == HEADER.size
        assert queued(client) == (0, False)
        worker.kill()
    daemon.wait_event("worker died", worker_pid=victim)
    closed = daemon.wait_event(CLOSED, conn=conn)[-1]
    assert (closed["op"], closed["detail"]) == ("remove", "died while receiving")
    with pytest.raises((ConnectionClosed, BrokenPipeError, ConnectionResetError)):
        client.send_raw(remove[HEADER.size :])
        client.recv_header_reply("status")
    assert (export(daemon) / "victim").read_bytes() == CONTENT
    assert not daemon.events("op", op="remove")


def test_worker_stopped_as_its_recv_returned_is_found_unresponsive(tmp_path: Path) -> None:
    """A worker stopped (SIGSTOP, a cgroup freezer) right as its recv returned a whole
    request, before it recorded it: nothing waits in the socket, but the watchdog sees
    the request in the buffer, kills the worker and hands the request on, as for a
    worker stopped before its recv."""
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1}], request_timeout=1.0) as d:
        (export(d) / "f").write_bytes(CONTENT)
        client, conn, victim = serve(d)
        client.sock.settimeout(10)  # ten times request_timeout
        with held_waiting(victim) as worker:
            client.send_raw(LSTAT_F)
            worker.until(SYS_RECVFROM, entry=False, where=lambda stop: stop.rval > 0)
            os.kill(victim, signal.SIGSTOP)  # pending: it stops there once let go
            worker.detach()
        wait_until(lambda: stopped(victim), what="the worker stopped")
        assert queued(client) == (0, False)
        assert is_lstat_of_f(d, client.recv_header_reply("data"))
        d.wait_event("worker unresponsive", conn=conn)


def test_next_request_in_time_keeps_the_connection_when_the_master_runs_late(
    daemon: Daemon,
) -> None:
    """The worker died with its reply read and nothing queued; the master starts
    waiting for the guest's next request (it registers the connection with its
    selector: held by ptrace right there), and the guest sends it at once. The master
    then runs late (load; held here) past its REPLY_VERDICT_WAIT: it looks at the
    socket before closing, and the guest, which answered in time, keeps it."""
    client, conn, victim = serve(daemon)
    with held_waiting(victim) as worker:
        client.send_raw(LSTAT_F)
        worker.until(SYS_SENDTO, entry=False)
        assert is_lstat_of_f(daemon, client.recv_header_reply("data"))
        with Tracer(daemon.proc.pid) as master:
            worker.kill()
            out = master.until(SYS_IOCTL, entry=False, where=lambda s: s.args[1] == SIOCOUTQ)
            master.until(
                SYS_EPOLL_CTL, entry=False, where=lambda s: s.args[1:3] == (1, out.args[0])
            )
            client.send_raw(request(LSTAT, "s", "/"))
            assert queued(client) == (0, True)
            # The master late by more than its wait: the time is what is under test.
            time.sleep(REPLY_VERDICT_WAIT + 0.1)
    recovered(daemon, conn, victim, "reply had been sent", "lstat")
    reply = client.recv_header_reply("data")
    assert reply.ok and stat.S_ISDIR(decode_stat(reply.data)["mode"])
