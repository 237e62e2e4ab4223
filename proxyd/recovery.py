"""Crash recovery: what a guest is owed when the worker serving it dies.

A worker publishes where it is in the request cycle in its journal (proxyd/slot.py),
with plain stores. When it dies, judge() reads the journal and the connection's socket
queues and returns the verdict; the master acts on it. README's "When a worker dies"
table is this module.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import os
import select
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxyd import protocol as p
from proxyd import server, slot
from proxyd.metrics import Events
from proxyd.pool import Connection, Worker
from proxyd.slot import Slot

POISON_DEATHS = 3  # deaths while executing the same request that close its connection
POISON_WINDOW = 60.0  # seconds within which those deaths must fall
REPLY_VERDICT_WAIT = 0.2  # seconds to wait for a guest's next request after an unclear death

SIOCINQ = 0x541B  # bytes waiting to be read (ioctl(2) on a socket, linux/sockios.h)
SIOCOUTQ = 0x5411  # bytes sent and not yet read by the peer

# OPEN flags that make it change the export; without them an OPEN changes nothing.
# (O_TMPFILE by its own bit: the flag includes O_DIRECTORY, which alone changes nothing.)
_OPEN_CHANGES = os.O_CREAT | os.O_TRUNC | (os.O_TMPFILE & ~os.O_DIRECTORY)

# Actions.
HAND_ON = "hand on"  # a fresh worker takes the connection (with `prefix` in its buffer)
ANSWER_EIO = "answer EIO"  # the request may have run: -EIO, then a fresh worker
AWAIT_NEXT = "await next request"  # a reply that may or may not have left: wait and see
CLOSE = "close"  # the stream's state cannot be known: close it


@dataclass(frozen=True)
class Verdict:
    action: str
    outcome: str  # what the `crash recovery` log line says
    code: int  # the request code in the journal's header (0 when none)
    # A digest of the request that was executing or replying (None when none was):
    # the same request dying again and again is poison.
    executed: str | None = None
    prefix: bytes = b""  # request bytes a fresh worker must start from
    again: bool = False  # the request was executed and will be executed once more
    request: bytes = b""  # the request executing or replying (header and payload)

    @property
    def op(self) -> str | None:
        return op_name(self.code)


def op_name(code: int) -> str | None:
    """The request's name (`lstat`, ...), None for a code that is not a request."""
    request = p.REQUESTS.get(code)
    return request.name if request is not None else None


def queued(sock: socket.socket, request: int) -> int:
    """SIOCINQ / SIOCOUTQ of a socket: bytes queued (see unix(7))."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), request, buf)
    return int.from_bytes(buf, sys.byteorder)


def readable(sock: socket.socket) -> bool:
    """Whether a recv would return at once: bytes wait, or the peer closed (poll(2))."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def changes_nothing(code: int, payload: bytes) -> bool:
    """Whether running request `code` again is exactly as correct as running it once:
    it reads the export and changes nothing in it (LSTAT, READLINK, STATFS, LGETXATTR,
    LLISTXATTR, GETVERSION, and OPEN without O_CREAT, O_TRUNC or O_TMPFILE)."""
    request = p.REQUESTS.get(code)
    if request is None or request.mutates:
        return False
    if code != p.T_OPEN:
        return True
    try:
        _, flags = p.decode_path_int(payload)
    except p.MalformedRequest:
        return False
    return not flags & _OPEN_CHANGES


def judge(journal: Slot, sock: socket.socket, retry: bool = True) -> Verdict:
    """The verdict for a connection whose worker died, from the worker's journal and
    the connection's socket queues. Reads only; the caller acts. `retry=False` (the
    master killed a request that ran too long) answers EIO even where running the
    request again would be correct: it would most likely hang again."""
    fields = journal.fields
    phase, have = fields[slot.PHASE], fields[slot.HAVE]
    code, size = journal.header()
    if phase == slot.IDLE:
        return Verdict(HAND_ON, "nothing was in flight", code)
    if phase == slot.RECEIVING:
        return _judge_receiving(journal, code, have)
    if phase not in (slot.EXECUTING, slot.REPLY_READY):
        # Only a worker that wrote nonsense in its journal gets here: trust none of it.
        return Verdict(CLOSE, "journal unreadable", code)
    end = p.HEADER_SIZE + size
    request = bytes(journal.request[:end])
    executed = hashlib.blake2b(request, digest_size=8).hexdigest()
    # Bytes past this request were consumed too (a client that did not wait for its
    # reply): they go on with the connection, whatever happens to this one.
    rest = bytes(journal.request[end:have]) if have > end else b""
    if phase == slot.EXECUTING:
        if retry and changes_nothing(code, request[p.HEADER_SIZE :]):
            outcome = "request executed again"
            return Verdict(HAND_ON, outcome, code, executed, request + rest, True, request)
        return Verdict(ANSWER_EIO, "answered EIO", code, executed, rest, request=request)
    if queued(sock, SIOCOUTQ) > 0 or queued(sock, SIOCINQ) > 0:
        return Verdict(HAND_ON, "reply had been sent", code, executed, rest, request=request)
    return Verdict(AWAIT_NEXT, "reply state unknown", code, executed, rest, request=request)


def _judge_receiving(journal: Slot, code: int, have: int) -> Verdict:
    if not received_unrecorded(journal):
        if have == 0:
            return Verdict(HAND_ON, "nothing was in flight", code)
        prefix = bytes(journal.request[:have])
        return Verdict(HAND_ON, "partly received request handed on", code, prefix=prefix)
    # Died between a recv that returned and recording it (a kill that arrives while the
    # recv is being woken up lands here).
    request = unrecorded_request(journal)
    if request is not None:
        return Verdict(HAND_ON, "received request handed on", code, prefix=request)
    # Part of a request consumed, and how much we cannot tell: a wrong guess would run
    # bytes the guest never sent, or desynchronise the stream.
    return Verdict(CLOSE, "died while receiving", code)


def received_unrecorded(journal: Slot) -> bool:
    """Whether the worker received bytes past those it recorded (HAVE): some byte after
    them is no longer what the worker left there (slot.Slot.clear_request). Only a recv
    that returned nothing but bytes equal to what they overwrote goes unseen; QEMU's
    requests start with a non-zero code, so its next request is always seen."""
    have = journal.fields[slot.HAVE]
    start = max(have, p.HEADER_SIZE)
    # A copy and one compare: ~10 µs for the whole buffer (the watchdog asks often).
    if journal.request_from(start) != slot.FILLED_PAYLOAD[start - p.HEADER_SIZE :]:
        return True
    return have < p.HEADER_SIZE and any(journal.request[have : p.HEADER_SIZE])


def received_extent(journal: Slot) -> int:
    """How many bytes the buffer shows received: up to the last byte that is no longer
    what the worker left there."""
    payload = journal.request_from(p.HEADER_SIZE).rstrip(bytes([slot.FILL]))
    if payload:
        return p.HEADER_SIZE + len(payload)
    return len(bytes(journal.request[: p.HEADER_SIZE]).rstrip(b"\0"))


def unrecorded_request(journal: Slot) -> bytes | None:
    """The request a worker received but did not record, when the buffer proves that
    exactly it arrived: a known code, and the bytes received end with its payload's
    last byte (written, as it is not FILL; bytes arrive in order, so all before it did
    too). None when that cannot be told: a request that ends in FILL, or a client that
    sent more without waiting."""
    code, size = journal.header()
    if code not in p.REQUESTS or not 0 < size <= p.MAX_PAYLOAD:
        return None  # every request has a payload: a zero size is a header cut short
    end = p.HEADER_SIZE + size
    if received_extent(journal) != end:
        return None
    return bytes(journal.request[:end])


# What the watchdog finds in the journal of a busy worker that has stopped moving.
HUNG = "hung"  # executing a request (or sending its reply): SIGABRT, then SIGKILL; EIO
UNRESPONSIVE = "unresponsive"  # request bytes wait that it does not take: SIGKILL, hand on


def stuck(journal: Slot, sock: socket.socket) -> str | None:
    """HUNG, UNRESPONSIVE or None: what a worker owes its guest right now, judged from
    its journal and its connection's receive queue. The caller decides, by watching
    progress_mark() stay the same, whether it has owed it for too long."""
    phase = journal.fields[slot.PHASE]
    if phase in (slot.EXECUTING, slot.REPLY_READY):
        return HUNG
    # Bytes wait in the socket, or in the buffer (a recv returned that the worker has
    # not recorded: it stopped right there).
    if phase == slot.RECEIVING and (queued(sock, SIOCINQ) > 0 or received_unrecorded(journal)):
        return UNRESPONSIVE
    return None


def progress_mark(journal: Slot) -> tuple[int, int, int]:
    """(phase, requests started, bytes received): it changes whenever a worker moves."""
    fields = journal.fields
    return fields[slot.PHASE], fields[slot.SEQ], fields[slot.HAVE]


def eio_reply(code: int) -> bytes | None:
    """The -EIO reply in the form request `code` needs (an fd reply for OPEN and
    CREATE, a status reply otherwise); None for an unknown code."""
    request = p.REQUESTS.get(code)
    if request is None:
        return None
    if request.reply == p.FD:
        return p.encode_fd_reply(-errno.EIO)
    return p.encode_error(errno.EIO)


def count_death(conn: Connection, request: tuple[int, str], now: float | None = None) -> bool:
    """Count a worker death while `request` was executing or replying: (its number on
    the connection, Verdict.executed). True when that same request has now killed
    POISON_DEATHS workers within POISON_WINDOW (a request that kills whoever serves
    it). A death during another request starts the count again: bad luck is not poison."""
    now = time.monotonic() if now is None else now
    if conn.poison_suspect != request:
        conn.poison_suspect, conn.deaths = request, []
    conn.deaths = [t for t in conn.deaths if now - t < POISON_WINDOW] + [now]
    return len(conn.deaths) >= POISON_DEATHS


# --- acting on it ---------------------------------------------------------------------------

ABORT_GRACE = 2.0  # seconds between SIGABRT and SIGKILL for a hung worker


class Recovery:
    """What the master does for a connection whose worker died or stopped moving.

    `hand_on(conn)` gives a connection back to its pool (a fresh worker takes it, or it
    is closed when its export is gone); `close(conn, reason)` closes one. `undecided`
    holds the connections whose worker died sending a reply, while the master waits to
    see whether the guest read it (handed over in an upgrade)."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        log: Any,
        counters: collections.Counter[str],
        hand_on: Callable[[Connection], None],
        close: Callable[[Connection, str], None],
    ) -> None:
        self.log = log
        self._selector = selector
        self._counters = counters
        self._hand_on = hand_on
        self._close = close
        self.undecided: dict[int, tuple[Connection, str | None, float]] = {}
        self.metrics = Events()  # the master's (proxyd/metrics.py)
        self.audit = "none"  # the audit level in force (the master sets it)
        # Per connection: the audit fields of the request its worker died executing or
        # replying, for the `crash recovery` line (the worker never wrote its op event).
        self._cut_short: dict[int, dict[str, Any]] = {}

    def worker_died(self, w: Worker, conn: Connection, asked_to_leave: bool = False) -> None:
        """Act on the verdict for `conn`, whose worker `w` died: hand it to a fresh
        worker (running a request that changes nothing again, or after an EIO where
        the request may have changed the export), or close it where that is the only
        safe answer. `conn.requests` already counts the requests `w` started.
        `asked_to_leave`: it was retired (an adopted worker leaves so, without a channel
        to say it released its connection): a hand-on then is no crash."""
        # A request the master killed for running too long is not run again.
        verdict = judge(w.journal, conn.sock, retry=w.killed_for != HUNG)
        if asked_to_leave and verdict.action == HAND_ON and verdict.executed is None:
            conn.prefix = verdict.prefix
            self.log.info("connection handed on", export=conn.export, conn=conn.id)
            self._hand_on(conn)
            return
        # conn.requests counts the one in flight: with the digest, it names that request.
        if verdict.executed is not None and self._poisoned(conn, (conn.requests, verdict.executed)):
            return
        if verdict.again:
            conn.requests -= 1  # counted again when it runs again
        elif verdict.request:  # its op event is never written: the recovery line says it
            self._cut_short[conn.id] = server.cut_short_fields(verdict.request, self.audit)
        conn.prefix = verdict.prefix
        if verdict.action == HAND_ON:
            self._recovered(conn, verdict.op, verdict.outcome)
        elif verdict.action == ANSWER_EIO:
            if self._answer_eio(conn, verdict.code):
                self._recovered(conn, verdict.op, verdict.outcome)
            else:
                self._uncertain(conn, verdict.op, "could not send the EIO reply")
        elif verdict.action == AWAIT_NEXT:
            self.await_next_request(conn, verdict.op)
        else:
            self._uncertain(conn, verdict.op, verdict.outcome)

    def await_next_request(self, conn: Connection, op: str | None) -> None:
        """The worker died sending a reply that is no longer queued: either it never
        left, or the guest read it already. A guest that read it soon sends its next
        request; one still waiting never will. Wait REPLY_VERDICT_WAIT for the
        difference (expire() closes the connection after it)."""
        self.undecided[conn.id] = (conn, op, time.monotonic() + REPLY_VERDICT_WAIT)
        self._selector.register(
            conn.sock, selectors.EVENT_READ, lambda sock, conn=conn: self._reply_was_read(conn)
        )

    def expire(self, now: float, stopping: bool) -> None:
        """Close the undecided connections whose guest sent nothing in time (all of
        them when the daemon is stopping)."""
        for conn_id, (conn, op, deadline) in list(self.undecided.items()):
            if now < deadline and not stopping:
                continue
            if not stopping and readable(conn.sock):
                # It came in time; a master running late must not hold that against it.
                self._reply_was_read(conn)
            else:
                del self.undecided[conn_id]
                self._selector.unregister(conn.sock)
                self._uncertain(conn, op, "died sending a reply; the guest sent nothing since")

    def watch(self, w: Worker, now: float, timeout: float) -> None:
        """The watchdog, for a worker serving a connection. A request executing longer
        than `timeout` (seconds): SIGABRT (then SIGKILL after ABORT_GRACE); the guest gets
        EIO. Request bytes waiting that the worker has not taken for `timeout` (stopped,
        or stuck before its recv): SIGKILL; the request never started, so the connection
        simply goes on with a fresh worker. A reply being sent gets twice the time: a
        peer that does not read is the worker's own to cut off (server._send_all)."""
        assert w.conn is not None
        kind = stuck(w.journal, w.conn.sock)
        mark = progress_mark(w.journal) if kind is not None else None
        if mark is None or mark != w.watch_mark:
            w.watch_mark, w.watch_since = mark, now
            return
        if now - w.watch_since < timeout * (2 if mark[0] == slot.REPLY_READY else 1):
            return
        if w.killed_for is None:
            w.killed_for, w.killed_at = kind, now
            fields = {"export": w.pool.name, "worker_pid": w.pid, "conn": w.conn.id}
            self.metrics.watchdog_killed(w.pool.name, kind)
            if kind == UNRESPONSIVE:
                self._counters["unresponsive_killed"] += 1
                self.log.warning("worker unresponsive", timeout_s=timeout, **fields)
                w.signal(signal.SIGKILL)
            else:
                self._counters["hung_killed"] += 1
                code, _ = w.journal.header()
                op = op_name(code) or code
                self.log.warning(
                    "request timed out, killing worker", op=op, timeout_s=timeout, **fields
                )
                w.signal(signal.SIGABRT)
        elif now - w.killed_at > ABORT_GRACE:  # a stopped process ignores SIGABRT
            w.signal(signal.SIGKILL)

    def _poisoned(self, conn: Connection, request: tuple[int, str]) -> bool:
        """The same request has killed POISON_DEATHS workers: close its connection."""
        if not count_death(conn, request):
            return False
        self._counters["poison_closed"] += 1
        self.metrics.poisoned(conn.export)
        self.log.warning(
            "poison connection closed",
            export=conn.export,
            conn=conn.id,
            deaths=len(conn.deaths),
            window_s=POISON_WINDOW,
        )
        self._close(conn, "poison")
        return True

    def _recovered(self, conn: Connection, op: str | None, outcome: str) -> None:
        self._counters["recoveries"] += 1
        self.metrics.recovered(conn.export, outcome)
        self.log.warning(
            "crash recovery",
            export=conn.export,
            conn=conn.id,
            op=op,
            outcome=outcome,
            **self._cut_short.pop(conn.id, {}),
        )
        self._hand_on(conn)

    def _reply_was_read(self, conn: Connection) -> None:
        _, op, _ = self.undecided.pop(conn.id)
        self._selector.unregister(conn.sock)
        self._recovered(conn, op, "reply had been sent")  # a next request, or EOF: both fine

    def _uncertain(self, conn: Connection, op: str | None, detail: str) -> None:
        self._counters["uncertain_closed"] += 1
        self.metrics.recovered(conn.export, "reply state unknown")
        self.log.warning(
            "connection closed after a crash: reply state unknown",
            export=conn.export,
            conn=conn.id,
            op=op,
            detail=detail,
            **self._cut_short.pop(conn.id, {}),
        )
        self._close(conn, "crash, reply state unknown")

    def _answer_eio(self, conn: Connection, code: int) -> bool:
        reply = eio_reply(code)
        if reply is None:
            return False
        try:
            return conn.sock.send(reply, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL) == len(reply)
        except OSError:
            return False
