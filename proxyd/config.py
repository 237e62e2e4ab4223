"""The command line and the TOML configuration, validated into one Config object.

The reference helper's flags (`virtfs-proxy-helper`) keep their meanings and
describe one export; `--config FILE` describes any number. Every problem is
reported as one line that names the flag or the key.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import stat
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from proxyd import __version__, mounts, privileges
from proxyd.log import FORMATS, LEVELS, ON_BLOCKED
from proxyd.privileges import SECCOMP_MODES, IdMap

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


AUDIT_LEVELS = ("none", "mutations", "all")


@dataclass(frozen=True)
class ExportConfig:
    name: str
    path: str  # absolute
    socket: str | None  # absolute; None when serving an inherited descriptor (-f)
    socket_uid: int = 0
    socket_gid: int = 0
    socket_mode: int = 0o770
    allow_uids: tuple[int, ...] = ()  # empty: any peer that can open the socket
    allow_gids: tuple[int, ...] = ()
    readonly: bool = False
    min_idle: int = 1
    max_workers: int = 16
    max_connections_per_uid: int = 0  # live connections one peer uid may hold; 0: no limit
    # (st_dev, st_ino) of the export when the configuration was read: a worker refuses
    # to serve a path that has since been moved or replaced (by a symlink, say).
    identity: tuple[int, int] = (0, 0)
    # (guest_first, host_first, count) ranges its workers' mount of the export is
    # ID-mapped with (privileges.map_export_ids); both empty: no mapping.
    uid_map: IdMap = ()
    gid_map: IdMap = ()

    @property
    def id_mapped(self) -> bool:
        return bool(self.uid_map)


@dataclass(frozen=True)
class Config:
    exports: tuple[ExportConfig, ...]
    control_socket: str | None = None
    log_format: str = "json"
    log_level: str = "info"
    log_file: str | None = None  # None: stderr (or syslog when daemonized)
    audit: str = "mutations"
    stop_timeout: float = 5.0
    request_timeout: float = 30.0
    seccomp: str = "kill"  # kill | log | off: what a forbidden system call does to a worker
    on_log_blocked: str = "drop"  # drop | wait: when the log does not take a line (proxyd/sink.py)
    metrics_listen: str | None = None  # "HOST:PORT" serving GET /metrics (proxyd/metrics.py)
    metrics_file: str | None = None  # a file the metrics are written to (node_exporter's textfile)
    daemonize: bool = False
    pidfile: str | None = None
    once: bool = False  # serve one connection, then exit (the reference's behaviour)
    check_only: bool = False  # --check: validate, report, exit
    upgrade_check: bool = False  # --upgrade-check: can this program take over? (upgrade.py)
    fd: int | None = None  # -f: the one connection to serve
    source: str = "command line"  # the config file, for titles and logs
    path: str | None = field(default=None, compare=False)  # the config file to re-read


def metrics_on(config: Config) -> bool:
    """Whether metrics are exposed (an endpoint or a file): workers then count requests."""
    return config.metrics_listen is not None or config.metrics_file is not None


def worker_view(config: Config, export: ExportConfig) -> tuple[Any, ...]:
    """Everything a worker of `export` is forked with. A reload that changes it
    replaces that export's workers (at request boundaries); one that changes only what
    the master alone uses (socket, allow-lists, pool sizes, stop_timeout) leaves them.
    The ID maps are in it: a worker's mount of the export carries them."""
    return (
        export.path,
        export.identity,
        export.readonly,
        export.uid_map,
        export.gid_map,
        config.log_format,
        config.log_level,
        config.audit,
        config.request_timeout,
        config.seccomp,
        config.on_log_blocked,
        metrics_on(config),
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's two
        raise ConfigError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="proxyd",
        description="Serve host directories to QEMU's 9p proxy fs driver. With -p and "
        "-s/-f it is a drop-in for virtfs-proxy-helper; with --config it serves many exports.",
    )
    ap.add_argument("-p", "--path", help="directory to export (workers chroot into it)")
    ap.add_argument("-f", "--fd", help="an already connected socket descriptor to serve")
    ap.add_argument("-s", "--socket", help="socket path to listen on (needs -u and -g)")
    ap.add_argument("-u", "--uid", help="owner uid of the socket file")
    ap.add_argument("-g", "--gid", help="owner gid of the socket file")
    ap.add_argument(
        "-n",
        "--nodaemon",
        action="store_true",
        help="stay in the foreground (log to stderr unless a log file is set)",
    )
    ap.add_argument("-c", "--config", help="TOML configuration file (instead of -p/-s/-f)")
    ap.add_argument(
        "--once",
        action="store_true",
        help="serve one connection, then exit (as the reference helper)",
    )
    ap.add_argument("--log-format", choices=FORMATS, help="log line format (default json)")
    ap.add_argument("--log-level", choices=LEVELS, help="lowest level logged (default info)")
    ap.add_argument("--log-file", help="append log lines to this file (reopened on SIGUSR1)")
    ap.add_argument(
        "--seccomp",
        choices=SECCOMP_MODES,
        help="what a worker's forbidden system call does: kill it (default), log, off",
    )
    ap.add_argument(
        "--pidfile", help="write the master's pid here (refuse to start if it is alive)"
    )
    ap.add_argument("--audit", choices=AUDIT_LEVELS, help="requests logged (default mutations)")
    ap.add_argument(
        "--check",
        action="store_true",
        help="validate the command line and configuration, then exit",
    )
    # Asked by a running master before it re-executes this program (proxyd/upgrade.py).
    ap.add_argument("--upgrade-check", action="store_true", help=argparse.SUPPRESS)
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


def _check_export(path: str, where: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{where} '{path}': {e.strerror}", EXIT_EXPORT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where} '{path}' is not a directory", EXIT_EXPORT)
    return os.path.abspath(path)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_isolation(exports: tuple[ExportConfig, ...]) -> None:
    """Exports must not overlap, and no socket may live inside an export.

    A guest can rename and symlink anything in its export: with a nested export it
    could swap the other's directory for a symlink to / (or move directories out
    from under a `..` walk), and with a socket in its export it could swap the
    socket for a symlink while the master re-binds it.
    """
    for a in exports:
        for b in exports:
            if a is not b and _inside(a.path, b.path):
                raise ConfigError(
                    f"export '{a.name}'.path '{a.path}' is inside export "
                    f"'{b.name}' ('{b.path}'): exports must not overlap"
                )
            if b.socket is not None and _inside(os.path.dirname(b.socket), a.path):
                raise ConfigError(
                    f"export '{b.name}'.socket '{b.socket}' is inside export "
                    f"'{a.name}' ('{a.path}'), where its guest could replace it"
                )


def _check_socket_path(path: str, where: str) -> str:
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(
            f"{where} '{path}' is longer than the {SUN_PATH_MAX} bytes a Unix socket address holds"
        )
    return path


def _check_fd(fd: int) -> None:
    try:
        st = os.fstat(fd)
    except OSError:
        raise ConfigError(f"-f {fd}: no such open descriptor") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"-f {fd}: descriptor is not a socket")
    sock = socket.socket(fileno=fd)
    family, kind = sock.family, sock.type
    sock.detach()
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
        raise ConfigError(f"-f {fd}: not a Unix stream socket")


def _from_flags(args: argparse.Namespace) -> Config:
    if args.path is None:
        raise ConfigError("no export path given (-p/--path, or --config FILE)")
    if args.socket is None and args.fd is None:
        raise ConfigError("give a socket path (-s) or a socket descriptor (-f)")
    if args.socket is not None and args.fd is not None:
        raise ConfigError("-s/--socket and -f/--fd cannot be used together")
    path = _check_export(args.path, "export path")
    name = os.path.basename(path.rstrip("/")) or "root"
    if args.fd is not None:
        fd = _int("-f/--fd", args.fd)
        _check_fd(fd)
        export = ExportConfig(
            name=name, path=path, socket=None, min_idle=1, max_workers=1, identity=_identity(path)
        )
        return Config(exports=(export,), fd=fd, once=True, source=f"-p {path} -f {fd}")
    if args.uid is None or args.gid is None:
        raise ConfigError("-s/--socket needs the socket owner: -u UID and -g GID")
    export = ExportConfig(
        name=name,
        path=path,
        socket=_check_socket_path(args.socket, "socket path"),
        socket_uid=_int("-u/--uid", args.uid),
        socket_gid=_int("-g/--gid", args.gid),
        identity=_identity(path),
    )
    check_isolation((export,))
    return Config(exports=(export,), once=args.once, source=f"-p {path} -s {export.socket}")


# --- the TOML file ------------------------------------------------------------------

_DAEMON_KEYS = {
    "control_socket",
    "log_format",
    "log_level",
    "log_file",
    "audit",
    "stop_timeout",
    "request_timeout",
    "seccomp",
    "on_log_blocked",
    "metrics_listen",
    "metrics_file",
}
_EXPORT_KEYS = {
    "name",
    "path",
    "socket",
    "socket_uid",
    "socket_gid",
    "socket_mode",
    "allow_uids",
    "allow_gids",
    "readonly",
    "min_idle",
    "max_workers",
    "max_connections_per_uid",
    "uid_map",
    "gid_map",
}


def _typed(table: dict[str, Any], key: str, where: str, kind: type | tuple, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) and kind is not bool:  # TOML booleans are ints in Python
        raise ConfigError(f"{where}.{key}: expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(
            f"{where}.{key}: expected {_kind_name(kind)}, got {type(value).__name__} {value!r}"
        )
    return value


def _kind_name(kind: type | tuple) -> str:
    names = {
        str: "a string",
        int: "an integer",
        bool: "true or false",
        list: "a list",
        float: "a number",
    }
    if isinstance(kind, tuple):
        return " or ".join(names[k] for k in kind if k in names)
    return names.get(kind, kind.__name__)


def _choice(daemon: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = _typed(daemon, key, "daemon", str, default)
    if value not in choices:
        raise ConfigError(f"daemon.{key}: '{value}' is not one of {', '.join(choices)}")
    return value


def _id_list(table: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    values = _typed(table, key, where, list, [])
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFE:
            raise ConfigError(f"{where}.{key}: {v!r} is not a valid id")
    return tuple(values)


ID_LAST = 0xFFFFFFFE  # the highest id a map may hold: (uid_t)-1 is never an id


def _id_map(table: dict[str, Any], key: str, where: str) -> IdMap:
    """`uid_map`/`gid_map`: [[guest_first, host_first, count], ...], each range within
    0..ID_LAST on both sides and overlapping no other on either side (the kernel's
    rules for /proc/PID/uid_map, user_namespaces(7)). Raises ConfigError naming the
    key and the range."""
    values = _typed(table, key, where, list, [])
    if key in table and not values:
        raise ConfigError(f"{where}.{key}: empty (give at least one range, or leave it out)")
    if len(values) > privileges.MAP_RANGES_MAX:
        raise ConfigError(
            f"{where}.{key}: {len(values)} ranges, the kernel takes at most "
            f"{privileges.MAP_RANGES_MAX}"
        )
    ranges: list[tuple[int, int, int]] = []
    for i, value in enumerate(values):
        at = f"{where}.{key}[{i}]"
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise ConfigError(f"{at}: expected [guest_first, host_first, count], got {value!r}")
        guest, host, count = value
        for name, first in (("guest_first", guest), ("host_first", host)):
            if first < 0:
                raise ConfigError(f"{at}: {name} {first} is negative")
        if count < 1:
            raise ConfigError(f"{at}: count {count} is less than 1")
        if count > ID_LAST + 1:
            raise ConfigError(f"{at}: count {count} is more than 2^32 - 1")
        for name, first in (("guest", guest), ("host", host)):
            if first + count - 1 > ID_LAST:
                raise ConfigError(
                    f"{at}: {name} ids {first}..{first + count - 1} wrap past {ID_LAST}, "
                    "the highest id"
                )
        for j, (g, h, c) in enumerate(ranges):
            for name, a, b in (("guest", guest, g), ("host", host, h)):
                if a < b + c and b < a + count:
                    raise ConfigError(
                        f"{at}: {name} ids {a}..{a + count - 1} overlap {key}[{j}] "
                        f"({b}..{b + c - 1})"
                    )
        ranges.append((guest, host, count))
    result = tuple(ranges)
    size = len(privileges.namespace_map_text(result))
    if size > privileges.MAP_TEXT_MAX:
        raise ConfigError(
            f"{where}.{key}: its ranges take {size} bytes as a user namespace map, the "
            f"kernel takes at most {privileges.MAP_TEXT_MAX}"
        )
    return result


def _check_idmappable(export: ExportConfig, where: str) -> None:
    """Try the mapping as a worker will (privileges.check_idmappable): an export whose
    filesystem, or a mount below it, cannot be ID-mapped is refused here, not served
    unmapped."""
    with open(mounts.MOUNTINFO, "rb") as f:
        below = sorted(m[1] for m in mounts.below(mounts.parse(f.read()), export.path))
    # The export's own filesystem first (its directory need not be a mount point).
    points = [export.path] + [os.fsdecode(p) for p in below if p != os.fsencode(export.path)]
    try:
        privileges.check_idmappable(export.path, export.uid_map, export.gid_map, points)
    except OSError as e:
        why = {
            errno.EINVAL: "the filesystem does not support ID-mapped mounts",
            errno.EPERM: "already ID-mapped, or not permitted",
        }.get(e.errno or 0, "")
        raise ConfigError(
            f"{where}.uid_map: '{export.path}' cannot be ID-mapped: {e.strerror or e}"
            + (f" ({why})" if why else ""),
            EXIT_EXPORT,
        ) from None


def _in_range(value: float, key: str, where: str, low: float, high: float) -> float:
    if not low <= value <= high:
        raise ConfigError(f"{where}.{key}: {value} is outside {low}..{high}")
    return value


def _unknown_keys(table: dict[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'")


def _export_from_table(
    table: dict[str, Any], index: int, running: dict[str, ExportConfig]
) -> ExportConfig:
    where = f"export[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table ([[export]])")
    name = _typed(table, "name", where, str, None)
    if not name:
        raise ConfigError(f"{where}.name: missing")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}.name: '{name}' may only hold letters, digits, - _ .")
    where = f"export '{name}'"
    _unknown_keys(table, _EXPORT_KEYS, where)
    path = _typed(table, "path", where, str, None)
    if path is None:
        raise ConfigError(f"{where}.path: missing")
    socket_path = _typed(table, "socket", where, str, None)
    if socket_path is None:
        raise ConfigError(f"{where}.socket: missing")
    mode = _typed(table, "socket_mode", where, (str, int), "0770")
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise ConfigError(f"{where}.socket_mode: '{mode}' is not an octal mode") from None
    min_idle = _in_range(_typed(table, "min_idle", where, int, 1), "min_idle", where, 0, 1024)
    max_workers = _in_range(
        _typed(table, "max_workers", where, int, 16), "max_workers", where, 1, 4096
    )
    per_uid = _typed(table, "max_connections_per_uid", where, int, 0)
    _in_range(per_uid, "max_connections_per_uid", where, 0, 1_000_000)
    if min_idle > max_workers:
        raise ConfigError(f"{where}.min_idle: {min_idle} is more than max_workers {max_workers}")
    uid_map = _id_map(table, "uid_map", where)
    gid_map = _id_map(table, "gid_map", where)
    for key, given, other in (("gid_map", uid_map, gid_map), ("uid_map", gid_map, uid_map)):
        if given and not other:
            raise ConfigError(f"{where}.{key}: missing (give uid_map and gid_map, or neither)")
    known = running.get(name)
    missing = False
    if known is not None and os.path.abspath(path) == known.path and not os.path.isdir(path):
        # An export already served whose directory is missing right now: that is the
        # export's own trouble (it is unavailable until the directory is back), not a
        # reason to refuse a reload that may concern other exports.
        path, identity, missing = known.path, known.identity, True
    else:
        path = _check_export(path, f"{where}.path")
        identity = _identity(path)
    export = ExportConfig(
        name=name,
        path=path,
        socket=_check_socket_path(socket_path, f"{where}.socket"),
        socket_uid=int(
            _in_range(
                _typed(table, "socket_uid", where, int, 0), "socket_uid", where, 0, 0xFFFFFFFE
            )
        ),
        socket_gid=int(
            _in_range(
                _typed(table, "socket_gid", where, int, 0), "socket_gid", where, 0, 0xFFFFFFFE
            )
        ),
        socket_mode=int(_in_range(mode, "socket_mode", where, 0, 0o777)),
        allow_uids=_id_list(table, "allow_uids", where),
        allow_gids=_id_list(table, "allow_gids", where),
        readonly=_typed(table, "readonly", where, bool, False),
        min_idle=int(min_idle),
        max_workers=int(max_workers),
        max_connections_per_uid=per_uid,
        identity=identity,
        uid_map=uid_map,
        gid_map=gid_map,
    )
    if export.id_mapped and not missing:
        _check_idmappable(export, where)
    return export


def load_file(path: str, running: Config | None = None) -> Config:
    """Read and validate a TOML configuration file; raise ConfigError naming the key.

    `running` (a reload) is the configuration in force: an export it serves under the
    same name and path may be missing on disk (it keeps its recorded identity)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file '{path}': {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}': {e}") from None
    _unknown_keys(data, {"daemon", "export"}, "config")
    daemon = _typed(data, "daemon", "config", dict, {})
    _unknown_keys(daemon, _DAEMON_KEYS, "daemon")
    control = _typed(daemon, "control_socket", "daemon", str, None)
    log_format = _choice(daemon, "log_format", FORMATS, "json")
    log_level = _choice(daemon, "log_level", LEVELS, "info")
    log_file = _typed(daemon, "log_file", "daemon", str, None)
    audit = _choice(daemon, "audit", AUDIT_LEVELS, "mutations")
    stop_timeout = _in_range(
        _typed(daemon, "stop_timeout", "daemon", (int, float), 5.0),
        "stop_timeout",
        "daemon",
        0.1,
        3600,
    )
    request_timeout = _in_range(
        _typed(daemon, "request_timeout", "daemon", (int, float), 30.0),
        "request_timeout",
        "daemon",
        0.5,
        86400,
    )
    seccomp = _choice(daemon, "seccomp", SECCOMP_MODES, "kill")
    on_log_blocked = _choice(daemon, "on_log_blocked", ON_BLOCKED, "drop")
    metrics_listen = _typed(daemon, "metrics_listen", "daemon", str, None)
    if metrics_listen is not None:
        host, port = listen_address(metrics_listen)
        metrics_listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    metrics_file = _typed(daemon, "metrics_file", "daemon", str, None)
    tables = _typed(data, "export", "config", list, [])
    if not tables:
        raise ConfigError("config: no [[export]] table")
    served = {e.name: e for e in running.exports} if running is not None else {}
    exports = tuple(_export_from_table(t, i, served) for i, t in enumerate(tables))
    check_isolation(exports)
    for attr in ("name", "socket"):
        seen: set[str] = set()
        for e in exports:
            value = getattr(e, attr)
            if value in seen:
                raise ConfigError(f"export '{e.name}'.{attr}: '{value}' is used twice")
            seen.add(value)
    return Config(
        exports=exports,
        control_socket=_check_socket_path(control, "daemon.control_socket") if control else None,
        log_format=log_format,
        log_level=log_level,
        log_file=os.path.abspath(log_file) if log_file else None,
        audit=audit,
        stop_timeout=float(stop_timeout),
        request_timeout=float(request_timeout),
        seccomp=seccomp,
        on_log_blocked=on_log_blocked,
        metrics_listen=metrics_listen,
        metrics_file=_check_metrics_file(metrics_file) if metrics_file else None,
        source=os.path.abspath(path),
        path=os.path.abspath(path),
    )


def listen_address(value: str) -> tuple[str, int]:
    """(host, port) of a "HOST:PORT" listening address: HOST an IPv4 address, or an IPv6
    one in brackets ("[::1]:9477"); no name, which would need a DNS look-up. Raises
    ConfigError (naming daemon.metrics_listen)."""
    where = f"daemon.metrics_listen: '{value}'"
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{where} is not HOST:PORT with an IP address (127.0.0.1:9477, [::1]:9477)"
        ) from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: the port must be a number from 1 to 65535")
    if address.version == 6 and not value.startswith("["):
        raise ConfigError(f"{where}: write an IPv6 address in brackets ([::1]:9477)")
    return str(address), int(port)


def _check_metrics_file(path: str) -> str:
    """An absolute path ending in .prom (node_exporter reads only those) whose directory
    only root may write: the file is written by renaming a temporary file, named from
    the path, into place (prometheus_client.write_to_textfile), and a symlink another
    user put under that name would be followed."""
    path = os.path.abspath(path)
    where = f"daemon.metrics_file '{path}'"
    if not path.endswith(".prom"):
        raise ConfigError(f"{where}: the name must end in .prom (node_exporter reads no other)")
    directory = os.path.dirname(path)
    try:
        st = os.stat(directory)
    except OSError as e:
        raise ConfigError(f"{where}: directory: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where}: '{directory}' is not a directory")
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{where}: other users than root may write in '{directory}' (a symlink put "
            "there would redirect proxyd's writes): use a directory only root may write"
        )
    return path


def parse_args(argv: list[str]) -> Config:
    """Validate the command line (and the file it names); raise ConfigError."""
    args = _parser().parse_args(argv)
    if args.config is not None:
        given = [
            f
            for f, v in (
                ("-p", args.path),
                ("-s", args.socket),
                ("-f", args.fd),
                ("-u", args.uid),
                ("-g", args.gid),
            )
            if v is not None
        ]
        if given:
            raise ConfigError(f"--config cannot be combined with {', '.join(given)}")
        config = load_file(args.config)
        config = replace(config, once=args.once)
    else:
        config = _from_flags(args)
    overrides: dict[str, Any] = {
        "daemonize": not args.nodaemon,
        "check_only": args.check,
        "upgrade_check": args.upgrade_check,
    }
    if args.log_format:
        overrides["log_format"] = args.log_format
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.log_file:
        overrides["log_file"] = os.path.abspath(args.log_file)
    if args.audit:
        overrides["audit"] = args.audit
    if args.seccomp:
        overrides["seccomp"] = args.seccomp
    if args.pidfile:
        overrides["pidfile"] = os.path.abspath(args.pidfile)
    return replace(config, **overrides)
