"""Serving one proxy connection inside the export: the worker's core.

The hot path per request is one recv_into a preallocated buffer (header and payload
usually arrive together), the operation, and one send of the whole reply. Decoding
works on a memoryview of that buffer; dispatch is a list indexed by request code.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxyd import protocol as p
from proxyd.ops import ExportOps, SpecialFileRefused

Handler = Callable[[memoryview], Any]

_SCM_RIGHTS = socket.SCM_RIGHTS
_SOL_SOCKET = socket.SOL_SOCKET


def _data_or_length(value: int | bytes) -> bytes:
    # LGETXATTR / LLISTXATTR with size 0 answer the length, else the bytes.
    if isinstance(value, int):
        return p.encode_status(value)
    return p.encode_string_data(value)


def _ok(_: None) -> bytes:
    return _STATUS_OK


_STATUS_OK = p.encode_status(0)


def request_handlers(ops: ExportOps) -> list[Handler | None]:
    """Handlers indexed by request code: payload -> reply bytes (or an fd for OPEN/CREATE).

    Each handler decodes its payload, runs the operation and encodes the success
    reply; failures propagate as OSError / MalformedRequest to the serving loop.
    """

    def status(decode: Callable, op: Callable) -> Handler:
        def handle(payload: memoryview) -> bytes:
            op(*decode(payload))
            return _STATUS_OK

        return handle

    def data(decode: Callable, op: Callable, encode: Callable) -> Handler:
        def handle(payload: memoryview) -> bytes:
            return encode(op(*decode(payload)))

        return handle

    def fd(decode: Callable, op: Callable) -> Handler:
        def handle(payload: memoryview) -> int:
            return op(*decode(payload))

        return handle

    table: list[Handler | None] = [None] * (max(p.REQUESTS) + 1)
    table[p.T_OPEN] = fd(p.decode_path_int, ops.open)
    table[p.T_CREATE] = fd(p.decode_create, ops.create)
    table[p.T_MKNOD] = status(p.decode_mknod, ops.mknod)
    table[p.T_MKDIR] = status(p.decode_mkdir, ops.mkdir)
    table[p.T_SYMLINK] = status(p.decode_symlink, ops.symlink)
    table[p.T_LINK] = status(p.decode_two_paths, ops.link)
    table[p.T_LSTAT] = data(p.decode_path, ops.lstat, p.encode_stat)
    table[p.T_READLINK] = data(p.decode_path_int, ops.readlink, p.encode_string_data)
    table[p.T_STATFS] = data(p.decode_path, ops.statfs, p.encode_statfs)
    table[p.T_CHMOD] = status(p.decode_path_int, ops.chmod)
    table[p.T_CHOWN] = status(p.decode_chown, ops.chown)
    table[p.T_TRUNCATE] = status(p.decode_truncate, ops.truncate)
    table[p.T_UTIME] = status(p.decode_utime, ops.utime)
    table[p.T_RENAME] = status(p.decode_two_paths, ops.rename)
    table[p.T_REMOVE] = status(p.decode_path, ops.remove)
    table[p.T_LGETXATTR] = data(p.decode_getxattr, ops.lgetxattr, _data_or_length)
    table[p.T_LLISTXATTR] = data(p.decode_listxattr, ops.llistxattr, _data_or_length)
    table[p.T_LSETXATTR] = status(p.decode_setxattr, ops.lsetxattr)
    table[p.T_LREMOVEXATTR] = status(p.decode_two_paths, ops.lremovexattr)
    table[p.T_GETVERSION] = data(p.decode_path, ops.getversion, p.encode_getversion)
    return table


def _is_fd_reply(code: int) -> bool:
    return code in (p.T_OPEN, p.T_CREATE)


@dataclass
class ConnectionStats:
    """What one connection did, for the closing log line."""

    requests: int = 0
    errors: int = 0
    reason: str = "eof"  # why serving ended
    protocol_error: str | None = None


class Server:
    """Serves proxy connections, one at a time, with one set of handlers.

    `log` is a structlog-style bound logger. `buffer` may be supplied (the daemon
    gives a shared page so that its master can see a request in flight).
    """

    def __init__(self, ops: ExportOps, log: Any, buffer: bytearray | memoryview | None = None):
        self._handlers = request_handlers(ops)
        self._log = log
        self._buf = memoryview(buffer if buffer is not None else bytearray(p.BUFFER_SIZE))
        if len(self._buf) < p.BUFFER_SIZE:
            raise ValueError(f"request buffer must hold {p.BUFFER_SIZE} bytes")

    def serve(self, sock: socket.socket) -> ConnectionStats:
        """Answer requests on `sock` until EOF or a fatal protocol error."""
        stats = ConnectionStats()
        started = time.monotonic()
        try:
            self._loop(sock, stats)
        except p.FatalProtocolError as e:
            stats.reason, stats.protocol_error = "protocol-error", str(e)
            self._log.warning("protocol error, closing connection", error=str(e))
        except (ConnectionResetError, BrokenPipeError) as e:
            stats.reason = f"peer-gone: {e.strerror}"
        except OSError as e:
            stats.reason = f"socket-error: {e.strerror}"
        self._log.info(
            "connection closed",
            reason=stats.reason,
            requests=stats.requests,
            errors=stats.errors,
            duration_s=round(time.monotonic() - started, 3),
        )
        return stats

    def _loop(self, sock: socket.socket, stats: ConnectionStats) -> None:
        buf = self._buf
        handlers = self._handlers
        recv_into = sock.recv_into
        sendall = sock.sendall
        unpack_header = p.HEADER.unpack_from
        have = 0  # bytes in buf: the current request, maybe the start of the next
        while True:
            while have < p.HEADER_SIZE:
                n = recv_into(buf[have:])
                if n == 0:
                    if have:
                        stats.reason = "eof-mid-request"
                    return
                have += n
            code, size = unpack_header(buf)
            p.check_header(code, size)
            end = p.HEADER_SIZE + size
            while have < end:
                n = recv_into(buf[have:])
                if n == 0:
                    stats.reason = "eof-mid-request"
                    return
                have += n

            stats.requests += 1
            payload = buf[p.HEADER_SIZE : end]
            if _is_fd_reply(code):
                self._answer_with_fd(sock, code, handlers[code], payload, stats)
            else:
                try:
                    reply = handlers[code](payload)
                except Exception as e:
                    stats.errors += 1
                    reply = p.encode_error(self._errno_of(code, e))
                sendall(reply)

            if have > end:  # a client that did not wait for its reply: keep the rest
                buf[: have - end] = buf[end:have]
            have -= end

    def _answer_with_fd(self, sock: socket.socket, code: int, handler: Handler,
                        payload: memoryview, stats: ConnectionStats) -> None:  # fmt: skip
        try:
            fd = handler(payload)
        except Exception as e:
            stats.errors += 1
            sock.sendall(p.encode_fd_reply(-self._errno_of(code, e)))
            return
        try:
            sock.sendmsg([p.FD_REPLY_VALID], [(_SOL_SOCKET, _SCM_RIGHTS, p.FD_REPLY.pack(fd))])
        finally:
            os.close(fd)  # the client has its own copy now (or none, if sending failed)

    def _errno_of(self, code: int, e: Exception) -> int:
        if isinstance(e, OSError) and e.errno:
            if isinstance(e, SpecialFileRefused):
                self._log.warning(
                    "special file refused",
                    op=p.REQUESTS[code].name,
                    path=_printable(e.filename),
                    file_type=e.file_type,
                )
            return e.errno
        if isinstance(e, p.MalformedRequest):
            self._log.info("malformed request", op=p.REQUESTS[code].name, error=str(e))
            return e.errno
        if isinstance(e, ValueError | OverflowError):  # a value the kernel cannot take
            return errno.EINVAL
        self._log.exception("request failed unexpectedly", op=p.REQUESTS[code].name)
        return errno.EIO


def _printable(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)
