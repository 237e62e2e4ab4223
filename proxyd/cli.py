"""`proxyd`: the command line entry point.

Validates the command line (or the configuration file), binds the export sockets
while errors can still reach the terminal, detaches unless -n, and runs the master.
"""

from __future__ import annotations

import os
import sys

from proxyd import control, listener, log
from proxyd.config import EXIT_SOCKET_IN_USE, Config, ConfigError, parse_args
from proxyd.master import Master
from proxyd.title import set_title


def daemonize() -> None:
    """Detach as daemon(3) does: new session, no terminal, stdio on /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the session leader goes, so a terminal can never be reacquired
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _running_pid(pidfile: str) -> int | None:
    """The pid in `pidfile` if that process is alive and is a proxyd."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            alive = f.read().startswith(b"proxyd: master")
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and alive else None


def _write_pidfile(pidfile: str) -> None:
    """Atomically: a reader sees the old content or the whole new pid, never half."""
    temporary = f"{pidfile}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(temporary, pidfile)


def _remove_pidfile(pidfile: str) -> None:
    if _running_pid(pidfile) == os.getpid():
        os.unlink(pidfile)


def serve(config: Config) -> int:
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
    log_fd = 2
    if config.log_file is not None:
        try:
            log_fd = log.open_file(config.log_file)
        except OSError as e:
            raise ConfigError(f"log file '{config.log_file}': {e.strerror}") from None
    if config.daemonize:
        daemonize()
    # Daemonized without a log file: syslog, as the reference helper does.
    to_syslog = config.daemonize and config.log_file is None
    log.configure(config.log_format, config.log_level, to_syslog=to_syslog, fd=log_fd)
    for path in stale:
        log.get(role="master").info("stale socket replaced", socket=path)
    set_title(f"master [{config.source}]")  # before the pidfile names this process
    if config.pidfile is not None:
        _write_pidfile(config.pidfile)
    try:
        return Master(config, bound, control_listener).run()
    finally:
        if config.pidfile is not None:
            _remove_pidfile(config.pidfile)


SUBCOMMANDS = ("status", "reload", "stop", "audit")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        if argv[0] == "audit":
            from proxyd import audit

            return audit.main(argv[1:])
        return control.main(argv)
    try:
        config = parse_args(argv)
        if config.check_only:
            names = ", ".join(e.name for e in config.exports)
            print(f"proxyd: {config.source}: valid ({len(config.exports)} exports: {names})")
            return 0
        return serve(config)
    except ConfigError as e:
        print(f"proxyd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
