"""The state a master hands to the program it re-executes for an upgrade.

`proxyd upgrade` (or SIGUSR2) makes the master execve(2) the proxyd now installed,
keeping its pid and every descriptor that matters: the listening sockets, its copy of
every live connection, each worker's channel and journal, the control socket, the log.
The old program writes one JSON document (below) into a memfd and names that memfd in
the PROXYD_HANDOVER environment variable; every descriptor the document names is left
open across the exec, every other one is close-on-exec. The new program reads the
document before anything else (read()), and takes over the workers and connections
exactly where they are. docs/handover.md documents every field; a program refuses a
document whose `version` it does not know (and says so when checked beforehand:
`proxyd --upgrade-check` prints the versions it reads).

Version 1:

    {"version": 1, "program_version": str, "started": float, "upgrades": int,
     "upgraded_at": float | null, "generation": int, "next_conn": int,
     "counters": {str: int}, "metrics": METRICS (optional), "log_fd": int | null,
     "control": LISTENER | null, "reply_to": int | null,
     "pools": [{"name": str, "listener": LISTENER | null, "min_idle": int,
                "generation": int, "next_index": int, "pending": [conn id, ...],
                "unavailable": str | null, "unavailable_since": float}],
     "connections": [{"id": int, "fd": int, "export": str, "peer_pid": int,
                      "peer_uid": int, "peer_gid": int, "accepted": float,
                      "requests": int, "errors": int, "prefix": hex str,
                      "undecided": bool, "op": str | null}],
     "workers": [{"pid": int, "export": str, "index": int, "generation": int,
                  "channel_fd": int | null, "journal_fd": int, "pidfd": int | null,
                  "started": float, "state": str, "conn": conn id | null,
                  "connections": int, "requests": int}]}
    LISTENER = {"fd": int, "path": str, "identity": [dev, ino], "directory": [dev, ino]}
    METRICS = proxyd.metrics.Metrics.state(): {"listen": str | null, "listen_fd": int | null,
               "events": [[str, str, str, int]], "exited": {str: [int]},
               "baselines": {str: [int]}}
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from proxyd import __version__, listener, log
from proxyd.config import ExportConfig
from proxyd.pool import Connection, Worker
from proxyd.slot import Slot

if TYPE_CHECKING:
    from proxyd.master import Master

VERSION = 1
VERSIONS_READ = (1,)  # the versions this program can take over
ENV = "PROXYD_HANDOVER"
MAX_SIZE = 64 * 1024 * 1024


class HandoverError(Exception):
    """A handover document this program cannot take over; the message says why."""


def descriptors(document: dict[str, Any]) -> list[int]:
    """Every descriptor a document names (they must survive the exec)."""
    fds = [document["log_fd"], document["reply_to"]]
    listeners = [document["control"]] + [p["listener"] for p in document["pools"]]
    fds += [lst["fd"] for lst in listeners if lst is not None]
    fds += [c["fd"] for c in document["connections"]]
    for w in document["workers"]:
        fds += [w["channel_fd"], w["journal_fd"], w["pidfd"]]
    fds.append((document.get("metrics") or {}).get("listen_fd"))
    return [fd for fd in fds if fd is not None and fd > 2]


def write(document: dict[str, Any]) -> int:
    """The document in a new memfd, rewound; returns its descriptor (inheritable).
    Raises OSError."""
    fd = os.memfd_create("proxyd-handover", 0)
    try:
        os.write(fd, json.dumps(document, separators=(",", ":")).encode())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read() -> dict[str, Any] | None:
    """The document an upgrading master left for this program, or None when this
    program was not started by an upgrade. Closes the memfd and clears the variable;
    the descriptors it names are made close-on-exec again (workers forked later must
    not inherit them). Raises HandoverError for a document this program cannot take."""
    value = os.environ.pop(ENV, None)
    if value is None:
        return None
    try:
        fd = int(value)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except (ValueError, OSError) as e:
        raise HandoverError(f"{ENV}={value!r}: {e}") from None
    try:
        document = json.loads(data)
    except ValueError as e:
        raise HandoverError(f"handover document is not JSON: {e}") from None
    version = document.get("version") if isinstance(document, dict) else None
    if version not in VERSIONS_READ:
        raise HandoverError(f"handover version {version!r} is not one of {VERSIONS_READ}")
    for fd in descriptors(document):
        os.set_inheritable(fd, False)
    return document


# --- what a master hands over, and how the next one takes it ------------------------------


def _listener(lst: listener.Listener | None) -> dict[str, Any] | None:
    if lst is None:
        return None
    return {
        "fd": lst.sock.fileno(),
        "path": lst.path,
        "identity": list(lst.identity),
        "directory": list(lst.directory),
    }


def _take_listener(doc: dict[str, Any] | None) -> listener.Listener | None:
    if doc is None:
        return None
    sock = socket.socket(fileno=doc["fd"])
    sock.setblocking(False)
    return listener.Listener(sock, doc["path"], tuple(doc["identity"]), tuple(doc["directory"]))


def state(master: Master, reply_to: socket.socket | None) -> dict[str, Any]:
    """The running master's state as a version-1 document (see above)."""
    undecided = {conn_id: op for conn_id, (_, op, _) in master.recovery.undecided.items()}
    logs_to_file = master.config.log_file is not None
    return {
        "version": VERSION,
        "program_version": __version__,
        "started": master.started,
        "upgrades": master.upgrades,
        "upgraded_at": master.upgraded_at,
        "generation": master.generation,
        "next_conn": master.next_conn,
        "counters": dict(master.counters),
        "metrics": master.metrics.state(),
        "log_fd": log.current_fd() if logs_to_file else None,
        "control": _listener(master.control.listener) if master.control else None,
        "reply_to": reply_to.fileno() if reply_to is not None else None,
        "pools": [
            {
                "name": pool.name,
                "listener": _listener(pool.listener),
                "min_idle": pool.min_idle,
                "generation": pool.generation,
                "next_index": pool.next_index,
                "pending": [c.id for c in pool.pending],
                "unavailable": pool.unavailable,
                "unavailable_since": pool.unavailable_since,
            }
            for pool in master.pools.values()
        ],
        "connections": [
            {
                "id": c.id,
                "fd": c.sock.fileno(),
                "export": c.export,
                "peer_pid": c.peer_pid,
                "peer_uid": c.peer_uid,
                "peer_gid": c.peer_gid,
                "accepted": c.accepted,
                "requests": c.requests,
                "errors": c.errors,
                "prefix": c.prefix.hex(),
                "undecided": c.id in undecided,
                "op": undecided.get(c.id),
            }
            for c in master.connections.values()
        ],
        "workers": [
            {
                "pid": w.pid,
                "export": w.pool.name,
                "index": w.index,
                "generation": w.generation,
                "channel_fd": w.channel.fileno() if w.channel is not None else None,
                "journal_fd": w.journal.fd,
                "pidfd": w.pidfd,
                "started": w.started,
                "state": w.state,
                "conn": w.conn.id if w.conn is not None else None,
                "connections": w.connections,
                "requests": w.requests,
            }
            for w in master.workers.values()
        ],
    }


def restore(master: Master, document: dict[str, Any]) -> None:
    """Take over, in a freshly executed master, everything `document` hands over; then
    apply this program's configuration as a reload would, and ask every worker of the
    old program to leave at its next request boundary (new-code workers take over)."""
    master.started = document["started"]
    master.upgrades = document["upgrades"] + 1
    master.upgraded_at = time.time()
    master.generation = document["generation"]
    master.next_conn = document["next_conn"]
    master.counters.update(document["counters"])
    master.metrics.restore(document.get("metrics"))  # before adopted workers' baselines
    connections = {}
    for c in document["connections"]:
        conn = Connection(
            c["id"],
            socket.socket(fileno=c["fd"]),
            c["export"],
            c["peer_pid"],
            c["peer_uid"],
            c["peer_gid"],
            accepted=c["accepted"],
            requests=c["requests"],
            errors=c["errors"],
            prefix=bytes.fromhex(c["prefix"]),
        )
        connections[conn.id] = master.connections[conn.id] = conn
    exports = {e.name: e for e in master.config.exports}
    removed = []
    for p in document["pools"]:
        # An export the configuration no longer has is removed as a reload removes it.
        export = exports.get(p["name"]) or ExportConfig(p["name"], "/", None)
        pool = master.new_pool(export, min_idle=p["min_idle"])
        pool.generation = p["generation"]
        pool.listener = _take_listener(p["listener"])
        pool.next_index = p["next_index"]
        pool.pending.extend(connections[i] for i in p["pending"])
        pool.unavailable, pool.unavailable_since = p["unavailable"], p["unavailable_since"]
        if pool.name not in exports:
            removed.append(pool)
    for wd in document["workers"]:
        pool = master.pools[wd["export"]]
        channel = None
        if wd["channel_fd"] is not None:
            channel = socket.socket(fileno=wd["channel_fd"])
            channel.setblocking(False)
        w = Worker(
            wd["pid"],
            pool,
            wd["index"],
            wd["generation"],
            channel,
            Slot(fd=wd["journal_fd"]),
            started=wd["started"],
            state=wd["state"],
            conn=connections.get(wd["conn"]),
            connections=wd["connections"],
            requests=wd["requests"],
            pidfd=wd["pidfd"],
        )
        master.adopt_worker(w)
    for c in document["connections"]:
        if c["undecided"]:  # its worker died sending a reply: wait for a next request
            master.recovery.await_next_request(connections[c["id"]], c["op"])
    if document["control"] is not None and master.control is None:
        master.start_control(_take_listener(document["control"]))
    for pool in removed:
        master.remove_pool(pool)
    master.apply_configuration(master.config, previous=None)
    master.log.info(
        "upgrade done",
        version=__version__,
        from_version=document["program_version"],
        upgrades=master.upgrades,
        workers=len(master.workers),
        connections=len(master.connections),
    )
    if document["reply_to"] is not None:
        answer = {"ok": True, "version": __version__, "from": document["program_version"]}
        client = socket.socket(fileno=document["reply_to"])
        with contextlib.suppress(OSError):
            client.settimeout(1.0)
            client.sendall(json.dumps(answer).encode())
        client.close()
