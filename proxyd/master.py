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
import resource
import selectors
import signal
import socket
import stat
import struct
import time
from dataclasses import replace
from typing import Any

from proxyd import (
    __version__,
    adopt,
    channel,
    handover,
    listener,
    log,
    mounts,
    recovery,
    service,
    slot,
    upgrade,
)
from proxyd.config import (
    EXIT_EXPORT,
    EXIT_OK,
    Config,
    ConfigError,
    ExportConfig,
    load_file,
    worker_view,
)
from proxyd.pool import BUSY, IDLE, PENDING_LIMIT, RETIRING, STARTING, Connection, Pool, Worker
from proxyd.slot import Slot
from proxyd.title import set_title
from proxyd.worker import run_worker

TICK = 0.25  # seconds between housekeeping rounds
START_FAILURES_FATAL = 5  # consecutive failed starts before the master gives up
ABORT_GRACE = 2.0  # SIGABRT -> SIGKILL for a hung worker
ACCEPT_BATCH = 16  # connections accepted per wake-up: one socket cannot starve the rest
RESOURCE_RETRY = 1.0  # seconds before starting a worker again after the system refused one
# Descriptors the master holds per connection it serves: its copy of the connection, the
# worker's channel, and its journal's memfd (and the duplicate Python's mmap keeps).
FDS_PER_CONNECTION = 4
FDS_FIXED = 32  # listeners, control socket, log, signal pipe, inotify, epoll, mountinfo, ...

HANDLED_SIGNALS = (
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


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


def _describe_exit(status: int | None) -> dict[str, Any]:
    if status is None:  # an adopted worker, not our child: no status to read
        return {}
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name}
    return {"exit_code": os.WEXITSTATUS(status)}


class Master:
    def __init__(
        self,
        config: Config,
        bound: dict[str, listener.Listener] | None = None,
        control_listener: listener.Listener | None = None,
        argv: list[str] | None = None,
        resumed: dict[str, Any] | None = None,
    ) -> None:
        """`bound`: export sockets bound before detaching; `argv`: the command line, for
        an upgrade to start the new program with; `resumed`: the handover document of
        the master that re-executed this program (proxyd/handover.py)."""
        self.config = config
        self.argv = list(argv or [])
        self.resumed = resumed
        self.upgrades = 0
        self.upgraded_at: float | None = None
        self.log = log.get(role="master")
        self.selector = selectors.DefaultSelector()
        self.pools: dict[str, Pool] = {}
        self.workers: dict[int, Worker] = {}
        self.connections: dict[int, Connection] = {}
        self.generation = 0
        self.next_conn = 1
        self.stop_deadline: float | None = None
        self.reload_wanted = False  # SIGHUP seen: reload once this turn of the loop ends
        self.fd_limit = raise_fd_limit()
        # Keep this many descriptors free for the connections already accepted (a
        # worker's start takes four at once: its channel's two ends and its journal).
        self.fd_reserve = min(64, max(16, self.fd_limit // 16))
        self.fds_low = False  # not accepting until descriptors are freed
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
        self.undecided: dict[int, tuple[Connection, str | None, float]] = {}
        self._refusals: dict[tuple[str, int, str], tuple[float, int]] = {}
        self.control: service.ControlService | None = None
        if control_listener is not None:
            self.start_control(control_listener)

    def start_control(self, control_listener: listener.Listener) -> None:
        """Answer on the control socket (proxyd/service.py)."""
        self.control = service.ControlService(
            control_listener, self.selector, self._control_answer, self.log
        )

    def mount_table(self) -> list[mounts.Mount]:
        """The host's mounts as this process sees them now."""
        return self._mounts.read()

    def adopt_worker(self, w: Worker) -> None:
        """Count `w` as one of ours and listen to it: its channel, or, for a worker that
        is not our child, its pidfd (readable when it exits)."""
        self.workers[w.pid] = w.pool.workers[w.pid] = w
        if w.channel is not None:
            self.selector.register(
                w.channel, selectors.EVENT_READ, lambda _, w=w: self._on_worker_message(w)
            )
        if w.pidfd is not None:
            self.selector.register(w.pidfd, selectors.EVENT_READ, lambda _, w=w: self._reap(w))

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
        needed = descriptors_needed(self.config)
        if needed > self.fd_limit:
            self.log.warning(
                "descriptor limit too low for max_workers",
                limit=self.fd_limit,
                needed=needed,
                advice="raise LimitNOFILE (systemd) or minfds (supervisord)",
            )
        if self.resumed is not None:
            handover.restore(self, self.resumed)
            self._adopt_orphans()
            self.log.info(
                "upgrade done",
                version=__version__,
                from_version=self.resumed["program_version"],
                upgrades=self.upgrades,
                workers=len(self.workers),
                connections=len(self.connections),
            )
            self.handle_chld()  # workers that exited while the program was being replaced
        else:
            for export in self.config.exports:
                pool = Pool(config=export, min_idle=export.min_idle)
                pool.host_mounts = mounts.below(self.mount_table(), os.path.realpath(export.path))
                self.pools[export.name] = pool
            self._adopt_orphans()  # before any worker of ours starts: they keep their numbers
            for pool in self.pools.values():
                self._open_pool(pool)
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
        if self.fds_low:
            # Spare workers hold descriptors (channel, journal) the waiting connections
            # need more: no idle grace period while they are short.
            for pool in self.pools.values():
                for w in pool.excess_idle(now, at_once=True):
                    self._retire(w)
            self._check_descriptors(self._fd_headroom())
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
        # An upgrading master blocked them across its exec: what came meanwhile is
        # delivered now, to these handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

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
            signal.SIGUSR2: self.handle_usr2,
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
        self.config = new
        log.configure(new.log_format, new.log_level, on_blocked=new.on_log_blocked)
        self.log = log.get(role="master")
        if new.log_file != old.log_file:
            self._reopen_log()
        self.generation += 1
        changes = self.apply_configuration(new, old)
        self.counters["reloads"] += 1
        self.log.info(
            "reload applied", generation=self.generation, config_digest=_digest(new), **changes
        )
        return None

    def apply_configuration(self, new: Config, previous: Config | None) -> dict[str, list[str]]:
        """Make the pools what `new` says: exports added are bound, removed ones closed,
        a moved socket bound again; an export whose workers would be forked differently
        than under `previous` (None after an upgrade: new code, so every one) gets new
        workers at request boundaries, the others keep theirs. Returns the export names
        added, removed, replaced, and all of them."""
        old_names = set(self.pools)
        new_names = {e.name for e in new.exports}
        for name in old_names - new_names:
            self.remove_pool(self.pools[name])
        replaced = []
        for export in new.exports:
            pool = self.pools.get(export.name)
            if pool is None:
                self._add_pool(export)
                continue
            if previous is None or worker_view(previous, pool.config) != worker_view(new, export):
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
            elif pool.listener is not None and not pool.accepting:
                self._listen(pool)  # taken over from an upgrading master
        for w in list(self.workers.values()):
            if w.generation < w.pool.generation:
                self._retire(w)
        return {
            "added": sorted(new_names - old_names),
            "removed": sorted(old_names - new_names),
            "replaced": replaced,
            "exports": sorted(new_names),
        }

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

    def handle_usr2(self) -> None:
        """Upgrade in place: re-execute the proxyd now installed (see upgrade())."""
        self.upgrade()

    def upgrade(self, reply_to: socket.socket | None = None) -> str | None:
        """Replace this program by the proxyd now installed, keeping the pid, every
        socket, every connection and every worker (proxyd/upgrade.py); the new program
        then replaces the workers at request boundaries, as a reload does. First the
        new program is asked whether it can start and take over; if not, or if the exec
        fails, this one goes on serving unchanged. Returns why it was refused (logged);
        on success it does not return. `reply_to`: a control client to answer, by the
        new program."""
        if self.stop_deadline is not None:
            return "the daemon is stopping"
        command = upgrade.program()
        self.log.info("upgrade started", version=__version__, program=command[0])
        refusal, said = upgrade.check(command, self.argv)
        if refusal is None:
            document = handover.state(self, reply_to)
            self.log.info("upgrade handing over", to_version=said.get("version"))
            refusal = upgrade.execute(command, self.argv, document, HANDLED_SIGNALS)
        self.counters["upgrades_refused"] += 1
        self.log.warning("upgrade refused", reason=refusal, version=__version__)
        return refusal

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
            if w.channel is None:
                continue
            with contextlib.suppress(OSError):
                channel.send(w.channel, {"op": "log"}, log.current_fd())
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
        pool.host_mounts = mounts.below(self.mount_table(), os.path.realpath(export.path))
        self.pools[export.name] = pool
        self._open_pool(pool)

    def _open_pool(self, pool: Pool) -> None:
        """Listen on the export's socket (bound before detaching, or now) and start its
        workers."""
        export = pool.config
        if export.socket is not None:
            pool.listener = self._bound.pop(export.name, None)
            if pool.listener is None:
                self._bind(pool)
            else:
                self._listen(pool)
        self._dispatch(pool)

    def remove_pool(self, pool: Pool) -> None:
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
        self._update_accepting(pool)
        self._watcher.watch(os.path.dirname(pool.listener.path))
        self.log.info(
            "export bound",
            export=pool.name,
            socket=pool.listener.path,
            path=pool.config.path,
            readonly=pool.config.readonly,
        )

    def _update_accepting(self, pool: Pool) -> None:
        """Accept on the export's socket unless PENDING_LIMIT connections wait already
        or descriptors run low: then new connections wait in the listen backlog."""
        want = pool.listener is not None and not pool.update_backlogged() and not self.fds_low
        if want and not pool.accepting:
            assert pool.listener is not None
            self.selector.register(
                pool.listener.sock,
                selectors.EVENT_READ,
                lambda sock, pool=pool: self._on_accept(pool, sock),
            )
        elif not want and pool.accepting and pool.listener is not None:
            self.selector.unregister(pool.listener.sock)
        pool.accepting = want

    def _stop_accepting(self, pool: Pool) -> None:
        if pool.accepting and pool.listener is not None:
            self.selector.unregister(pool.listener.sock)
        pool.accepting = False

    def _close_listener(self, pool: Pool, unlink: bool = True) -> None:
        if pool.listener is None:
            return
        self._stop_accepting(pool)
        pool.listener.close(unlink=unlink)
        pool.listener = None

    def _rebind(self, pool: Pool) -> None:
        """QEMU unlinked the path after connecting: bind it again for the next VM.

        Connections already queued on the old socket are accepted before it closes.
        """
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
        headroom = self._fd_headroom()
        while limit is None or accepted < limit:
            self._check_descriptors(headroom)
            if self.fds_low:
                return
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed(sock)
                else:  # ENOMEM, ENOBUFS, ...: the connection waits in the backlog
                    self.log.warning("accept failed", export=pool.name, error=e.strerror)
                return
            accepted += 1
            headroom -= FDS_PER_CONNECTION
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
        self.log.warning("connection refused", reason="out of file descriptors")

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
        # An adopted worker leaves once a worker of ours is ready for its connection (one
        # idle worker per adopted worker leaving).
        adopted = [w for w in pool.workers.values() if w.pidfd is not None and w.conn]
        idle = sum(1 for w in pool.workers.values() if w.state == IDLE)
        free = idle - sum(1 for w in adopted if w.state == RETIRING)
        for w in [w for w in adopted if w.state == BUSY][: max(free, 0)]:
            self._retire(w)
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
        self._update_accepting(pool)

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
        """Fork a worker for `pool`. False (logged, retried after a second) when the
        system refuses a resource: descriptors, memory, processes. That is no fault
        of the export's, and its connections simply wait."""
        try:
            master_end, worker_end = channel.pair()
        except OSError as e:
            return self._cannot_start(pool, "socketpair", e)
        try:
            journal = Slot()
        except OSError as e:
            master_end.close()
            worker_end.close()
            return self._cannot_start(pool, "memfd", e)
        index = pool.next_index
        pool.next_index += 1
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
            return self._cannot_start(pool, "fork", e)
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
        self.adopt_worker(Worker(pid, pool, index, pool.generation, master_end, journal))
        return True

    def _cannot_start(self, pool: Pool, step: str, e: OSError) -> bool:
        self.counters["start_errors"] += 1
        self.log.warning(
            "cannot start a worker",
            export=pool.name,
            step=step,
            error=errno.errorcode.get(e.errno or 0, str(e)),
            retry_in_s=RESOURCE_RETRY,
        )
        pool.next_start = time.monotonic() + RESOURCE_RETRY
        return False

    # --- descriptors ---------------------------------------------------------------------

    def _fd_headroom(self) -> int:
        """Descriptors this process may still open (RLIMIT_NOFILE minus those open);
        0 when even counting them needs one too many."""
        try:
            return self.fd_limit - len(os.listdir("/proc/self/fd"))
        except OSError:
            return 0

    def _check_descriptors(self, headroom: int) -> None:
        """Stop accepting, on every export, while fewer than fd_reserve descriptors are
        left (what serving the connections already accepted may still need); accept
        again above twice that. Waiting connections stay in the listen backlogs."""
        low = headroom < self.fd_reserve or (self.fds_low and headroom < 2 * self.fd_reserve)
        if low == self.fds_low:
            return
        self.fds_low = low
        if low:
            self.counters["descriptors_low"] += 1
            self.log.warning(
                "descriptors low, not accepting",
                open=self.fd_limit - headroom,
                limit=self.fd_limit,
                connections=len(self.connections),
                workers=len(self.workers),
            )
        else:
            self.log.info("accepting again", open=self.fd_limit - headroom, limit=self.fd_limit)
        for pool in self.pools.values():
            self._update_accepting(pool)

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
        if w.channel is not None:
            self.selector.unregister(w.channel)
            w.channel.close()
            w.channel = None

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
            assert w.channel is not None  # only an idle worker is handed a connection
            channel.send(w.channel, message, conn.sock.fileno())
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
        while w.channel is not None:
            try:
                message, _ = channel.receive(w.channel, channel.FROM_WORKER, socket.MSG_DONTWAIT)
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

    def _adopt_orphans(self) -> None:
        """Take back the connections a master that died left with its workers (they go
        on serving without one): watched, recovered and audited again, each moves to a
        worker of ours at its next request boundary (proxyd/adopt.py)."""
        for pid, name, index in adopt.candidates({p.name: p.config for p in self.pools.values()}):
            try:
                orphan = adopt.take(pid, name, index)
            except OSError as e:
                self.log.warning("orphan not adopted", export=name, worker_pid=pid, error=str(e))
                continue
            pool = self.pools[name]
            sock = socket.socket(fileno=orphan.conn_fd)
            peer_pid, uid, gid = _peer(sock)
            conn = Connection(self.next_conn, sock, name, peer_pid, uid, gid)
            self.next_conn += 1
            self.connections[conn.id] = conn
            journal = Slot(fd=orphan.journal_fd)
            # Generation -1: it is asked to leave (_dispatch) as soon as a worker of ours
            # is ready to take its connection, which then never waits in the master.
            w = Worker(pid, pool, index, -1, None, journal, state=BUSY, conn=conn)
            w.pidfd = orphan.pidfd
            self.adopt_worker(w)
            pool.next_index = max(pool.next_index, index + 1)
            self.counters["connections_adopted"] += 1
            self.log.warning(
                "connection adopted",
                export=name,
                conn=conn.id,
                worker_pid=pid,
                peer_pid=peer_pid,
                peer_uid=uid,
                peer_gid=gid,
            )

    def _reap(self, w: Worker) -> None:
        """An adopted worker (not our child: no SIGCHLD, no status) has exited."""
        assert w.pidfd is not None
        self.selector.unregister(w.pidfd)
        os.close(w.pidfd)
        w.pidfd = None
        if self.workers.pop(w.pid, None) is not None:
            self._worker_exited(w, None)

    def _worker_exited(self, w: Worker, status: int | None) -> None:
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
            self.await_next_request(conn, verdict.op)
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

    def await_next_request(self, conn: Connection, op: str | None) -> None:
        """The worker died sending a reply that is no longer queued: either it never
        left, or the guest read it already. A guest that read it soon sends its next
        request; one still waiting never will. Wait a moment for the difference."""
        deadline = time.monotonic() + recovery.REPLY_VERDICT_WAIT
        self.undecided[conn.id] = (conn, op, deadline)
        self.selector.register(
            conn.sock, selectors.EVENT_READ, lambda sock, conn=conn: self._reply_was_read(conn)
        )

    def _reply_was_read(self, conn: Connection) -> None:
        _, op, _ = self.undecided.pop(conn.id)
        self.selector.unregister(conn.sock)
        self._hand_on(conn, op, "reply had been sent")  # a next request, or EOF: both fine

    def _judge_undecided(self, now: float) -> None:
        for conn_id, (conn, op, deadline) in list(self.undecided.items()):
            if now >= deadline or self.stop_deadline is not None:
                del self.undecided[conn_id]
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

    def _control_answer(self, cmd: str, client: socket.socket) -> dict[str, Any]:
        if cmd == "upgrade":
            refused = self.upgrade(reply_to=client)  # on success the new program answers
            return {"ok": False, "error": f"upgrade refused: {refused}"}
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
