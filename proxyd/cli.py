"""`proxyd`: the command line entry point.

Validates the command line (or the configuration file), binds the export sockets
while errors can still reach the terminal, detaches unless -n, and runs the master.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import stat
import sys
from typing import Any

from proxyd import __version__, control, handover, listener, log, metrics, sink
from proxyd.config import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SOCKET_IN_USE,
    Config,
    ConfigError,
    parse_args,
)
from proxyd.master import HANDLED_SIGNALS, Master
from proxyd.title import set_title

EXIT_FLUSH_TIMEOUT = 1.0  # seconds a stopping master waits for the log to take its last lines


READY = b"ready\n"  # what the daemon tells the command that started it, once it is up


def daemonize() -> int:
    """Detach as daemon(3) does: new session, no terminal, stdio on /dev/null.

    The command that started proxyd does not exit at once: it waits until the daemon
    tells it how its start ended (tell_launcher), so that the pidfile exists when it
    returns, and a start-up error after detaching still reaches the terminal. Returns
    the descriptor (a pipe's write end) to tell it through.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    if os.fork() > 0:
        os.close(write_end)
        os._exit(_launcher_exit(read_end))
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the session leader goes, so a terminal can never be reacquired
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return write_end


def _launcher_exit(read_end: int) -> int:
    """In the command that started proxyd: the exit code the daemon's word calls for.
    READY: 0. "CODE MESSAGE": the message on stderr, CODE. Nothing (the pipe closed
    unanswered: the daemon died starting): EXIT_INTERNAL."""
    said = b""
    while chunk := os.read(read_end, 4096):
        said += chunk
    if said == READY:
        return EXIT_OK
    code, _, message = said.decode(errors="replace").partition(" ")
    if not code.isdigit():
        code, message = str(EXIT_INTERNAL), "the daemon exited before it was ready (see its log)"
    print(f"proxyd: error: {message.strip()}", file=sys.stderr)
    return int(code)


def tell_launcher(fd: int, exit_code: int = EXIT_OK, message: str = "") -> None:
    """Tell the command that started the daemon (daemonize) that it is up (exit code
    0) or why it stops, then close `fd`. The launcher may be gone (killed): ignored."""
    with contextlib.suppress(OSError):
        os.write(fd, READY if exit_code == EXIT_OK else f"{exit_code} {message}".encode())
    os.close(fd)


def _running_pid(pidfile: str) -> int | None:
    """The pid in `pidfile` if that process is alive and is a proxyd.

    Read through listener.open_file (O_NOFOLLOW, O_NONBLOCK: a symlink or a FIFO
    another user put there is never followed nor waited on), from a regular file only.
    """
    try:
        fd = listener.open_file(pidfile, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            pid = int(os.read(fd, 32).strip() or 0)
        finally:
            os.close(fd)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            alive = f.read().startswith(b"proxyd: master")
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and alive else None


def _write_pidfile(pidfile: str) -> tuple[int, int]:
    """Atomically: a reader sees the old content or the whole new pid, never half.

    A fresh file (O_CREAT|O_EXCL|O_NOFOLLOW, random name) in the pidfile's directory
    descriptor (listener.open_directory), renamed onto the name with renameat: neither
    ever follows a symlink. Returns the file's (st_dev, st_ino); raises OSError.
    """
    directory, name = listener.split(pidfile)
    dir_fd = listener.open_directory(directory)
    try:
        while True:
            temporary = f".{name}.{secrets.token_hex(6)}"
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(temporary, flags, 0o644, dir_fd=dir_fd)
                break
            except FileExistsError:
                continue  # someone took the name first: draw another
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return st.st_dev, st.st_ino


def _remove_pidfile(pidfile: str, identity: tuple[int, int]) -> None:
    """unlinkat the pidfile if its name still holds the file we wrote (fstatat
    AT_SYMLINK_NOFOLLOW on the directory's descriptor); anything else stays."""
    with contextlib.suppress(OSError):
        directory, name = listener.split(pidfile)
        dir_fd = listener.open_directory(directory)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == identity:
                os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


def serve(config: Config, argv: list[str]) -> int:
    """Bind, detach, run the master; or, in a program an upgrading master re-executed
    (proxyd/handover.py), take over what it hands on instead of binding and detaching."""
    try:
        resumed = handover.read()
    except handover.HandoverError as e:
        # The upgrading master is gone; its workers go on serving their guests and a
        # master started next (supervisord, systemd) adopts their connections.
        print(f"proxyd: error: cannot take over from the upgrading master: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    if resumed is not None:
        return _resume(config, argv, resumed)
    if config.pidfile is not None and (pid := _running_pid(config.pidfile)) is not None:
        raise ConfigError(
            f"another proxyd (pid {pid}) is running: {config.pidfile}", EXIT_SOCKET_IN_USE
        )
    bound: dict[str, listener.Listener] = {}
    stale: list[str] = []
    try:
        for export in config.exports:
            if export.socket is not None:
                if listener.claim_path(export.socket):
                    stale.append(export.socket)
                bound[export.name] = listener.bind(
                    export.socket, export.socket_uid, export.socket_gid, export.socket_mode
                )
        control_listener = control.bind(config.control_socket) if config.control_socket else None
    except ConfigError:
        for done in bound.values():
            done.close()
        raise
    metrics_listener = None
    try:
        metrics_listener = metrics.bind(config.metrics_listen) if config.metrics_listen else None
        destination = _log_destination(config)
    except ConfigError:
        for done in [*bound.values(), *([control_listener] if control_listener else [])]:
            done.close()
        if metrics_listener is not None:
            metrics_listener.close()
        raise
    launcher = daemonize() if config.daemonize else None
    # Once the pidfile names this process a TERM may come: it waits, blocked, for the
    # master's handler (Master.run unblocks them), instead of killing it uncleaned.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    _configure_master_log(config, destination)
    for path in stale:
        log.get(role="master").info("stale socket replaced", socket=path)
    set_title(f"master [{config.source}]")  # before the pidfile names this process
    try:
        written = None if config.pidfile is None else _write_pidfile(config.pidfile)
    except OSError as e:
        error = ConfigError(f"pidfile '{config.pidfile}': {e.strerror}")
        for done in [*bound.values(), *([control_listener] if control_listener else [])]:
            done.close()
        if metrics_listener is not None:
            metrics_listener.close()
        if launcher is None:
            raise error from None
        tell_launcher(launcher, error.exit_code, str(error))
        return error.exit_code
    if launcher is not None:
        tell_launcher(launcher)  # the pidfile is there: the launching command may return
    try:
        return Master(
            config, bound, control_listener, argv=argv, metrics_listener=metrics_listener
        ).run()
    finally:
        if config.pidfile is not None and written is not None:
            _remove_pidfile(config.pidfile, written)
        log.close(EXIT_FLUSH_TIMEOUT)  # the last lines (`stop`), if the log takes them soon


def _log_destination(config: Config) -> sink.Sink:
    """Where the master's lines go, set up while an error still reaches the terminal:
    the log file; else, when detaching, syslog; else stderr (proxyd/sink.py).

    Detaching without a log file when syslog's /dev/log cannot be connected is refused:
    the logs would go nowhere. Raises ConfigError (exit code 2) naming the cause.
    """
    if config.log_file is not None:
        try:
            return sink.for_file(log.open_file(config.log_file))
        except OSError as e:
            raise ConfigError(f"log file '{config.log_file}': {e.strerror}") from None
    if config.daemonize:
        try:
            return sink.for_syslog()
        except OSError as e:
            raise ConfigError(
                f"no log_file, and syslog cannot be reached at {sink.SYSLOG_PATH} "
                f"({e.strerror}): set log_file (--log-file), or stay in the foreground (-n)"
            ) from None
    return sink.for_descriptor(2)


def _configure_master_log(config: Config, destination: sink.Sink) -> None:
    """The master's log as the configuration says, to `destination`."""
    log.configure(
        config.log_format,
        config.log_level,
        destination=destination,
        on_blocked=config.on_log_blocked,
        identity={"role": "master"},
    )


def _resume(config: Config, argv: list[str], resumed: dict[str, Any]) -> int:
    """The program an upgrade started: same pid, already detached, sockets open."""
    # The log file the old program wrote to (even if logrotate moved it meanwhile: the
    # next SIGUSR1 reopens), else stderr or syslog set up as at start.
    fd = resumed["log_fd"]
    destination = sink.for_file(fd) if fd is not None else _log_destination(config)
    _configure_master_log(config, destination)
    set_title(f"master [{config.source}]")
    written = None if config.pidfile is None else _write_pidfile(config.pidfile)
    try:
        return Master(config, argv=argv, resumed=resumed).run()
    finally:
        if config.pidfile is not None and written is not None:
            _remove_pidfile(config.pidfile, written)
        log.close(EXIT_FLUSH_TIMEOUT)


SUBCOMMANDS = ("status", "reload", "stop", "upgrade", "audit")

# After the flags' help (argparse's, from proxyd/config.py), what it cannot know.
MORE_HELP = f"""
commands (each with its own --help):
  proxyd status [--json]  the running daemon: exports, workers, connections, counters
  proxyd reload           re-read its configuration (as SIGHUP); says if it was refused
  proxyd stop             stop it gracefully (as SIGTERM)
  proxyd upgrade          run the proxyd now installed in its place: same pid, guests kept
  proxyd audit [FILE...]  query its log: what a guest did (filters, table/json/summary)
status, reload, stop and upgrade talk to the daemon's control socket: --socket PATH,
or the one --config FILE names, or {control.DEFAULT_SOCKET}.

logs: with -n on stderr, or only to log_file when one is set (--log-file); detached
(without -n) to log_file, or else to syslog (/dev/log; proxyd refuses to start, exit
code 2, when it cannot be connected).
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        if argv[0] == "audit":
            from proxyd import audit

            return audit.main(argv[1:])
        return control.main(argv)
    if "-h" in argv or "--help" in argv:
        with contextlib.suppress(SystemExit):  # argparse exits once it printed the help
            parse_args(["--help"])
        print(MORE_HELP, end="")
        return 0
    try:
        config = parse_args(argv)
        if config.upgrade_check:  # a running master asks: can this program take over?
            said = {"ok": True, "version": __version__, "handover_versions": handover.VERSIONS_READ}
            print(json.dumps(said))
            return 0
        if config.check_only:
            names = ", ".join(e.name for e in config.exports)
            print(f"proxyd: {config.source}: valid ({len(config.exports)} exports: {names})")
            return 0
        return serve(config, argv)
    except ConfigError as e:
        print(f"proxyd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
