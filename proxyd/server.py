"""Serving one proxy connection inside the export: the per-request path.

The hot path per request is one recv into the journal's request buffer (header and
payload usually arrive together), the operation, and one send of the whole reply;
dispatch is a list indexed by request code. With metrics on, each reply is also counted
in the journal's metrics area (slot.py) with C stores. Compiled by setup.py (Cython,
pure Python mode): this file is the only source, run by the interpreter where it is
not compiled.
"""

from __future__ import annotations

import array
import contextlib
import errno
import functools
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cython

from proxyd import log, slot
from proxyd import protocol as p
from proxyd.ops import ExportOps, SpecialFileRefused
from proxyd.privileges import IdMap, map_id
from proxyd.slot import Slot

if cython.compiled:
    from cython.cimports.libc.errno import EAGAIN, EINTR
    from cython.cimports.libc.errno import errno as c_errno
    from cython.cimports.libc.string import memcpy, memset
    from cython.cimports.posix.signal import SA_RESTART, sigaction, sigaction_t, sigemptyset
    from cython.cimports.posix.time import CLOCK_MONOTONIC, clock_gettime, timespec, timeval
    from cython.cimports.posix.unistd import close as c_close
    from cython.cimports.proxyd._libc import (
        CMSG_DATA,
        CMSG_FIRSTHDR,
        CMSG_LEN,
        CMSG_SPACE,
        MSG_DONTWAIT,
        MSG_NOSIGNAL,
        POLLOUT,
        SCM_RIGHTS,
        SO_RCVTIMEO,
        SOL_SOCKET,
        iovec,
        msghdr,
        poll,
        pollfd,
        recv,
        send,
        sendmsg,
        setsockopt,
    )

Handler = Callable[[tuple], Any]

_SCM_RIGHTS = socket.SCM_RIGHTS
_SOL_SOCKET = socket.SOL_SOCKET
_FD_VALID_BUFFERS = [p.FD_REPLY_VALID]
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
# C constants when compiled (no lookups on the way to a send), plain ints interpreted.
_FD_VALID = cython.declare(cython.int, p.FD_VALID)
_PHASE = cython.declare(cython.Py_ssize_t, slot.PHASE)
_REPLY_READY = cython.declare(cython.uint, slot.REPLY_READY)
_HEADER_SIZE = cython.declare(cython.Py_ssize_t, p.HEADER_SIZE)
_FILL = cython.declare(cython.uchar, slot.FILL)
_M_CODES = cython.declare(cython.Py_ssize_t, slot.M_CODES)
_PER_CODE = cython.declare(cython.Py_ssize_t, slot.PER_CODE)
_M_OK = cython.declare(cython.Py_ssize_t, slot.M_OK)
_M_ERROR = cython.declare(cython.Py_ssize_t, slot.M_ERROR)
_M_SUM_NS = cython.declare(cython.Py_ssize_t, slot.M_SUM_NS)
_M_BUCKETS = cython.declare(cython.Py_ssize_t, slot.M_BUCKETS)
_M_ERRNOS = cython.declare(cython.Py_ssize_t, slot.M_ERRNOS)
_ERRNO_OTHER = cython.declare(cython.Py_ssize_t, slot.ERRNO_OTHER)
# What the loop reads as C arrays (memoryviews interpreted): the duration buckets'
# bounds, and errno -> its word in the errno counts.
_DURATION_BOUNDS = memoryview(array.array("q", slot.DURATION_BOUNDS_NS))
_ERRNO_CLASSES = memoryview(array.array("B", slot.errno_classes()))


def _data_or_length(value: int | bytes) -> bytes:
    # LGETXATTR / LLISTXATTR with size 0 answer the length, else the bytes.
    if isinstance(value, int):
        return p.encode_status(value)
    return p.encode_string_data(value)


_STATUS_OK = p.encode_status(0)


def request_handlers(ops: ExportOps) -> list[Handler | None]:
    """Handlers indexed by request code: the decoded payload (DECODERS' tuple) ->
    reply bytes (or an fd for OPEN/CREATE).

    Each handler runs the operation and encodes the success reply; failures (OSError,
    ValueError for a value the kernel cannot take) propagate to the serving loop. The
    loop decodes (request_decoders), so that the audit event reuses the arguments.
    """

    def status(op: Callable) -> Handler:
        def handle(args: tuple) -> bytes:
            op(*args)
            return _STATUS_OK

        return handle

    def data(op: Callable, encode: Callable) -> Handler:
        def handle(args: tuple) -> bytes:
            return encode(op(*args))

        return handle

    def fd(op: Callable) -> Handler:
        def handle(args: tuple) -> int:
            return op(*args)

        return handle

    table: list[Handler | None] = [None] * (max(p.REQUESTS) + 1)
    table[p.T_OPEN] = fd(ops.open)
    table[p.T_CREATE] = fd(ops.create)
    table[p.T_MKNOD] = status(ops.mknod)
    table[p.T_MKDIR] = status(ops.mkdir)
    table[p.T_SYMLINK] = status(ops.symlink)
    table[p.T_LINK] = status(ops.link)
    table[p.T_LSTAT] = data(ops.lstat, p.encode_stat)
    table[p.T_READLINK] = data(ops.readlink, p.encode_string_data)
    table[p.T_STATFS] = data(ops.statfs, p.encode_statfs)
    table[p.T_CHMOD] = status(ops.chmod)
    table[p.T_CHOWN] = status(ops.chown)
    table[p.T_TRUNCATE] = status(ops.truncate)
    table[p.T_UTIME] = status(ops.utime)
    table[p.T_RENAME] = status(ops.rename)
    table[p.T_REMOVE] = status(ops.remove)
    table[p.T_LGETXATTR] = data(ops.lgetxattr, _data_or_length)
    table[p.T_LLISTXATTR] = data(ops.llistxattr, _data_or_length)
    table[p.T_LSETXATTR] = status(ops.lsetxattr)
    table[p.T_LREMOVEXATTR] = status(ops.lremovexattr)
    table[p.T_GETVERSION] = data(ops.getversion, p.encode_getversion)
    return table


def request_decoders() -> list[Callable[[bytes], tuple] | None]:
    """protocol.DECODERS as a list indexed by request code (None: no such request)."""
    table: list[Callable[[bytes], tuple] | None] = [None] * (max(p.REQUESTS) + 1)
    for code, decode in p.DECODERS.items():
        table[code] = decode
    return table


# --- the socket and the shared buffer --------------------------------------------------
#
# Compiled (setup.py), these are libc's recv/send/sendmsg on the connection's
# descriptor and C loads and stores on the shared pages; interpreted, the socket's
# methods and memoryviews do the same system calls and the same stores.


@cython.cfunc
@cython.boundscheck(False)
def _recv(
    sock: socket.socket, fd: cython.int, buf: cython.uchar[::1], have: cython.Py_ssize_t
) -> cython.Py_ssize_t:
    """recv(2) into buf[have:]: the bytes received (0 at EOF), or -1 when SO_RCVTIMEO
    expired with nothing received. Raises OSError."""
    if cython.compiled:
        while True:
            n = recv(fd, cython.address(buf[have]), buf.shape[0] - have, 0)
            if n >= 0:
                return n
            err = c_errno
            if err == EAGAIN:
                return -1
            if err != EINTR:
                raise OSError(err, os.strerror(err))
    try:
        return sock.recv_into(buf[have:])
    except BlockingIOError:
        return -1


@cython.cfunc
def _wait_to_send(
    sock: socket.socket, fd: cython.int, deadline: cython.longlong, timeout: cython.longlong
) -> cython.longlong:
    """Wait until the connection takes more (poll(2), POLLOUT) or `deadline` (monotonic
    ns; 0: none yet, it becomes `timeout` ns from now) passes; return the deadline, for
    the next wait until the peer takes something. A signal (the master's wake-up) only
    makes it look again: the deadline stays where it was. Raises BlockingIOError at the
    deadline, OSError."""
    if not deadline:
        deadline = _now() + timeout
    while True:
        left: cython.longlong = deadline - _now()
        if left <= 0:
            raise BlockingIOError(errno.EAGAIN, "the peer took nothing for request_timeout")
        ms: cython.int = (left + 999_999) // 1_000_000
        if cython.compiled:
            entry = cython.declare(pollfd)
            entry.fd = fd
            entry.events = POLLOUT
            entry.revents = 0
            ready: cython.int = poll(cython.address(entry), 1, ms)
            if ready > 0:
                return deadline
            if ready < 0 and c_errno != EINTR:
                raise OSError(c_errno, os.strerror(c_errno))
        else:
            waiting = select.poll()
            waiting.register(sock, select.POLLOUT)
            if waiting.poll(ms):  # EINTR: retried by Python with the time left (PEP 475)
                return deadline


@cython.cfunc
def _send_all(
    sock: socket.socket, fd: cython.int, reply: bytes, timeout: cython.longlong
) -> cython.int:
    """send(2) all of `reply`, never blocking in the call: while the peer takes nothing,
    _wait_to_send, `timeout` ns from the last progress at most. Raises OSError:
    BlockingIOError when the peer took nothing for that long."""
    data: cython.p_char
    left: cython.Py_ssize_t = len(reply)
    sent: cython.Py_ssize_t = 0
    n: cython.Py_ssize_t
    err: cython.int
    deadline: cython.longlong = 0  # while the peer takes nothing: by when it must (ns)
    if cython.compiled:
        data = reply
    while left > 0:
        if cython.compiled:
            n = send(fd, data + sent, left, MSG_NOSIGNAL | MSG_DONTWAIT)
            err = c_errno if n < 0 else 0
        else:
            try:
                n, err = sock.send(reply[sent:], socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT), 0
            except BlockingIOError:
                n, err = -1, errno.EAGAIN
        if n >= 0:
            sent += n
            left -= n
            deadline = 0
        elif err == errno.EAGAIN:
            deadline = _wait_to_send(sock, fd, deadline, timeout)
        elif err != errno.EINTR:
            raise OSError(err, os.strerror(err))
    return 0


@cython.cfunc
@cython.boundscheck(False)
def _send_fd(
    sock: socket.socket,
    conn: cython.int,
    fd: cython.int,
    fields: cython.uint[::1],
    timeout: cython.longlong,
) -> cython.int:
    """The fd reply: FD_VALID with `fd` as SCM_RIGHTS, by sendmsg(2) on `conn`. The
    message is built first; then REPLY_READY is stored in the journal and at once the
    call made (never blocking: while the peer takes nothing, _wait_to_send). Raises
    OSError: BlockingIOError when the peer took nothing for `timeout` ns."""
    deadline: cython.longlong = 0  # while the peer takes nothing: by when it must (ns)
    if cython.compiled:
        value: cython.int = _FD_VALID
        iov = cython.declare(iovec)
        msg = cython.declare(msghdr)
        control = cython.declare(cython.char[64])  # >= CMSG_SPACE(sizeof(int))
        memset(cython.address(msg), 0, cython.sizeof(msghdr))
        memset(control, 0, cython.sizeof(control))
        iov.iov_base = cython.address(value)
        iov.iov_len = 4
        msg.msg_iov = cython.address(iov)
        msg.msg_iovlen = 1
        msg.msg_control = control
        msg.msg_controllen = CMSG_SPACE(cython.sizeof(cython.int))
        cmsg = CMSG_FIRSTHDR(cython.address(msg))
        cmsg.cmsg_level = SOL_SOCKET
        cmsg.cmsg_type = SCM_RIGHTS
        cmsg.cmsg_len = CMSG_LEN(cython.sizeof(cython.int))
        memcpy(CMSG_DATA(cmsg), cython.address(fd), cython.sizeof(cython.int))
        fields[_PHASE] = _REPLY_READY
        while sendmsg(conn, cython.address(msg), MSG_NOSIGNAL | MSG_DONTWAIT) < 0:
            err = c_errno
            if err == EAGAIN:
                deadline = _wait_to_send(sock, conn, deadline, timeout)
            elif err != EINTR:
                raise OSError(err, os.strerror(err))
        return 0
    rights = [(_SOL_SOCKET, _SCM_RIGHTS, p.FD_REPLY.pack(fd))]
    fields[_PHASE] = _REPLY_READY
    while True:
        try:
            sock.sendmsg(_FD_VALID_BUFFERS, rights, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            return 0
        except BlockingIOError:
            deadline = _wait_to_send(sock, conn, deadline, timeout)


@cython.cfunc
@cython.boundscheck(False)
def _u32(buf: cython.uchar[::1], off: cython.Py_ssize_t) -> cython.uint:
    """The host-order u32 at buf[off:off + 4] (a header field)."""
    if cython.compiled:
        v = cython.declare(cython.uint)
        memcpy(cython.address(v), cython.address(buf[off]), 4)
        return v
    return _U32.unpack_from(buf, off)[0]


@cython.cfunc
@cython.boundscheck(False)
def _u16(buf: cython.uchar[::1], off: cython.Py_ssize_t) -> cython.uint:
    """The host-order u16 at buf[off:off + 2] (a string's length)."""
    if cython.compiled:
        v = cython.declare(cython.ushort)
        memcpy(cython.address(v), cython.address(buf[off]), 2)
        return v
    return _U16.unpack_from(buf, off)[0]


@cython.cfunc
@cython.boundscheck(False)
def _bytes(buf: cython.uchar[::1], start: cython.Py_ssize_t, end: cython.Py_ssize_t) -> bytes:
    """A copy of buf[start:end] (a request's payload)."""
    if cython.compiled:
        return cython.cast(cython.p_char, cython.address(buf[start]))[: end - start]
    return bytes(buf[start:end])


@cython.cfunc
@cython.boundscheck(False)
def _clear(buf: cython.uchar[::1], start: cython.Py_ssize_t, end: cython.Py_ssize_t) -> cython.int:
    """Make buf[start:end] say "not received" again (slot.Slot.clear_request): zeros in
    the header, FILL after it. The master reads how far a recv it never heard of got
    from where these bytes were overwritten (recovery.received_unrecorded)."""
    i: cython.Py_ssize_t
    for i in range(start, min(end, _HEADER_SIZE)):
        buf[i] = 0
    for i in range(max(start, _HEADER_SIZE), end):
        buf[i] = _FILL
    return 0


@cython.cfunc
def _close(fd: cython.int) -> cython.void:
    """close(2), its error ignored: Linux frees the descriptor whatever close says, and
    a sent descriptor's file is the client's now. Compiled: no GIL released and taken."""
    if cython.compiled:
        c_close(fd)
        return
    with contextlib.suppress(OSError):
        os.close(fd)


@cython.cfunc
def _now() -> cython.longlong:
    """CLOCK_MONOTONIC in nanoseconds (the vDSO: no system call)."""
    if cython.compiled:
        ts = cython.declare(timespec)
        clock_gettime(CLOCK_MONOTONIC, cython.address(ts))
        return ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    return time.monotonic_ns()


@cython.cfunc
@cython.boundscheck(False)
@cython.wraparound(False)
def _count(
    area: cython.ulonglong[::1],
    bounds: cython.longlong[::1],
    classes: cython.uchar[::1],
    code: cython.uint,
    err: cython.int,
    ns: cython.longlong,
) -> cython.int:
    """Count one reply to request `code` in the metrics area (slot.py): ok or error
    (and its errno's class), its duration `ns` in the sum and in its bucket."""
    at: cython.Py_ssize_t = _M_CODES + code * _PER_CODE
    if err:
        area[at + _M_ERROR] += 1
        area[_M_ERRNOS + (classes[err] if err < classes.shape[0] else _ERRNO_OTHER)] += 1
    else:
        area[at + _M_OK] += 1
    area[at + _M_SUM_NS] += ns
    i: cython.Py_ssize_t = 0
    while i < bounds.shape[0] and ns > bounds[i]:  # le: the first bound not below it
        i += 1
    area[at + _M_BUCKETS + i] += 1
    return 0


@dataclass
class ConnectionStats:
    """What one connection did, for the closing log line and the master."""

    requests: int = 0
    errors: int = 0
    reason: str = "eof"  # why serving ended: eof, released, protocol-error, stalled, ...
    protocol_error: str | None = None


class Released(Exception):
    """The master asked for the connection back at a request boundary."""


class _Stalled(Exception):
    """The peer sent part of a request and then nothing for request_timeout."""


# --- waking a worker blocked on a quiet connection ----------------------------------------
#
# Between requests a worker blocks in recv(2) with no timeout: no timer is armed for each
# request (0.1-0.4 µs of every one) and an idle guest costs no wake-ups. The master,
# having stored a command or a new log epoch in the journal, sends WAKE_SIGNAL; its
# handler sets the connection's receive timeout to 1 µs, so that the recv the worker is
# in, or the next one it makes, returns at once (SA_RESTART: any other call goes on).
# The worker then clears the timeout and only then reads the journal, so a wake-up is
# never lost, whether it comes before the call or during it. With part of a request
# received, the timeout is request_timeout (a peer stalled mid-request).
WAKE_SIGNAL = slot.WAKE_SIGNAL
_wake_fd = cython.declare(cython.int, -1)  # the connection being served, else -1
_wake_sock: socket.socket | None = None  # the same, interpreted


@cython.cfunc
@cython.nogil
@cython.exceptval(check=False)
def _on_wake(sig: cython.int) -> cython.void:
    """WAKE_SIGNAL's handler (compiled): one async-signal-safe call, which cannot fail
    (the descriptor is open while it is watched) and so leaves errno as it was."""
    if cython.compiled:
        soon = cython.declare(timeval)
        soon.tv_sec = 0
        soon.tv_usec = 1
        if _wake_fd >= 0:
            setsockopt(_wake_fd, SOL_SOCKET, SO_RCVTIMEO, cython.address(soon), cython.sizeof(soon))


def install_wake_handler() -> None:
    """Handle WAKE_SIGNAL in this process (a worker, before it serves). Raises OSError."""
    if cython.compiled:
        action = cython.declare(sigaction_t)
        memset(cython.address(action), 0, cython.sizeof(action))
        action.sa_handler = _on_wake
        action.sa_flags = SA_RESTART
        sigemptyset(cython.address(action.sa_mask))
        if sigaction(WAKE_SIGNAL, cython.address(action), cython.NULL) != 0:
            raise OSError(c_errno, os.strerror(c_errno))
        return

    def on_wake(_sig: int, _frame: object) -> None:  # runs between bytecodes: recv EINTRs
        if _wake_sock is not None:
            _set_receive_timeout(_wake_sock, 1e-6)

    signal.signal(WAKE_SIGNAL, on_wake)


def _watch(sock: socket.socket | None) -> None:
    """The connection WAKE_SIGNAL wakes from now on (None: none)."""
    global _wake_fd, _wake_sock
    _wake_sock = sock
    _wake_fd = sock.fileno() if sock is not None else -1


def _set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO of `seconds` (0: none; any time left, however short, at least 1 µs:
    a zero timeval would mean none)."""
    whole = int(seconds)
    micro = int((seconds - whole) * 1e6)
    if seconds > 0 and not whole and not micro:
        micro = 1
    sock.setsockopt(_SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", whole, micro))


class Server:
    """Serves proxy connections, one at a time, with one set of handlers.

    The request buffer and the in-flight fields live in a Slot shared with the
    master (a private one when there is no master), so that a crash at any point
    leaves the master enough to answer the guest or hand the connection on.
    `on_command` is called at a request boundary when the master has set a command
    or a new log epoch in the slot; it may raise Released. `metrics`: count every
    reply in the slot's metrics area.
    """

    def __init__(
        self,
        ops: ExportOps,
        log: Any,
        slot_: Slot | None = None,
        request_timeout: float = 30.0,
        audit: str = "none",
        readonly: bool = False,
        on_command: Callable[[], None] | None = None,
        on_log_reopen: Callable[[], None] | None = None,
        id_maps: tuple[IdMap, IdMap] | None = None,
        metrics: bool = False,
    ) -> None:
        self._handlers = request_handlers(ops)
        self._decoders = request_decoders()
        self._log = log
        self._slot = slot_ if slot_ is not None else Slot()
        self._counting = metrics  # count every reply in the slot's metrics area
        self._request_timeout = request_timeout
        self._audited = audited_codes(audit)
        self._readonly = readonly
        self._on_command = on_command or (lambda: None)
        self._on_log_reopen = on_log_reopen or (lambda: None)
        self._refusal: str | None = None
        self._id_maps = id_maps  # (uid_map, gid_map) of an ID-mapped export, else None
        self.log_epoch = 0

    def set_log(self, log: Any) -> None:
        """The logger of the next connection (bound to its id and peer)."""
        self._log = log

    def serve(self, sock: socket.socket) -> ConnectionStats:
        """Answer requests on `sock` until EOF, a fatal protocol error or a release.

        The slot may already hold the start of a request (handed on by the master
        from a worker that died while receiving it). The master logs the closing.
        """
        stats = ConnectionStats()
        _set_receive_timeout(sock, 0)
        _watch(sock)
        try:
            self._loop(sock, stats)
        except Released:
            stats.reason = "released"
        except _Stalled:
            stats.reason = "stalled"
            self._log.warning("peer stalled mid-request", have=self._slot.fields[slot.HAVE])
        except BlockingIOError:  # the peer took none of a reply for request_timeout
            stats.reason = "peer not reading"
            self._log.warning("peer not reading its replies")
        except p.FatalProtocolError as e:
            stats.reason, stats.protocol_error = "protocol error", str(e)
            self._log.warning("protocol error", error=str(e))
        except (ConnectionResetError, BrokenPipeError) as e:
            stats.reason = f"peer gone: {e.strerror}"
        except OSError as e:
            stats.reason = f"socket error: {e.strerror}"
        finally:
            _watch(None)
        if stats.reason != "released":
            # Released, the journal keeps saying RECEIVING with the bytes of a request
            # that arrived as we were asked to leave: they go on with the connection.
            self._slot.fields[slot.PHASE] = slot.IDLE
        return stats

    def _at_boundary(self, sock: socket.socket) -> None:
        """Woken with nothing received: no receive timeout again (WAKE_SIGNAL's handler
        set one), then the master's command or new log epoch, if any."""
        _set_receive_timeout(sock, 0)
        fields = self._slot.fields
        if fields[slot.COMMAND] or fields[slot.LOG_EPOCH] != self.log_epoch:
            self._on_command()

    def _receive(self, sock: socket.socket, have: int, need: int) -> int:
        """Read until `need` bytes are in the buffer; 0 at EOF (or EOF mid-request).
        With part of a request in, the peer may be silent for request_timeout at most
        (then _Stalled); with nothing in, a wake-up is the master's (_at_boundary)."""
        buf: cython.uchar[::1] = self._slot.request
        fields: cython.uint[::1] = self._slot.fields
        fd: cython.int = sock.fileno()
        deadline = None  # part of a request in: monotonic seconds by which more must come
        timed = False  # a receive timeout is set, to be cleared on the way out
        try:
            while have < need:
                if have and deadline is None:  # silence counts from the last byte received
                    deadline = time.monotonic() + self._request_timeout
                    _set_receive_timeout(sock, self._request_timeout)
                    timed = True
                n = _recv(sock, fd, buf, have)
                if n < 0:  # SO_RCVTIMEO: woken, or the peer silent for too long
                    if have == 0:
                        self._at_boundary(sock)
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _Stalled from None
                    _set_receive_timeout(sock, left)  # woken mid-request: the rest of it
                    continue
                if n == 0:
                    return 0
                have += n
                fields[slot.HAVE] = have
                deadline = None  # set again, in full, before the next wait
        finally:
            if timed:
                _set_receive_timeout(sock, 0)
        return have

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def _loop(self, sock: socket.socket, stats: ConnectionStats) -> None:
        # The hot path: the common case (a whole request arriving in one piece) is one
        # recv, and everything else falls back to _receive. Compiled, the journal and
        # the request buffer are C arrays over the shared pages and recv/send go to
        # libc; interpreted, the same lines run on memoryviews and the socket methods.
        fields: cython.uint[::1] = self._slot.fields
        buf: cython.uchar[::1] = self._slot.request
        handlers: list = self._handlers
        decoders: list = self._decoders
        audited: list = self._audited
        n_codes: cython.uint = len(handlers)
        fd: cython.int = sock.fileno()
        receive = self._receive
        counting: cython.bint = self._counting
        send_timeout: cython.longlong = int(self._request_timeout * 1e9)  # ns
        area: cython.ulonglong[::1] = self._slot.metrics
        bounds: cython.longlong[::1] = _DURATION_BOUNDS
        classes: cython.uchar[::1] = _ERRNO_CLASSES
        HEADER_SIZE: cython.Py_ssize_t = p.HEADER_SIZE  # noqa: N806
        MAX_PAYLOAD: cython.uint = p.MAX_PAYLOAD  # noqa: N806
        PHASE: cython.Py_ssize_t = slot.PHASE  # noqa: N806
        HAVE: cython.Py_ssize_t = slot.HAVE  # noqa: N806
        SEQ: cython.Py_ssize_t = slot.SEQ  # noqa: N806
        COMMAND: cython.Py_ssize_t = slot.COMMAND  # noqa: N806
        LOG_EPOCH: cython.Py_ssize_t = slot.LOG_EPOCH  # noqa: N806
        RECEIVING: cython.uint = slot.RECEIVING  # noqa: N806
        EXECUTING: cython.uint = slot.EXECUTING  # noqa: N806
        REPLY_READY: cython.uint = slot.REPLY_READY  # noqa: N806
        T_OPEN: cython.uint = p.T_OPEN  # noqa: N806
        T_CREATE: cython.uint = p.T_CREATE  # noqa: N806
        code: cython.uint
        size: cython.uint
        end: cython.Py_ssize_t
        n: cython.Py_ssize_t
        err: cython.int
        started: cython.longlong
        ended: cython.longlong
        have: cython.Py_ssize_t = fields[HAVE]  # bytes already in the buffer: handed on
        fields[PHASE] = RECEIVING
        seq: cython.uint = 0
        while True:
            if have == 0:
                if fields[COMMAND] or fields[LOG_EPOCH] != self.log_epoch:
                    self._on_command()
                n = _recv(sock, fd, buf, 0)
                if n < 0:  # SO_RCVTIMEO: woken by the master (WAKE_SIGNAL)
                    self._at_boundary(sock)
                    have = receive(sock, 0, HEADER_SIZE)
                else:
                    have = n
                    fields[HAVE] = have
                if have == 0:
                    return
                if fields[COMMAND]:  # asked to leave while waiting: the request goes too
                    self._on_command()
            if have < HEADER_SIZE:
                have = receive(sock, have, HEADER_SIZE)
                if have == 0:
                    return
            code = _u32(buf, 0)
            size = _u32(buf, 4)
            if size > MAX_PAYLOAD or code >= n_codes or handlers[code] is None:
                p.check_header(code, size)  # raises, saying which
            end = HEADER_SIZE + size
            if have < end:
                have = receive(sock, have, end)
                if have == 0:
                    stats.reason = "eof mid-request"
                    return

            seq += 1
            fields[SEQ] = seq
            fields[PHASE] = EXECUTING
            stats.requests += 1
            payload = _bytes(buf, HEADER_SIZE, end)
            audit = audited[code]
            if audit == AUDIT_IF_WRITING:  # OPEN at "mutations": only when it writes
                audit = AUDIT_ALWAYS if _open_writes(buf, size) else AUDIT_NEVER
            # One clock read here and one after the reply, for the metrics and the
            # audit line's dur_us alike.
            started = _now() if audit or counting else 0
            ended = 0
            args = None  # stays None where the payload does not decode
            try:
                args = decoders[code](payload)
                result = handlers[code](args)
                err = 0
            except Exception as e:
                err = self._errno_of(code, e)
                result = None
                stats.errors += 1
                self._refusal = _refusal_kind(e, self._readonly)
            # Everything is built before REPLY_READY is stored: from that store to the
            # system call is the one window where the master cannot tell sent from unsent.
            if code in (T_OPEN, T_CREATE) and not err:
                try:
                    _send_fd(sock, fd, result, fields, send_timeout)  # REPLY_READY, send
                finally:
                    _close(result)  # the client has its own copy (or none: not sent)
            else:
                if err:
                    is_fd = code in (T_OPEN, T_CREATE)
                    result = p.encode_fd_reply(-err) if is_fd else p.encode_error(err)
                fields[PHASE] = REPLY_READY
                _send_all(sock, fd, result, send_timeout)
            logged = audit or (err and self._refusal)

            # Back to a request boundary at once (the master's view of a death is
            # exact again). Clear what was used before saying RECEIVING, so that bytes
            # the master finds there were really just received. The audit line comes
            # after: its arguments were decoded from a copy, only the header was cleared.
            have -= end
            if have:  # a client that did not wait for its reply: keep the rest
                if logged:
                    self._audit(code, args, err, started, 0, audit)
                    logged = False
                buf[:have] = buf[end : end + have]
            _clear(buf, have, end + have)
            fields[HAVE] = have
            fields[PHASE] = RECEIVING
            if counting:  # after RECEIVING: the window after the reply stays as short
                ended = _now()
                _count(area, bounds, classes, code, err, ended - started)
            if logged:
                self._audit(code, args, err, started, ended, audit)

    def _audit(
        self, code: int, args: tuple | None, err: int, started: int, ended: int, audit: int
    ) -> None:
        """The audit event of one request (after its reply went out: off the latency).
        `args`: its decoded payload, None where it did not decode. `started`, `ended`:
        monotonic ns around it (`ended` 0: now).

        A security refusal (special file, read-only export) is a warning, and is
        logged even where the audit level would not log the request. The common
        event (info, no host ids to add, names with nothing to escape) is written from
        audit_json without a dict.
        """
        refusal = self._refusal if err else None
        self._refusal = None
        if self._slot.fields[slot.LOG_EPOCH] != self.log_epoch:  # a reopened log file waits
            self._on_log_reopen()
        dur_us = ((ended or _now()) - started) // 1000 if started else None
        keys = _OP_KEYS[code]
        if args is not None and refusal is None and (self._id_maps is None or "uid" not in keys):
            members = audit_json(code, args, err, dur_us)
            if members is not None and log.op_json(self._log, keys, members):
                return
        if args is None:
            fields = {"op": p.REQUESTS[code].name, "malformed": True}
        else:
            fields = audit_fields(code, args)
        if self._id_maps is not None and "uid" in fields:
            host_ids(fields, *self._id_maps)
        fields["result"] = log.result_name(err)
        if dur_us is not None:
            fields["dur_us"] = dur_us
        log.op(self._log, fields, refusal)

    def _errno_of(self, code: int, e: Exception) -> int:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        if isinstance(e, p.MalformedRequest):
            self._log.debug("malformed request", op=p.REQUESTS[code].name, error=str(e))
            return e.errno
        if isinstance(e, ValueError | OverflowError):  # a value the kernel cannot take
            return errno.EINVAL
        self._log.exception("request failed unexpectedly", op=p.REQUESTS[code].name)
        return errno.EIO


def _refusal_kind(e: Exception, readonly: bool) -> str | None:
    """Refusals an auditor must see as warnings, whatever the audit level."""
    if isinstance(e, SpecialFileRefused):
        return f"special file ({e.file_type})"
    if readonly and isinstance(e, OSError) and e.errno == errno.EROFS:
        return "read-only export"
    return None


# --- audit events ------------------------------------------------------------------------

AUDIT_NEVER, AUDIT_ALWAYS, AUDIT_IF_WRITING = 0, 1, 2

_WRITING = cython.declare(
    cython.uint, os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
)


@cython.cfunc
def _open_writes(buf: cython.uchar[::1], size: cython.Py_ssize_t) -> cython.bint:
    """Whether the OPEN request of `size` payload bytes in `buf` asks for writing (a
    malformed one counts as writing: it gets its audit event)."""
    if size < 2:
        return True
    n: cython.Py_ssize_t = _u16(buf, p.HEADER_SIZE)  # the path's length
    if size < 2 + n + 4:
        return True
    return (_u32(buf, p.HEADER_SIZE + 2 + n) & _WRITING) != 0


def audited_codes(audit: str) -> list[int]:
    """Per request code: never, always, or (OPEN at "mutations") only when writing.
    Never at all where the log's level writes no `op` event (above info): none is built."""
    table = [AUDIT_NEVER] * (max(p.REQUESTS) + 1)
    if not log.audit_written():
        return table
    for code, request in p.REQUESTS.items():
        if audit == "all" or (audit == "mutations" and request.mutates):
            table[code] = AUDIT_ALWAYS
    if audit == "mutations":
        table[p.T_OPEN] = AUDIT_IF_WRITING
    return table


def cut_short_fields(request: bytes, audit: str) -> dict[str, Any]:
    """The fields (`path`, `flags`, `mode`, `uid`, ...) the `op` event of `request`
    (its header and payload, as a worker's journal holds them) would have carried
    besides `op` and `result`, where audit level `audit` logs that request: a worker
    that died executing or replying never wrote it, and the master's `crash recovery`
    line carries them instead (docs/events.md). uid/gid as the guest sent them. {}
    where the level does not log the request, or its payload does not decode."""
    code, size = p.HEADER.unpack_from(request)
    table = audited_codes(audit)
    audited = table[code] if code < len(table) else AUDIT_NEVER
    if audited == AUDIT_NEVER:
        return {}
    try:
        args = p.DECODERS[code](request[p.HEADER_SIZE : p.HEADER_SIZE + size])
    except p.MalformedRequest:
        return {}
    if audited == AUDIT_IF_WRITING and not args[1] & _WRITING:  # (OPEN's flags)
        return {}  # a read-only OPEN at "mutations"
    fields = audit_fields(code, args)
    del fields["op"]
    return fields


def host_ids(fields: dict[str, Any], uid_map: IdMap, gid_map: IdMap) -> None:
    """Add `host_uid`/`host_gid` to an audit event's `uid`/`gid` (as the guest sent them)
    where the export's ID map stores another id: the host id, or None for an id outside
    every range (the kernel refused it: EOVERFLOW). -1 (CHOWN's "unchanged") is no id."""
    for key, ranges in (("uid", uid_map), ("gid", gid_map)):
        guest = fields[key] & 0xFFFFFFFF  # sent as a signed 32-bit field
        if guest == 0xFFFFFFFF:
            continue
        host = map_id(ranges, guest)
        if host != guest:
            fields[f"host_{key}"] = host


# The fields of each request's `op` event after `op` (docs/events.md), in order:
# (field, index in the decoded arguments, how it is written). One table for both ways
# of writing the event: audit_fields (a dict, for structlog) and audit_json.
_PATH = cython.declare(cython.int, 0)
_INT = cython.declare(cython.int, 1)
_MODE = cython.declare(cython.int, 2)
_FILE_MODE = cython.declare(cython.int, 3)  # MKNOD's: with the file type
_FLAGS = cython.declare(cython.int, 4)
_TIMES = cython.declare(cython.int, 5)  # [s, ns] from the index on
_PATH_ONLY = (("path", 0, _PATH),)
_OP_FIELDS: dict[int, tuple[tuple[str, int, int], ...]] = {
    p.T_OPEN: (("path", 0, _PATH), ("flags", 1, _FLAGS)),
    p.T_CREATE: (
        ("path", 0, _PATH),
        ("flags", 1, _FLAGS),
        ("mode", 2, _MODE),
        ("uid", 3, _INT),
        ("gid", 4, _INT),
    ),
    p.T_MKNOD: (
        ("path", 2, _PATH),
        ("mode", 3, _FILE_MODE),
        ("rdev", 4, _INT),
        ("uid", 0, _INT),
        ("gid", 1, _INT),
    ),
    p.T_MKDIR: (("path", 2, _PATH), ("mode", 3, _MODE), ("uid", 0, _INT), ("gid", 1, _INT)),
    p.T_SYMLINK: (("path", 3, _PATH), ("path2", 2, _PATH), ("uid", 0, _INT), ("gid", 1, _INT)),
    p.T_LINK: (("path", 0, _PATH), ("path2", 1, _PATH)),
    p.T_RENAME: (("path", 0, _PATH), ("path2", 1, _PATH)),
    p.T_READLINK: (("path", 0, _PATH), ("size", 1, _INT)),
    p.T_CHMOD: (("path", 0, _PATH), ("mode", 1, _MODE)),
    p.T_CHOWN: (("path", 0, _PATH), ("uid", 1, _INT), ("gid", 2, _INT)),
    p.T_TRUNCATE: (("path", 0, _PATH), ("length", 1, _INT)),
    p.T_UTIME: (("path", 0, _PATH), ("atime", 1, _TIMES), ("mtime", 3, _TIMES)),
    p.T_LGETXATTR: (("path", 1, _PATH), ("name", 2, _PATH), ("size", 0, _INT)),
    p.T_LLISTXATTR: (("path", 1, _PATH), ("size", 0, _INT)),
    p.T_LSETXATTR: (
        ("path", 0, _PATH),
        ("name", 1, _PATH),
        ("size", 3, _INT),
        ("xattr_flags", 4, _INT),
    ),
    p.T_LREMOVEXATTR: (("path", 0, _PATH), ("name", 1, _PATH)),
    p.T_LSTAT: _PATH_ONLY,
    p.T_STATFS: _PATH_ONLY,
    p.T_REMOVE: _PATH_ONLY,
    p.T_GETVERSION: _PATH_ONLY,
}


def _field(args: tuple, index: int, kind: int) -> Any:
    value = args[index]
    if kind == _PATH:
        return log.printable(value)
    if kind == _MODE:
        return oct(value & 0o7777)
    if kind == _FILE_MODE:  # MKNOD's carries the file type
        return oct(value & 0o177777)
    if kind == _FLAGS:
        return log.open_flags(value)
    if kind == _TIMES:
        return [value, args[index + 1]]
    return value


def audit_fields(code: int, args: tuple) -> dict[str, Any]:
    """The fields of one request's audit event (docs/events.md, event "op"), from its
    decoded payload (protocol.DECODERS' tuple): {"op": "chmod", "path": "/a",
    "mode": "0o644"}."""
    fields: dict[str, Any] = {"op": p.REQUESTS[code].name}
    for name, index, kind in _OP_FIELDS[code]:
        fields[name] = _field(args, index, kind)
    return fields


# audit_json's pieces, per request code: `"op":"chmod"`, then per field its `,"name":`
# (with the opening quote of a path) with its index and kind; and the names of the
# event's fields (the context must hold none of them, as for log.op).
_OP_JSON = [
    b'"op":"%s"' % p.REQUESTS[code].name.encode() if code in _OP_FIELDS else None
    for code in range(max(_OP_FIELDS) + 1)
]
_FIELDS_JSON = [
    tuple(
        (b',"%s":%s' % (name.encode(), b'"' if kind == _PATH else b""), index, kind)
        for name, index, kind in _OP_FIELDS.get(code, ())
    )
    for code in range(max(_OP_FIELDS) + 1)
]
_OP_KEYS = [
    frozenset(("op", "result", "dur_us", *(name for name, _, _ in _OP_FIELDS.get(code, ()))))
    for code in range(max(_OP_FIELDS) + 1)
]


@functools.lru_cache(maxsize=256)  # bounded: the guest picks the flags
def _flags_json(flags: int) -> bytes:
    return b'"%s"' % log.open_flags(flags).encode()


@cython.cfunc
@cython.boundscheck(False)
@cython.wraparound(False)
def _plain_path(path: bytes) -> cython.bint:
    """Whether `path` is written in a JSON line as its bytes between quotes: printable
    ASCII without a quote or a backslash (nothing for JSON or log.escape to change)."""
    c: cython.uchar
    for c in path:  # noqa: SIM110 (compiled: a C loop over the bytes; all() is not)
        if c < 0x20 or c > 0x7E or c == 0x22 or c == 0x5C:
            return False
    return True


@functools.lru_cache(maxsize=256)  # bounded: errno values
def _result_json(err: int) -> bytes:
    return b',"result":"%s"' % log.result_name(err).encode()


@cython.ccall
@cython.locals(index=cython.Py_ssize_t, kind=cython.int)
def audit_json(
    code: cython.Py_ssize_t, args: tuple, err: int, dur_us: int | None
) -> bytearray | None:
    """The fields of the `op` event of request `code` with decoded arguments `args`,
    answered `err` (0: ok) in `dur_us` (None: not timed), as the members of a JSON
    object exactly as orjson writes them after log.escape:
    b'"op":"chmod","path":"/a","mode":"0o644","result":"ok","dur_us":7'
    (audit_fields(code, args), then `result` and `dur_us`). None where a path or name
    holds a byte JSON or log.escape would write otherwise (the dict and structlog's
    processors write that event)."""
    out = bytearray(_OP_JSON[code])
    for name, index, kind in _FIELDS_JSON[code]:
        value = args[index]
        out += name
        if kind == _PATH:
            if not _plain_path(value):
                return None
            out += value
            out += b'"'
        elif kind == _MODE:
            out += b'"0o%o"' % (value & 0o7777)
        elif kind == _FILE_MODE:
            out += b'"0o%o"' % (value & 0o177777)
        elif kind == _FLAGS:
            out += _flags_json(value)
        elif kind == _TIMES:
            out += b"[%d,%d]" % (value, args[index + 1])
        else:
            out += b"%d" % value
    out += _result_json(err)
    if dur_us is not None:
        out += b',"dur_us":%d' % dur_us
    return out
