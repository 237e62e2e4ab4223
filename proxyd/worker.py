"""The worker process: sandbox itself, then serve the connections the master hands over
(proxyd/server.py serves each one)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
from typing import Any, NoReturn

from proxyd import channel, log, privileges, slot
from proxyd.config import EXIT_EXPORT, EXIT_INTERNAL, EXIT_OK, Config, ExportConfig, metrics_on
from proxyd.ops import ExportOps, ReadOnlyOps, has_generations
from proxyd.server import Released, Server, install_wake_handler
from proxyd.slot import Slot
from proxyd.title import set_title

# --- the worker process ----------------------------------------------------------------


def _title(export: str, index: int, state: str) -> None:
    set_title(f"worker {export}#{index} {state}")


def _quiet_signals() -> None:
    """The master owns signals. A worker ignores TERM/INT/HUP (a process-group signal
    from a terminal or supervisord must not cut a request short: the master retires
    workers at request boundaries) and is only ever killed by the master."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGUSR1,
        signal.SIGUSR2,
    ):
        signal.signal(sig, signal.SIG_IGN)


def run_worker(
    export: ExportConfig,
    config: Config,
    index: int,
    control: socket.socket,
    journal: Slot,
    master_pid: int,
) -> NoReturn:
    """Main of a forked worker: sandbox, report ready, serve what the master hands over.

    Never returns: a worker leaves with os._exit so that nothing of the master's
    (atexit handlers, finally blocks up the stack) runs in it.
    """
    code = EXIT_INTERNAL
    try:
        code = _worker(export, config, index, control, journal, master_pid)
    except BaseException:
        with contextlib.suppress(BaseException):
            log.get(role="worker", export=export.name, worker=index).exception("worker crashed")
    finally:
        os._exit(code)


def _worker(
    export: ExportConfig,
    config: Config,
    index: int,
    control: socket.socket,
    journal: Slot,
    master_pid: int,
) -> int:
    # No PR_SET_PDEATHSIG: a worker outlives a master that dies (SIGKILL, a crash) and
    # keeps serving its connection until the guest leaves or a new master adopts the
    # connection (README, "When the master dies"). An idle or starting worker learns of
    # the death from its channel (EOF, EPIPE) and leaves.
    if os.getppid() != master_pid:  # the master died while we were being forked
        return EXIT_OK
    # No core files: a hung worker is killed with SIGABRT, and its cwd is the export.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _quiet_signals()
    install_wake_handler()  # the master wakes us on a quiet connection (server.py)
    _title(export.name, index, "starting")
    # Only our own descriptors go into the sandbox: the log's is the master's (stderr
    # opened again non-blocking, the log file, or the socket connected to syslog). The
    # journal's memfd stays too: a master that adopts this worker maps it again.
    privileges.keep_only_descriptors((0, 1, 2, control.fileno(), log.current_fd(), journal.fd))
    identity = {"role": "worker", "export": export.name, "worker": index}
    log.configure(
        config.log_format, config.log_level, on_blocked=config.on_log_blocked, identity=identity
    )
    log.count_in(journal.fields, slot.LOG_DROPPED, slot.LOG_PENDING)  # for the master's status
    log.relay_to(journal.relay)  # should our master die and its log with it
    logger = log.get(role="worker", export=export.name, worker=index)
    try:
        privileges.enter_sandbox(
            export.path, config.seccomp, export.identity, export.uid_map, export.gid_map
        )
    except privileges.SandboxError as e:
        logger.error("export cannot be served", error=str(e))
        return EXIT_EXPORT
    ops_class = ReadOnlyOps if export.readonly else ExportOps
    ops = ops_class(privileges.Credentials(), has_generations())

    def on_log_reopen() -> None:
        """The master reopened the log file: its descriptor waits on the channel."""
        server.log_epoch = journal.fields[slot.LOG_EPOCH]
        _take_messages(control, block=False)

    def on_command() -> None:
        """At a request boundary: a reopened log file, or the master wants us back."""
        if journal.fields[slot.LOG_EPOCH] != server.log_epoch:
            on_log_reopen()
        if journal.fields[slot.COMMAND] == slot.RETIRE:
            raise Released

    server = Server(
        ops,
        logger,
        journal,
        request_timeout=config.request_timeout,
        audit=config.audit,
        readonly=export.readonly,
        on_command=on_command,
        on_log_reopen=on_log_reopen,
        id_maps=(export.uid_map, export.gid_map) if export.id_mapped else None,
        metrics=metrics_on(config),
    )
    if not _report(control, {"op": "ready"}):
        return EXIT_OK  # retired before it was ready (a reload, a stop): nothing to say
    _title(export.name, index, "idle")
    while True:
        handed = _take_messages(control, block=True)
        if handed is None:  # the master closed our channel: retire
            return EXIT_OK
        conn_id, peer, fd = handed
        conn = socket.socket(fileno=fd)
        _title(export.name, index, f"conn={conn_id} peer={peer['peer_pid']}")
        server.set_log(logger.bind(conn=conn_id, **peer))
        stats = server.serve(conn)
        conn.close()
        op = "released" if stats.reason == "released" else "done"
        report = {
            "op": op,
            "conn": conn_id,
            "requests": stats.requests,
            "errors": stats.errors,
            "reason": stats.reason,
            "protocol_error": stats.protocol_error,
        }
        if not _report(control, report):
            # Only a dead master leaves a busy worker's channel closed: we served its
            # connection on our own (or until a new master took it back), and go.
            logger.warning("master gone", conn=conn_id, requests=stats.requests, reason=op)
            return EXIT_OK
        if op == "released":
            return EXIT_OK
        _title(export.name, index, "idle")


def _report(control: socket.socket, message: dict[str, Any]) -> bool:
    """Send a report to the master; False when the master has closed our channel
    (it retired us, or it is gone): the worker then leaves quietly."""
    try:
        channel.send(control, message)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def _take_messages(control: socket.socket, block: bool) -> tuple[int, dict[str, int], int] | None:
    """Handle the master's messages. A reopened log file is taken over at once; a
    connection to serve is returned (id, peer, descriptor). None when the master
    closed the channel or is gone, or (not blocking) when nothing is left to read."""
    while True:
        if block:  # idle: lines held for the log go out meanwhile (proxyd/sink.py)
            log.flush_until_readable(control.fileno())
        try:
            message, fd = channel.receive(
                control, channel.FROM_MASTER, 0 if block else socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return None
        if message is None:  # the master closed our channel, or is gone
            return None
        assert fd is not None  # the schema requires one for both ops
        if message["op"] == "log":
            log.take_over(fd)  # the same descriptor number, if already logging to a file
            continue
        peer = {k: message[k] for k in ("peer_pid", "peer_uid", "peer_gid")}
        return message["conn"], peer, fd
