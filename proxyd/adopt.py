"""Finding the workers a dead master left serving, and taking their connections back.

A worker outlives its master (worker.py): it keeps serving its guest. The master that
starts next (supervisord or systemd restart it) looks for such orphans before it
serves: root processes titled `proxyd: worker NAME#I conn=...` whose parent is not a
live proxyd master, of an export it serves (the worker's root directory must be that
export's directory: same device and inode). For each it takes, with pidfd_getfd(2), a
copy of the worker's connection and of its journal; then it can watch the journal,
answer for the worker if it dies, and ask it to leave at its next request boundary, as
at a reload. Nothing in the worker's sandbox changes: the master reaches in, the worker
reaches nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import socket
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxyd import admission, slot
from proxyd.config import ExportConfig
from proxyd.pool import BUSY, Connection, Worker
from proxyd.slot import Slot

if TYPE_CHECKING:
    from proxyd.master import Master

SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438  # x86-64 and every other architecture since 5.3
TITLE = re.compile(rb"^proxyd: worker (?P<export>[\w.-]+)#(?P<index>\d+) conn=\d+")
JOURNAL = "/memfd:proxyd-journal (deleted)"
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Orphan:
    pid: int
    export: str
    index: int
    pidfd: int  # readable when the worker exits (it is not our child: no SIGCHLD)
    journal_fd: int
    conn_fd: int


def _syscall(number: int, *args: int) -> int:
    ret = _libc.syscall(number, *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _is_master(pid: int) -> bool:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().startswith(b"proxyd: master")
    return False


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def candidates(exports: dict[str, ExportConfig]) -> list[tuple[int, str, int]]:
    """(pid, export, index) of every orphaned worker serving a connection of one of
    `exports`: root's, titled as a serving worker, its parent no proxyd master, its root
    directory the export's."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                match = TITLE.match(f.read())
            if match is None:
                continue
            status = _status(pid)
            if status["Uid"].split()[0] != "0" or _is_master(int(status["PPid"])):
                continue
            export = exports.get(match["export"].decode())
            root = os.stat(f"/proc/{pid}/root")
        except (OSError, KeyError, ValueError):
            continue  # gone, or not readable: not one of ours to take
        if export is not None and (root.st_dev, root.st_ino) == export.identity:
            found.append((pid, export.name, int(match["index"])))
    return found


def take(pid: int, export: str, index: int) -> Orphan:
    """Copies of the orphan's journal and connection, and a pidfd to watch it by.
    Raises OSError: it went away meanwhile (ESRCH, ENOENT), we may not reach into it
    (EPERM), or it holds no journal or connection (ENODATA)."""
    pidfd = journal = conn = -1
    try:
        pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except FileNotFoundError:  # a descriptor the worker has just closed (a
                continue  # file it opened for a request): not the ones we want
            if target == JOURNAL and journal < 0:
                journal = _syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            elif target.startswith("socket:") and conn < 0:
                copy = _syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
                if _is_stream(copy):
                    conn = copy
                else:
                    os.close(copy)
        if journal >= 0 and conn >= 0:
            return Orphan(pid, export, index, pidfd, journal, conn)
        raise OSError(errno.ENODATA, "no journal or no connection among its descriptors")
    except BaseException:
        for fd in (pidfd, journal, conn):
            if fd >= 0:
                os.close(fd)
        raise


def _is_stream(fd: int) -> bool:
    """The guest's connection is the worker's one SOCK_STREAM socket (its channel to
    the master is SOCK_SEQPACKET, its syslog socket SOCK_DGRAM)."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return False
    sock = socket.socket(fileno=fd)
    try:
        return sock.type == socket.SOCK_STREAM
    finally:
        sock.detach()


def adopt_orphans(master: Master) -> None:
    """Take back the connections a master that died left with its workers (they go on
    serving without one): watched, recovered and audited again, each moves to a worker
    of `master`'s once one is ready to take it (Pool.adopted_to_release)."""
    exports = {p.name: p.config for p in master.pools.values()}
    for pid, name, index in candidates(exports):
        try:
            orphan = take(pid, name, index)
        except OSError as e:
            master.log.warning("orphan not adopted", export=name, worker_pid=pid, error=str(e))
            continue
        pool = master.pools[name]
        sock = socket.socket(fileno=orphan.conn_fd)
        peer_pid, uid, gid = admission.peer(sock)
        journal = Slot(fd=orphan.journal_fd)
        conn = Connection(master.next_conn, sock, name, peer_pid, uid, gid)
        conn.accepted = journal.fields[slot.ACCEPTED] or conn.accepted
        master.next_conn += 1
        master.connections[conn.id] = conn
        # Generation -1: older than any of the pool's; not our child: watched by pidfd.
        w = Worker(pid, pool, index, -1, None, journal, state=BUSY, conn=conn)
        w.pidfd = orphan.pidfd
        master.adopt_worker(w)
        pool.next_index = max(pool.next_index, index + 1)
        master.counters["connections_adopted"] += 1
        master.log.warning(
            "connection adopted",
            export=name,
            conn=conn.id,
            worker_pid=pid,
            peer_pid=peer_pid,
            peer_uid=uid,
            peer_gid=gid,
        )
