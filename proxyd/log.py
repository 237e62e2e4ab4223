# cython: binding=True, annotation_typing=False
# (Compiled by setup.py. binding: the functions _written makes are _Writer's methods;
# no annotation typing: a str or bytes subclass is logged as interpreted, not refused.)
"""Logging for every proxyd process: structlog, one event per line, JSON by default.

* Each line is written with one write(2) and is never longer than PIPE_BUF, so lines
  from the master and its workers sharing stderr (a pipe to supervisord) or a log
  file (O_APPEND) never interleave. An event that would be longer has its longest
  strings cut, and says which in its `truncated` field.
* Levels below the configured one cost one method call (structlog's filtering
  bound logger).
* Destinations (proxyd/sink.py, which never makes a process wait for them): stderr
  (default), a file (`log_file`; reopened on SIGUSR1, workers get the new descriptor
  from the master since they cannot open it from their chroot), or syslog when
  daemonized without a file (a datagram socket to /dev/log, connected before the
  chroot; lines framed as glibc's syslog(3) frames them).

The audit event (`event="op"`) is built here too, so that its schema lives in one
place; docs/events.md documents every event and field.
"""

from __future__ import annotations

import datetime
import errno
import functools
import json
import logging
import math
import os
import select
import stat
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from proxyd import sink

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "console")
ON_BLOCKED = ("drop", "wait")  # on_log_blocked: what a line the log does not take costs
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


# orjson writes only JSON's own types itself; anything else raises, and goes the long way.
_ORJSON_PLAIN = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _serialize(event: dict[str, Any]) -> bytes:
    # Rendered first, cleaned only when the line shows it may need it: a line of
    # printable ASCII with no backslash (JSON writes one for every quote and control
    # character) holds no string escape() would change. Most lines, audit lines above
    # all, are that; cleaning them field by field cost as much as rendering them.
    try:
        line = orjson.dumps(event, option=_ORJSON_PLAIN)
        if _plain(line):
            return line
    except TypeError:  # not JSON's own types: _clean writes them as strings
        pass
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


# syslog priorities (RFC 3164): facility daemon, and a severity per level.
_LOG_DAEMON = 3 << 3
_SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _syslog_line(severity: int, line: bytes) -> bytes:
    """`line` as a syslog message, as glibc's syslog(3) frames it for /dev/log:
    `<PRI>Mmm dd hh:mm:ss proxyd[PID]: ` and the line (RFC 3164, local time)."""
    t = time.localtime()  # localtime_r: the zone read at start, no file read in the chroot
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return f"<{_LOG_DAEMON | severity}>{stamp} proxyd[{os.getpid()}]: ".encode() + line


def _framed(level: str) -> Callable[[Any, bytes], bytes]:
    """A structlog logger method returning the line as this process's sink takes it."""
    severity = _SEVERITY[level]

    def frame(self: Any, line: bytes) -> bytes:
        return _syslog_line(severity, line) if _sink.syslog else line + b"\n"

    return frame


def _written(level: str) -> Callable[[Any, bytes], None]:
    """A structlog logger method writing the line to this process's sink."""
    severity = _SEVERITY[level]

    def write(self: Any, line: bytes) -> None:
        out = _sink  # looked up per line: a reopened log file may have replaced it
        out.write(_syslog_line(severity, line) if out.syslog else line + b"\n")

    return write


class _Writer:
    """structlog's logger: each event is one line to this process's sink (sink.py),
    which never waits for the destination."""

    debug = _written("debug")
    info = msg = _written("info")
    warning = _written("warning")
    error = exception = _written("error")
    critical = _written("critical")


class _Framer:
    """A logger whose methods return the line instead of writing it: the sink's own
    `log lines dropped` warning is rendered with it, then written by the sink."""

    warning = _framed("warning")


_WRITER = _Writer()
_sink = sink.Sink(2)  # until configure(): stderr as it is
_identity: dict[str, Any] = {"role": "master"}  # the fields of the sink's own warning
_processors: list[Any] = []
_wrapper: Any = None
_min_level = logging.INFO  # the configured level, as a number
_json = True  # the configured format is JSON (op lines may take the short way)
# A new process (a worker) starts with nothing held and nothing counted.
os.register_at_fork(after_in_child=lambda: _sink.forked())


def _timestamp(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    """The `timestamp` field (as _utc writes it), but for syslog, which stamps its own
    time."""
    if not _sink.syslog:
        event["timestamp"] = _now_utc()
    return event


# The last second formatted: its number, its date and time as the `timestamp` field
# writes them, and an op line's tail up to the fraction of that second (_line).
_OP_TAIL = b'"event":"op","level":"info","timestamp":"'
_second: tuple[int, str, bytes] = (-1, "", b"")


def _tick(seconds: int) -> tuple[int, str, bytes]:
    """_second for `seconds` since the epoch: formatted once per second (a busy
    worker writes thousands of lines in one)."""
    global _second
    if seconds != _second[0]:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text, _OP_TAIL + text.encode() + b".")
    return _second


def _now_utc() -> str:
    """Now as the `timestamp` field writes it."""
    us = time.time_ns() // 1000
    return f"{_tick(us // 1_000_000)[1]}.{us % 1_000_000:06d}Z"


def _utc(t: float) -> str:
    """`t` (time.time()) as the `timestamp` field writes it."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _report_dropped(lines: int, since: float, error: int) -> bytes | None:
    """The `log lines dropped` line (None when the level leaves warnings out)."""
    logger = structlog.wrap_logger(_Framer(), processors=_processors, wrapper_class=_wrapper)
    line: bytes | None = logger.warning(
        "log lines dropped",
        pid=os.getpid(),
        **_identity,
        lines=lines,
        since=_utc(since),
        error=errno.errorcode.get(error, str(error)),
    )
    return line


def configure(
    fmt: str = "json",
    level: str = "info",
    *,
    destination: sink.Sink | None = None,
    on_blocked: str = "drop",
    identity: dict[str, Any] | None = None,
) -> None:
    """Set up structlog for this process (again on a reload, and in each worker).

    `destination`: where lines go from now on (sink.py: stderr, a log file or
    syslog); None keeps the current one, with what it holds and has counted.
    `on_blocked`: "drop" (lines the destination does not take are held, then dropped
    and counted) or "wait" (the process waits for it). `identity`: the fields (role,
    export, worker) of the sink's own `log lines dropped` warning; None keeps them.
    """
    global _sink, _identity, _processors, _wrapper, _min_level, _json, _op_context
    if destination is not None:
        _sink = destination
    if identity is not None:
        _identity = identity
    _sink.wait = on_blocked == "wait"
    _sink.report = _report_dropped
    render = _render_console if fmt == "console" else _serialize
    _json = fmt == "json"
    _op_context = _NO_CONTEXT
    _processors = [
        structlog.processors.add_log_level,
        _timestamp,
        structlog.processors.format_exc_info,
        lambda _logger, _name, event: _fit(event, render),
    ]
    _min_level = getattr(logging, level.upper())
    _wrapper = structlog.make_filtering_bound_logger(_min_level)
    structlog.configure(
        processors=_processors,
        wrapper_class=_wrapper,
        logger_factory=lambda *args: _WRITER,
        cache_logger_on_first_use=False,
    )


def flush() -> bool:
    """Try the lines held for the destination, never waiting (the master's tick, an
    idle worker). True when nothing is held."""
    return _sink.flush()


def flush_until_readable(fd: int) -> None:
    """An idle worker waiting for `fd` (its channel): lines held for the log are tried
    again meanwhile, whenever the log may take them."""
    _sink.flush_until_readable(fd)


def pending() -> int:
    """Lines held for the destination."""
    return _sink.pending()


def dropped() -> int:
    """Lines this process dropped since it started."""
    return _sink.dropped


def count_in(fields: memoryview, dropped_index: int, pending_index: int) -> None:
    """Keep this process's dropped and held line counts in `fields` (a worker's
    journal, which the master reads for `proxyd status`)."""
    _sink.count_in(fields, dropped_index, pending_index)


def relay_to(relay: Any) -> None:
    """In a worker: once its log is gone for good (a pipe or stream whose reader closed
    it: the master died and the supervisor closed that master's log), put its lines in
    `relay` (its journal's slot.Relay), for the master that adopts it to write."""
    _sink.relay = relay


def relayed(line: bytes) -> None:
    """Write a line a worker put in its relay (already rendered) to this process's log."""
    line = line.rstrip(b"\n")
    _sink.write(_syslog_line(_SEVERITY["info"], line) if _sink.syslog else line + b"\n")


def take_over(fd: int) -> None:
    """Write to this reopened log file from now on (SIGUSR1, or a reload that set
    log_file); held lines and counts go with it. Logging to a file already: the
    file is swapped under the same descriptor number (dup2), so that workers forked
    later inherit it. Closes `fd` or keeps it."""
    global _sink
    if _sink.regular and _sink.owned:
        os.dup2(fd, _sink.fd)
        os.close(fd)
        _sink.replaced()
        return
    new = sink.for_file(fd)
    new.adopt(_sink)
    old, _sink = _sink, new
    old.close(0)


def close(timeout: float) -> None:
    """At exit: try the held lines for up to `timeout` seconds."""
    _sink.close(timeout)


def current_fd() -> int:
    """The descriptor lines are written to (a worker keeps it through its sandbox)."""
    return _sink.fd


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


def audit_written() -> bool:
    """Whether the configured level lets `op` events (info) through: else a worker
    need not build them."""
    return _min_level <= logging.INFO


def op(logger: Any, fields: dict[str, Any], refused: str | None = None) -> None:
    """Write the audit event `op` with `fields`, in `logger`'s context (docs/events.md):
    at info, or at warning with `refused` (what kind of refusal).

    The line is the one `logger.info("op", **fields)` writes, through the same
    processors, without structlog's dispatch around them: this event is written once
    per request, and the dispatch cost 0.8 µs of its 5.5 (in-process, to a file).
    """
    level, number = ("warning", logging.WARNING) if refused else ("info", logging.INFO)
    if number < _min_level:
        return
    context = structlog.get_context(logger)
    if not refused and _json and not _sink.syslog:
        line = _op_line(context, fields)
        if line is not None:
            _sink.write(line)
            return
    event = context.copy()
    if refused:
        event["refused"] = refused
    event.update(fields)
    event["event"] = "op"
    for processor in _processors:
        event = processor(_WRITER, level, event)
    getattr(_WRITER, level)(event)


# The context whose JSON _line last rendered: (context, its members as JSON or None
# where the long way must clean them, the keys a field must not have: the context's and
# those the processors add). A bound context is never changed (bind makes a new one),
# so the same object renders the same members; holding it keeps its id from reuse.
_OWN_KEYS = frozenset(("event", "level", "timestamp", "exc_info", "refused"))
_NO_CONTEXT: tuple[Any, bytes | None, frozenset[str]] = (None, None, _OWN_KEYS)
_op_context = _NO_CONTEXT


def op_json(logger: Any, keys: frozenset[str], rendered: bytes | bytearray) -> bool:
    """Write the info `op` event whose fields (named `keys`) are already JSON members
    as orjson writes them, nothing in them to escape: b'"op":"chmod","path":"/a"'
    (server.audit_json). False where it must go as a dict through log.op instead: a
    console format, syslog, a context that needs escaping or holds one of `keys`, a
    line to cut. True when written, or when the level writes no info event."""
    if _min_level > logging.INFO:
        return True
    if not _json or _sink.syslog:
        return False
    line = _line(structlog.get_context(logger), keys, rendered)
    if line is None:
        return False
    _sink.write(line)
    return True


def _op_line(context: dict[str, Any], fields: dict[str, Any]) -> bytes | None:
    """The info `op` line (newline included) exactly as the processors would write it
    in JSON, without them: the fields by orjson, then as _line. None where the long
    way must run: a field that needs escaping or is not JSON's own type, or as _line.

    An audit line at audit = mutations comes after requests that wrote none, with the
    processors' code out of the caches: this way touches less (tests/test_events.py
    checks that both ways write the same bytes)."""
    try:
        rendered = orjson.dumps(fields, option=_ORJSON_PLAIN)[1:-1]
    except TypeError:
        return None
    if not _plain(rendered):
        return None
    return _line(context, fields.keys(), rendered)


def _line(context: dict[str, Any], keys: Any, rendered: bytes | bytearray) -> bytes | None:
    """The info `op` line of the fields named `keys`, `rendered` as JSON members, in
    `context`: the context's members rendered once per context, then the fields, then
    `event`, `level` and `timestamp` in the processors' order. None where the long way
    must run: a context that needs escaping or is not JSON's own type, a field named
    as a context member or a processor's own key, a line to cut."""
    global _op_context
    if _op_context[0] is not context:
        try:
            members = orjson.dumps(context, option=_ORJSON_PLAIN)[1:-1]
        except TypeError:
            members = None
        if members is not None and not (_plain(members) and _OWN_KEYS.isdisjoint(context)):
            members = None
        _op_context = (context, members, _OWN_KEYS.union(context))
    _, members, taken = _op_context
    if members is None or not taken.isdisjoint(keys):
        return None
    us = time.time_ns() // 1000
    line = b"".join(
        (
            b"{",
            members,
            b"," if members and rendered else b"",
            rendered,
            b"," if members or rendered else b"",
            _tick(us // 1_000_000)[2],
            b'%06dZ"}\n' % (us % 1_000_000),
        )
    )
    return line if len(line) <= LINE_MAX else None  # LINE_MAX with its newline: cut


def _plain(rendered: bytes) -> bool:
    """JSON text holding no string escape() would change (see _serialize)."""
    return rendered.isascii() and b"\\" not in rendered and b"\x7f" not in rendered


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


@functools.lru_cache(maxsize=256)  # a guest uses a few sets; naming one costs 0.6 µs
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
