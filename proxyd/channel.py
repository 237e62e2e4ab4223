"""Messages between the master and one worker: a SOCK_SEQPACKET socketpair.

Each message is one JSON object in one packet, optionally with one descriptor
(SCM_RIGHTS). Master to worker: {"op": "serve", "conn": ID, ...} with the
connection. Worker to master: "ready", "done", "released".
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
    """A message that cannot be trusted (truncated, not JSON, unexpected descriptors)."""


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


def receive(sock: socket.socket, flags: int = 0) -> tuple[dict[str, Any] | None, int | None]:
    """One message and its descriptor, if any; (None, None) when the peer is gone.

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
        except ValueError:
            raise ChannelError("message is not JSON") from None
        if not isinstance(message, dict) or "op" not in message:
            raise ChannelError("message has no op")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, (fds[0] if fds else None)
