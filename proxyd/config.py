"""The command line, validated into one Config object.

The flags are the reference helper's (`virtfs-proxy-helper`), with the same
meanings; every problem is reported as one line naming it.
"""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass

from proxyd import __version__
from proxyd.log import FORMATS, LEVELS

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL

# Exit codes, distinct so that scripts and supervisord can tell them apart.
EXIT_OK = 0
EXIT_INTERNAL = 1  # an unexpected failure (a bug): see the log
EXIT_USAGE = 2  # bad flag or configuration
EXIT_EXPORT = 3  # the export cannot be served (chroot or sandbox refused)
EXIT_SOCKET_IN_USE = 4  # another process is listening on the socket path


class ConfigError(Exception):
    """A bad flag or value; the message names it. Carries the exit code to use."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Config:
    export: str  # absolute path of the directory to export
    fd: int | None  # an inherited, connected socket (-f)
    socket: str | None  # a socket path to listen on (-s)
    socket_uid: int
    socket_gid: int
    daemonize: bool
    log_format: str = "json"
    log_level: str = "info"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's two
        raise ConfigError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="proxyd",
        description="Serve a host directory to QEMU's 9p proxy fs driver "
        "(a drop-in for virtfs-proxy-helper).",
    )
    ap.add_argument("-p", "--path", help="directory to export (the worker chroots into it)")
    ap.add_argument("-f", "--fd", help="an already connected socket descriptor to serve")
    ap.add_argument("-s", "--socket", help="socket path to listen on (needs -u and -g)")
    ap.add_argument("-u", "--uid", help="owner uid of the socket file")
    ap.add_argument("-g", "--gid", help="owner gid of the socket file")
    ap.add_argument("-n", "--nodaemon", action="store_true",
                    help="stay in the foreground and log to stderr")  # fmt: skip
    ap.add_argument("--log-format", choices=FORMATS, default="json",
                    help="log line format (default json)")  # fmt: skip
    ap.add_argument("--log-level", choices=LEVELS, default="info",
                    help="lowest level logged (default info)")  # fmt: skip
    ap.add_argument("-V", "--version", action="version", version=f"proxyd {__version__}")
    return ap


def _int(flag: str, value: str, lowest: int = 0) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise ConfigError(f"{flag}: '{value}' is not a number") from None
    if number < lowest or number > 0xFFFFFFFE:
        raise ConfigError(f"{flag}: {number} is out of range")
    return number


def _check_export(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"export path '{path}': {e.strerror}", EXIT_EXPORT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"export path '{path}' is not a directory", EXIT_EXPORT)
    return os.path.abspath(path)


def _check_fd(fd: int) -> None:
    try:
        st = os.fstat(fd)
    except OSError:
        raise ConfigError(f"-f {fd}: no such open descriptor") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"-f {fd}: descriptor is not a socket")


def parse_args(argv: list[str]) -> Config:
    """Validate the command line; raise ConfigError with a one-line message."""
    args = _parser().parse_args(argv)
    if args.path is None:
        raise ConfigError("no export path given (-p/--path)")
    if args.socket is None and args.fd is None:
        raise ConfigError("give a socket path (-s) or a socket descriptor (-f)")
    if args.socket is not None and args.fd is not None:
        raise ConfigError("-s/--socket and -f/--fd cannot be used together")
    export = _check_export(args.path)
    fd = None
    sock_path = None
    uid = gid = -1
    if args.fd is not None:
        fd = _int("-f/--fd", args.fd)
        _check_fd(fd)
    else:
        if args.uid is None or args.gid is None:
            raise ConfigError("-s/--socket needs the socket owner: -u UID and -g GID")
        uid = _int("-u/--uid", args.uid)
        gid = _int("-g/--gid", args.gid)
        sock_path = os.path.abspath(args.socket)
        if len(os.fsencode(sock_path)) > SUN_PATH_MAX:
            raise ConfigError(f"socket path '{sock_path}' is longer than the "
                              f"{SUN_PATH_MAX} bytes a Unix socket address holds")  # fmt: skip
    return Config(export=export, fd=fd, socket=sock_path, socket_uid=uid, socket_gid=gid,
                  daemonize=not args.nodaemon, log_format=args.log_format,
                  log_level=args.log_level)  # fmt: skip
