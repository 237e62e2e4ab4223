"""The in-flight journal a worker shares with its master, at no system-call cost.

The master maps one anonymous shared page set per worker before the fork. The worker
receives every request straight into the slot's request buffer and publishes, with
plain memory stores, where it is in the request cycle. If the worker dies, the
master reads the slot to decide what the guest is owed:

    RECEIVING, nothing consumed      -> nothing: hand the connection on
    RECEIVING, part of a request     -> hand the connection on with those bytes
    EXECUTING                        -> the request may have run: answer -EIO
    REPLY_READY (reply being sent)    -> look at the socket; if unsure, close

Layout: a row of u32 fields, then the request buffer.
"""

from __future__ import annotations

import mmap
import os

from proxyd.protocol import BUFFER_SIZE, HEADER, HEADER_SIZE

# Phases.
IDLE = 0  # no connection
RECEIVING = 1  # waiting for (the rest of) a request; HAVE bytes of it in the buffer
EXECUTING = 2  # the whole request is in the buffer and being executed
REPLY_READY = 3  # the request ran; its reply is being sent

# Field indexes (u32 each).
PHASE = 0
CONN = 1  # connection id being served
HAVE = 2  # bytes of the current request in the request buffer
SEQ = 3  # requests started on this connection (the master's hang detector watches it)
COMMAND = 4  # master -> worker: RETIRE at the next request boundary
LOG_EPOCH = 5  # master -> worker: bumped when a reopened log file waits on the channel
# worker -> master, for the worker's whole life (proxyd/sink.py): log lines it dropped, and
# those it holds for a log that does not take them now (lost too if it dies).
LOG_DROPPED = 6
LOG_PENDING = 7
_LIFELONG = (LOG_DROPPED, LOG_PENDING)  # kept when the slot is reset for a new connection
FIELDS = 16

NONE = 0
RETIRE = 1

_FIELDS_SIZE = FIELDS * 4
SLOT_SIZE = _FIELDS_SIZE + BUFFER_SIZE

_ZERO_HEADER = bytes(HEADER_SIZE)


class Slot:
    """One worker's shared journal; `fields` and `request` are live views of it.

    Backed by a memfd (`fd`), so that a master that re-executes itself for an upgrade
    can map the journals of the workers it keeps (Slot(fd=...)). Python's mmap holds a
    duplicate of that descriptor of its own: a journal costs two. Raises OSError
    (EMFILE, ENOMEM, ...) when it cannot be made."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("proxyd-journal", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, SLOT_SIZE)
            except BaseException:
                os.close(fd)
                raise
        self.fd = fd
        try:
            self._map = mmap.mmap(fd, SLOT_SIZE, mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        view = memoryview(self._map)
        self.fields = view[:_FIELDS_SIZE].cast("I")
        self.request = view[_FIELDS_SIZE:SLOT_SIZE]

    def reset(self) -> None:
        for i in range(FIELDS):
            if i not in _LIFELONG:
                self.fields[i] = 0
        self.request[:HEADER_SIZE] = _ZERO_HEADER

    def header(self) -> tuple[int, int]:
        """(code, size) of the request header in the buffer (zeros when cleared)."""
        return HEADER.unpack_from(self.request)

    def header_consumed(self) -> bool:
        """Whether any byte of a request landed in the (cleared) header."""
        return self.request[:HEADER_SIZE] != _ZERO_HEADER

    def close(self) -> None:
        self.fields.release()
        self.request.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
