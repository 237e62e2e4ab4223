"""The master: accepts connections and hands them to chrooted, pre-forked workers.

One thread, one selector loop over the listening sockets, the workers' channels, the
signal pipe, inotify, the mount table and the control socket. Signal handlers do
nothing but wake the loop (signal.set_wakeup_fd); each signal then has one method here.
The master keeps its own copy of every live connection, so a worker's death costs the
guest at most an EIO on a request that may have changed the export, never its mount
(proxyd/recovery.py). It never touches a file of an export.

Its state, all of it handed over in an upgrade (proxyd/handover.py): `pools` (one per
export: workers and waiting connections, proxyd/pool.py), `workers` (every live worker
by pid), `connections` (every live connection by id), `generation` (reloads applied;
each pool has its own, bumped when what its workers are forked with changes),
`counters`, `started`/`upgrades`/`upgraded_at`, and `stop_deadline` (set once a stop
began). Its collaborators: `sockets` (the export sockets and the accept gate,
proxyd/sockets.py), `recovery` (verdicts and the watchdog), `control` (the control
socket, proxyd/service.py).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import selectors
import signal
import socket
import time
from dataclasses import replace
from typing import Any

from proxyd import (
    __version__,
    admission,
    adopt,
    channel,
    handover,
    listener,
    log,
    metrics,
    mounts,
    recovery,
    sdnotify,
    service,
    slot,
    spawn,
    upgrade,
)
from proxyd.config import EXIT_EXPORT, EXIT_OK, Config, ConfigError, load_file, worker_view
from proxyd.pool import (
    BUSY,
    IDLE,
    RETIRING,
    STARTING,
    Connection,
    Pool,
    Worker,
    export_problem,
    unavailable_reason,
)
from proxyd.sockets import Sockets
from proxyd.title import set_title

TICK = 0.25  # seconds between housekeeping rounds
START_FAILURES_FATAL = 5  # consecutive failed starts before an export is given up
RESOURCE_RETRY = 1.0  # seconds before starting a worker again after the system refused one

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


def _digest(config: Config) -> str:
    """A short fingerprint of the configuration in force, for the log."""
    if config.path is not None:
        with contextlib.suppress(OSError), open(config.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    return hashlib.sha256(repr(config).encode()).hexdigest()[:16]


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
        metrics_listener: socket.socket | None = None,
    ) -> None:
        """`bound`: export sockets bound before detaching; `argv`: the command line, for
        an upgrade to start the new program with; `resumed`: the handover document of
        the master that re-executed this program (proxyd/handover.py);
        `metrics_listener`: the metrics endpoint's socket, bound before detaching."""
        self.config = config
        self.argv = list(argv or [])
        self.resumed = resumed
        self.log = log.get(role="master")
        self.selector = selectors.DefaultSelector()
        self.pools: dict[str, Pool] = {}
        self.workers: dict[int, Worker] = {}
        self.connections: dict[int, Connection] = {}
        self.generation = 0
        self.next_conn = 1
        self.counters: collections.Counter[str] = collections.Counter()
        self.started = time.time()
        self.upgrades = 0
        self.upgraded_at: float | None = None
        self.first_ready: float | None = None  # start-up ends when a worker first gets ready
        self.stop_deadline: float | None = None
        self.reload_wanted = False  # SIGHUP seen: reload once this turn of the loop ends
        self.exit_code = EXIT_OK
        self._bound = bound or {}
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._on_signal)
        self._mounts = mounts.MountWatcher()
        self.selector.register(self._mounts.fd, selectors.EVENT_READ, self._on_mounts)
        self.sockets = Sockets(
            self.selector, self.log, self.counters, self._admit, lambda: self.pools.values()
        )
        self.recovery = recovery.Recovery(
            self.selector, self.log, self.counters, self._hand_on, self._close_connection
        )
        self.recovery.audit = config.audit
        self.refusals = admission.Refusals(self.log)
        # Prometheus metrics (proxyd/metrics.py); the collaborators count into it too.
        self.metrics = metrics.Metrics(self, metrics_listener)
        self.sockets.metrics = self.recovery.metrics = self.metrics
        self.control: service.ControlService | None = None
        if control_listener is not None:
            self.start_control(control_listener)
        # systemd's notify socket, watchdog and fd store (read once: no worker sees them).
        self.notify = sdnotify.Notifier.from_environment()

    def start_control(self, control_listener: listener.Listener) -> None:
        """Answer on the control socket (proxyd/service.py)."""
        self.control = service.ControlService(
            control_listener, self.selector, self._control_answer, self.log
        )

    def mount_table(self) -> list[mounts.Mount]:
        """The host's mounts as this process sees them now."""
        return self._mounts.read()

    def new_pool(self, config: Any, min_idle: int | None = None) -> Pool:
        """A pool for export `config`, registered, knowing the mounts below its path."""
        pool = Pool(config=config, min_idle=config.min_idle if min_idle is None else min_idle)
        pool.host_mounts = mounts.below(self.mount_table(), os.path.realpath(config.path))
        self.pools[pool.name] = pool
        return pool

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
            self.metrics.adopted(w)

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
            id_mapped=[e.name for e in self.config.exports if e.id_mapped],
            audit=self.config.audit,
        )
        self.sockets.warn_if_short(self.config)
        if self.resumed is not None:
            handover.restore(self, self.resumed)
            self.handle_chld()  # workers that exited while the program was being replaced
        else:
            for export in self.config.exports:
                self.new_pool(export)
        self.metrics.start()
        adopt.adopt_orphans(self)  # before any worker of ours starts: they keep their numbers
        self.notify.restore(self)  # what systemd's fd store kept of a master that died
        for pool in self.pools.values():
            self.sockets.open(pool, self._bound.pop(pool.name, None))
            self._dispatch(pool)
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
                    if self.config.once and self.next_conn > 1:
                        self._listen_no_more()
            if self.reload_wanted:  # any number of SIGHUPs since the last turn: one reload
                self.reload_wanted = False
                self.reload()
            self._housekeeping()
        self._shutdown()
        self.notify.forget_store()  # a stop: no copy may keep a guest's connection open
        return self.exit_code

    def _finished(self) -> bool:
        if self.stop_deadline is None:
            return False
        return not self.workers or time.monotonic() >= self.stop_deadline

    def _housekeeping(self) -> None:
        log.flush()  # lines the log did not take yet: tried again, never waited for
        now = time.monotonic()
        if self.sockets.low:
            # Spare workers hold descriptors (channel, journal) the waiting connections
            # need more: no idle grace period while they are short.
            for pool in self.pools.values():
                for w in pool.excess_idle(now, at_once=True):
                    self._retire(w)
            self.sockets.check_descriptors(self.sockets.headroom())
        self.sockets.rebind_unlinked()
        for pool in self.pools.values():
            if export_problem(pool.config) is not None:
                # Spares sandboxed into a directory the path no longer names must not
                # take new connections; busy workers finish theirs, as the reference.
                for w in [w for w in pool.workers.values() if w.state == IDLE]:
                    self._retire(w)
            self._dispatch(pool)
        for w in list(self.workers.values()):
            if w.pidfd is not None:  # adopted: its log died with its master; we write it
                for line in w.journal.relay.take():
                    log.relayed(line)
            if w.conn is not None:
                self.recovery.watch(w, now, self.config.request_timeout)
            elif w.state == STARTING and time.time() - w.started > self.config.request_timeout:
                # Stuck setting up its sandbox (a hung mount of the export, say): a
                # failed start like any other once it is reaped.
                self.log.warning("worker start timed out", export=w.pool.name, worker_pid=w.pid)
                w.signal(signal.SIGKILL)
        self.recovery.expire(now, stopping=self.stop_deadline is not None)
        if self.control is not None:
            self.control.expire(now)
        self.metrics.tick(now)
        self.notify.tick(self)  # watchdog, readiness, status line, fd store: systemd

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
            w.signal(signal.SIGKILL)
        self.stop_deadline = time.monotonic()

    def handle_hup(self) -> None:
        """Reload the configuration, once this turn of the loop ends (a burst of
        SIGHUPs is one reload)."""
        self.reload_wanted = True

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

    # --- reload, log reopen, upgrade ------------------------------------------------------

    def reload(self) -> str | None:
        """Re-read the configuration and apply it (apply_configuration). Returns why
        the reload was refused, or None when it was applied. systemd hears of it
        (RELOADING=1, then READY=1)."""
        self.notify.reloading("reloading the configuration")
        refused = self._reload()
        self.notify.reloaded(self, None if refused is None else f"reload refused: {refused}")
        return refused

    def _reload(self) -> str | None:
        if self.stop_deadline is not None:
            return "the daemon is stopping"
        try:
            new = self._reread()
            self.metrics.reconfigure(new)  # a metrics_listen already taken refuses it
        except ConfigError as e:
            self.log.error("reload refused", error=str(e))
            self.counters["reloads_refused"] += 1
            return str(e)
        old, self.config = self.config, new
        self.recovery.audit = new.audit
        log.configure(new.log_format, new.log_level, on_blocked=new.on_log_blocked)
        self._set_log(log.get(role="master"))
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
                pool = self.new_pool(export)
                self.sockets.open(pool)
                self._dispatch(pool)
                continue
            if previous is None or worker_view(previous, pool.config) != worker_view(new, export):
                pool.generation += 1
                replaced.append(export.name)
                pool.next_start = 0.0  # an unavailable export tries its new settings now
            socket_of = lambda e: (e.socket, e.socket_uid, e.socket_gid, e.socket_mode)  # noqa: E731
            moved = socket_of(export) != socket_of(pool.config)
            pool.config = export
            pool.min_idle = export.min_idle
            if moved:
                self.sockets.close(pool)
                self.sockets.open(pool)
        for w in list(self.workers.values()):
            if w.generation < w.pool.generation:
                self._retire(w)
        return {
            "added": sorted(new_names - old_names),
            "removed": sorted(old_names - new_names),
            "replaced": replaced,
            "exports": sorted(new_names),
        }

    def _reread(self) -> Config:
        if self.config.path is None:
            return self.config  # flags only: nothing to re-read
        new = load_file(self.config.path, running=self.config)
        return replace(new, daemonize=self.config.daemonize, once=self.config.once)

    def _set_log(self, logger: Any) -> None:
        self.log = self.sockets.log = self.recovery.log = self.refusals.log = logger
        if self.control is not None:
            self.control.log = logger

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
            if w.conn is not None:  # serving: blocked on its connection, not the channel
                w.signal(slot.WAKE_SIGNAL)
        self.counters["log_reopens"] += 1
        self.log.info("log reopened", log_file=path, workers=len(self.workers))

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
        self.notify.reloading("upgrading")  # the new program sends READY=1, same pid
        refusal, said = upgrade.check(command, self.argv)
        if refusal is None:
            document = handover.state(self, reply_to)
            self.log.info("upgrade handing over", to_version=said.get("version"))
            with self.notify.exported():
                refusal = upgrade.execute(command, self.argv, document, HANDLED_SIGNALS)
        self.counters["upgrades_refused"] += 1
        self.log.warning("upgrade refused", reason=refusal, version=__version__)
        self.notify.reloaded(self, f"upgrade refused: {refusal}")
        return refusal

    # --- exports ----------------------------------------------------------------------------

    def remove_pool(self, pool: Pool) -> None:
        pool.removed = True
        self.sockets.close(pool)
        while pool.pending:
            self._close_connection(pool.pending.popleft(), "export removed")
        for w in list(pool.workers.values()):
            self._retire(w)
        del self.pools[pool.name]

    def _on_mounts(self, _: Any) -> None:
        """The host's mount table changed: an export with a mount made, removed or
        remounted at or below it gets new workers (at request boundaries), which see
        exactly what the host sees now, with nodev,nosuid,noexec added (mounts.py)."""
        table = self._mounts.read()
        for pool in self.pools.values():
            changed = pool.mounts_changed(table)
            if changed is not None:
                pool.generation += 1
                for w in list(pool.workers.values()):
                    self._retire(w)
                mounted, unmounted = changed
                self.log.info(
                    "export mounts changed", export=pool.name, mounted=mounted, unmounted=unmounted
                )

    # --- connections ------------------------------------------------------------------------

    def _admit(self, pool: Pool, sock: socket.socket) -> None:
        """A connection accepted on `pool`'s socket: refused (unavailable export, peer
        not allowed), or kept and queued for a worker."""
        pid, uid, gid = admission.peer(sock)
        if self.config.once and self.next_conn > 1:  # queued behind the one --once serves
            self.refusals.warn(pool.name, pid, uid, gid, "--once: one connection only")
            sock.close()
            return
        reason = admission.refusal(pool.config, uid, gid, self.connections.values())
        if pool.unavailable is not None:
            self.counters["refused_unavailable"] += 1
            reason = f"export unavailable: {pool.unavailable}"
        elif reason is not None:
            self.counters["refused_peers"] += 1
        if reason is not None:
            self.metrics.refused(pool.name, reason)
            self.refusals.warn(pool.name, pid, uid, gid, reason)
            sock.close()
            return
        conn = Connection(self.next_conn, sock, pool.name, pid, uid, gid)
        self.next_conn += 1
        self.connections[conn.id] = conn
        self.counters["connections"] += 1
        self.metrics.accepted(pool.name)
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
                other.min_idle = 0  # so no spare worker is started for a next one
        pool.pending.append(conn)
        self._dispatch(pool)

    def _listen_no_more(self) -> None:
        """--once took its connection: close every export socket, as the reference closes
        its listening socket after its one accept. Called after the accept batch that
        took it, not from _admit: the socket must stay open under Sockets' accept loop."""
        for pool in self.pools.values():
            self.sockets.close(pool)

    def _hand_on(self, conn: Connection) -> None:
        """Back to its pool's queue, first in line (a recovered connection)."""
        pool = self.pools.get(conn.export)
        if pool is None:
            self._close_connection(conn, "export removed")
            return
        pool.pending.appendleft(conn)
        self._dispatch(pool)

    def _close_connection(self, conn: Connection, reason: str) -> None:
        self.connections.pop(conn.id, None)
        conn.sock.close()
        self.metrics.closed(conn.export, reason)
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
        for w in pool.adopted_to_release():  # once a worker of ours can take its guest
            self._retire(w)
        if self.stop_deadline is not None or pool.removed:
            return
        now = time.monotonic()
        for _ in range(pool.starts_wanted(now)):
            problem = export_problem(pool.config)
            if problem is not None:  # no fork in vain: the start fails here
                if pool.unavailable is None:  # unavailable: looked at again next tick
                    self._start_failed(pool, {"reason": problem})
                break
            try:
                self.adopt_worker(spawn.fork_worker(pool, self.config, HANDLED_SIGNALS))
            except spawn.SpawnError as e:  # no fault of the export's: its connections wait
                self.counters["start_errors"] += 1
                self.log.warning(
                    "cannot start a worker",
                    export=pool.name,
                    step=e.step,
                    error=errno.errorcode.get(e.error.errno or 0, str(e.error)),
                    retry_in_s=RESOURCE_RETRY,
                )
                pool.next_start = now + RESOURCE_RETRY
                break
        if pool.is_newly_exhausted():
            self.counters["pool_exhausted"] += 1
            self.log.warning(
                "pool exhausted",
                export=pool.name,
                max_workers=pool.config.max_workers,
                waiting=len(pool.pending),
            )
        for w in pool.excess_idle(now):
            self._retire(w)
        self.sockets.update(pool)

    def _hand(self, w: Worker, conn: Connection) -> None:
        journal = w.journal
        journal.reset()
        journal.fields[slot.ACCEPTED] = int(conn.accepted)  # for a master that adopts it
        journal.fields[slot.CONN] = conn.id  # for one that takes it back from systemd's store
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

    def _retire(self, w: Worker) -> None:
        """Ask a worker to leave: an idle one at once, a busy one at its next request
        boundary (it then hands its connection back)."""
        if w.state in (IDLE, STARTING):
            self._forget_channel(w)
            w.state = RETIRING
        elif w.state == BUSY:
            w.journal.fields[slot.COMMAND] = slot.RETIRE
            w.signal(slot.WAKE_SIGNAL)
            w.state = RETIRING

    def _forget_channel(self, w: Worker) -> None:
        """Close our end of the worker's channel: an idle worker exits at EOF."""
        if w.channel is not None:
            self.selector.unregister(w.channel)
            w.channel.close()
            w.channel = None

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
        w.signal(signal.SIGKILL)
        self._forget_channel(w)

    def _worker_ready(self, w: Worker) -> None:
        w.state = IDLE
        w.idle_since = time.monotonic()
        pool = w.pool
        pool.start_failures = 0
        if self.first_ready is None:
            self.first_ready = time.time()
        if pool.unavailable is not None:
            down = round(time.time() - pool.unavailable_since, 1)
            self.log.info(
                "export available again", export=pool.name, path=pool.config.path, down_s=down
            )
            pool.unavailable = None
        self.log.info(
            "worker spawned",
            export=pool.name,
            worker=w.index,
            worker_pid=w.pid,
            generation=w.generation,
        )
        if w.generation < pool.generation:
            self._retire(w)
        self._dispatch(pool)

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
            if self.stop_deadline is not None:
                self._close_connection(conn, "daemon stopping")
            else:
                self._hand_on(conn)
            return
        retiring = w.state == RETIRING or w.generation < w.pool.generation
        w.state = IDLE
        w.idle_since = time.monotonic()
        if retiring:
            self._retire(w)
        self._close_connection(conn, message["reason"])  # may begin a stop
        self._dispatch(w.pool)

    # --- deaths ---------------------------------------------------------------------------------

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
            self.metrics.died(pool.name, status)
            conn_id = w.conn.id if w.conn else None
            self.log.warning(
                "worker died",
                export=pool.name,
                worker=w.index,
                worker_pid=w.pid,
                conn=conn_id,
                **how,
            )
        if w.conn is not None:
            w.conn.requests += w.journal.fields[slot.SEQ]  # what the dead worker had served
            if self.stop_deadline is not None:
                self._close_connection(w.conn, "daemon stopping")
            else:
                self.recovery.worker_died(w, w.conn, asked_to_leave=expected)
        for line in w.journal.relay.take():  # what it left for us, if its log was gone
            log.relayed(line)
        lost = w.journal.fields[slot.LOG_DROPPED] + w.journal.fields[slot.LOG_PENDING]
        if lost:  # log lines it dropped, and those it still held: for `proxyd status`
            self.counters["log_lines_dropped_by_exited_workers"] += lost
        self.metrics.worker_gone(w)  # what it counted stays in its export's totals
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
        pool.unavailable, pool.unavailable_since = unavailable_reason(how), time.time()
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

    # --- the control socket -----------------------------------------------------------------

    def _control_answer(self, cmd: str, client: socket.socket) -> dict[str, Any]:
        if cmd == "upgrade":
            refused = self.upgrade(reply_to=client)  # on success the new program answers
            return {"ok": False, "error": f"upgrade refused: {refused}"}
        if cmd == "status":
            return {"ok": True, "status": service.status_document(self)}
        if cmd == "reload":
            self.reload_wanted = False  # this reload answers a pending SIGHUP too
            refused = self.reload()
            if refused is not None:
                return {"ok": False, "error": f"reload refused: {refused}"}
            return {"ok": True, "generation": self.generation}
        self._begin_stop("control: stop")
        return {"ok": True}

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
        self.notify.stopping_now(self, why)
        for pool in self.pools.values():
            self.sockets.close(pool)
            while pool.pending:
                self._close_connection(pool.pending.popleft(), "daemon stopping")
        for w in list(self.workers.values()):
            self._retire(w)

    def _shutdown(self) -> None:
        for w in list(self.workers.values()):
            self.log.warning("killing worker still running at stop", worker_pid=w.pid)
            w.signal(signal.SIGKILL)
        for w in list(self.workers.values()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid, 0)
            self.workers.pop(w.pid)
            if w.conn is not None:
                self._close_connection(w.conn, "daemon stopped")
        for conn in list(self.connections.values()):
            self._close_connection(conn, "daemon stopped")
        self.sockets.close_all()
        if self.control is not None:
            self.control.close()
        self.metrics.close()
        self.log.info("stop", exit_code=self.exit_code, counters=dict(self.counters))
