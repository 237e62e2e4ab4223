"""Crash recovery: what a guest is owed when the worker serving it dies.

A worker publishes where it is in the request cycle in its journal (proxyd/slot.py),
with plain stores. When it dies, judge() reads the journal and the connection's socket
queues and returns the verdict; the master acts on it. README's "When a worker dies"
table is this module.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import sys
import time
from dataclasses import dataclass

from proxyd import protocol as p
from proxyd import slot
from proxyd.pool import Connection
from proxyd.slot import Slot

POISON_DEATHS = 3  # in-flight worker deaths within POISON_WINDOW that close a connection
POISON_WINDOW = 60.0  # seconds
REPLY_VERDICT_WAIT = 0.2  # seconds to wait for a guest's next request after an unclear death

SIOCINQ = 0x541B  # bytes waiting to be read (ioctl(2) on a socket, linux/sockios.h)
SIOCOUTQ = 0x5411  # bytes sent and not yet read by the peer

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
    in_flight: bool  # a request was under way: the death counts against the connection
    prefix: bytes = b""  # request bytes a fresh worker must start from

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


def judge(journal: Slot, sock: socket.socket) -> Verdict:
    """The verdict for a connection whose worker died, from the worker's journal and
    the connection's socket queues. Reads only; the caller acts."""
    fields = journal.fields
    phase, have = fields[slot.PHASE], fields[slot.HAVE]
    code, size = journal.header()
    if phase == slot.IDLE or (
        phase == slot.RECEIVING and have == 0 and not journal.header_consumed()
    ):
        return Verdict(HAND_ON, "nothing was in flight", code, in_flight=False)
    if phase == slot.RECEIVING and have > 0:
        return Verdict(
            HAND_ON,
            "partly received request handed on",
            code,
            in_flight=True,
            prefix=bytes(journal.request[:have]),
        )
    if phase == slot.EXECUTING:
        return Verdict(ANSWER_EIO, "answered EIO", code, in_flight=True)
    if phase == slot.REPLY_READY:
        if queued(sock, SIOCOUTQ) > 0 or queued(sock, SIOCINQ) > 0:
            return Verdict(HAND_ON, "reply had been sent", code, in_flight=True)
        return Verdict(AWAIT_NEXT, "reply state unknown", code, in_flight=True)
    if code in p.REQUESTS and size <= p.MAX_PAYLOAD and queued(sock, SIOCINQ) == 0:
        # Died between a recv that returned and recording it (a kill that arrives
        # while the recv is being woken up lands here). The header is in the buffer
        # and nothing is left in the socket: a client that writes each request
        # whole, as QEMU does, had its whole request consumed, and it is there.
        return Verdict(
            HAND_ON,
            "received request handed on",
            code,
            in_flight=True,
            prefix=bytes(journal.request[: p.HEADER_SIZE + size]),
        )
    # Part of the request may still be in the socket and part consumed: how much, we
    # cannot tell, and a wrong guess would desynchronise the stream.
    return Verdict(CLOSE, "died while receiving", code, in_flight=True)


def eio_reply(code: int) -> bytes | None:
    """The -EIO reply in the form request `code` needs (an fd reply for OPEN and
    CREATE, a status reply otherwise); None for an unknown code."""
    request = p.REQUESTS.get(code)
    if request is None:
        return None
    if request.reply == p.FD:
        return p.encode_fd_reply(-errno.EIO)
    return p.encode_error(errno.EIO)


def count_death(conn: Connection, now: float | None = None) -> bool:
    """Count a worker death with a request in flight against `conn`; True when it is
    the POISON_DEATHS-th within POISON_WINDOW (a request that kills whoever serves it)."""
    now = time.monotonic() if now is None else now
    conn.deaths = [t for t in conn.deaths if now - t < POISON_WINDOW] + [now]
    return len(conn.deaths) >= POISON_DEATHS
