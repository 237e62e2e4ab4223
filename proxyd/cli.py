"""`proxyd`: the command line entry point.

Validates the command line (or the configuration file), binds the export sockets
while errors can still reach the terminal, detaches unless -n, and runs the master.
"""

from __future__ import annotations

import os
import sys

from proxyd import listener, log
from proxyd.config import Config, ConfigError, parse_args
from proxyd.master import Master


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


def serve(config: Config) -> int:
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
    return Master(config, bound).run()


def main(argv: list[str] | None = None) -> int:
    try:
        return serve(parse_args(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"proxyd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
