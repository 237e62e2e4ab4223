"""The master's control service: the root-only control socket and the status document.

A client connects, sends one JSON line ({"cmd": "status" | "reload" | "stop" |
"upgrade"}) and
reads one JSON document back (proxyd/control.py is the client side). The service reads
without blocking, inside the master's selector loop: a client that never finishes its
line is dropped after CLIENT_DEADLINE seconds, and one that does not read its answer
cannot hold the master longer than ANSWER_TIMEOUT.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxyd import __version__, control, listener, log, slot
from proxyd.pool import BUSY, RETIRING, Worker

if TYPE_CHECKING:
    from proxyd.master import Master

CLIENT_DEADLINE = 2.0  # seconds a client has to send its request line
ANSWER_TIMEOUT = 1.0  # seconds the answer may take to send


class ControlService:
    """Accepts control clients on `listener_` and answers each with `answer(cmd, client)`
    (an upgrade that succeeds never returns: the new program answers that client)."""

    def __init__(
        self,
        listener_: listener.Listener,
        selector: selectors.BaseSelector,
        answer: Callable[[str, socket.socket], dict[str, Any]],
        log: Any,
    ) -> None:
        self.listener = listener_
        self._selector = selector
        self._answer = answer
        self.log = log
        self._clients: dict[socket.socket, tuple[bytearray, float]] = {}
        listener_.sock.setblocking(False)
        selector.register(listener_.sock, selectors.EVENT_READ, self._on_accept)

    def sockets(self) -> list[socket.socket]:
        """Every socket the service holds (a new worker closes them)."""
        return [self.listener.sock, *self._clients]

    def expire(self, now: float) -> None:
        """Drop clients that never finished their request line."""
        for client, (_, deadline) in list(self._clients.items()):
            if now > deadline:
                self._drop(client)

    def close(self) -> None:
        for client in list(self._clients):
            self._drop(client)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.listener.sock)
        self.listener.close()

    def _on_accept(self, sock: socket.socket) -> None:
        try:
            client, _ = sock.accept()
        except OSError:
            return
        if not control.peer_is_root(client):
            self.log.warning("control connection refused", reason="peer is not root")
            client.close()
            return
        client.setblocking(False)
        self._clients[client] = (bytearray(), time.monotonic() + CLIENT_DEADLINE)
        self._selector.register(client, selectors.EVENT_READ, self._on_request)

    def _drop(self, client: socket.socket) -> None:
        self._clients.pop(client, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client)
        client.close()

    def _on_request(self, client: socket.socket) -> None:
        buf, _ = self._clients[client]
        try:
            data = client.recv(control.MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        if data and b"\n" not in buf and len(buf) < control.MAX_REQUEST:
            return  # the rest of the line is still coming
        try:
            answer = self._answer(control.parse_request(bytes(buf)), client)
        except ValueError as e:
            self.log.warning("bad control request", error=str(e)[:200])
            answer = {"ok": False, "error": f"bad request: {e}"}
        except Exception as e:  # a bug answering must cost this client only, not the master
            self.log.exception("control request failed")
            answer = {"ok": False, "error": f"internal error: {e}"}
        try:
            client.setblocking(True)
            client.settimeout(ANSWER_TIMEOUT)
            client.sendall(json.dumps(answer).encode())
        except OSError:
            pass
        self._drop(client)


def _live_requests(w: Worker) -> int:
    """Requests the worker has served on its current connection (from its journal)."""
    return w.journal.fields[slot.SEQ] if w.state in (BUSY, RETIRING) and w.conn else 0


def status_document(master: Master) -> dict[str, Any]:
    """What `proxyd status` shows: exports, workers, connections, counters (JSON-ready)."""
    now = time.time()
    workers = [
        {
            "pid": w.pid,
            "export": w.pool.name,
            "index": w.index,
            "state": w.state,
            "conn": w.conn.id if w.conn else None,
            "connections": w.connections,
            "requests": w.requests + _live_requests(w),
            "started": w.started,
            "generation": w.generation,
            "log_dropped": w.journal.fields[slot.LOG_DROPPED],
            "log_pending": w.journal.fields[slot.LOG_PENDING],
        }
        for w in sorted(master.workers.values(), key=lambda w: (w.pool.name, w.index))
    ]
    serving = {w.conn.id: w for w in master.workers.values() if w.conn is not None}
    connections = []
    for c in sorted(master.connections.values(), key=lambda c: c.id):
        w = serving.get(c.id)
        # `requests`: every request served on the connection, by every worker that held
        # it (it moves to a fresh one after a reload, an upgrade or a crash); of them,
        # `worker_requests` were served by the worker holding it now, and are part of
        # that worker's own `requests` too.
        by_worker = _live_requests(w) if w is not None else 0
        connections.append(
            {
                "id": c.id,
                "export": c.export,
                "peer_pid": c.peer_pid,
                "peer_uid": c.peer_uid,
                "peer_gid": c.peer_gid,
                "since": c.accepted,
                "requests": c.requests + by_worker,
                "errors": c.errors,
                "worker": None if w is None else f"{w.pool.name}#{w.index}",
                "worker_pid": None if w is None else w.pid,
                "worker_requests": by_worker,
            }
        )
    exports = []
    for pool in master.pools.values():
        states = [w.state for w in pool.workers.values()]
        exports.append(
            {
                "name": pool.name,
                "path": pool.config.path,
                "socket": pool.config.socket,
                "readonly": pool.config.readonly,
                "uid_map": [list(r) for r in pool.config.uid_map],  # empty: not ID-mapped
                "gid_map": [list(r) for r in pool.config.gid_map],
                "min_idle": pool.min_idle,
                "max_workers": pool.config.max_workers,
                "workers": len(states),
                "idle": states.count("idle"),
                "busy": states.count("busy") + states.count("retiring"),
                "waiting": len(pool.pending),
                "available": pool.unavailable is None,
                "unavailable_reason": pool.unavailable,
                "unavailable_since": pool.unavailable_since if pool.unavailable else None,
            }
        )
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started": master.started,
        "uptime_s": round(now - master.started, 1),
        "source": master.config.source,
        "generation": master.generation,
        "upgrades": master.upgrades,
        "upgraded_at": master.upgraded_at,
        "stopping": master.stop_deadline is not None,
        "exports": exports,
        "workers": workers,
        "connections": connections,
        "counters": dict(master.counters),
        "log": _log_counts(master, workers),
    }


def _log_counts(master: Master, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Log lines dropped because the log did not take them (proxyd/sink.py): the
    master's own, the live workers' (from their journals), those of workers that have
    exited (what they dropped and what they still held), and the total of all three."""
    live = sum(w["log_dropped"] for w in workers)
    exited = master.counters["log_lines_dropped_by_exited_workers"]
    return {
        "on_blocked": master.config.on_log_blocked,
        "dropped": log.dropped() + live + exited,
        "master_dropped": log.dropped(),
        "master_pending": log.pending(),
        "workers_dropped": live,
        "exited_workers_dropped": exited,
    }
