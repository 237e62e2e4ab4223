"""Logs an auditor can trust: every event documented, exactly one audit event per
request at each audit level, lines that always parse and fit, log file reopening."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import unicodedata
from pathlib import Path

import orjson
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd import log, server, sink
from proxyd import protocol as p
from tests.daemon import Daemon, wait_until
from tests.proxyclient import CHECKOUT, OP_NAMES, ProxyClient, errno_of

DOCS = (CHECKOUT / "docs" / "events.md").read_text()
MUTATING = {
    "create",
    "mknod",
    "mkdir",
    "symlink",
    "link",
    "chmod",
    "chown",
    "truncate",
    "utime",
    "rename",
    "remove",
    "lsetxattr",
    "lremovexattr",
}
COMMON = {
    "pid",
    "role",
    "export",
    "worker",
    "conn",
    "peer_pid",
    "peer_uid",
    "peer_gid",
    "event",
    "level",
    "timestamp",
    "op",
    "path",
    "result",
    "dur_us",
}
EXTRA = {  # the documented fields of each op beyond the common ones
    "open": {"flags"},
    "create": {"flags", "mode", "uid", "gid"},
    "mknod": {"mode", "rdev", "uid", "gid"},
    "mkdir": {"mode", "uid", "gid"},
    "symlink": {"path2", "uid", "gid"},
    "link": {"path2"},
    "rename": {"path2"},
    "readlink": {"size"},
    "chmod": {"mode"},
    "chown": {"uid", "gid"},
    "truncate": {"length"},
    "utime": {"atime", "mtime"},
    "lgetxattr": {"name", "size"},
    "llistxattr": {"size"},
    "lsetxattr": {"name", "size", "xattr_flags"},
    "lremovexattr": {"name"},
}


def emitted_events() -> set[str]:
    names = set()
    for source in (CHECKOUT / "proxyd").glob("*.py"):
        text = source.read_text()
        pattern = r"\.(?:debug|info|warning|error|exception|critical)\(\s*\"([^\"]+)\""
        names.update(re.findall(pattern, text))
    return names


def test_every_emitted_event_is_documented() -> None:
    names = emitted_events()
    assert len(names) > 30  # the scan found the code's events
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOCS, re.MULTILINE))
    documented.add("op")  # has its own section
    assert "## The audit event: `op`" in DOCS
    assert names - documented == set(), "events missing from docs/events.md"
    assert documented - names - {"op"} <= {
        # fields tables also use the `| `name` |` form
        "timestamp",
        "level",
        "event",
        "pid",
        "role",
        "export",
        "worker",
        "conn",
        "peer_pid`, `peer_uid`, `peer_gid",
        "truncated",
        "op",
        "path",
        "path2",
        "uid`, `gid",
        "mode",
        "rdev",
        "flags",
        "length",
        "size",
        "name",
        "xattr_flags",
        "atime`, `mtime",
        "result",
        "dur_us",
        "refused",
        "malformed",
    }


class Served:
    """proxyd -f on a socketpair with a chosen audit level; its log lines parsed."""

    def __init__(self, export: Path, audit: str, log_level: str = "info") -> None:
        ours, theirs = socket.socketpair()
        self.log_path = export.parent / f"log-{audit}-{log_level}"
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "proxyd",
                    "-n",
                    "-p",
                    str(export),
                    "-f",
                    str(theirs.fileno()),
                    "--audit",
                    audit,
                    "--log-level",
                    log_level,
                ],
                cwd=CHECKOUT,
                pass_fds=[theirs.fileno()],
                stderr=log_file,
            )
        theirs.close()
        self.client = ProxyClient(ours)

    def finish(self) -> list[dict]:
        self.client.close()
        assert self.proc.wait(10) == 0
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines]  # every line parses


def one_of_each(c: ProxyClient, export: Path) -> None:
    (export / "f").write_text("data")
    r = c.open("/f", os.O_RDONLY)
    os.close(r.fd)
    r = c.open("/f", os.O_WRONLY | os.O_APPEND)  # OPEN for writing
    os.close(r.fd)
    r = c.create("/new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640, 1000, 1001)
    os.close(r.fd)
    c.mknod(0, 0, "/fifo", stat.S_IFIFO | 0o600, 0)
    c.mkdir(1000, 1000, "/d", 0o755)
    c.symlink(0, 0, "f", "/l")
    c.link("/f", "/hard")
    c.lstat("/f")
    c.readlink("/l", 100)
    c.statfs("/")
    c.chmod("/f", 0o600)
    c.chown("/f", 1, 2)
    c.truncate("/f", 2)
    c.utime("/f", 1, 2, 3, 4)
    c.rename("/hard", "/moved")
    c.remove("/moved")
    c.lsetxattr("/f", "user.k", b"v")
    c.lgetxattr(10, "/f", "user.k")
    c.llistxattr(0, "/f")
    c.lremovexattr("/f", "user.k")
    c.getversion("/f")
    assert errno_of(c.lstat(b"/\xff-missing")) == errno.ENOENT  # not UTF-8, failing


# The `op` events one_of_each() causes at audit = all, in order: each request's own fields
# with the values it sent (result "ok" unless given).
ONE_OF_EACH = [
    {"op": "open", "path": "/f", "flags": "O_RDONLY"},
    {"op": "open", "path": "/f", "flags": "O_WRONLY|O_APPEND"},
    {
        "op": "create",
        "path": "/new",
        "flags": "O_WRONLY|O_CREAT|O_EXCL",
        "mode": "0o640",
        "uid": 1000,
        "gid": 1001,
    },
    {"op": "mknod", "path": "/fifo", "mode": "0o10600", "rdev": 0, "uid": 0, "gid": 0},
    {"op": "mkdir", "path": "/d", "mode": "0o755", "uid": 1000, "gid": 1000},
    {"op": "symlink", "path": "/l", "path2": "f", "uid": 0, "gid": 0},
    {"op": "link", "path": "/f", "path2": "/hard"},
    {"op": "lstat", "path": "/f"},
    {"op": "readlink", "path": "/l", "size": 100},
    {"op": "statfs", "path": "/"},
    {"op": "chmod", "path": "/f", "mode": "0o600"},
    {"op": "chown", "path": "/f", "uid": 1, "gid": 2},
    {"op": "truncate", "path": "/f", "length": 2},
    {"op": "utime", "path": "/f", "atime": [1, 2], "mtime": [3, 4]},
    {"op": "rename", "path": "/hard", "path2": "/moved"},
    {"op": "remove", "path": "/moved"},
    {"op": "lsetxattr", "path": "/f", "name": "user.k", "size": 1, "xattr_flags": 0},
    {"op": "lgetxattr", "path": "/f", "name": "user.k", "size": 10},
    {"op": "llistxattr", "path": "/f", "size": 0},
    {"op": "lremovexattr", "path": "/f", "name": "user.k"},
    {"op": "getversion", "path": "/f"},
    {"op": "lstat", "path": "/\\xff-missing", "result": "ENOENT"},
]


@pytest.mark.parametrize("audit", ["none", "mutations", "all"])
def test_audit_levels_log_exactly_the_documented_events(tmp_path: Path, audit: str) -> None:
    """Every field of every `op` event, with its value: the request's own fields as sent,
    who sent it (the peer: this process, uid 0), where (export, worker, connection)."""
    export = tmp_path / "export"
    export.mkdir()
    served = Served(export, audit)
    one_of_each(served.client, export)
    events = served.finish()
    ops = [e for e in events if e["event"] == "op"]
    if audit == "none":
        expected = []
    elif audit == "mutations":  # every change, and OPEN for writing
        expected = [
            e
            for e in ONE_OF_EACH
            if e["op"] in MUTATING or (e["op"] == "open" and e["flags"] != "O_RDONLY")
        ]
    else:
        expected = ONE_OF_EACH
    context = {
        "event": "op",
        "level": "info",
        "role": "worker",
        "export": "export",  # named after the directory, as with the reference's flags
        "worker": 0,
        "conn": 1,
        "peer_pid": os.getpid(),  # the socketpair's creator: SO_PEERCRED
        "peer_uid": 0,
        "peer_gid": 0,
        "result": "ok",
    }
    timing = {"timestamp", "dur_us", "pid"}  # when, how long, which process: checked below
    assert [{k: v for k, v in e.items() if k not in timing} for e in ops] == [
        context | e for e in expected
    ]
    for event in ops:
        assert set(event) <= COMMON | EXTRA.get(event["op"], set()), event  # documented
        assert event["op"] in OP_NAMES
        assert isinstance(event["dur_us"], int) and 0 <= event["dur_us"] < 10**7, event
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["timestamp"])
    # One worker served them all: the one the master started (not the master itself).
    spawned = [e["worker_pid"] for e in events if e["event"] == "worker spawned"]
    assert {e["pid"] for e in ops} <= set(spawned[:1]) and len(spawned) == 1


def test_security_refusals_are_warnings_at_every_level(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    os.mkfifo(export / "fifo")
    served = Served(export, "none")
    assert errno_of(served.client.open("/fifo", os.O_RDONLY)) == errno.ENXIO
    (event,) = [e for e in served.finish() if e["event"] == "op"]
    assert event["level"] == "warning" and event["refused"] == "special file (fifo)"
    assert event["result"] == "ENXIO" and event["path"] == "/fifo"


def test_a_level_above_info_writes_no_audit_event_but_every_refusal(tmp_path: Path) -> None:
    """At log level warning the `op` events (info) are neither written nor built, at
    any audit level; a security refusal is a warning and still is."""
    export = tmp_path / "export"
    export.mkdir()
    os.mkfifo(export / "fifo")
    served = Served(export, "all", log_level="warning")
    one_of_each(served.client, export)
    assert errno_of(served.client.open("/fifo", os.O_RDONLY)) == errno.ENXIO
    ops = [e for e in served.finish() if e["event"] == "op"]
    assert [(e["level"], e["path"], e["refused"]) for e in ops] == [
        ("warning", "/fifo", "special file (fifo)")
    ]


_VALUES = st.one_of(
    st.text(),
    st.integers(),  # beyond 64 bits too: plain json writes those
    st.none(),
    st.floats(allow_nan=False),
    st.lists(st.text(), max_size=3),
)


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), _VALUES, max_size=8))
def test_a_line_rendered_at_once_is_the_line_cleaned_first(event: dict) -> None:
    """log.py renders a JSON line first and cleans its strings only when the line shows
    one may need it: whatever the strings hold, the line is the one cleaning first gives."""
    cleaned = log._clean_event(dict(event))
    try:
        long_way = orjson.dumps(cleaned)
    except TypeError:
        long_way = json.dumps(cleaned).encode()
    assert log._serialize(dict(event)) == long_way


# Keys the processors write themselves and keys a context and fields may share, often.
_KEYS = st.sampled_from(("event", "level", "timestamp", "refused", "pid", "op")) | st.from_regex(
    r"[a-z_]{1,12}", fullmatch=True
)


def _both_ways(
    tmp: Path, context: dict, fields: dict, members: bytes | None = None
) -> tuple[bytes, bytes]:
    """The line log.op writes (with `members`, the fields as JSON: log.op_json, else
    log.op, as the serving loop does) and the line structlog's own
    `logger.info("op", ...)` writes for the same event, in this process, their time
    stamps blanked."""
    out = tmp / "op.log"
    out.write_bytes(b"")
    log.configure("json", "info", destination=sink.for_file(os.open(out, os.O_WRONLY)))
    try:
        logger = structlog.get_logger().bind(**context)
        if members is None or not log.op_json(logger, frozenset(fields), members):
            log.op(logger, dict(fields))
        logger.info("op", **fields)
    finally:
        log.configure("json", "info", destination=sink.Sink(2))
    short, long = out.read_bytes().splitlines()
    blank = rb'"timestamp": ?"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"'
    return re.sub(blank, b"", short), re.sub(blank, b"", long)


@given(
    st.dictionaries(_KEYS, _VALUES, max_size=6),
    st.dictionaries(_KEYS.filter(lambda k: k != "event"), _VALUES, max_size=6),
)
def test_an_op_line_written_the_short_way_is_the_line_structlog_writes(
    tmp_path_factory: pytest.TempPathFactory, context: dict, fields: dict
) -> None:
    """log.op renders an op line without structlog's processors where it can (its
    context once, its fields by orjson): whatever the context and fields hold (strings
    to escape, ints beyond 64 bits, a field named as a context member, a processor's
    own key), the line is the one the processors write."""
    short, long = _both_ways(tmp_path_factory.mktemp("op"), context, fields)
    assert short == long


def test_an_op_line_at_the_pipe_limit_is_cut_as_structlog_cuts_it(tmp_path: Path) -> None:
    """Around LINE_MAX (a line that just fits, one that is one byte too long) the two
    ways agree: a line that does not fit is cut, its `truncated` field says so."""
    context = {"pid": 7, "role": "worker"}
    base = len(log._op_line(context, {"op": "lstat", "path": ""}) or b"")
    assert base
    for extra in range(-2, 3):
        path = "/" * (log.LINE_MAX - base + extra)
        short, long = _both_ways(tmp_path, context, {"op": "lstat", "path": path})
        assert short == long and len(short) < log.LINE_MAX
        assert (b'"truncated"' in short) == (extra > 0), extra


class _Name(str):
    """A str subclass (an enum.StrEnum member is one)."""


def test_a_str_subclass_is_logged_as_a_str(tmp_path: Path) -> None:
    """log.py is compiled: a value or argument of a str or bytes subclass is still
    logged as the interpreter logs it, not refused by a compiled type check."""
    assert log.escape(_Name("a\x1b")) == "a\\x1b"
    assert log.printable(bytearray(b"/p")) == "/p"
    short, long = _both_ways(tmp_path, {"role": _Name("worker")}, {"op": _Name("chmod\x1b")})
    assert short == long and b'"role":"worker"' in short and b'"op":"chmod\\\\x1b"' in short


def test_an_audit_event_takes_the_short_way(tmp_path: Path) -> None:
    """The worker's context and a request's fields, plain ASCII: rendered without the
    processors (else the property above would hold of the long way alone)."""
    context = {"pid": 7, "role": "worker", "export": "e", "worker": 0, "conn": 1}
    fields = {"op": "chmod", "path": "/a b", "mode": "0o644", "result": "ok", "dur_us": 7}
    assert log._op_line(context, fields) is not None
    short, long = _both_ways(tmp_path, context, fields)
    assert short == long and b'"path":"/a b"' in short


# The decoded arguments of each request type, as protocol.DECODERS gives them: b for
# bytes (a path, a name, a value), i for an int.
_ARGUMENTS = {
    p.T_OPEN: "bi",
    p.T_CREATE: "biiii",
    p.T_MKNOD: "iibii",
    p.T_MKDIR: "iibi",
    p.T_SYMLINK: "iibb",
    p.T_LINK: "bb",
    p.T_LSTAT: "b",
    p.T_READLINK: "bi",
    p.T_STATFS: "b",
    p.T_CHMOD: "bi",
    p.T_CHOWN: "bii",
    p.T_TRUNCATE: "bi",
    p.T_UTIME: "biiii",
    p.T_RENAME: "bb",
    p.T_REMOVE: "b",
    p.T_LGETXATTR: "ibb",
    p.T_LLISTXATTR: "ib",
    p.T_LSETXATTR: "bbbii",
    p.T_LREMOVEXATTR: "bb",
    p.T_GETVERSION: "b",
}
_ARGUMENT = {
    "b": st.from_regex(rb"[ -~]{0,24}", fullmatch=True) | st.binary(max_size=24),
    "i": st.integers(-(2**63), 2**63 - 1),
}


@st.composite
def _request_arguments(draw: st.DrawFn) -> tuple[int, tuple]:
    code = draw(st.sampled_from(sorted(_ARGUMENTS)))
    return code, tuple(draw(_ARGUMENT[kind]) for kind in _ARGUMENTS[code])


@settings(max_examples=300)
@given(
    # a worker's own context most often (nothing in it makes the line go the long way)
    st.just({"pid": 7, "role": "worker", "export": "e", "worker": 0, "conn": 1})
    | st.dictionaries(_KEYS, _VALUES, max_size=4),
    _request_arguments(),
    st.integers(0, 140),
    st.none() | st.integers(0, 2**40),
)
def test_an_audit_line_written_from_its_arguments_is_the_line_structlog_writes(
    tmp_path_factory: pytest.TempPathFactory,
    context: dict,
    request: tuple[int, tuple],
    err: int,
    dur_us: int | None,
) -> None:
    """The serving loop writes a request's op event from its decoded arguments as
    JSON (server.audit_json, log.op_json) where it can, else as a dict: whatever the
    request type, its paths and numbers and the logger's context, the line is the one
    structlog writes for server.audit_fields' dict."""
    code, args = request
    fields = server.audit_fields(code, args)
    fields["result"] = log.result_name(err)
    if dur_us is not None:
        fields["dur_us"] = dur_us
    members = server.audit_json(code, args, err, dur_us)
    short, long = _both_ways(tmp_path_factory.mktemp("op"), context, fields, members)
    assert short == long


# Each request type's decoded arguments (protocol.DECODERS' order) with distinct values,
# and the fields its op event carries (docs/events.md), written out by hand.
_SCHEMA = [
    (p.T_OPEN, (b"/o", 0o101), {"path": "/o", "flags": "O_WRONLY|O_CREAT"}),
    (
        p.T_CREATE,
        (b"/c", 0o1, 0o100640, 11, 12),
        {"path": "/c", "flags": "O_WRONLY", "mode": "0o640", "uid": 11, "gid": 12},
    ),
    (
        p.T_MKNOD,
        (11, 12, b"/n", 0o10644, 13),
        {"path": "/n", "mode": "0o10644", "rdev": 13, "uid": 11, "gid": 12},
    ),
    (p.T_MKDIR, (11, 12, b"/d", 0o40755), {"path": "/d", "mode": "0o755", "uid": 11, "gid": 12}),
    (
        p.T_SYMLINK,
        (11, 12, b"/target", b"/s"),
        {"path": "/s", "path2": "/target", "uid": 11, "gid": 12},
    ),
    (p.T_LINK, (b"/a", b"/b"), {"path": "/a", "path2": "/b"}),
    (p.T_RENAME, (b"/a", b"/b"), {"path": "/a", "path2": "/b"}),
    (p.T_READLINK, (b"/l", 14), {"path": "/l", "size": 14}),
    (p.T_CHMOD, (b"/m", 0o104755), {"path": "/m", "mode": "0o4755"}),
    (p.T_CHOWN, (b"/w", 11, -1), {"path": "/w", "uid": 11, "gid": -1}),
    (p.T_TRUNCATE, (b"/t", 2**40), {"path": "/t", "length": 2**40}),
    (p.T_UTIME, (b"/u", 1, 2, 3, 4), {"path": "/u", "atime": [1, 2], "mtime": [3, 4]}),
    (p.T_LGETXATTR, (15, b"/x", b"user.a"), {"path": "/x", "name": "user.a", "size": 15}),
    (p.T_LLISTXATTR, (15, b"/x"), {"path": "/x", "size": 15}),
    (
        p.T_LSETXATTR,
        (b"/x", b"user.a", b"value", 5, 1),
        {"path": "/x", "name": "user.a", "size": 5, "xattr_flags": 1},
    ),
    (p.T_LREMOVEXATTR, (b"/x", b"user.a"), {"path": "/x", "name": "user.a"}),
    (p.T_LSTAT, (b"/f",), {"path": "/f"}),
    (p.T_STATFS, (b"/f",), {"path": "/f"}),
    (p.T_REMOVE, (b"/f",), {"path": "/f"}),
    (p.T_GETVERSION, (b"/f",), {"path": "/f"}),
]


@pytest.mark.parametrize(
    ("code", "args", "expected"), _SCHEMA, ids=[OP_NAMES[c - p.T_OPEN] for c, _, _ in _SCHEMA]
)
def test_each_request_type_logs_its_own_arguments(code: int, args: tuple, expected: dict) -> None:
    """Which argument goes in which field, in which order, both ways: the dict
    (audit_fields) and the JSON (audit_json) the serving loop writes."""
    fields = server.audit_fields(code, args)
    assert list(fields.items()) == [("op", OP_NAMES[code - p.T_OPEN]), *expected.items()]
    members = server.audit_json(code, args, 0, None)
    assert orjson.loads(b"{%s}" % members) == {**fields, "result": "ok"}
    assert members.startswith(orjson.dumps(fields)[1:-1])


def test_a_plain_request_is_written_from_its_arguments() -> None:
    """Plain paths take audit_json's way (else the property above would hold of the
    dict's way alone); a path JSON writes otherwise does not."""
    assert server.audit_json(p.T_CHMOD, (b"/a b", 0o100644), 0, 7) == (
        b'"op":"chmod","path":"/a b","mode":"0o644","result":"ok","dur_us":7'
    )
    utime = server.audit_json(p.T_UTIME, (b"/t", 1, 2, 3, 4), errno.ENOENT, None)
    assert utime.endswith(b'"mtime":[3,4],"result":"ENOENT"')
    for path in (b'/a"', b"/a\\", b"/a\x1b", b"/a\x7f", "/é".encode()):
        assert server.audit_json(p.T_RENAME, (b"/ok", path), 0, 1) is None, path


_OP_LINES = """
import os, sys
from proxyd import log, sink
log.configure("json", "info", destination=sink.for_file(os.open(sys.argv[1], os.O_WRONLY)))
logger = log.get(role="worker", export="e", worker=0).bind(conn=1, peer_pid=2)
fields = {"op": "chmod", "path": "/a\\u202e\\x1b", "mode": "0o644", "result": "ok", "dur_us": 7}
log.op(logger, fields)
logger.info("op", **fields)
log.op(logger, fields, refused="special file (fifo)")
logger.warning("op", refused="special file (fifo)", **fields)
"""


def test_the_audit_event_is_the_line_structlog_writes(tmp_path: Path) -> None:
    """log.op, the audit event's shorter way, writes what the logger's own call writes."""
    out = tmp_path / "log"
    out.touch()
    subprocess.run([sys.executable, "-c", _OP_LINES, str(out)], cwd=CHECKOUT, check=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line.pop("timestamp"))
    assert lines[0] == lines[1] and lines[2] == lines[3]
    assert lines[0]["path"] == "/a\\u202e\\x1b" and lines[2]["level"] == "warning"
    assert list(lines[2]) == list(lines[3])  # the same fields in the same order


def test_huge_fields_are_cut_to_fit_a_pipe_write(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    served = Served(export, "all")
    long_path = "/" + "x" * 60000
    assert errno_of(served.client.lstat(long_path)) == errno.ENAMETOOLONG
    served.client.close()
    assert served.proc.wait(10) == 0  # -f: the connection ended, proxyd stopped normally
    lines = served.log_path.read_bytes().splitlines()
    assert max(len(line) for line in lines) < 4096
    (event,) = [json.loads(line) for line in lines if b'"event":"op"' in line]
    assert event["truncated"] == ["path"] and event["path"].endswith("…")
    assert event["result"] == "ENAMETOOLONG"


def test_concurrent_load_every_line_parses_and_every_request_counts_once(
    tmp_path: Path,
) -> None:
    with Daemon(tmp_path, [{"name": "a", "max_workers": 8}], audit="all") as d:
        clients = [d.connect("a") for _ in range(6)]
        per_client = 300

        def work(i: int, c: ProxyClient) -> None:
            for j in range(per_client // 3):
                c.mkdir(0, 0, f"/c{i}-{j}", 0o755)
                c.lstat(f"/c{i}-{j}")
                c.remove(f"/c{i}-{j}")

        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for c in clients:
            c.close()
        d.wait_event("connection closed", count=6)
    lines = d.log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line parses
    ops = [e for e in events if e["event"] == "op"]
    per_conn: dict[int, int] = {}
    for e in ops:
        per_conn[e["conn"]] = per_conn.get(e["conn"], 0) + 1
    assert sorted(per_conn.values()) == [per_client] * 6
    closed = {e["conn"]: e["requests"] for e in events if e["event"] == "connection closed"}
    assert closed == per_conn  # the master's count agrees with the audit trail
    paths = [(e["conn"], e["op"], e["path"]) for e in ops]
    assert len(set(paths)) == len(paths)  # no request logged twice


def test_sigusr1_reopens_the_log_file_in_master_and_workers(tmp_path: Path) -> None:
    log_file = tmp_path / "proxyd.json"
    with Daemon(tmp_path, [{"name": "a", "min_idle": 2}], log_file=str(log_file)) as d:
        busy = d.connect("a")
        busy.mkdir(0, 0, "/before", 0o755)
        wait_until(lambda: '"path":"/before"' in log_file.read_text(), what="the first line")
        rotated = tmp_path / "proxyd.json.1"
        os.rename(log_file, rotated)  # what logrotate does
        d.signal(signal.SIGUSR1)
        # Not just the file: the master opens it, then hands it to every worker, then
        # says so. A request before that is still logged to the old file.
        wait_until(
            lambda: log_file.exists() and '"event":"log reopened"' in log_file.read_text(),
            what="the reopened file handed to the workers",
        )

        def holding_the_rotated_file() -> bool:
            for pid in d.workers():
                with contextlib.suppress(FileNotFoundError):
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        with contextlib.suppress(FileNotFoundError):
                            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(rotated):
                                return True
            return False

        # The busy worker, blocked on its quiet connection, is woken (WAKE_SIGNAL) to take
        # the new file before its guest's next request: none keeps the rotated one open.
        wait_until(lambda: not holding_the_rotated_file(), what="the rotated file let go")
        busy.mkdir(0, 0, "/after-busy", 0o755)  # a worker that was busy all along
        idle = d.connect("a")  # a worker that was idle when the signal came
        idle.mkdir(0, 0, "/after-idle", 0o755)
        busy.close()
        idle.close()
        wait_until(
            lambda: log_file.read_text().count('"connection closed"') == 2,
            what="both connections closed in the new file",
        )
    new = [json.loads(line) for line in log_file.read_text().splitlines()]
    old = rotated.read_text()
    assert {e["path"] for e in new if e["event"] == "op"} == {"/after-busy", "/after-idle"}
    assert any(e["event"] == "log reopened" and e["role"] == "master" for e in new)
    assert '"/after' not in old and '"path":"/before"' in old


# --- names a terminal would act on (issue 10.7) ---------------------------------------

# One short name per class (short, so that the audit table shows them whole).
NASTY = [
    b"/c0-\x1b[31mred\x1b[0m\x07",  # ESC (CSI 31m, SGR reset), BEL
    b"/c0-\t\n\r\x08",  # TAB, LF, CR, BS
    b"/del-\x7f",
    "/c1-\u009b31m-\u009d0;x\u009c".encode(),  # CSI, OSC ... ST as UTF-8 C1 controls
    "/c1-\u0085\u0080\u009f".encode(),  # NEL, the first and last C1
    "/rlo-\u202egpj.exe".encode(),  # right-to-left override
    "/bidi-\u202a\u202b\u202c\u202d".encode(),  # embeddings, pop
    "/iso-\u2066\u2067\u2068\u2069".encode(),  # isolates
    "/mark-\u200e\u200f\u061c".encode(),  # LRM, RLM, ALM
    "/zw-\u200b\u200c\u200d\u2060\ufeff\u00ad".encode(),  # zero-width, BOM, soft hyphen
    "/tag-\U000e0041\U000e007f".encode(),  # Cf beyond the BMP (tag characters)
    "/sep-\u2028-\u2029".encode(),  # line and paragraph separators
    b"/raw-\xff\xfe-\x9b-\xc2",  # not UTF-8 (a lone 0x9b is CSI in 8-bit terminals)
    b"/lit-\\xff-\\u202e-\\\\",  # a name that literally holds escape-like text
    b'/q"uote',
    b"/two  spaces",
    b"/x -> //etc/shadow",  # not a rename: one path
]
# Everything a terminal acts on or that reorders or hides text.
_LOOKS_SAFE = re.compile(r'\\(\\|"|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})')


def dangerous(text: str) -> list[str]:
    """The characters of `text` that must never reach a terminal raw: C0 (but the
    newline ending a line), DEL, C1, format characters (Cf: bidi and zero-width),
    the line and paragraph separators, surrogates (bytes that were not UTF-8)."""
    return [
        c
        for c in text
        if (ord(c) < 0x20 and c != "\n")
        or 0x7F <= ord(c) <= 0x9F
        or unicodedata.category(c) in ("Cf", "Cs")
        or c in "\u2028\u2029"
    ]


def assert_terminal_safe(raw: bytes) -> str:
    """`raw` is UTF-8 holding none of the dangerous characters; returns it decoded."""
    text = raw.decode("utf-8")  # strict: a raw byte that is not UTF-8 fails here
    assert dangerous(text) == []
    return text


def unescape(text: str, quotes: bool = False) -> bytes:
    """The bytes proxyd's escaping (docs/events.md) stands for, decoded independently:
    \\\\ a backslash, \\xNN one byte, \\uXXXX and \\UXXXXXXXX a character in UTF-8, and
    with `quotes` \\" a double quote (console lines, quoted table cells)."""
    out = bytearray()
    pos = 0
    for match in _LOOKS_SAFE.finditer(text):
        between = text[pos : match.start()]
        assert "\\" not in between, f"a backslash that is no escape in {text!r}"
        out += between.encode()
        escape = match[1]
        if escape == "\\":
            out += b"\\"
        elif escape == '"':
            assert quotes, text
            out += b'"'
        elif escape[0] == "x":
            out.append(int(escape[1:], 16))
        else:
            out += chr(int(escape[1:], 16)).encode("utf-8", "surrogatepass")
        pos = match.end()
    assert "\\" not in text[pos:], f"a backslash that is no escape in {text!r}"
    return bytes(out + text[pos:].encode())


def nasty_requests(c: ProxyClient) -> list[tuple[str, bytes, bytes | None]]:
    """Requests naming every class of dangerous name, and the two-path look-alikes;
    returns the (op, path, path2) each audit event must give back."""
    for directory in (b"/x -> ", b"/x -> //etc", b"/etc"):
        assert c.mkdir(0, 0, directory, 0o755).ok
    expected: list[tuple[str, bytes, bytes | None]] = [
        ("mkdir", p, None) for p in (b"/x -> ", b"/x -> //etc", b"/etc")
    ]
    for name in NASTY:
        c.mkdir(0, 0, name, 0o755)
        expected.append(("mkdir", name, None))
    assert c.mkdir(0, 0, b"/x", 0o755).ok
    assert c.rename(b"/x", b"//etc/shadow").ok  # a real two-path request
    expected += [("mkdir", b"/x", None), ("rename", b"/x", b"//etc/shadow")]
    for i, target in enumerate([b"-", b"a  b", "\u202e\u009b".encode(), b"\\x41"]):
        assert c.symlink(0, 0, target, f"/l{i}").ok
        expected.append(("symlink", f"/l{i}".encode(), target))
    return expected


_CONSOLE_FIELD = re.compile(r' (\w+)=("(?:[^"\\]|\\.)*"|[^ "]+)')


def console_fields(line: str) -> dict[str, str]:
    """The key=value fields after the timestamp, level and event of a console line;
    each string value still escaped, with its quotes."""
    body = line[line.index(" op ") + 3 :].lstrip(" ")
    body = " " + body
    fields = {}
    pos = 0
    while pos < len(body):
        match = _CONSOLE_FIELD.match(body, pos)
        assert match is not None, f"cannot parse {body[pos:]!r}"
        fields[match[1]] = match[2]
        pos = match.end()
    return fields


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_dangerous_names_are_escaped_reversibly_in_the_log(tmp_path: Path, fmt: str) -> None:
    """Every class of character a terminal acts on, through a real daemon into its
    log: the raw bytes hold none of them, and every path unescapes to the exact bytes
    the guest sent, whatever it held (a literal "\\xff" included)."""
    with Daemon(tmp_path, [{"name": "a", "min_idle": 0}], log_format=fmt) as d:
        c = d.connect("a")
        expected = nasty_requests(c)
        c.close()
        wait_until(lambda: b"connection closed" in d.log_path.read_bytes(), what="the close")
    text = assert_terminal_safe(d.log_path.read_bytes())
    seen = []
    for line in text.splitlines():
        if fmt == "json":
            event = json.loads(line)
            if event["event"] != "op":
                continue
            path, path2 = unescape(event["path"]), event.get("path2")
            seen.append((event["op"], path, None if path2 is None else unescape(path2)))
        elif line.split()[2:3] == ["op"]:
            fields = console_fields(line)
            path = unescape(fields["path"][1:-1], quotes=True)
            path2 = fields.get("path2")
            op = fields["op"][1:-1]
            seen.append((op, path, None if path2 is None else unescape(path2[1:-1], quotes=True)))
    assert seen == expected


def test_an_escaped_name_cut_to_fit_stays_whole_escapes(tmp_path: Path) -> None:
    """A path of 3000 C1 controls (6 bytes each once escaped) is cut to fit 4096
    bytes: the line parses, and what is left unescapes to a prefix of the name."""
    export = tmp_path / "export"
    export.mkdir()
    served = Served(export, "all")
    name = "/" + "\u009b" * 3000
    assert errno_of(served.client.lstat(name)) == errno.ENAMETOOLONG
    served.client.close()
    assert served.proc.wait(10) == 0
    raw = served.log_path.read_bytes()
    assert_terminal_safe(raw)
    assert max(len(line) for line in raw.splitlines()) < 4096
    (event,) = [json.loads(line) for line in raw.splitlines() if b'"event":"op"' in line]
    assert event["truncated"] == ["path"] and event["path"].endswith("…")
    kept = unescape(event["path"][:-1])
    assert len(kept) > 1000 and name.encode().startswith(kept)
