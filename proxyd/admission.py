"""Who may connect to an export: the peer checks of the master, and their refusals."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

from proxyd.config import ExportConfig
from proxyd.pool import Connection

REFUSAL_INTERVAL = 1.0  # seconds between two warnings for the same peer uid and reason


def peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED, unix(7))."""
    return struct.unpack("=iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def refusal(
    export: ExportConfig, uid: int, gid: int, connections: Iterable[Connection]
) -> str | None:
    """Why a peer may not use this export (allow-lists, max_connections_per_uid given
    the live `connections`), or None."""
    if (export.allow_uids and uid not in export.allow_uids) or (
        export.allow_gids and gid not in export.allow_gids
    ):
        return "not in allow_uids/allow_gids"
    limit = export.max_connections_per_uid
    if limit:
        held = sum(1 for c in connections if c.export == export.name and c.peer_uid == uid)
        if held >= limit:
            return f"peer uid already holds {limit} connections"
    return None


class Refusals:
    """The `connection refused` warnings: at most one per REFUSAL_INTERVAL per export,
    peer uid and reason (a peer hammering the socket must not flood the log); the ones
    left out are counted in the next one's `suppressed`."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def warn(self, export: str, pid: int, uid: int, gid: int, reason: str) -> None:
        key = (export, uid, reason)
        now = time.monotonic()
        last, suppressed = self._last.get(key, (0.0, 0))
        if now - last < REFUSAL_INTERVAL:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        self.log.warning(
            "connection refused",
            export=export,
            peer_pid=pid,
            peer_uid=uid,
            peer_gid=gid,
            reason=reason,
            suppressed=suppressed,
        )
