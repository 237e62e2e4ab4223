"""The master: accepts connections and hands them to chrooted, pre-forked workers.

One thread, one selector loop over the listening sockets, the workers' channels, the
signal pipe, an inotify descriptor and the control socket. Signal handlers do nothing
but wake the loop (signal.set_wakeup_fd); each signal then has one method here. The
master keeps its own copy of every live connection, so a worker's death costs the guest
at most an EIO on the request in flight (proxyd/recovery.py), never its mount. It never
touches a file of an export.

Its state: `pools` (one per export: workers and waiting connections, proxyd/pool.py),
`workers` (every live worker by pid), `connections` (every live connection by id),
`generation` (reloads applied; each pool has its own, bumped when a reload changes
what its workers are forked with), `counters`, and `stop_deadline` (set once a stop
began).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gc
import hashlib
import os
import selectors
import signal
import socket
import stat
import struct
import time
from dataclasses import replace
from typing import Any

from proxyd import __version__, channel, listener, log, mounts, recovery, service, slot
from proxyd.config import (
    EXIT_EXPORT,
    EXIT_OK,
    Config,
    ConfigError,
    ExportConfig,
    load_file,
    worker_view,
)
from proxyd.pool import BUSY, IDLE, RETIRING, STARTING, Connection, Pool, Worker
from proxyd.slot import Slot
from proxyd.title import set_title
from proxyd.worker import run_worker

TICK = 0.25  # seconds between housekeeping rounds
START_FAILURES_FATAL = 5  # consecutive failed starts before the master gives up
ABORT_GRACE = 2.0  # SIGABRT -> SIGKILL for a hung worker
ACCEPT_BATCH = 16  # connections accepted per wake-up: one socket cannot starve the rest

HANDLED_SIGNALS = (
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
)


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    return struct.unpack("=iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def _digest(config: Config) -> str:
    """A short fingerprint of the configuration in force, for the log."""
    if config.path is not None:
        with contextlib.suppress(OSError), open(config.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    return hashlib.sha256(repr(config).encode()).hexdigest()[:16]


def _failure_text(how: dict[str, Any]) -> str:
    if "signal" in how:
        return f"its workers die at start ({how['signal']})"
    return f"its workers cannot enter the sandbox (exit code {how.get('exit_code')})"


def _describe_exit(status: int) -> dict[str, Any]:
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name}
    return {"exit_code": os.WEXITSTATUS(status)}


class Master:
    def __init__(
        self,
        config: Config,
        bound: dict[str, listener.Listener] | None = None,
        control_listener: listener.Listener | None = None,
    ) -> None:
        self.config = config
        self.log = log.get(role="master")
        self.selector = selectors.DefaultSelector()
        self.pools: dict[str, Pool] = {}
        self.workers: dict[int, Worker] = {}
        self.connections: dict[int, Connection] = {}
        self.generation = 0
        self.next_conn = 1
        self.stop_deadline: float | None = None
        self.reload_wanted = False  # SIGHUP seen: reload once this turn of the loop ends
        self.exit_code = EXIT_OK
        self.counters: collections.Counter[str] = collections.Counter()
        self.started = time.time()
        self.first_ready: float | None = None  # start-up ends when a worker first gets ready
        self._bound = bound or {}
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._watcher = listener.DirectoryWatcher()
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._on_signal)
        self.selector.register(self._watcher.fd, selectors.EVENT_READ, self._on_inotify)
        self._mounts = mounts.MountWatcher()
        self.selector.register(self._mounts.fd, selectors.EVENT_READ, self._on_mounts)
        # Connections whose worker died sending a reply: (conn, op, deadline).
        self._undecided: dict[int, tuple[Connection, str | None, float]] = {}
        self._refusals: dict[tuple[str, int, str], tuple[float, int]] = {}
        self.control = (
            service.ControlService(control_listener, self.selector, self._control_answer, self.log)
            if control_listener is not None
            else None
        )

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        set_title(f"master [{self.config.source}]")
        self._install_signals()
        self.log.info(
            "start",
            version=__version__,
            source=self.config.source,
            config_digest=_digest(self.config),
            exports=[e.name for e in self.config.exports],
            audit=self.config.audit,
        )
        for export in self.config.exports:
            self._add_pool(export)
        if self.config.fd is not None:
            self._admit(
                self.pools[self.config.exports[0].name], socket.socket(fileno=self.config.fd)
            )
        while not self._finished():
            for key, _ in self.selector.select(TICK):
                # An earlier callback of this batch may have closed this one's file
                # (a listener replaced by a re-bind): skip what is no longer registered.
                if self.selector.get_map().get(key.fd) is key:
                    key.data(key.fileobj)
            if self.reload_wanted:  # any number of SIGHUPs since the last turn: one reload
                self.reload_wanted = False
                self.reload()
            self._housekeeping()
        self._shutdown()
        return self.exit_code

    def _finished(self) -> bool:
        if self.stop_deadline is None:
            return False
        return not self.workers or time.monotonic() >= self.stop_deadline

    def _housekeeping(self) -> None:
        log.flush()  # lines the log did not take yet: tried again, never waited for
        now = time.monotonic()
        for pool in self.pools.values():
            if pool.listener is not None and not pool.listener.still_bound():
                self._rebind(pool)
            if self._export_problem(pool.config) is not None:
                # Spares sandboxed into a directory the path no longer names must not
                # take new connections; busy workers finish theirs, as the reference.
                for w in [w for w in pool.workers.values() if w.state == IDLE]:
                    self._retire(w)
            self._dispatch(pool)
        for w in list(self.workers.values()):
            if w.conn is not None:
                self._watch(w, now)
            elif w.state == STARTING and time.time() - w.started > self.config.request_timeout:
                # Stuck setting up its sandbox (a hung mount of the export, say): a
                # failed start like any other once it is reaped.
                self.log.warning("worker start timed out", export=w.pool.name, worker_pid=w.pid)
                self._kill(w, signal.SIGKILL)
        self._judge_undecided(now)
        if self.control is not None:
            self.control.expire(now)

    # --- signals: the handlers only wake the loop ----------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_signal(self, _: Any) -> None:
        try:
            data = os.read(self._signal_r, 512)
        except BlockingIOError:
            return
        handlers = {
            signal.SIGCHLD: self.handle_chld,
            signal.SIGHUP: self.handle_hup,
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_term,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou,
            signal.SIGUSR1: self.handle_usr1,
        }
        for signum in data:
            method = handlers.get(signum)
            if method is not None:
                method()

    def handle_chld(self) -> None:
        """Reap every exited worker, recover its connection, let the pool replace it."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is not None:
                self._worker_exited(w, status)

    def handle_term(self) -> None:
        """Graceful stop; a second TERM is an immediate one."""
        if self.stop_deadline is not None:
            self.handle_quit()
            return
        self._begin_stop("signal")

    def handle_quit(self) -> None:
        """Immediate stop: kill every worker now."""
        self.log.warning("stopping now", workers=len(self.workers))
        if self.stop_deadline is None:
            self._begin_stop("quit")
        for w in self.workers.values():
            self._kill(w, signal.SIGKILL)
        self.stop_deadline = time.monotonic()

    def handle_hup(self) -> None:
        """Reload the configuration, once this turn of the loop ends (a burst of
        SIGHUPs is one reload)."""
        self.reload_wanted = True

    def reload(self) -> str | None:
        """Re-read the configuration and apply it. Exports added are bound, exports
        removed are closed; an export whose workers would be forked differently gets
        new ones (at request boundaries), the others keep theirs.

        Returns why the reload was refused, or None when it was applied."""
        if self.stop_deadline is not None:
            return "the daemon is stopping"
        try:
            new = self._reread()
        except ConfigError as e:
            self.log.error("reload refused", error=str(e))
            self.counters["reloads_refused"] += 1
            return str(e)
        old = self.config
        old_names = set(self.pools)
        new_names = {e.name for e in new.exports}
        self.config = new
        log.configure(new.log_format, new.log_level, on_blocked=new.on_log_blocked)
        self.log = log.get(role="master")
        if new.log_file != old.log_file:
            self._reopen_log()
        self.generation += 1
        for name in old_names - new_names:
            self._remove_pool(self.pools[name])
        replaced = []
        for export in new.exports:
            pool = self.pools.get(export.name)
            if pool is None:
                self._add_pool(export)
                continue
            if worker_view(old, pool.config) != worker_view(new, export):
                pool.generation += 1
                replaced.append(export.name)
                pool.next_start = 0.0  # an unavailable export tries its new settings now
            moved = (export.socket, export.socket_uid, export.socket_gid, export.socket_mode) != (
                pool.config.socket,
                pool.config.socket_uid,
                pool.config.socket_gid,
                pool.config.socket_mode,
            )
            pool.config = export
            pool.min_idle = export.min_idle
            if moved:
                self._close_listener(pool)
                self._bind(pool)
        for w in list(self.workers.values()):
            if w.generation < w.pool.generation:
                self._retire(w)
        self.counters["reloads"] += 1
        self.log.info(
            "reload applied",
            generation=self.generation,
            config_digest=_digest(new),
            added=sorted(new_names - old_names),
            removed=sorted(old_names - new_names),
            replaced=replaced,
            exports=sorted(new_names),
        )
        return None

    def handle_ttin(self) -> None:
        """One more spare worker per export."""
        for pool in self.pools.values():
            pool.min_idle = min(pool.min_idle + 1, pool.config.max_workers)
        self.log.info("spare workers", min_idle={n: p.min_idle for n, p in self.pools.items()})

    def handle_ttou(self) -> None:
        """One fewer spare worker per export, retired at once."""
        for pool in self.pools.values():
            pool.min_idle = max(pool.min_idle - 1, 0)
            for w in pool.excess_idle(time.monotonic(), at_once=True):
                self._retire(w)
        self.log.info("spare workers", min_idle={n: p.min_idle for n, p in self.pools.items()})

    def handle_usr1(self) -> None:
        """Reopen the log file (after logrotate moved it) here and in every worker."""
        self._reopen_log()

    def _reopen_log(self) -> None:
        path = self.config.log_file
        if path is None:
            self.log.info("log reopen skipped", reason="not logging to a file")
            return
        try:
            fd = log.open_file(path)
        except OSError as e:
            self.log.error("cannot reopen log file", log_file=path, error=e.strerror)
            return
        log.take_over(fd)  # held lines go to the new file
        for w in self.workers.values():
            if w.control.fileno() < 0:
                continue
            with contextlib.suppress(OSError):
                channel.send(w.control, {"op": "log"}, log.current_fd())
            # Then tell a busy worker to look at its channel (after the send, so it finds it).
            w.journal.fields[slot.LOG_EPOCH] += 1
        self.counters["log_reopens"] += 1
        self.log.info("log reopened", log_file=path, workers=len(self.workers))

    def _reread(self) -> Config:
        if self.config.path is None:
            return self.config  # flags only: nothing to re-read, workers are still replaced
        new = load_file(self.config.path, running=self.config)
        return replace(
            new,
            daemonize=self.config.daemonize,
            once=self.config.once,
            control_socket=new.control_socket,
        )

    # --- exports and their sockets --------------------------------------------------------

    def _add_pool(self, export: ExportConfig) -> None:
        pool = Pool(config=export, min_idle=export.min_idle)
        pool.host_mounts = mounts.below(self._mounts.read(), os.path.realpath(export.path))
        self.pools[export.name] = pool
        if export.socket is not None:
            pool.listener = self._bound.pop(export.name, None)
            if pool.listener is None:
                self._bind(pool)
            else:
                self._listen(pool)
        self._dispatch(pool)

    def _remove_pool(self, pool: Pool) -> None:
        pool.removed = True
        self._close_listener(pool)
        while pool.pending:
            self._close_connection(pool.pending.popleft(), "export removed")
        for w in list(pool.workers.values()):
            self._retire(w)
        del self.pools[pool.name]

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
        self._accept_from(pool)
        self._watcher.watch(os.path.dirname(pool.listener.path))
        self.log.info(
            "export bound",
            export=pool.name,
            socket=pool.listener.path,
            path=pool.config.path,
            readonly=pool.config.readonly,
        )

    def _accept_from(self, pool: Pool) -> None:
        assert pool.listener is not None
        self.selector.register(
            pool.listener.sock,
            selectors.EVENT_READ,
            lambda sock, pool=pool: self._on_accept(pool, sock),
        )
        pool.paused = False

    def _close_listener(self, pool: Pool, unlink: bool = True) -> None:
        if pool.listener is None:
            return
        if not pool.paused:
            self.selector.unregister(pool.listener.sock)
        pool.listener.close(unlink=unlink)
        pool.listener = None

    def _rebind(self, pool: Pool) -> None:
        """QEMU unlinked the path after connecting: bind it again for the next VM.

        Connections already queued on the old socket are accepted before it closes.
        """
        old = pool.listener
        assert old is not None
        if not pool.paused:
            self.selector.unregister(old.sock)
        pool.listener = None
        self._bind(pool)
        if pool.listener is None:  # could not bind: keep serving the old backlog
            pool.listener = old
            self._listen(pool)
            return
        self._on_accept(pool, old.sock, limit=None)
        old.close(unlink=False)
        self.counters["rebinds"] += 1
        self.log.info("export socket re-bound", export=pool.name, socket=old.path)

    def _on_inotify(self, _: Any) -> None:
        self._watcher.drain()
        for pool in list(self.pools.values()):
            if pool.listener is not None and not pool.listener.still_bound():
                self._rebind(pool)

    def _on_mounts(self, _: Any) -> None:
        """The host's mount table changed: an export with a mount made, removed or
        remounted at or below it gets new workers (at request boundaries), which see
        exactly what the host sees now, with nodev,nosuid,noexec added (mounts.py)."""
        table = self._mounts.read()
        for pool in self.pools.values():
            now = mounts.below(table, os.path.realpath(pool.config.path))
            if now == pool.host_mounts:
                continue
            before = {m[1] for m in pool.host_mounts}
            after = {m[1] for m in now}
            pool.host_mounts = now
            pool.generation += 1
            for w in list(pool.workers.values()):
                self._retire(w)
            self.log.info(
                "export mounts changed",
                export=pool.name,
                mounted=sorted(os.fsdecode(m) for m in after - before),
                unmounted=sorted(os.fsdecode(m) for m in before - after),
            )

    # --- connections ------------------------------------------------------------------------

    def _on_accept(self, pool: Pool, sock: socket.socket, limit: int | None = ACCEPT_BATCH) -> None:
        accepted = 0
        while limit is None or accepted < limit:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed(sock)
                else:
                    self.log.error("accept failed", export=pool.name, error=e.strerror)
                return
            accepted += 1
            self._admit(pool, conn)

    def _shed(self, sock: socket.socket) -> None:
        """Out of descriptors: use the reserve one to accept and close a connection,
        so that a full backlog cannot make the loop spin."""
        os.close(self._reserve_fd)
        try:
            conn, _ = sock.accept()
            conn.close()
        except OSError:
            pass
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.counters["refused_no_fds"] += 1
        self.log.error("connection refused", reason="out of file descriptors")

    def _refusal_reason(self, export: ExportConfig, uid: int, gid: int) -> str | None:
        """Why a peer may not use this export (allow-lists, per-uid limit), or None."""
        if (export.allow_uids and uid not in export.allow_uids) or (
            export.allow_gids and gid not in export.allow_gids
        ):
            return "not in allow_uids/allow_gids"
        limit = export.max_connections_per_uid
        if limit:
            held = sum(
                1
                for c in self.connections.values()
                if c.export == export.name and c.peer_uid == uid
            )
            if held >= limit:
                return f"peer uid already holds {limit} connections"
        return None

    def _admit(self, pool: Pool, sock: socket.socket) -> None:
        pid, uid, gid = _peer(sock)
        if pool.unavailable is not None:
            self.counters["refused_unavailable"] += 1
            reason = f"export unavailable: {pool.unavailable}"
            self._log_refusal(pool.name, pid, uid, gid, reason)
            sock.close()
            return
        reason = self._refusal_reason(pool.config, uid, gid)
        if reason is not None:
            self.counters["refused_peers"] += 1
            self._log_refusal(pool.name, pid, uid, gid, reason)
            sock.close()
            return
        conn = Connection(self.next_conn, sock, pool.name, pid, uid, gid)
        self.next_conn += 1
        self.connections[conn.id] = conn
        self.counters["connections"] += 1
        self.log.info(
            "connection accepted",
            export=pool.name,
            conn=conn.id,
            peer_pid=pid,
            peer_uid=uid,
            peer_gid=gid,
        )
        if self.config.once:  # the reference's behaviour: one connection, then no more
            for other in self.pools.values():
                self._close_listener(other)
        pool.pending.append(conn)
        self._dispatch(pool)

    def _log_refusal(self, export: str, pid: int, uid: int, gid: int, reason: str) -> None:
        """One warning per second per peer uid and reason: a peer hammering the socket
        must not flood the log (the count of the ones left out is in `suppressed`)."""
        key = (export, uid, reason)
        now = time.monotonic()
        last, suppressed = self._refusals.get(key, (0.0, 0))
        if now - last < 1.0:
            self._refusals[key] = (last, suppressed + 1)
            return
        self._refusals[key] = (now, 0)
        self.log.warning(
            "connection refused",
            export=export,
            peer_pid=pid,
            peer_uid=uid,
            peer_gid=gid,
            reason=reason,
            suppressed=suppressed,
        )

    def _close_connection(self, conn: Connection, reason: str) -> None:
        self.connections.pop(conn.id, None)
        conn.sock.close()
        self.log.info(
            "connection closed",
            export=conn.export,
            conn=conn.id,
            peer_pid=conn.peer_pid,
            peer_uid=conn.peer_uid,
            peer_gid=conn.peer_gid,
            reason=reason,
            requests=conn.requests,
            errors=conn.errors,
            duration_s=round(time.time() - conn.accepted, 3),
        )
        if self.config.once and self.stop_deadline is None and not self.connections:
            self._begin_stop("once: the connection ended")

    # --- the pool -------------------------------------------------------------------------------

    def _dispatch(self, pool: Pool) -> None:
        """Give waiting connections to idle workers; keep the pool at its size."""
        while pool.pending:
            w = pool.idle_worker()
            if w is None:
                break
            self._hand(w, pool.pending.popleft())
        if self.stop_deadline is not None or pool.removed:
            return
        now = time.monotonic()
        for _ in range(pool.starts_wanted(now)):
            problem = self._export_problem(pool.config)
            if problem is not None:  # no fork in vain: the start fails here
                if pool.unavailable is None:  # unavailable: looked at again next tick
                    self._start_failed(pool, {"reason": problem})
                break
            if not self._spawn(pool):
                break
        if pool.is_exhausted():
            if not pool.exhausted:
                pool.exhausted = True
                self.counters["pool_exhausted"] += 1
                self.log.warning(
                    "pool exhausted",
                    export=pool.name,
                    max_workers=pool.config.max_workers,
                    waiting=len(pool.pending),
                )
        elif not pool.pending:
            pool.exhausted = False
        for w in pool.excess_idle(now):
            self._retire(w)
        if pool.listener is not None:
            if pool.should_pause():
                self.selector.unregister(pool.listener.sock)
                pool.paused = True
            elif pool.should_resume():
                self._accept_from(pool)

    def _export_problem(self, export: ExportConfig) -> str | None:
        """Why the export's directory cannot be served now, or None. The master looks
        at the directory itself (stat), never into it: the worker's sandbox checks it
        again through a descriptor."""
        try:
            st = os.stat(export.path)
        except OSError as e:
            return f"directory: {e.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return "not a directory any more"
        if export.identity != (0, 0) and (st.st_dev, st.st_ino) != export.identity:
            return "replaced by another directory (device and inode changed)"
        return None

    def _spawn(self, pool: Pool) -> bool:
        index = pool.next_index
        pool.next_index += 1
        master_end, worker_end = channel.pair()
        journal = Slot()
        master_pid = os.getpid()
        # Block our signals across the fork: a signal reaching the child before it
        # resets its handlers must not be written into the master's wake-up pipe.
        # Objects the master has now are the child's too: frozen, the child's garbage
        # collector never walks (and so never copies) the pages they live on.
        gc.freeze()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            master_end.close()
            worker_end.close()
            journal.close()
            self.log.error("cannot fork a worker", export=pool.name, error=e.strerror)
            pool.next_start = time.monotonic() + 1.0
            return False
        if pid == 0:
            signal.set_wakeup_fd(-1)
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            master_end.close()  # its channel's EOF must tell the worker the master is gone
            # Every other descriptor of the master's (listeners, other guests'
            # connections, other workers' channels) is closed by the worker itself
            # before its sandbox (privileges.keep_only_descriptors).
            run_worker(pool.config, self.config, index, worker_end, journal, master_pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        worker_end.close()
        master_end.setblocking(False)
        w = Worker(pid, pool, index, pool.generation, master_end, journal)
        self.workers[pid] = w
        pool.workers[pid] = w
        self.selector.register(
            master_end, selectors.EVENT_READ, lambda sock, w=w: self._on_worker_message(w)
        )
        return True

    def _retire(self, w: Worker) -> None:
        """Ask a worker to leave: an idle one at once, a busy one at its next request
        boundary (it then hands its connection back)."""
        if w.state in (IDLE, STARTING):
            self._forget_channel(w)
            w.state = RETIRING
        elif w.state == BUSY:
            w.journal.fields[slot.COMMAND] = slot.RETIRE
            w.state = RETIRING

    def _forget_channel(self, w: Worker) -> None:
        """Close our end of the worker's channel: an idle worker exits at EOF."""
        if w.control.fileno() >= 0:
            self.selector.unregister(w.control)
            w.control.close()

    def _kill(self, w: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, sig)

    def _hand(self, w: Worker, conn: Connection) -> None:
        journal = w.journal
        journal.reset()
        if conn.prefix:
            journal.request[: len(conn.prefix)] = conn.prefix
            journal.fields[slot.HAVE] = len(conn.prefix)
        # In flight from now on: should the worker die before it starts serving, the
        # handed-on bytes are found again (the worker sets RECEIVING itself too).
        journal.fields[slot.PHASE] = slot.RECEIVING
        message = {
            "op": "serve",
            "conn": conn.id,
            "peer_pid": conn.peer_pid,
            "peer_uid": conn.peer_uid,
            "peer_gid": conn.peer_gid,
        }
        try:
            channel.send(w.control, message, conn.sock.fileno())
        except OSError:
            w.pool.pending.appendleft(conn)  # the worker is gone; SIGCHLD will tell
            w.state = RETIRING
            return
        conn.prefix = b""
        w.state = BUSY
        w.conn = conn
        w.connections += 1
        w.watch_mark = None

    # --- messages from workers --------------------------------------------------------------

    def _on_worker_message(self, w: Worker) -> None:
        while w.control.fileno() >= 0:
            try:
                message, _ = channel.receive(w.control, channel.FROM_WORKER, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (channel.ChannelError, OSError) as e:
                self._misbehaved(w, str(e))
                return
            if message is None:  # the worker is exiting; SIGCHLD says how
                self._forget_channel(w)
                return
            op = message["op"]
            if op == "ready" and w.state == STARTING:
                self._worker_ready(w)
            elif op != "ready" and w.conn is not None and message["conn"] == w.conn.id:
                self._worker_finished(w, message)
            else:
                self._misbehaved(w, f"'{op}' does not fit a {w.state} worker")
                return

    def _misbehaved(self, w: Worker, why: str) -> None:
        """A worker sent what no sound worker sends: it may be compromised. Kill it;
        its death is then recovered like any other (the guest keeps its mount)."""
        self.counters["bad_worker_messages"] += 1
        self.log.warning("bad message from worker", export=w.pool.name, worker_pid=w.pid, error=why)
        self._kill(w, signal.SIGKILL)
        self._forget_channel(w)

    def _worker_ready(self, w: Worker) -> None:
        w.state = IDLE
        w.idle_since = time.monotonic()
        pool = w.pool
        pool.start_failures = 0
        if self.first_ready is None:
            self.first_ready = time.time()
        if pool.unavailable is not None:
            self.log.info(
                "export available again",
                export=pool.name,
                path=pool.config.path,
                down_s=round(time.time() - pool.unavailable_since, 1),
            )
            pool.unavailable = None
        self.log.info(
            "worker spawned",
            export=w.pool.name,
            worker=w.index,
            worker_pid=w.pid,
            generation=w.generation,
        )
        if w.generation < w.pool.generation:
            self._retire(w)
        self._dispatch(w.pool)

    def _worker_finished(self, w: Worker, message: dict[str, Any]) -> None:
        conn = w.conn
        assert conn is not None
        w.conn = None
        w.requests += message["requests"]
        conn.requests += message["requests"]
        conn.errors += message["errors"]
        if message["op"] == "released":  # at a request boundary, for a reload or a stop
            # A request that arrived as the worker was asked to leave goes on with the
            # connection: the next worker serves it.
            conn.prefix = bytes(w.journal.request[: w.journal.fields[slot.HAVE]])
            self._forget_channel(w)
            w.state = RETIRING
            if self.stop_deadline is not None or conn.export not in self.pools:
                self._close_connection(conn, "daemon stopping")
            else:
                self.pools[conn.export].pending.appendleft(conn)
                self._dispatch(self.pools[conn.export])
            return
        retiring = w.state == RETIRING or w.generation < w.pool.generation
        w.state = IDLE
        w.idle_since = time.monotonic()
        if retiring:
            self._retire(w)
        self._close_connection(conn, message["reason"])  # may begin a stop
        self._dispatch(w.pool)

    # --- deaths and crash recovery -------------------------------------------------------------

    def _worker_exited(self, w: Worker, status: int) -> None:
        # What it said before it went comes first (a connection released at a request
        # boundary is handed on as released, not recovered as a crash).
        self._on_worker_message(w)
        pool = w.pool
        pool.workers.pop(w.pid, None)
        self._forget_channel(w)
        how = _describe_exit(status)
        expected = w.state == RETIRING or self.stop_deadline is not None
        if w.state == STARTING:
            self._start_failed(pool, {"worker_pid": w.pid, **how})
        elif expected:
            self.log.info(
                "worker exited", export=pool.name, worker=w.index, worker_pid=w.pid, **how
            )
        else:
            self.counters["worker_deaths"] += 1
            self.log.warning(
                "worker died",
                export=pool.name,
                worker=w.index,
                worker_pid=w.pid,
                conn=w.conn.id if w.conn else None,
                **how,
            )
        if w.conn is not None:
            w.conn.requests += w.journal.fields[slot.SEQ]  # what the dead worker had served
            self._recover(w, w.conn)
        lost = w.journal.fields[slot.LOG_DROPPED] + w.journal.fields[slot.LOG_PENDING]
        if lost:  # log lines it dropped, and those it still held: for `proxyd status`
            self.counters["log_lines_dropped_by_exited_workers"] += lost
        w.journal.close()
        if pool.name in self.pools:
            before = set(pool.workers)
            self._dispatch(pool)
            if not expected and w.state != STARTING:
                for pid in set(pool.workers) - before:
                    self.log.info(
                        "worker replaced", export=pool.name, old_pid=w.pid, worker_pid=pid
                    )
                    break

    def _start_failed(self, pool: Pool, how: dict[str, Any]) -> None:
        """A start that never got ready: back off. Five in a row, and the export cannot
        be served: at start-up (no worker of any export was ever ready) the daemon
        stops with exit code 3, so that supervisord shows FATAL instead of a silent
        spin; afterwards that export alone is marked unavailable, its connections are
        refused, and a start is tried again after each back-off (capped at 10 s) until
        one gets ready. The other exports never stop for it."""
        delay = pool.start_failed(time.monotonic())
        if pool.unavailable is not None:  # still down: status says so, the log said it
            self.log.debug("export still unavailable", export=pool.name, **how)
            return
        self.log.warning(
            "worker failed to start",
            export=pool.name,
            failures=pool.start_failures,
            retry_in_s=round(delay, 2),
            **how,
        )
        if pool.start_failures < START_FAILURES_FATAL or self.stop_deadline is not None:
            return
        if self.first_ready is None:
            self.log.error(
                "export cannot be served, giving up",
                export=pool.name,
                path=pool.config.path,
                failures=pool.start_failures,
            )
            self.exit_code = EXIT_EXPORT
            self._begin_stop("export cannot be served")
            return
        pool.unavailable = str(how.get("reason") or _failure_text(how))
        pool.unavailable_since = time.time()
        self.counters["exports_unavailable"] += 1
        self.log.warning(
            "export unavailable",
            export=pool.name,
            path=pool.config.path,
            reason=pool.unavailable,
            failures=pool.start_failures,
        )
        while pool.pending:
            self._close_connection(pool.pending.popleft(), "export unavailable")

    def _recover(self, w: Worker, conn: Connection) -> None:
        """Act on the verdict for a connection whose worker died: hand it to a fresh
        worker (running a request that changes nothing again, or answering EIO where
        the request may have changed the export), or close it where that is the only
        safe answer (proxyd/recovery.py)."""
        if self.stop_deadline is not None:
            self._close_connection(conn, "daemon stopping")
            return
        # A request the master killed for running too long is not run again.
        verdict = recovery.judge(w.journal, conn.sock, retry=w.killed_for != recovery.HUNG)
        # conn.requests counts the one in flight: with the digest, it names that request.
        if verdict.executed is not None and self._poisoned(conn, (conn.requests, verdict.executed)):
            return
        if verdict.again:
            conn.requests -= 1  # counted again when it runs again
        conn.prefix = verdict.prefix
        if verdict.action == recovery.HAND_ON:
            self._hand_on(conn, verdict.op, verdict.outcome)
        elif verdict.action == recovery.ANSWER_EIO:
            if self._answer_eio(conn, verdict.code):
                self._hand_on(conn, verdict.op, verdict.outcome)
            else:
                self._uncertain(conn, verdict.op, "could not send the EIO reply")
        elif verdict.action == recovery.AWAIT_NEXT:
            self._await_next_request(conn, verdict.op)
        else:
            self._uncertain(conn, verdict.op, verdict.outcome)

    def _poisoned(self, conn: Connection, request: tuple[int, str]) -> bool:
        """The same request has killed POISON_DEATHS workers: close its connection."""
        if not recovery.count_death(conn, request):
            return False
        self.counters["poison_closed"] += 1
        self.log.warning(
            "poison connection closed",
            export=conn.export,
            conn=conn.id,
            deaths=len(conn.deaths),
            window_s=recovery.POISON_WINDOW,
        )
        self._close_connection(conn, "poison")
        return True

    def _hand_on(self, conn: Connection, op: str | None, outcome: str) -> None:
        self.counters["recoveries"] += 1
        self.log.warning("crash recovery", export=conn.export, conn=conn.id, op=op, outcome=outcome)
        pool = self.pools.get(conn.export)
        if pool is None:
            self._close_connection(conn, "export removed")
            return
        pool.pending.appendleft(conn)
        self._dispatch(pool)

    def _await_next_request(self, conn: Connection, op: str | None) -> None:
        """The worker died sending a reply that is no longer queued: either it never
        left, or the guest read it already. A guest that read it soon sends its next
        request; one still waiting never will. Wait a moment for the difference."""
        deadline = time.monotonic() + recovery.REPLY_VERDICT_WAIT
        self._undecided[conn.id] = (conn, op, deadline)
        self.selector.register(
            conn.sock, selectors.EVENT_READ, lambda sock, conn=conn: self._reply_was_read(conn)
        )

    def _reply_was_read(self, conn: Connection) -> None:
        _, op, _ = self._undecided.pop(conn.id)
        self.selector.unregister(conn.sock)
        self._hand_on(conn, op, "reply had been sent")  # a next request, or EOF: both fine

    def _judge_undecided(self, now: float) -> None:
        for conn_id, (conn, op, deadline) in list(self._undecided.items()):
            if now >= deadline or self.stop_deadline is not None:
                del self._undecided[conn_id]
                self.selector.unregister(conn.sock)
                self._uncertain(conn, op, "died sending a reply; the guest sent nothing since")

    def _uncertain(self, conn: Connection, op: str | None, detail: str) -> None:
        self.counters["uncertain_closed"] += 1
        self.log.warning(
            "connection closed after a crash: reply state unknown",
            export=conn.export,
            conn=conn.id,
            op=op,
            detail=detail,
        )
        self._close_connection(conn, "crash, reply state unknown")

    def _answer_eio(self, conn: Connection, code: int) -> bool:
        reply = recovery.eio_reply(code)
        if reply is None:
            return False
        try:
            return conn.sock.send(reply, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL) == len(reply)
        except OSError:
            return False

    def _watch(self, w: Worker, now: float) -> None:
        """The watchdog, for a worker serving a connection. A request executing longer
        than request_timeout: SIGABRT (then SIGKILL after ABORT_GRACE); the guest gets
        EIO. Request bytes waiting that the worker has not taken for request_timeout
        (stopped, or stuck before its recv): SIGKILL; the request never started, so the
        connection simply goes on with a fresh worker. A reply being sent gets twice
        the time: a peer that does not read is the worker's own SO_SNDTIMEO to handle."""
        assert w.conn is not None
        kind = recovery.stuck(w.journal, w.conn.sock)
        mark = recovery.progress_mark(w.journal) if kind is not None else None
        if mark is None or mark != w.watch_mark:
            w.watch_mark, w.watch_since = mark, now
            return
        limit = self.config.request_timeout * (2 if mark[0] == slot.REPLY_READY else 1)
        if now - w.watch_since < limit:
            return
        if w.killed_for is None:
            w.killed_for, w.killed_at = kind, now
            code, _ = w.journal.header()
            fields = {
                "export": w.pool.name,
                "worker_pid": w.pid,
                "conn": w.conn.id,
                "timeout_s": self.config.request_timeout,
            }
            if kind == recovery.UNRESPONSIVE:
                self.counters["unresponsive_killed"] += 1
                self.log.warning("worker unresponsive", **fields)
                self._kill(w, signal.SIGKILL)
            else:
                self.counters["hung_killed"] += 1
                op = recovery.op_name(code) or code
                self.log.warning("request timed out, killing worker", op=op, **fields)
                self._kill(w, signal.SIGABRT)
        elif now - w.killed_at > ABORT_GRACE:  # a stopped process ignores SIGABRT
            self._kill(w, signal.SIGKILL)

    # --- the control socket -----------------------------------------------------------------

    def _control_answer(self, cmd: str) -> dict[str, Any]:
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "reload":
            self.reload_wanted = False  # this reload answers a pending SIGHUP too
            refused = self.reload()
            if refused is not None:
                return {"ok": False, "error": f"reload refused: {refused}"}
            return {"ok": True, "generation": self.generation}
        self._begin_stop("control: stop")
        return {"ok": True}

    def status(self) -> dict[str, Any]:
        """What `proxyd status` shows (proxyd/service.py)."""
        return service.status_document(self)

    # --- stopping ---------------------------------------------------------------------------

    def _begin_stop(self, why: str) -> None:
        if self.stop_deadline is not None:
            return
        self.stop_deadline = time.monotonic() + self.config.stop_timeout
        self.log.info(
            "stopping",
            reason=why,
            workers=len(self.workers),
            connections=len(self.connections),
            timeout_s=self.config.stop_timeout,
        )
        for pool in self.pools.values():
            self._close_listener(pool)
            while pool.pending:
                self._close_connection(pool.pending.popleft(), "daemon stopping")
        for w in list(self.workers.values()):
            self._retire(w)

    def _shutdown(self) -> None:
        for w in list(self.workers.values()):
            self.log.warning("killing worker still running at stop", worker_pid=w.pid)
            self._kill(w, signal.SIGKILL)
        for w in list(self.workers.values()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid, 0)
            self.workers.pop(w.pid)
            if w.conn is not None:
                self._close_connection(w.conn, "daemon stopped")
        for conn in list(self.connections.values()):
            self._close_connection(conn, "daemon stopped")
        for pool in self.pools.values():
            self._close_listener(pool)
        if self.control is not None:
            self.control.close()
        self.log.info("stop", exit_code=self.exit_code, counters=dict(self.counters))
