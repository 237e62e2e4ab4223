"""Crash recovery: what a guest is owed when the worker serving it dies.

A worker publishes where it is in the request cycle in its journal (proxyd/slot.py),
with plain stores. When it dies, judge() reads the journal and the connection's socket
queues and returns the verdict; the master acts on it. README's "When a worker dies"
table is this module.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import sys
import time
from dataclasses import dataclass

from proxyd import protocol as p
from proxyd import slot
from proxyd.pool import Connection
from proxyd.slot import Slot

POISON_DEATHS = 3  # deaths while executing the same request that close its connection
POISON_WINDOW = 60.0  # seconds within which those deaths must fall
REPLY_VERDICT_WAIT = 0.2  # seconds to wait for a guest's next request after an unclear death

SIOCINQ = 0x541B  # bytes waiting to be read (ioctl(2) on a socket, linux/sockios.h)
SIOCOUTQ = 0x5411  # bytes sent and not yet read by the peer

# OPEN flags that make it change the export; without them an OPEN changes nothing.
_OPEN_CHANGES = os.O_CREAT | os.O_TRUNC | os.O_TMPFILE

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
    if phase == slot.IDLE or (
        phase == slot.RECEIVING and have == 0 and not journal.header_consumed()
    ):
        return Verdict(HAND_ON, "nothing was in flight", code)
    if phase == slot.RECEIVING and have > 0:
        prefix = bytes(journal.request[:have])
        return Verdict(HAND_ON, "partly received request handed on", code, prefix=prefix)
    end = p.HEADER_SIZE + size
    if phase in (slot.EXECUTING, slot.REPLY_READY):
        request = bytes(journal.request[:end])
        executed = hashlib.blake2b(request, digest_size=8).hexdigest()
        # Bytes past this request were consumed too (a client that did not wait for its
        # reply): they go on with the connection, whatever happens to this one.
        rest = bytes(journal.request[end:have]) if have > end else b""
    if phase == slot.EXECUTING:
        if retry and changes_nothing(code, request[p.HEADER_SIZE :]):
            outcome = "request executed again"
            return Verdict(HAND_ON, outcome, code, executed, request + rest, again=True)
        return Verdict(ANSWER_EIO, "answered EIO", code, executed, rest)
    if phase == slot.REPLY_READY:
        if queued(sock, SIOCOUTQ) > 0 or queued(sock, SIOCINQ) > 0:
            return Verdict(HAND_ON, "reply had been sent", code, executed, rest)
        return Verdict(AWAIT_NEXT, "reply state unknown", code, executed, rest)
    if code in p.REQUESTS and size <= p.MAX_PAYLOAD and queued(sock, SIOCINQ) == 0:
        # Died between a recv that returned and recording it (a kill that arrives
        # while the recv is being woken up lands here). The header is in the buffer
        # and nothing is left in the socket: a client that writes each request
        # whole, as QEMU does, had its whole request consumed, and it is there.
        prefix = bytes(journal.request[:end])
        return Verdict(HAND_ON, "received request handed on", code, prefix=prefix)
    # Part of the request may still be in the socket and part consumed: how much, we
    # cannot tell, and a wrong guess would desynchronise the stream.
    return Verdict(CLOSE, "died while receiving", code)


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
    if phase == slot.RECEIVING and queued(sock, SIOCINQ) > 0:
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
