"""`proxyd audit`: query proxyd's JSON log lines (audit "op" events and lifecycle events).

Reads the current log and supervisord's rotated parts (plain or gzip, told apart by the
gzip magic bytes, not by the name), or stdin, one line at a time: any size streams
through in constant memory. Inputs are read oldest first (ordered by their first
timestamp), so a shell glob over the rotated parts reads in time order.

Lines that are not proxyd JSON events (supervisord's own lines, garbage, the console
key=value format) are skipped and counted; a cut last line (a file still being written)
is skipped silently.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import io
import itertools
import json
import os
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from proxyd.protocol import REQUESTS

PROG = "proxyd audit"
OPS = tuple(sorted(request.name for request in REQUESTS.values()))
# proxyd.log.LEVELS, lowest first (not imported from there: that would load structlog).
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("table", "json", "summary")

_RANK = {name: rank for rank, name in enumerate(LEVELS)}
_ERRNO_NAMES = frozenset(name for name in dir(errno) if name.startswith("E"))
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_LINE = 1 << 20  # longer "lines" are not proxyd's: skipped without holding them
_PROBE_BYTES = 1 << 20  # how far into an input to look for its first timestamp
_RELATIVE = re.compile(r"(\d+)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SLASHES = re.compile("/{2,}")
# The master's lines for a request whose worker died before writing its op event; where
# the audit level logs that request they carry its fields, path included (events.md).
_CUT_SHORT_EVENTS = ("crash recovery", "connection closed after a crash: reply state unknown")
_PATH_WIDTH = 48  # per path in the table; longer ones lose their middle
_TABLE_AHEAD = 1000  # rows read before the column widths are fixed (they only grow after)

Event = dict[str, Any]


class _UsageError(Exception):
    pass


class _InputError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage dump
        raise _UsageError(message)


# --- argument types ----------------------------------------------------------------------


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC, as the log is) or "30s"/"15m"/"2h"/"1d" ago."""
    try:
        if match := _RELATIVE.fullmatch(text.strip()):
            ago = timedelta(seconds=int(match[1]) * _SECONDS[match[2]])
            return (now or datetime.now(UTC)) - ago
        t = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time or a duration like 30s, 15m, 2h, 1d"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _op(text: str) -> str:
    if text.lower() not in OPS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(OPS)}")
    return text.lower()


def _result(text: str) -> str:
    if text.lower() == "ok":
        return "ok"
    # proxyd logs an errno name, or the number when Python knows no name for it
    if text.upper() in _ERRNO_NAMES or (text.isascii() and text.isdigit()):
        return text.upper()
    raise argparse.ArgumentTypeError(f"{text!r} is not ok or an errno name like ENOENT")


def _parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Query proxyd's JSON log: plain or gzip-compressed files (supervisord's "
        "rotated parts too), read oldest first, or stdin. Different filters must all match; "
        "a filter given several times matches any of its values.",
        epilog="TIME is ISO 8601 (2026-11-27T11:30:00Z; without an offset it is UTC) or a "
        "duration before now (30s, 15m, 2h, 1d). --since is inclusive, --until exclusive. "
        "LEVEL is debug, info, warning, error or critical. In --path, // counts as /. "
        "--op and --path also match the master's crash recovery line that names a request "
        "its worker died executing (it may or may not have happened: no op event says). "
        "Exit status: 0 when it ran (matches or not), 1 when an input cannot be read, "
        "2 for bad arguments.",
    )
    add = parser.add_argument
    add("files", nargs="*", metavar="FILE", help="log files, plain or gzip; - (or none) for stdin")
    add("--since", type=parse_time, metavar="TIME", help="events at or after TIME")
    add("--until", type=parse_time, metavar="TIME", help="events before TIME")
    add("--export", action="append", metavar="NAME", help="events of export NAME")
    add("--op", action="append", type=_op, help="op events of request OP (mkdir, ...)")
    add("--result", action="append", type=_result, help="op events with RESULT (ok, ENOENT, ...)")
    add("--errors", action="store_true", help="op events whose result is not ok")
    add("--path", metavar="PREFIX", help="op events whose path or path2 starts with PREFIX")
    add("--peer-uid", type=int, metavar="UID", help="events of peer uid UID")
    add("--conn", type=int, metavar="ID", help="events of connection ID")
    add("--level", type=str.lower, choices=LEVELS, metavar="LEVEL", help="LEVEL or higher")
    add("--event", action="append", metavar="NAME", help='events named NAME ("op", "start", ...)')
    add("--format", choices=FORMATS, default="table", help="table (default), json, summary")
    return parser


# --- reading -------------------------------------------------------------------------------


def parse(line: bytes) -> tuple[Event, datetime] | None:
    """The proxyd event on this line and its time, or None for anything else."""
    if line.lstrip()[:1] != b"{":  # supervisord's lines, garbage: cheaper than json
        return None
    try:
        event = json.loads(line.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return None
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        t = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return event, (t if t.tzinfo else t.replace(tzinfo=UTC))


def _lines(stream: IO[bytes]) -> Iterator[tuple[bytes | None, bool]]:
    """(line, ends with a newline); None for an overlong line, skipped unread."""
    while line := stream.readline(_MAX_LINE):
        if line.endswith(b"\n"):
            yield line, True
        elif len(line) < _MAX_LINE:
            yield line, False  # the end of the input: a line possibly cut mid-write
        else:
            while (more := stream.readline(_MAX_LINE)) and not more.endswith(b"\n"):
                pass
            yield None, True


class _Input:
    """One input, with its first lines read ahead to find its first timestamp."""

    def __init__(self, name: str, raw: IO[bytes], owned: bool) -> None:
        self.name, self._raw, self._owned = name, raw, owned
        self._stream: IO[bytes] = raw
        if raw.peek(2)[:2] == _GZIP_MAGIC:  # type: ignore[attr-defined]
            self._stream = gzip.GzipFile(fileobj=raw, mode="rb")
        self._rest = _lines(self._stream)
        self._ahead: list[tuple[bytes | None, bool]] = []
        self.first = self._probe()

    def _probe(self) -> datetime | None:
        size = 0
        for line, complete in self._rest:
            self._ahead.append((line, complete))
            if line is not None:
                if found := parse(line):
                    return found[1]
                size += len(line)
            if size > _PROBE_BYTES:
                break
        return None

    def lines(self) -> Iterator[tuple[bytes | None, bool]]:
        return itertools.chain(self._ahead, self._rest)

    def close(self) -> None:
        if self._stream is not self._raw:
            self._stream.close()  # a GzipFile leaves the file it wraps open
        if self._owned:
            self._raw.close()


def _reason(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__


_READ_ERRORS = (OSError, EOFError, zlib.error)  # EOFError, zlib.error: a damaged gzip part


def _open_inputs(names: list[str]) -> list[_Input]:
    """Every input opened (so a missing one is reported before any output), oldest first."""
    inputs: list[_Input] = []
    label = ""
    try:
        for name in dict.fromkeys(names or ["-"]):  # each once: stdin cannot be read twice
            if name == "-":
                label = "<stdin>"
                stdin = sys.stdin.buffer
                if not hasattr(stdin, "peek"):
                    stdin = io.BufferedReader(stdin)  # type: ignore[arg-type]
                inputs.append(_Input(label, stdin, owned=False))
                continue
            label = name
            raw = open(name, "rb")  # noqa: SIM115 (closed by _Input.close)
            try:
                inputs.append(_Input(name, raw, owned=True))
            except BaseException:
                raw.close()
                raise
    except _READ_ERRORS as e:
        for done in inputs:
            done.close()
        raise _InputError(f"cannot read {label}: {_reason(e)}") from None
    # stable: inputs with no timestamp in their first MiB keep their place, at the end
    inputs.sort(key=lambda i: (i.first is None, i.first or datetime.min.replace(tzinfo=UTC)))
    return inputs


@dataclass
class _Counts:
    skipped: int = 0  # unparseable lines
    failed: bool = False  # an input could not be read to its end


def _events(inputs: Iterable[_Input], counts: _Counts) -> Iterator[tuple[Event, datetime, bytes]]:
    """Every proxyd event of every input: (event, time, its line as read)."""
    for source in inputs:
        try:
            for line, complete in source.lines():
                found = parse(line) if line is not None else None
                if found is None:
                    counts.skipped += complete  # a cut last line is not worth a mention
                    continue
                yield found[0], found[1], line if complete else line + b"\n"  # type: ignore[operator]
        except _READ_ERRORS as e:
            print(f"{PROG}: error: cannot read {source.name}: {_reason(e)}", file=sys.stderr)
            counts.failed = True


# --- filtering -------------------------------------------------------------------------------


class Query:
    """The filters of one invocation; an event must pass them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.since: datetime | None = args.since
        self.until: datetime | None = args.until
        # lists, not sets: a value in a log line may be unhashable (a list, an object)
        self.exports: list[str] = args.export or []
        self.ops: list[str] = args.op or []
        self.results: list[str] = args.result or []
        self.errors: bool = args.errors
        # QEMU sends "//home/u" for /home/u: runs of slashes compare as one
        self.path: str | None = None if args.path is None else _SLASHES.sub("/", args.path)
        self.peer_uid: int | None = args.peer_uid
        self.conn: int | None = args.conn
        self.level: int | None = None if args.level is None else _RANK[args.level]
        self.events: list[str] = args.event or []
        self.ops_only = bool(self.ops) or self.path is not None

    def matches(self, event: Event, t: datetime) -> bool:
        if (self.since and t < self.since) or (self.until and t >= self.until):
            return False
        if self.ops_only and not _names_request(event):
            return False
        if self.events and event["event"] not in self.events:
            return False
        if self.exports and event.get("export") not in self.exports:
            return False
        if self.ops and event.get("op") not in self.ops:
            return False
        result = event.get("result")
        if self.results and result not in self.results:
            return False
        if self.errors and (result is None or result == "ok"):
            return False
        if self.path is not None and not _has_path(event, self.path):
            return False
        if self.peer_uid is not None and not _same_int(event.get("peer_uid"), self.peer_uid):
            return False
        if self.conn is not None and not _same_int(event.get("conn"), self.conn):
            return False
        if self.level is not None:
            level = event.get("level")
            if not isinstance(level, str) or _RANK.get(level, -1) < self.level:
                return False
        return True


def _names_request(event: Event) -> bool:
    """An op event, or the master's line for a request cut short that names it: the
    request may or may not have happened, and no op event says so."""
    return event["event"] == "op" or (event["event"] in _CUT_SHORT_EVENTS and "path" in event)


def _has_path(event: Event, prefix: str) -> bool:
    return any(
        isinstance(value, str) and _SLASHES.sub("/", value).startswith(prefix)
        for value in (event.get("path"), event.get("path2"))
    )


def _same_int(value: Any, wanted: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == wanted


# --- output --------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A table or summary cell: "-" when empty, anything a terminal would act on escaped."""
    if value is None or value == "":
        return "-"
    if type(value) is int:  # the common case (conn, uid, dur_us), and json.dumps is slow
        return str(value)
    return shown(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def shown(text: str) -> str:
    r"""`text` with every character that is not printable escaped as proxyd's log
    escapes it (proxyd.log.escape): \xNN for a C0 control, DEL or a byte that was not
    UTF-8, \uXXXX or \UXXXXXXXX for any other (C1 controls, bidi and other format
    characters, line and paragraph separators). Backslashes are left as they are:
    proxyd's own lines hold only printable characters, with their backslashes escaped
    already; this is for lines from elsewhere (older versions, other programs)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _path_cell(value: Any) -> str:
    """One path for the table: shortened to _PATH_WIDTH, and in double quotes (a quote
    in it as \\") when it holds a space or a quote or is "-", so that no name can pass
    for two paths ("a -> b"), for another column or for no path."""
    text = shorten(_text(value), _PATH_WIDTH)
    if text == "-" or any(c.isspace() or c == '"' for c in text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def shorten(text: str, width: int) -> str:
    """`text` cut to `width` characters by replacing its middle with "…"."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2  # the tail (the file name) keeps the extra character
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _when(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


HEADER = ("TIME", "LEVEL", "EXPORT", "CONN", "PEER_UID", "EVENT", "PATH", "RESULT", "DUR_US")
_RIGHT = (False, False, False, True, True, False, False, False, True)


def table_row(event: Event, t: datetime) -> list[str]:
    is_op = event["event"] == "op"
    path = "-" if event.get("path") in (None, "") else _path_cell(event["path"])
    if event.get("path2") not in (None, ""):
        path += " -> " + _path_cell(event["path2"])
    return [
        _when(t),
        _text(event.get("level")),
        _text(event.get("export")),
        _text(event.get("conn")),
        _text(event.get("peer_uid")),
        _text(event.get("op") if is_op else event["event"]),
        path,
        _text(event.get("result", event.get("outcome"))),  # a recovery's outcome
        _text(event.get("dur_us")),
    ]


class _Table:
    """Aligned columns without holding every row: widths come from the first rows, then
    only grow (a later, wider cell shifts the rows after it)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._ahead: list[list[str]] | None = [list(HEADER)]
        self._widths = [0] * len(HEADER)

    def add(self, row: list[str]) -> None:
        if self._ahead is None:
            self._write(row)
            return
        self._ahead.append(row)
        if len(self._ahead) > _TABLE_AHEAD:
            self._flush()

    def close(self) -> None:
        if self._ahead is not None and len(self._ahead) > 1:  # no header over no rows
            self._flush()

    def _flush(self) -> None:
        rows, self._ahead = self._ahead or [], None
        for row in rows:
            self._widths = [max(w, len(cell)) for w, cell in zip(self._widths, row, strict=True)]
        for row in rows:
            self._write(row)

    def _write(self, row: list[str]) -> None:
        self._widths = [max(w, len(cell)) for w, cell in zip(self._widths, row, strict=True)]
        cells = [
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, right in zip(row, self._widths, _RIGHT, strict=True)
        ]
        self._out.write("  ".join(cells).rstrip() + "\n")


@dataclass
class _Conn:
    export: str
    first: datetime
    peer_uid: Any = None
    requests: int = 0
    errors: int = 0


class Summary:
    """Counts of the matching events: per export op x result, other events, connections."""

    def __init__(self) -> None:
        self.matched = 0
        self.ops: dict[str, dict[str, Counter[str]]] = {}  # export -> op -> result -> n
        self.others: dict[str, Counter[str]] = {}  # export -> event -> n
        # by (daemon run, conn): ids are unique for the life of a master, then start at 1 again
        self.conns: dict[tuple[int, str], _Conn] = {}
        self._run = 0

    def see(self, event: Event) -> None:
        """Every event, matching or not, to tell daemon runs apart."""
        if event["event"] == "start" and event.get("role") == "master":
            self._run += 1

    def add(self, event: Event, t: datetime) -> None:
        self.matched += 1
        export = _text(event.get("export"))
        is_op = event["event"] == "op"
        if is_op:
            result = _text(event.get("result"))
            per_op = self.ops.setdefault(export, {})
            per_op.setdefault(_text(event.get("op")), Counter())[result] += 1
        else:
            self.others.setdefault(export, Counter())[_text(event["event"])] += 1
        if event.get("conn") is None:
            return
        conn = self.conns.setdefault((self._run, _text(event["conn"])), _Conn(export, t))
        if event.get("peer_uid") is not None:
            conn.peer_uid = event["peer_uid"]
        if is_op:
            conn.requests += 1
            conn.errors += event.get("result") != "ok"

    def write(self, out: IO[str]) -> None:
        n_ops = sum(sum(c.values()) for per_op in self.ops.values() for c in per_op.values())
        out.write(
            f"{self.matched} matching lines, {n_ops} op events, {len(self.conns)} connections\n"
        )
        # exports by name; events without one ("start", "stop") last
        for export in sorted(self.ops.keys() | self.others.keys(), key=lambda e: (e == "-", e)):
            out.write("\n")
            self._write_export(out, export)
        if self.conns:
            out.write("\nconnections\n")
            rows = [["export", "conn", "first seen", "peer_uid", "requests", "errors"]]
            for (_, conn_id), conn in self.conns.items():
                counts = [str(conn.requests), str(conn.errors)]
                rows.append(
                    [conn.export, conn_id, _when(conn.first), _text(conn.peer_uid), *counts]
                )
            _write_grid(out, rows, right_from=3)

    def _write_export(self, out: IO[str], export: str) -> None:
        per_op = self.ops.get(export, {})
        totals: Counter[str] = Counter()
        for results in per_op.values():
            totals.update(results)
        errors = sum(n for result, n in totals.items() if result != "ok")
        name = "(no export)" if export == "-" else f"export {export}"
        out.write(f"{name}: {totals.total()} op events, {errors} errors\n")
        if per_op:
            # ok first, then the most frequent errors
            columns = sorted(totals, key=lambda r: (r != "ok", -totals[r], r))
            rows = [["op", *columns, "total"]]
            for op in sorted(per_op):
                counts = per_op[op]
                rows.append([op, *(str(counts[r]) for r in columns), str(counts.total())])
            rows.append(["total", *(str(totals[r]) for r in columns), str(totals.total())])
            _write_grid(out, rows, right_from=1)
        if others := self.others.get(export):
            listed = ", ".join(f"{name} {n}" for name, n in others.most_common())
            out.write(f"  other events: {listed}\n")


def _write_grid(out: IO[str], rows: list[list[str]], right_from: int) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(w) if i >= right_from else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.write("  " + "  ".join(cells).rstrip() + "\n")


# --- main ----------------------------------------------------------------------------------


_SAFE_LINE = re.compile(rb"[ -~]*\n")  # printable ASCII: nothing a terminal acts on


def json_line(event: Event, line: bytes) -> bytes:
    """The line as read when every character of it is printable (proxyd's own lines
    always are); otherwise the same JSON value written again with JSON \\u escapes
    for each character that is not printable (a byte that was not UTF-8 becomes
    \\udcNN, as Python's surrogateescape reads it)."""
    if _SAFE_LINE.fullmatch(line):
        return line
    with contextlib.suppress(UnicodeDecodeError):
        text = line.decode()
        if text[:-1].isprintable():
            return line
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return "".join(c if c.isprintable() else _json_escaped(c) for c in text).encode() + b"\n"


def _json_escaped(c: str) -> str:
    code = ord(c)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # UTF-16 surrogate pair, as JSON spells characters beyond the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _run(fmt: str, query: Query, inputs: list[_Input]) -> int:
    counts = _Counts()
    events = _events(inputs, counts)
    if fmt == "json":
        out = getattr(sys.stdout, "buffer", None)
        for event, t, line in events:
            if query.matches(event, t):
                line = json_line(event, line)
                if out is not None:
                    out.write(line)
                else:  # a text-only stdout (main() called with a StringIO)
                    sys.stdout.write(line.decode("utf-8", "surrogateescape"))
        if out is not None:
            out.flush()
    elif fmt == "table":
        table = _Table(sys.stdout)
        for event, t, _ in events:
            if query.matches(event, t):
                table.add(table_row(event, t))
        table.close()
    else:
        summary = Summary()
        for event, t, _ in events:
            summary.see(event)
            if query.matches(event, t):
                summary.add(event, t)
        summary.write(sys.stdout)
        print(f"{PROG}: {counts.skipped} unparseable lines skipped", file=sys.stderr)
    sys.stdout.flush()
    return 1 if counts.failed else 0


def main(argv: list[str]) -> int:
    """`proxyd audit [FILE...] [filters] [--format ...]`; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    if not args.files and (sys.stdin is None or sys.stdin.isatty()):
        # reading a terminal is never what was meant, and would just wait
        print(f"{PROG}: error: no input: name log files or pipe a log in", file=sys.stderr)
        return 2
    try:
        inputs = _open_inputs(args.files)
    except _InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        if hasattr(sys.stdout, "reconfigure"):  # a non-UTF-8 terminal gets escapes, no crash
            sys.stdout.reconfigure(errors="backslashreplace")
        return _run(args.format, Query(args), inputs)
    except BrokenPipeError:  # `proxyd audit ... | head`: the reader has all it wants
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for source in inputs:
            source.close()


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor behind stdout
        pass
