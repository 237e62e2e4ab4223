"""The in-flight journal a worker shares with its master, at no system-call cost.

The master maps one anonymous shared page set per worker before the fork. The worker
receives every request straight into the slot's request buffer and publishes, with
plain memory stores, where it is in the request cycle. If the worker dies, the
master reads the slot to decide what the guest is owed:

    RECEIVING, nothing consumed      -> nothing: hand the connection on
    RECEIVING, part of a request     -> hand the connection on with those bytes
    EXECUTING                        -> the request may have run: answer -EIO
    REPLY_READY (reply being sent)    -> look at the socket; if unsure, close

Layout: a row of u32 fields, the request buffer, the relay ring (Relay), then, at the
next page, the metrics area: u64 request counts the worker adds to (below).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal

from proxyd.protocol import BUFFER_SIZE, HEADER, HEADER_SIZE, REQUESTS

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
# The relay (Relay below): bytes the worker put in the relay ring and bytes the master
# took out, both counted since the worker started, modulo 2**32.
RELAY_WRITTEN = 8
RELAY_READ = 9
ACCEPTED = 10  # master -> whoever adopts the worker: when its connection was accepted (s)
_LIFELONG = (LOG_DROPPED, LOG_PENDING, RELAY_WRITTEN, RELAY_READ)  # kept between connections
FIELDS = 16

NONE = 0
RETIRE = 1

# Sent by the master to a busy worker once it has stored COMMAND or a new LOG_EPOCH: the
# worker, blocked in recv(2) with no timeout on a quiet connection, wakes up and reads
# them (server.py, install_wake_handler). Workers of older versions ignore it.
WAKE_SIGNAL = signal.SIGUSR2

_FIELDS_SIZE = FIELDS * 4
RELAY_SIZE = 64 * 1024  # log lines of a worker whose master died, for the next one

# --- the metrics area: what the worker served, counted with plain stores ------------------
#
# u64 words, for the worker's whole life, each written by the worker alone (one aligned
# 8-byte store: the master never reads half of one) and summed by the master when
# Prometheus scrapes (proxyd/metrics.py). Written only when metrics are configured.
METRICS_LAYOUT = 1  # word 0: a master reads only an area whose layout it knows
# Request durations (ns, the operation and its reply) by upper bound ("le"): 10 µs to
# 30 s in 1-2.5-5 steps; one more bucket counts what is above the last.
_US, _MS, _S = 1_000, 1_000_000, 1_000_000_000
DURATION_BOUNDS_NS = (
    *(10 * _US, 25 * _US, 50 * _US, 100 * _US, 250 * _US, 500 * _US),
    *(1 * _MS, 2500 * _US, 5 * _MS, 10 * _MS, 25 * _MS, 50 * _MS, 100 * _MS, 250 * _MS),
    *(500 * _MS, 1 * _S, 2500 * _MS, 5 * _S, 10 * _S, 30 * _S),
)
REQUEST_CODES = max(REQUESTS) + 1
# Per request code, PER_CODE words from M_CODES + code * PER_CODE: replies ok, replies
# with an errno, the sum of their durations (ns), then one count per duration bucket.
M_OK, M_ERROR, M_SUM_NS, M_BUCKETS = 0, 1, 2, 3
PER_CODE = M_BUCKETS + len(DURATION_BOUNDS_NS) + 1
M_CODES = 1
# Error replies by errno: one word per name here, then one for any other errno (a fixed
# set keeps the number of Prometheus series bounded).
ERRNO_NAMES = (
    "E2BIG",
    "EACCES",
    "EAGAIN",
    "EBADF",
    "EBUSY",
    "EDQUOT",
    "EEXIST",
    "EFBIG",
    "EINVAL",
    "EIO",
    "EISDIR",
    "ELOOP",
    "EMLINK",
    "ENAMETOOLONG",
    "ENOBUFS",
    "ENODATA",
    "ENOENT",
    "ENOSPC",
    "ENOTDIR",
    "ENOTEMPTY",
    "ENXIO",
    "EOPNOTSUPP",
    "EPERM",
    "ERANGE",
    "EROFS",
    "ETXTBSY",
    "EXDEV",
)
M_ERRNOS = M_CODES + REQUEST_CODES * PER_CODE
ERRNO_OTHER = len(ERRNO_NAMES)  # the class of an errno not named above
METRICS_WORDS = M_ERRNOS + len(ERRNO_NAMES) + 1


def errno_classes() -> bytes:
    """For each errno 0..255, its word in the errno counts (index into ERRNO_NAMES, or
    ERRNO_OTHER). An errno of 256 or more is ERRNO_OTHER too."""
    table = bytearray([ERRNO_OTHER]) * 256
    for i, name in enumerate(ERRNO_NAMES):
        table[getattr(errno, name)] = i
    return bytes(table)


_RELAY_AT = _FIELDS_SIZE + BUFFER_SIZE
_METRICS_AT = -(-(_RELAY_AT + RELAY_SIZE) // mmap.PAGESIZE) * mmap.PAGESIZE
SLOT_SIZE = _METRICS_AT + METRICS_WORDS * 8

_ZERO_HEADER = bytes(HEADER_SIZE)
# What the request buffer holds past the bytes received: a cleared header (zeros) and
# then FILL. A worker killed as a recv returns has not recorded what it got; bytes that
# differ from these were written since, which tells the master how far the recv came
# (recovery.received_unrecorded). 0xF7 is never a request code's byte, never a byte of
# UTF-8, and rare as the last byte of an integer.
FILL = 0xF7
FILLED_PAYLOAD = bytes([FILL]) * (BUFFER_SIZE - HEADER_SIZE)
_CLEARED = _ZERO_HEADER + FILLED_PAYLOAD


class Slot:
    """One worker's shared journal; `fields` and `request` are live views of it.

    Backed by a memfd (`fd`), so that a master that re-executes itself for an upgrade
    can map the journals of the workers it keeps (Slot(fd=...)). Python's mmap holds a
    duplicate of that descriptor of its own: a journal costs two. Raises OSError
    (EMFILE, ENOMEM, ...) when it cannot be made.

    `metrics` is the metrics area as u64 words, None in the journal of a worker of a
    program that had none (an upgrade maps the journals it keeps as they are)."""

    def __init__(self, fd: int | None = None) -> None:
        new = fd is None
        if fd is None:
            fd = os.memfd_create("proxyd-journal", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, SLOT_SIZE)
            except BaseException:
                os.close(fd)
                raise
        self.fd = fd
        try:
            # Mapping past the end of the memfd would fault on the first access there.
            size = min(SLOT_SIZE, os.fstat(fd).st_size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        view = memoryview(self._map)
        self.fields = view[:_FIELDS_SIZE].cast("I")
        self.request = view[_FIELDS_SIZE:_RELAY_AT]
        self.relay = Relay(self.fields, view[_RELAY_AT : _RELAY_AT + RELAY_SIZE])
        self.metrics = view[_METRICS_AT:SLOT_SIZE].cast("Q") if size == SLOT_SIZE else None
        if self.metrics is not None and self.metrics[0] == 0:  # a new journal
            self.metrics[0] = METRICS_LAYOUT
        if new:  # a journal taken over (fd=...) holds a live worker's state
            self.clear_request()

    def reset(self) -> None:
        for i in range(FIELDS):
            if i not in _LIFELONG:
                self.fields[i] = 0
        self.clear_request()

    def clear_request(self) -> None:
        """Nothing received: a zero header, then FILL (the worker keeps it so).

        Written through the memfd, not the mapping, as request_from reads: the master
        clears a journal for every connection it hands over, and the 64 KiB of a
        buffer need not be mapped in it for that (they would count in its RSS, 12.5 MB
        with 200 workers). A master's call: a worker's seccomp filter has no pwrite."""
        os.pwrite(self.fd, _CLEARED, _FIELDS_SIZE)

    def request_from(self, start: int) -> bytes:
        """A copy of the request buffer from `start` on, read through the memfd (see
        clear_request: the master's watchdog reads this for every quiet connection)."""
        return os.pread(self.fd, BUFFER_SIZE - start, _FIELDS_SIZE + start)

    def header(self) -> tuple[int, int]:
        """(code, size) of the request header in the buffer (zeros when cleared)."""
        return HEADER.unpack_from(self.request)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.release()
        self.relay.ring.release()
        self.fields.release()
        self.request.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Relay:
    """A ring of log lines in the journal, from a worker whose master died to the master
    that adopts it (proxyd/adopt.py). Under supervisord or systemd a worker's log is a
    pipe or stream to the supervisor, which closes it when the master dies: from then
    on the worker's lines (the audit trail of the guest it goes on serving) are put
    here instead (sink.py), and the adopting master writes them to its own log.

    One writer (the worker), one reader (the master): each record is a u16 length and
    the line; the writer stores the bytes, then RELAY_WRITTEN; the reader reads them,
    then stores RELAY_READ (x86-64 keeps stores in order, and so do these memory views'
    plain stores on it)."""

    def __init__(self, fields: memoryview, ring: memoryview) -> None:
        self.fields, self.ring = fields, ring

    def put(self, line: bytes) -> bool:
        """Append one line; False (nothing written) when the ring has no room for it."""
        written, read = self.fields[RELAY_WRITTEN], self.fields[RELAY_READ]
        record = len(line).to_bytes(2, "little") + line
        if (written - read) % 2**32 + len(record) > RELAY_SIZE:
            return False
        self._copy_in(written % RELAY_SIZE, record)
        self.fields[RELAY_WRITTEN] = (written + len(record)) % 2**32
        return True

    def take(self) -> list[bytes]:
        """Every line put since the last take, oldest first."""
        lines = []
        read, written = self.fields[RELAY_READ], self.fields[RELAY_WRITTEN]
        while read != written:
            size = int.from_bytes(self._copy_out(read % RELAY_SIZE, 2), "little")
            lines.append(self._copy_out((read + 2) % RELAY_SIZE, size))
            read = (read + 2 + size) % 2**32
        self.fields[RELAY_READ] = read
        return lines

    def _copy_in(self, at: int, data: bytes) -> None:
        first = min(len(data), RELAY_SIZE - at)
        self.ring[at : at + first] = data[:first]
        self.ring[: len(data) - first] = data[first:]

    def _copy_out(self, at: int, size: int) -> bytes:
        first = min(size, RELAY_SIZE - at)
        return bytes(self.ring[at : at + first]) + bytes(self.ring[: size - first])
