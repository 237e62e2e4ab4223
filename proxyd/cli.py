"""`proxyd`: the command line entry point.

With the reference helper's flags it serves exactly one connection, as the
reference does: from an inherited descriptor (-f) or the first client of a named
socket (-s). The process chroots into the export before it reads a request.
"""

from __future__ import annotations

import os
import socket
import sys

from proxyd import __version__, listener, log
from proxyd.config import (
    EXIT_EXPORT,
    EXIT_OK,
    Config,
    ConfigError,
    parse_args,
)
from proxyd.ops import ExportOps, has_generations
from proxyd.privileges import Credentials, SandboxError, enter_sandbox
from proxyd.worker import Server


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


def _connection_from_fd(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError(f"-f {fd}: not a Unix stream socket")
    return sock


def _peer(sock: socket.socket) -> dict[str, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid, gid = (int.from_bytes(creds[i : i + 4], sys.byteorder) for i in (0, 4, 8))
    return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}


def serve_one(config: Config) -> int:
    """The reference's behaviour: one connection, then exit."""
    bound = None
    stale = False
    if config.socket is not None:
        stale = listener.claim_path(config.socket)
        bound = listener.bind(config.socket, config.socket_uid, config.socket_gid)
    else:
        assert config.fd is not None
        conn = _connection_from_fd(config.fd)
    # Bind and validate in the foreground so that errors reach the terminal.
    if config.daemonize:
        daemonize()
    log.configure(config.log_format, config.log_level, to_syslog=config.daemonize)
    logger = log.get(role="worker", export=config.export)
    logger.info("start", version=__version__, socket=config.socket, fd=config.fd)
    if stale:
        logger.info("stale socket replaced", socket=config.socket)
    if bound is not None:
        conn, _ = bound.sock.accept()
        bound.close()  # one connection, as the reference; QEMU unlinks the path itself
    logger = logger.bind(**_peer(conn))
    logger.info("connection accepted")
    try:
        enter_sandbox(config.export)
    except SandboxError as e:
        logger.error("export cannot be served", error=str(e))
        return EXIT_EXPORT
    ops = ExportOps(Credentials(), has_generations())
    Server(ops, logger).serve(conn)
    conn.close()
    logger.info("stop")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        return serve_one(config)
    except ConfigError as e:
        print(f"proxyd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
