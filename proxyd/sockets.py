"""The export sockets of the master: bound, bound again when QEMU unlinks them, and
accepting only while there is room (back-pressure, descriptors).

QEMU unlinks the socket path right after connecting; inotify on the socket's directory
(and a check every tick) makes the master bind it again at once, so one daemon serves VM
after VM. A pool stops accepting while PENDING_LIMIT of its connections wait for a
worker, and every pool stops while fewer descriptors than the reserve are left: new
connections then wait in the listen backlog instead of failing anything.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import resource
import selectors
import socket
from collections.abc import Callable, Iterable
from typing import Any

from proxyd import listener
from proxyd.config import Config, ConfigError
from proxyd.metrics import Events
from proxyd.pool import PENDING_LIMIT, Pool

ACCEPT_BATCH = 16  # connections accepted per wake-up: one socket cannot starve the rest
# Descriptors the master holds per connection it serves: its copy of the connection, the
# worker's channel, and its journal's memfd (and the duplicate Python's mmap keeps).
FDS_PER_CONNECTION = 4
FDS_FIXED = 32  # listeners, control socket, log, signal pipe, inotify, epoll, mountinfo, ...


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (a process may, getrlimit(2));
    return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def descriptors_needed(config: Config) -> int:
    """Descriptors the master needs with every export at max_workers and PENDING_LIMIT
    connections waiting on each."""
    per_export = PENDING_LIMIT + 1  # waiting connections and the listener
    busy = sum(e.max_workers for e in config.exports) * FDS_PER_CONNECTION
    return FDS_FIXED + busy + per_export * len(config.exports)


class Sockets:
    """The listening side of the master. `admit(pool, sock)` gets every connection
    accepted; `pools()` lists the pools; `log` and `counters` are the master's."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        log: Any,
        counters: collections.Counter[str],
        admit: Callable[[Pool, socket.socket], None],
        pools: Callable[[], Iterable[Pool]],
    ) -> None:
        self.log = log
        self._selector = selector
        self._counters = counters
        self._admit = admit
        self._pools = pools
        self.fd_limit = raise_fd_limit()
        # Keep this many descriptors free for the connections already accepted (a
        # worker's start takes four at once: its channel's two ends and its journal).
        self.fd_reserve = min(64, max(16, self.fd_limit // 16))
        self.low = False  # descriptors short: no pool accepts
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._watcher = listener.DirectoryWatcher()
        selector.register(self._watcher.fd, selectors.EVENT_READ, self._on_inotify)
        self.metrics = Events()  # the master's (proxyd/metrics.py)

    def warn_if_short(self, config: Config) -> None:
        needed = descriptors_needed(config)
        if needed > self.fd_limit:
            self.log.warning(
                "descriptor limit too low for max_workers",
                limit=self.fd_limit,
                needed=needed,
                advice="raise LimitNOFILE (systemd) or minfds (supervisord)",
            )

    # --- one export's socket ----------------------------------------------------------

    def open(self, pool: Pool, bound: listener.Listener | None = None) -> None:
        """Listen on the export's socket: `bound` (bound before the master detached),
        the one it has (handed over by an upgrade), else one bound now. Nothing to do
        for a pool already accepting."""
        if pool.accepting:
            return
        if bound is not None:
            pool.listener = bound
        if pool.listener is not None:
            self._listen(pool)
        elif pool.config.socket is not None:
            self._bind(pool)

    def close(self, pool: Pool, unlink: bool = True) -> None:
        """Stop listening; remove the socket path unless `unlink` is False."""
        if pool.listener is None:
            return
        self._stop_accepting(pool)
        pool.listener.close(unlink=unlink)
        pool.listener = None

    def update(self, pool: Pool) -> None:
        """Accept on the export's socket unless PENDING_LIMIT connections wait already or
        descriptors run low: then new connections wait in the listen backlog."""
        want = pool.listener is not None and not pool.update_backlogged() and not self.low
        if want and not pool.accepting:
            assert pool.listener is not None
            self._selector.register(
                pool.listener.sock,
                selectors.EVENT_READ,
                lambda sock, pool=pool: self._on_accept(pool, sock),
            )
        elif not want and pool.accepting and pool.listener is not None:
            self._selector.unregister(pool.listener.sock)
        pool.accepting = want

    def rebind_unlinked(self) -> None:
        """Bind again every export socket whose path no longer names it."""
        for pool in list(self._pools()):
            if pool.listener is not None and not pool.listener.still_bound():
                self._rebind(pool)

    def _bind(self, pool: Pool) -> None:
        export = pool.config
        assert export.socket is not None
        try:
            stale = listener.claim_path(export.socket)
            pool.listener = listener.bind(
                export.socket, export.socket_uid, export.socket_gid, export.socket_mode
            )
        except ConfigError as e:
            self.log.error("cannot bind export socket", export=export.name, error=str(e))
            return
        if stale:
            self.log.info("stale socket replaced", export=export.name, socket=export.socket)
        self._listen(pool)

    def _listen(self, pool: Pool) -> None:
        assert pool.listener is not None
        pool.listener.sock.setblocking(False)
        self.update(pool)
        self._watcher.watch(os.path.dirname(pool.listener.path))
        self.log.info(
            "export bound",
            export=pool.name,
            socket=pool.listener.path,
            path=pool.config.path,
            readonly=pool.config.readonly,
        )

    def _stop_accepting(self, pool: Pool) -> None:
        if pool.accepting and pool.listener is not None:
            self._selector.unregister(pool.listener.sock)
        pool.accepting = False

    def _rebind(self, pool: Pool) -> None:
        """QEMU unlinked the path after connecting: bind it again for the next VM.
        Connections already queued on the old socket are accepted before it closes."""
        old = pool.listener
        assert old is not None
        self._stop_accepting(pool)
        pool.listener = None
        self._bind(pool)
        if pool.listener is None:  # could not bind: keep serving the old backlog
            pool.listener = old
            self._listen(pool)
            return
        self._on_accept(pool, old.sock, limit=None)
        old.close(unlink=False)
        self._counters["rebinds"] += 1
        self.log.info("export socket re-bound", export=pool.name, socket=old.path)

    def _on_inotify(self, _: Any) -> None:
        self._watcher.drain()
        self.rebind_unlinked()

    # --- accepting, within the descriptors there are -------------------------------------

    def _on_accept(self, pool: Pool, sock: socket.socket, limit: int | None = ACCEPT_BATCH) -> None:
        accepted = 0
        headroom = self.headroom()
        while limit is None or accepted < limit:
            self.check_descriptors(headroom)
            if self.low:
                return
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed(pool, sock)
                else:  # ENOMEM, ENOBUFS, ...: the connection waits in the backlog
                    self.log.warning("accept failed", export=pool.name, error=e.strerror)
                return
            accepted += 1
            headroom -= FDS_PER_CONNECTION
            self._admit(pool, conn)

    def _shed(self, pool: Pool, sock: socket.socket) -> None:
        """Out of descriptors all the same: use the reserve one to accept and close a
        connection, so that a full backlog cannot make the loop spin."""
        os.close(self._reserve_fd)
        try:
            conn, _ = sock.accept()
            conn.close()
        except OSError:
            pass
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._counters["refused_no_fds"] += 1
        self.metrics.refused(pool.name, "out of file descriptors")
        self.log.warning("connection refused", reason="out of file descriptors")

    def headroom(self) -> int:
        """Descriptors this process may still open (RLIMIT_NOFILE minus those open);
        0 when even counting them needs one too many."""
        try:
            return self.fd_limit - len(os.listdir("/proc/self/fd"))
        except OSError:
            return 0

    def check_descriptors(self, headroom: int) -> None:
        """Stop accepting, on every export, while fewer than fd_reserve descriptors are
        left (what serving the connections already accepted may still need); accept
        again above twice that."""
        low = headroom < self.fd_reserve or (self.low and headroom < 2 * self.fd_reserve)
        if low == self.low:
            return
        self.low = low
        if low:
            self._counters["descriptors_low"] += 1
            self.log.warning(
                "descriptors low, not accepting", open=self.fd_limit - headroom, limit=self.fd_limit
            )
        else:
            self.log.info("accepting again", open=self.fd_limit - headroom, limit=self.fd_limit)
        for pool in self._pools():
            self.update(pool)

    def close_all(self) -> None:
        for pool in self._pools():
            self.close(pool)
        self._watcher.close()
