"""Messages between the master and one worker: a SOCK_SEQPACKET socketpair.

Each message is one JSON object in one packet, optionally with one descriptor
(SCM_RIGHTS). Master to worker: {"op": "serve", "conn": ID, ...} with the
connection, {"op": "log"} with a reopened log file. Worker to master: "ready",
"done", "released". Every message is checked against its side's schema before
use: a worker may be compromised, and nothing it sends may hurt the master.
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

MAX_MESSAGE = 4096
_INT_SIZE = array.array("i").itemsize
_FD_SPACE = socket.CMSG_SPACE(_INT_SIZE)


class ChannelError(Exception):
    """A message that cannot be trusted (truncated, not JSON, too deep, unknown op,
    missing or extra fields, wrong types, a descriptor where none belongs)."""


_INT_MAX = 2**63 - 1
# op -> (fields and their types, whether the message carries a descriptor)
Schema = dict[str, tuple[dict[str, tuple[type, ...]], bool]]
_FINISHED: dict[str, tuple[type, ...]] = {
    "conn": (int,),
    "requests": (int,),
    "errors": (int,),
    "reason": (str,),
    "protocol_error": (str, type(None)),
}
FROM_WORKER: Schema = {
    "ready": ({}, False),
    "done": (_FINISHED, False),
    "released": (_FINISHED, False),
}
FROM_MASTER: Schema = {
    "serve": ({"conn": (int,), "peer_pid": (int,), "peer_uid": (int,), "peer_gid": (int,)}, True),
    "log": ({}, True),
}


def _check(message: Any, has_fd: bool, schema: Schema) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ChannelError("message has no op")
    op = message["op"]
    if op not in schema:
        raise ChannelError(f"unknown op {op[:40]!r}")
    fields, wants_fd = schema[op]
    if has_fd != wants_fd:
        raise ChannelError(f"{op}: descriptor {'missing' if wants_fd else 'unexpected'}")
    if set(message) != {"op", *fields}:
        raise ChannelError(f"{op}: fields {sorted(message)[:8]} are not {sorted(fields)}")
    for name, kinds in fields.items():
        value = message[name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ChannelError(f"{op}: {name} has type {type(value).__name__}")
        if isinstance(value, int) and not 0 <= value <= _INT_MAX:
            raise ChannelError(f"{op}: {name} out of range")
    return message


def pair() -> tuple[socket.socket, socket.socket]:
    """(master end, worker end), both close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def send(sock: socket.socket, message: dict[str, Any], fd: int | None = None) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if fd is None:
        sock.sendall(data)
    else:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        sock.sendmsg([data], rights)


def receive(
    sock: socket.socket, schema: Schema, flags: int = 0
) -> tuple[dict[str, Any] | None, int | None]:
    """One message, checked against `schema` (FROM_WORKER or FROM_MASTER), and its
    descriptor, if any; (None, None) when the peer is gone. Raises ChannelError for a
    message that breaks the schema, BlockingIOError with MSG_DONTWAIT and nothing there.

    Every descriptor received is either returned or closed, on every path.
    """
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(
            MAX_MESSAGE, _FD_SPACE, flags | socket.MSG_CMSG_CLOEXEC
        )
    except ConnectionResetError:  # the peer died with our message unread: it is gone
        return None, None
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT_SIZE
            fds.extend(array.array("i", payload[:usable]))
    try:
        if msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise ChannelError("message or its descriptors were truncated")
        if len(fds) > 1:
            raise ChannelError(f"{len(fds)} descriptors in one message")
        if not data:
            if fds:
                raise ChannelError("a descriptor without a message")
            return None, None
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise ChannelError("message is not JSON (or is nested too deep)") from None
        message = _check(message, bool(fds), schema)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, (fds[0] if fds else None)
