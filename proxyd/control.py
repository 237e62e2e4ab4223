"""The control socket: JSON status for operators, reload and stop as conveniences.

The master listens on a root-only Unix socket (mode 0600, and the peer must be uid 0).
A client sends one JSON line, {"cmd": "status" | "reload" | "stop"}, and reads one
JSON document back. `proxyd status`, `proxyd reload`, `proxyd stop` and the
supervisorctl plugin (`supervisorctl proxyd status`) are clients.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import tomllib
from typing import Any

from proxyd import listener

DEFAULT_SOCKET = "/run/proxyd/control.sock"
MAX_REQUEST = 4096
CLIENT_TIMEOUT = 10.0
UPGRADE_TIMEOUT = 90.0  # the new program is checked, then started: give it time


class ControlError(Exception):
    """The daemon cannot be reached or refused the command; the message says why."""


# --- the master's side -----------------------------------------------------------------


def bind(path: str) -> listener.Listener:
    """Listen on the control socket: root only (mode 0600), replacing a stale one.

    Its directory (often /run/proxyd, which QEMU's uid may write) is created and
    entered as listener.bind does for export sockets: through descriptors, never
    following a symlink another user could have placed. Raises ConfigError.
    """
    listener.claim_path(path)
    return listener.bind(path, 0, 0, mode=0o600)


def peer_is_root(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder) == 0


COMMANDS = ("status", "reload", "stop", "upgrade")


def parse_request(data: bytes) -> str:
    """The command of a request line ({"cmd": one of COMMANDS}, nothing else);
    ValueError for anything else, including JSON nested too deep to parse."""
    try:
        request = json.loads(data)
    except RecursionError:
        raise ValueError("nested too deep") from None
    if not isinstance(request, dict) or set(request) != {"cmd"} or request["cmd"] not in COMMANDS:
        raise ValueError('expected {"cmd": "status" | "reload" | "stop" | "upgrade"}')
    return request["cmd"]


# --- clients ---------------------------------------------------------------------------------


def call(path: str, cmd: str) -> dict[str, Any]:
    """Send one command to the daemon at `path` and return its answer. Raises
    ControlError (no daemon, no answer in time, a refusal: the message says which)."""
    timeout = UPGRADE_TIMEOUT if cmd == "upgrade" else CLIENT_TIMEOUT
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no daemon: control socket {path} does not exist") from None
        except ConnectionRefusedError:
            raise ControlError(f"no daemon is listening on {path}") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path} (root only)") from None
        sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        raise ControlError(f"the daemon on {path} did not answer in {timeout:.0f} s") from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"the daemon on {path} sent an unreadable answer") from None
    if not answer.get("ok", False):
        raise ControlError(answer.get("error", "the daemon refused the command"))
    return answer


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    # A list for max(): with no rows (no connections yet) it gets the header alone.
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return lines


def format_status(status: dict[str, Any]) -> str:
    """The status document as the tables `proxyd status` prints."""
    now = time.time()
    lines = [
        f"proxyd {status['version']}  pid {status['pid']}  up {_age(status['uptime_s'])}  "
        f"config {status['source']}  generation {status['generation']}"
        + (
            f"  upgraded {_age(now - status['upgraded_at'])} ago ({status['upgrades']}x)"
            if status.get("upgraded_at")
            else ""
        )
        + ("  STOPPING" if status.get("stopping") else ""),
        "",
    ]
    lines += _table(
        ["EXPORT", "STATE", "PATH", "SOCKET", "RO", "WORKERS", "IDLE", "BUSY", "WAITING"]
        + ["MIN", "MAX"],
        [
            [
                e["name"],
                "serving" if e.get("available", True) else "UNAVAILABLE",
                e["path"],
                e["socket"],
                "yes" if e["readonly"] else "no",
                e["workers"],
                e["idle"],
                e["busy"],
                e["waiting"],
                e["min_idle"],
                e["max_workers"],
            ]
            for e in status["exports"]
        ],
    )
    lines.append("")
    lines += _table(
        ["WORKER", "PID", "STATE", "CONN", "CONNECTIONS", "REQUESTS", "UP", "LOG_DROPPED"],
        [
            [
                f"{w['export']}#{w['index']}",
                w["pid"],
                w["state"],
                w["conn"],
                w["connections"],
                w["requests"],
                _age(now - w["started"]),
                w.get("log_dropped", 0),
            ]
            for w in status["workers"]
        ],
    )
    lines.append("")
    # A connection's REQUESTS count every worker that served it; BY_WORKER, those served
    # by the worker holding it now (named as in the worker table, which counts them too).
    lines += _table(
        ["CONN", "EXPORT", "PEER_PID", "PEER_UID", "SINCE", "REQUESTS", "ERRORS", "WORKER"]
        + ["BY_WORKER"],
        [
            [
                c["id"],
                c["export"],
                c["peer_pid"],
                c["peer_uid"],
                _age(now - c["since"]),
                c["requests"],
                c["errors"],
                c.get("worker"),
                c.get("worker_requests") if c.get("worker") else None,
            ]
            for c in status["connections"]
        ],
    )
    for e in status["exports"]:
        if not e.get("available", True):
            lines += ["", f"export {e['name']} unavailable: {e['unavailable_reason']}"]
    mapped = [e for e in status["exports"] if e.get("uid_map")]
    if mapped:
        lines.append("")
    for e in mapped:
        lines.append(
            f"export {e['name']} ID-mapped [guest_first, host_first, count]: "
            f"uid_map {e['uid_map']}, gid_map {e['gid_map']}"
        )
    counters = status["counters"]
    lines += [
        "",
        "counters: " + (", ".join(f"{k}={v}" for k, v in sorted(counters.items())) or "none"),
    ]
    if "log" in status:
        lines.append(_log_line(status["log"]))
    return "\n".join(lines)


def _log_line(counts: dict[str, Any]) -> str:
    """One line: log lines dropped in all (and by whom), what the master holds."""
    return (
        f"log lines dropped: {counts['dropped']} (master {counts['master_dropped']}, "
        f"workers {counts['workers_dropped']}, exited workers "
        f"{counts['exited_workers_dropped']}); master holds {counts['master_pending']}; "
        f"on_log_blocked = {counts['on_blocked']}"
    )


# A `control_socket = "..."` line, for a configuration file that is not valid TOML.
_CONTROL_SOCKET_LINE = re.compile(rb'^[ \t]*control_socket[ \t]*=[ \t]*"([^"\\\n]+)"', re.M)


def socket_from_config(path: str) -> tuple[str, str | None]:
    """The control socket the configuration file `path` names, read leniently: only the
    daemon judges the file (`proxyd reload -c FILE` of a broken FILE must reach it and
    report its verdict). Returns (socket, None), or (DEFAULT_SOCKET, why the file gave
    none: unreadable, no daemon.control_socket)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        return DEFAULT_SOCKET, f"{path}: {e.strerror}"
    try:
        daemon = tomllib.loads(text.decode("utf-8", "replace")).get("daemon")
        value = daemon.get("control_socket") if isinstance(daemon, dict) else None
    except tomllib.TOMLDecodeError:  # not TOML: the line alone, if it is there
        match = _CONTROL_SOCKET_LINE.search(text)
        value = os.fsdecode(match[1]) if match else None
    if not isinstance(value, str) or not value:
        return DEFAULT_SOCKET, f"{path} names no daemon.control_socket"
    return os.path.abspath(value), None  # as proxyd/config.py reads it


def socket_path(args: argparse.Namespace) -> tuple[str, str | None]:
    """The control socket: --socket, else the one --config names, else the default;
    and, when --config named none, why (socket_from_config)."""
    if args.socket:
        return args.socket, None
    if args.config:
        return socket_from_config(args.config)
    return DEFAULT_SOCKET, None


def describe(cmd: str, answer: dict[str, Any]) -> str:
    """What a command's answer says, in one line (status aside)."""
    if cmd == "reload":
        return f"reload applied (generation {answer['generation']})"
    if cmd == "upgrade":
        return f"upgraded from {answer['from']} to {answer['version']}"
    return "stopping"


def main(argv: list[str]) -> int:
    """`proxyd status|reload|stop|upgrade [--json] [--socket PATH | --config FILE]`."""
    ap = argparse.ArgumentParser(prog=f"proxyd {argv[0]}", description=__doc__.splitlines()[0])
    ap.add_argument("--socket", help=f"control socket (default {DEFAULT_SOCKET})")
    ap.add_argument(
        "-c",
        "--config",
        help="the daemon's configuration file: its daemon.control_socket is used (the "
        "daemon reloads the file it was started with)",
    )
    if argv[0] == "status":
        ap.add_argument("--json", action="store_true", help="print the JSON document as is")
    args = ap.parse_args(argv[1:])
    path, why_default = socket_path(args)
    if why_default is not None:
        print(f"proxyd {argv[0]}: {why_default}: using {path}", file=sys.stderr)
    try:
        answer = call(path, argv[0])
    except ControlError as e:
        print(f"proxyd {argv[0]}: error: {e}", file=sys.stderr)
        return 1
    try:
        if argv[0] == "status":
            status = answer["status"]
            print(json.dumps(status, indent=2) if args.json else format_status(status))
        else:
            print(describe(argv[0], answer))
        sys.stdout.flush()
    except BrokenPipeError:  # `proxyd status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


# --- the supervisorctl plugin ------------------------------------------------------------------


def make_ctl_plugin(controller: Any, **config: str) -> Any:
    """supervisorctl's factory: `[ctlplugin:proxyd]` with
    `supervisor.ctl_factory = proxyd.control:make_ctl_plugin` (optional
    `control_socket = PATH`)."""
    from supervisor.supervisorctl import ControllerPluginBase, LSBInitExitStatuses

    class ProxydControllerPlugin(ControllerPluginBase):  # type: ignore[misc]
        name = "proxyd"

        def __init__(self, controller: Any, control_socket: str = DEFAULT_SOCKET) -> None:
            self.ctl = controller
            self.control_socket = control_socket

        def do_proxyd(self, arg: str) -> None:
            words = arg.split()
            cmd = words[0] if words else "status"
            if (
                cmd not in COMMANDS
                or len(words) > 2
                or (len(words) == 2 and (cmd, words[1]) != ("status", "--json"))
            ):
                self.ctl.output(
                    "Error: proxyd status [--json] | proxyd reload | proxyd stop | proxyd upgrade"
                )
                self.ctl.exitstatus = LSBInitExitStatuses.INVALID_ARGS
                return
            try:
                answer = call(self.control_socket, cmd)
            except ControlError as e:
                self.ctl.output(f"Error: {e}")
                self.ctl.exitstatus = LSBInitExitStatuses.GENERIC
                return
            if cmd == "status":
                status = answer["status"]
                as_json = len(words) == 2
                self.ctl.output(json.dumps(status, indent=2) if as_json else format_status(status))
            else:
                self.ctl.output(describe(cmd, answer))

        def help_proxyd(self) -> None:
            self.ctl.output("proxyd status [--json]\tShow proxyd's exports, workers, connections")
            self.ctl.output("proxyd reload\t\tRe-read proxyd's configuration (as SIGHUP)")
            self.ctl.output("proxyd stop\t\tStop proxyd gracefully (as SIGTERM)")
            self.ctl.output("proxyd upgrade\t\tRun the proxyd now installed, keeping every guest")

    return ProxydControllerPlugin(controller, **config)
