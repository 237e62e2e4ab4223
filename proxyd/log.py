"""Logging for every proxyd process: structlog, one event per line, JSON by default.

* Each line is written with one write(2) and is never longer than PIPE_BUF, so lines
  from the master and its workers sharing stderr (a pipe to supervisord) or a log
  file (O_APPEND) never interleave. An event that would be longer has its longest
  strings cut, and says which in its `truncated` field.
* Levels below the configured one cost one method call (structlog's filtering
  bound logger).
* Destinations: stderr (default), a file (`log_file`; reopened on SIGUSR1, workers
  get the new descriptor from the master since they cannot open it from their
  chroot), or syslog when daemonized without a file (connected before the chroot).

The audit event (`event="op"`) is built here too, so that its schema lives in one
place; docs/events.md documents every event and field.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import select
import stat
import syslog
from typing import Any

import orjson
import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "console")
LINE_MAX = select.PIPE_BUF  # 4096 on Linux: the largest write a pipe keeps whole
_SHORTEST_CUT = 64  # never cut a string below this many characters


def escape(text: str) -> str:
    r"""`text` safe to show in a terminal, reversibly (docs/events.md, "Escaping").

    Kept as is: every printable character (str.isprintable) but the backslash.
    Escaped: `\\` for a backslash; `\xNN` for a byte: one that was not UTF-8 (a
    surrogateescape code point U+DC80..U+DCFF) or a C0 control or DEL; `\uXXXX` or
    `\UXXXXXXXX` for any other character that is not printable: C1 controls (CSI,
    OSC, ...), format characters (category Cf: bidi overrides and isolates,
    zero-width characters), the line and paragraph separators, other spaces than
    U+0020, unassigned code points. So `\xNN` is always one byte and `\u`/`\U` a
    character's UTF-8 encoding: a reader gets the exact bytes back.
    """
    if text.isprintable() and "\\" not in text:
        return text  # the common case, at C speed
    return "".join(c if c.isprintable() and c != "\\" else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    code = ord(c)
    if c == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _clean(value: Any) -> Any:
    """`value` with every string in it escaped (lists and objects too)."""
    if isinstance(value, str):
        return escape(value)
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {escape(str(k)): _clean(v) for k, v in value.items()}
    return escape(str(value))


def _clean_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event (a copy the caller owns) with its values cleaned, in place: the
    common values (ints, strings with nothing to escape) cost a type check."""
    for key, value in event.items():
        kind = type(value)
        if kind is int or (kind is str and value.isprintable() and "\\" not in value):
            continue
        event[key] = _clean(value)
    return event


def _serialize(event: dict[str, Any]) -> bytes:
    event = _clean_event(event)
    try:
        return orjson.dumps(event)
    except TypeError:  # an int beyond 64 bits: plain json writes it
        return json.dumps(event).encode()


def _render_console(event: dict[str, Any]) -> bytes:
    event = _clean_event(event)
    head = [str(event.pop(k, "")) for k in ("timestamp", "level", "event")]
    body = " ".join(f"{k}={_console_value(v)}" for k, v in event.items())
    return f"{head[0]} {head[1]:<7} {head[2]:<24} {body}".encode()


def _console_value(value: Any) -> str:
    """A string in double quotes (a quote in it as \\"), anything else as JSON."""
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    return json.dumps(value, ensure_ascii=False)


def _fit(event: dict[str, Any], render: Any) -> bytes:
    """Render, cutting the longest strings until the line fits in LINE_MAX bytes."""
    line = render(dict(event))
    if len(line) < LINE_MAX:
        return line
    cut: list[str] = []
    while len(line) >= LINE_MAX:
        strings = [(len(v), k) for k, v in event.items() if isinstance(v, str)]
        if not strings:
            break
        length, key = max(strings)
        if length <= _SHORTEST_CUT:
            break
        excess = len(line) - LINE_MAX + 64
        per_char = len(render({key: event[key]})) / length  # escapes take up to 11 bytes
        keep = length - math.ceil(excess / per_char)
        event[key] = event[key][: max(_SHORTEST_CUT, keep)] + "…"
        if key not in cut:
            cut.append(key)
        event["truncated"] = cut
        line = render(dict(event))
    return line[: LINE_MAX - 1]


class _FdWriter:
    """A structlog logger: each event is one os.write of one line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def msg(self, line: bytes) -> None:
        with contextlib.suppress(OSError):  # a closed log must never stop the server
            os.write(self.fd, line + b"\n")

    debug = info = warning = error = critical = exception = msg


class _SyslogWriter:
    """A structlog logger for daemon mode: one syslog(3) message per event."""

    def _at(priority: int):  # type: ignore[misc]
        def write(self: _SyslogWriter, line: bytes) -> None:
            syslog.syslog(priority, line.decode("utf-8", "backslashreplace"))

        return write

    debug = _at(syslog.LOG_DEBUG)
    info = msg = _at(syslog.LOG_INFO)
    warning = _at(syslog.LOG_WARNING)
    error = exception = _at(syslog.LOG_ERR)
    critical = _at(syslog.LOG_CRIT)
    del _at


_writer: Any = _FdWriter(2)


def configure(
    fmt: str = "json", level: str = "info", *, to_syslog: bool = False, fd: int = 2
) -> None:
    """Set up structlog for this process (again in each worker after the fork).

    Lines go to `fd` (stderr by default, or a log file), or to syslog.
    """
    global _writer
    if to_syslog:
        # Connect now (LOG_NDELAY): once chrooted, /dev/log is out of reach.
        syslog.openlog("proxyd", syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_DAEMON)
        _writer = _SyslogWriter()
    else:
        _writer = _FdWriter(fd)
    render = _render_console if fmt == "console" else _serialize
    processors: list[Any] = [structlog.processors.add_log_level]
    if not to_syslog:  # syslog stamps its own time
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [
        structlog.processors.format_exc_info,
        lambda _logger, _name, event: _fit(event, render),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *args: _writer,
        cache_logger_on_first_use=False,
    )


def uses_syslog() -> bool:
    return isinstance(_writer, _SyslogWriter)


def current_fd() -> int:
    """The descriptor lines are written to (2 for stderr, or the log file's)."""
    return _writer.fd if isinstance(_writer, _FdWriter) else 2


def open_file(path: str) -> int:
    """Open (or create, mode 0640) the log file for appending: one write per line stays
    atomic. At start and on every SIGUSR1 reopen.

    Root opens it, so through listener.open_file: its directory walked without
    following a symlink another user could have placed, the file itself opened with
    O_NOFOLLOW (and O_NONBLOCK: a FIFO put there never blocks the master). It must be
    a regular file with one name (not a hard link another user made to some file).
    Returns the descriptor; raises OSError (ELOOP, EINVAL for anything else).
    """
    from proxyd import listener  # not at the top: listener imports config, which imports log

    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY | os.O_NONBLOCK
    fd = listener.open_file(path, flags, 0o640)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file with a single name")
    return fd


def get(**context: Any) -> Any:
    """A logger with `context` bound to every event, and this process's pid."""
    return structlog.get_logger().bind(pid=os.getpid(), **context)


# --- the audit event ------------------------------------------------------------------


def printable(value: bytes) -> str:
    """A guest path (bytes) as a str for a log field: UTF-8 decoded, a byte that is
    not UTF-8 as a surrogateescape code point. Every string a line holds is escaped
    when the line is written (escape), so this keeps the bytes exactly."""
    return value.decode("utf-8", "surrogateescape")


def result_name(err: int) -> str:
    return "ok" if err == 0 else errno.errorcode.get(err, str(err))


# Composite flags first (O_SYNC holds O_DSYNC, O_TMPFILE holds O_DIRECTORY).
_OPEN_FLAG_NAMES = (
    "O_TMPFILE",
    "O_SYNC",
    "O_CREAT",
    "O_EXCL",
    "O_NOCTTY",
    "O_TRUNC",
    "O_APPEND",
    "O_NONBLOCK",
    "O_DSYNC",
    "O_DIRECT",
    "O_DIRECTORY",
    "O_NOFOLLOW",
    "O_NOATIME",
    "O_CLOEXEC",
    "O_PATH",
)
_OPEN_FLAGS = [(getattr(os, name), name) for name in _OPEN_FLAG_NAMES]
_OPEN_FLAGS.append((os.O_LARGEFILE or 0o100000, "O_LARGEFILE"))  # the kernel's, as QEMU sends it


def open_flags(flags: int) -> str:
    """Symbolic open flags, e.g. "O_WRONLY|O_CREAT|O_TRUNC"."""
    names = [("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[flags & os.O_ACCMODE]]
    rest = flags & ~os.O_ACCMODE
    for bit, name in _OPEN_FLAGS:
        if bit and rest & bit == bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return "|".join(names)
