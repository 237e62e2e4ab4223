"""`proxyd audit`: queries over a realistic log set (supervisord's rotated gzip parts,
its own lines, garbage, a cut last line), every output format, stdin, exit codes."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxyd.audit import main, parse_time, shorten
from tests.daemon import Daemon
from tests.proxyclient import CHECKOUT
from tests.test_events import assert_terminal_safe, dangerous, nasty_requests, unescape

AUDIT = [
    sys.executable,
    "-c",
    "import sys; from proxyd.audit import main; sys.exit(main(sys.argv[1:]))",
]
LONG_PATH = "//home/alice/src/" + "/".join(f"directory{i}" for i in range(10)) + "/deep.c"


def line(time: str, event: str, level: str = "info", **fields: object) -> bytes:
    record = {"timestamp": f"2026-11-27T{time}Z", "level": level, "event": event, **fields}
    return json.dumps(record).encode() + b"\n"


def master(time: str, event: str, level: str = "info", **fields: object) -> bytes:
    return line(time, event, level, pid=100, role="master", **fields)


def op(
    time: str,
    where: str,
    request: str,
    path: str,
    result: str = "ok",
    level: str = "info",
    **fields: object,
) -> bytes:
    """An audit event; `where` is "export/conn/peer_uid"."""
    export, conn, uid = where.split("/")
    peer = {"peer_pid": 500 + int(conn), "peer_uid": int(uid), "peer_gid": int(uid)}
    who = {"pid": 101, "role": "worker", "export": export, "worker": 0, "conn": int(conn), **peer}
    details = {"op": request, "path": path, **fields, "result": result, "dur_us": 100}
    return line(time, "op", level, **who, **details)


def accepted(time: str, where: str) -> bytes:
    export, conn, uid = where.split("/")
    peer = {"peer_pid": 500 + int(conn), "peer_uid": int(uid), "peer_gid": int(uid)}
    return master(time, "connection accepted", export=export, conn=int(conn), **peer)


def closed(time: str, export: str, conn: int, requests: int, errors: int) -> bytes:
    counts = {"requests": requests, "errors": errors, "duration_s": 1.5, "reason": "eof"}
    return master(time, "connection closed", export=export, conn=conn, **counts)


# The oldest part: daemon run 1, connection 1 (export vm1, peer uid 1000).
PART2 = [
    master("10:00:00.000000", "start", exports=["vm1", "vm2"]),
    accepted("10:00:01.500000", "vm1/1/1000"),
    op("10:00:02.000100", "vm1/1/1000", "mkdir", "//home/alice/src", mode="0o755"),
    op("10:00:03.000000", "vm1/1/1000", "create", "//home/alice/src/main.c", mode="0o644"),
    op("10:00:04.000000", "vm1/1/1000", "remove", "//home/alice/old.txt", "ENOENT"),
    closed("10:00:05.000000", "vm1", 1, 3, 1),
    master("10:00:06.000000", "stop", exit_code=0),
]
# Run 2: connection ids start at 1 again (vm2, peer uid 0), then 2 (vm1).
PART1 = [
    master("11:00:00.000000", "start", exports=["vm1", "vm2"]),
    b"2026-11-27 11:00:00,123 INFO spawned: 'proxyd' with pid 200\n",
    accepted("11:00:01.000000", "vm2/1/0"),
    op("11:00:02.000000", "vm2/1/0", "rename", "/srv/data/a", path2="/srv/data/b"),
    op("11:00:03.000000", "vm2/1/0", "chmod", "/srv/data/b", mode="0o600"),
    op("11:00:04.000000", "vm2/1/0", "lsetxattr", "/srv/data/b", "EACCES", name="user.tag"),
    accepted("11:00:05.000000", "vm1/2/1000"),
    op("11:00:06.000000", "vm1/2/1000", "symlink", "//home/alice/link", path2="../target"),
]
NON_UTF8 = op("11:30:06.000000", "vm2/1/0", "remove", "/srv/data/@.bin").replace(b"@", b"\xff\xfe")
CUT = b'{"timestamp": "2026-11-27T11:30:09.000000Z", "level": "info", "event": "op", "op": "mk'
REFUSED = {"level": "warning", "flags": "O_WRONLY", "refused": "special file (fifo)"}
RECOVERY = {"export": "vm1", "conn": 2, "op": "create", "outcome": "answered EIO"}
# The current file, still being written.
CURRENT = [
    b"2026-11-27 11:30:00,123 INFO spawned: 'proxyd' with pid 42\n",
    b"Traceback (most recent call last):\n",
    b"\x00\xff\xfe garbage \x80\n",
    b'{"level": "info", "event": "op", "op": "mkdir", "path": "/no/timestamp"}\n',
    op("11:30:01.000000", "vm1/2/1000", "truncate", "//home/alice/src/main.c", length=0),
    op("11:30:02.000000", "vm1/2/1000", "open", "//home/alice/fifo", "ENXIO", **REFUSED),
    master("11:30:03.000000", "worker died", "warning", export="vm1", conn=2, signal="SIGKILL"),
    master("11:30:04.000000", "crash recovery", "warning", **RECOVERY),
    op("11:30:05.000000", "vm1/2/1000", "create", LONG_PATH, "EIO", mode="0o644"),
    NON_UTF8,
    master("11:30:07.000000", "reload refused", "error", error="export 'vm3'.path: missing"),
    closed("11:30:08.000000", "vm1", 2, 4, 2),
    CUT,
]
EVENTS = [x for x in PART2 + PART1 + CURRENT if x.startswith(b'{"timestamp"') and x != CUT]
# --format json prints a line that is not all printable UTF-8 as the same JSON value
# with \u escapes: here the two bytes that are not UTF-8, as surrogateescape reads them.
NON_UTF8_JSON = (
    json.dumps(json.loads(NON_UTF8.decode("utf-8", "surrogateescape")), separators=(",", ":"))
    + "\n"
).encode()
SHOWN = [NON_UTF8_JSON if x == NON_UTF8 else x for x in EVENTS]
SKIPPED = 5  # two supervisord lines, two garbage lines, the line without a timestamp


@pytest.fixture
def logs(tmp_path: Path) -> list[str]:
    """supervisord's log directory, named as a shell glob lists it (newest first)."""
    (tmp_path / "proxyd.log").write_bytes(b"".join(CURRENT))
    # rotated parts are told by their content, whatever their name
    (tmp_path / "proxyd.log.1").write_bytes(gzip.compress(b"".join(PART1)))
    (tmp_path / "proxyd.log.2.gz").write_bytes(gzip.compress(b"".join(PART2)))
    return [str(tmp_path / name) for name in ("proxyd.log", "proxyd.log.1", "proxyd.log.2.gz")]


@pytest.fixture
def audit(capsysbinary: pytest.CaptureFixture[bytes]) -> Callable[..., tuple[int, str, str]]:
    """Runs main(args): (exit status, stdout, stderr); stdout may hold non-UTF-8 bytes."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsysbinary.readouterr()
        return code, out.decode("utf-8", "surrogateescape"), err.decode()

    return run


@pytest.fixture
def query(audit: Callable[..., tuple[int, str, str]]) -> Callable[..., list[dict]]:
    """The events a --format json query prints."""

    def run(*args: str) -> list[dict]:
        code, out, err = audit("--format", "json", *args)
        assert code == 0, err
        return [json.loads(x) for x in out.splitlines()]

    return run


def what(events: list[dict]) -> list[str]:
    return [e.get("op", e["event"]) if e["event"] == "op" else e["event"] for e in events]


def cells(text: str) -> list[str]:
    """Output lines with runs of spaces squeezed (alignment is checked separately)."""
    return [" ".join(row.split()) for row in text.splitlines()]


# --- reading -------------------------------------------------------------------------------


def test_every_event_exactly_as_read_oldest_part_first(audit, logs):
    code, out, err = audit("--format", "json", *logs)
    assert (code, err) == (0, "")
    assert out.encode() == b"".join(SHOWN)


def test_non_utf8_bytes_are_escaped_in_json_and_in_the_table(audit, logs):
    code, out, _ = audit("--format", "json", "--op", "remove", "--export", "vm2", *logs)
    assert code == 0 and out.encode() == NON_UTF8_JSON
    assert '"path":"/srv/data/\\udcff\\udcfe.bin"' in out  # the same value as read
    code, out, _ = audit("--op", "remove", "--export", "vm2", *logs)
    assert code == 0 and "/srv/data/\\xff\\xfe.bin" in out


@pytest.mark.parametrize("dash", [[], ["-"]])
def test_stdin_plain_and_gzip(dash):
    def run(data: bytes) -> list[str]:
        result = subprocess.run(
            [*AUDIT, "--format", "json", "--level", "warning", *dash],
            input=data,
            cwd=CHECKOUT,
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return what([json.loads(x) for x in result.stdout.splitlines()])

    warnings = ["open", "worker died", "crash recovery", "reload refused"]
    assert run(b"".join(CURRENT)) == warnings
    assert run(gzip.compress(b"".join(PART1 + CURRENT))) == warnings
    assert run(gzip.compress(b"".join(PART1))) == []


def test_a_last_line_without_newline_that_parses_is_kept(audit, tmp_path):
    (tmp_path / "a").write_bytes(PART2[0] + PART2[1].rstrip(b"\n"))
    (tmp_path / "b").write_bytes(PART2[2])
    code, out, _ = audit("--format", "json", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 0 and out.encode() == b"".join(PART2[:3])


def test_an_overlong_line_is_skipped_and_counted(audit, tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"{" + b"x" * (3 << 20) + b"\n" + PART2[0])
    code, out, err = audit("--format", "summary", str(path))
    assert code == 0 and out.startswith("1 matching lines")
    assert err == "proxyd audit: 1 unparseable lines skipped\n"


# --- filters -------------------------------------------------------------------------------


def test_time_range_since_inclusive_until_exclusive(query, logs):
    events = query("--since", "2026-11-27T11:00:00Z", "--until", "2026-11-27T11:30:01", *logs)
    assert [e["timestamp"][11:19] for e in events] == [
        "11:00:00",
        "11:00:01",
        "11:00:02",
        "11:00:03",
        "11:00:04",
        "11:00:05",
        "11:00:06",
    ]
    # an offset is honoured: 12:30:05+01:00 is 11:30:05 UTC
    events = query("--since", "2026-11-27T12:30:05+01:00", *logs)
    assert what(events) == ["create", "remove", "reload refused", "connection closed"]


def test_relative_since(query, tmp_path):
    now = datetime.now(UTC)
    stamps = [(now - timedelta(hours=h)).isoformat().replace("+00:00", "Z") for h in (3, 1.5, 0.5)]
    lines = [json.dumps({"timestamp": stamp, "event": "x"}) + "\n" for stamp in stamps]
    path = tmp_path / "log"
    path.write_text("".join(lines))
    assert [e["timestamp"] for e in query("--since", "2h", str(path))] == stamps[1:]
    assert [e["timestamp"] for e in query("--since", "45m", str(path))] == stamps[2:]
    assert [e["timestamp"] for e in query("--since", "1d", "--until", "1h", str(path))] == [
        stamps[0],
        stamps[1],
    ]


def test_parse_time():
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert parse_time("30s", now) == datetime(2026, 11, 27, 11, 59, 30, tzinfo=UTC)
    assert parse_time("15m", now) == datetime(2026, 11, 27, 11, 45, tzinfo=UTC)
    assert parse_time("2h", now) == datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    assert parse_time("1d", now) == datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_time("2026-11-27T11:32:13.940967Z") == datetime(
        2026, 11, 27, 11, 32, 13, 940967, tzinfo=UTC
    )
    assert parse_time("2026-11-27 11:32") == datetime(2026, 11, 27, 11, 32, tzinfo=UTC)


def test_export(query, logs):
    events = query("--export", "vm2", *logs)
    assert what(events) == ["connection accepted", "rename", "chmod", "lsetxattr", "remove"]
    assert len(query("--export", "vm2", "--export", "vm1", *logs)) == 18
    assert query("--export", "vm", *logs) == []


def test_op_means_op_events_only(query, logs):
    # "crash recovery" carries op=create too, but it is not a request
    events = query("--op", "create", *logs)
    assert [(e["event"], e["path"]) for e in events] == [
        ("op", "//home/alice/src/main.c"),
        ("op", LONG_PATH),
    ]
    events = query("--op", "MKDIR", "--op", "chmod", *logs)
    assert [e["path"] for e in events] == ["//home/alice/src", "/srv/data/b"]


def test_a_request_cut_short_is_found_by_its_op_and_path(audit, query, tmp_path):
    """The master's line for a mutation whose worker died (it may have happened) names
    its path where the audit level logs it: --path and --op find it beside the op
    events, the table shows its outcome; a recovery line without a path is no match."""
    log = tmp_path / "proxyd.log"
    log.write_bytes(
        op("12:00:00.000000", "vm1/3/1000", "create", "//home/alice/a.c", mode="0o644")
        + master("12:00:01.000000", "crash recovery", "warning", **RECOVERY)
        + master(
            "12:00:02.000000",
            "crash recovery",
            "warning",
            **{**RECOVERY, "conn": 3, "outcome": "answered EIO"},
            path="//home/alice/b.c",
            flags="O_RDWR|O_CREAT",
            mode="0o644",
            uid=1000,
            gid=1000,
        )
        + op("12:00:03.000000", "vm1/3/1000", "remove", "//home/alice/b.c", "ENOENT")
    )
    found = query("--path", "/home/alice/b.c", str(log))
    assert [(e["event"], e.get("op")) for e in found] == [
        ("crash recovery", "create"),
        ("op", "remove"),
    ]
    assert [e["event"] for e in query("--op", "create", str(log))] == ["op", "crash recovery"]
    code, out, _ = audit("--path", "/home/alice/b.c", str(log))
    assert code == 0
    assert "crash recovery //home/alice/b.c answered EIO" in " ".join(out.split())


def test_result_and_errors(query, logs):
    assert [e["path"] for e in query("--result", "enoent", *logs)] == ["//home/alice/old.txt"]
    assert [e["result"] for e in query("--errors", *logs)] == ["ENOENT", "EACCES", "ENXIO", "EIO"]
    assert [e["op"] for e in query("--result", "EIO", "--result", "EACCES", *logs)] == [
        "lsetxattr",
        "create",
    ]
    assert len(query("--result", "ok", *logs)) == 7
    assert query("--result", "ok", "--errors", *logs) == []


def test_path_prefix_matches_path_or_path2(query, logs):
    # QEMU's "//home/..." matches /home/...: repeated slashes compare as one
    events = query("--path", "/home/alice/src", *logs)
    assert [(e["op"], e["path"]) for e in events] == [
        ("mkdir", "//home/alice/src"),
        ("create", "//home/alice/src/main.c"),
        ("truncate", "//home/alice/src/main.c"),
        ("create", LONG_PATH),
    ]
    assert what(query("--path", "/home/alice/src/", *logs)) == ["create", "truncate", "create"]
    assert what(query("--path", "/srv/data/b", *logs)) == ["rename", "chmod", "lsetxattr"]
    assert what(query("--path", "../", *logs)) == ["symlink"]  # a symlink's target


def test_peer_uid_and_conn(query, logs):
    events = query("--peer-uid", "0", *logs)
    assert what(events) == ["connection accepted", "rename", "chmod", "lsetxattr", "remove"]
    # connection 1 of both daemon runs
    events = query("--conn", "1", "--event", "connection accepted", *logs)
    assert [(e["export"], e["peer_uid"]) for e in events] == [("vm1", 1000), ("vm2", 0)]
    assert what(query("--conn", "2", "--level", "warning", *logs)) == [
        "open",
        "worker died",
        "crash recovery",
    ]


def test_level_is_that_level_or_higher(query, logs):
    events = query("--level", "warning", *logs)
    assert what(events) == ["open", "worker died", "crash recovery", "reload refused"]
    assert what(query("--level", "ERROR", *logs)) == ["reload refused"]
    assert len(query("--level", "debug", *logs)) == len(EVENTS)


def test_event(query, logs):
    assert what(query("--event", "start", "--event", "stop", *logs)) == ["start", "stop", "start"]


def test_filters_combine(query, logs):
    events = query(
        *("--export", "vm1", "--since", "2026-11-27T11:00:00Z", "--op", "create", "--errors"),
        *("--peer-uid", "1000", "--conn", "2", "--path", "/home/alice/src/dir"),
        *logs,
    )
    assert [e["path"] for e in events] == [LONG_PATH]
    assert query("--export", "vm2", "--path", "/home", *logs) == []
    assert query("--export", "vm2", "--peer-uid", "1000", *logs) == []


# --- table and summary ---------------------------------------------------------------------


def test_table(audit, logs):
    code, out, err = audit("--export", "vm2", *logs)
    assert (code, err) == (0, "")
    assert cells(out) == [
        "TIME LEVEL EXPORT CONN PEER_UID EVENT PATH RESULT DUR_US",
        "2026-11-27T11:00:01.000Z info vm2 1 0 connection accepted - - -",
        "2026-11-27T11:00:02.000Z info vm2 1 0 rename /srv/data/a -> /srv/data/b ok 100",
        "2026-11-27T11:00:03.000Z info vm2 1 0 chmod /srv/data/b ok 100",
        "2026-11-27T11:00:04.000Z info vm2 1 0 lsetxattr /srv/data/b EACCES 100",
        "2026-11-27T11:30:06.000Z info vm2 1 0 remove /srv/data/\\xff\\xfe.bin ok 100",
    ]
    # aligned: every column starts at the same place on every row
    rows = out.splitlines()
    for header in ("LEVEL", "EXPORT", "EVENT", "PATH", "RESULT"):
        at = rows[0].index(header)
        assert all(row[at - 2 : at] == "  " and row[at] != " " for row in rows), header
    assert {len(row) for row in rows} == {len(rows[0])}  # the last column is right-aligned


def test_table_lifecycle_rows_and_long_paths(audit, logs):
    code, out, _ = audit("--conn", "2", "--since", "2026-11-27T11:30:03Z", *logs)
    assert code == 0
    short = shorten(LONG_PATH, 48)
    assert len(short) == 48 and short.startswith("//home/alice/src/dir")
    assert short.endswith("directory9/deep.c") and "…" in short
    assert cells(out) == [
        "TIME LEVEL EXPORT CONN PEER_UID EVENT PATH RESULT DUR_US",
        "2026-11-27T11:30:03.000Z warning vm1 2 - worker died - - -",
        "2026-11-27T11:30:04.000Z warning vm1 2 - crash recovery - answered EIO -",
        f"2026-11-27T11:30:05.000Z info vm1 2 1000 create {short} EIO 100",
        "2026-11-27T11:30:08.000Z info vm1 2 - connection closed - - -",
    ]


def test_table_without_matches_prints_nothing(audit, logs):
    assert audit("--export", "nope", *logs) == (0, "", "")


def test_summary(audit, logs):
    code, out, err = audit("--format", "summary", *logs)
    assert code == 0
    assert err == f"proxyd audit: {SKIPPED} unparseable lines skipped\n"
    vm1 = cells(out[out.index("export vm1:") : out.index("export vm2:")])
    vm2 = cells(out[out.index("export vm2:") : out.index("(no export)")])
    rest = cells(out[out.index("(no export)") :])
    assert cells(out)[0] == f"{len(EVENTS)} matching lines, 11 op events, 3 connections"
    assert vm1 == [
        "export vm1: 7 op events, 3 errors",
        "op ok EIO ENOENT ENXIO total",  # ok first, then errors by count, then name
        "create 1 1 0 0 2",
        "mkdir 1 0 0 0 1",
        "open 0 0 0 1 1",
        "remove 0 0 1 0 1",
        "symlink 1 0 0 0 1",
        "truncate 1 0 0 0 1",
        "total 4 1 1 1 7",
        "other events: connection accepted 2, connection closed 2, worker died 1, crash recovery 1",
        "",
    ]
    assert vm2 == [
        "export vm2: 4 op events, 1 errors",
        "op ok EACCES total",
        "chmod 1 0 1",
        "lsetxattr 0 1 1",
        "remove 1 0 1",
        "rename 1 0 1",
        "total 3 1 4",
        "other events: connection accepted 1",
        "",
    ]
    # connection 1 of run 1 and connection 1 of run 2 are two connections
    assert rest == [
        "(no export): 0 op events, 0 errors",
        "other events: start 2, stop 1, reload refused 1",
        "",
        "connections",
        "export conn first seen peer_uid requests errors",
        "vm1 1 2026-11-27T10:00:01.500Z 1000 3 1",
        "vm2 1 2026-11-27T11:00:01.000Z 0 4 1",
        "vm1 2 2026-11-27T11:00:05.000Z 1000 4 2",
    ]


def test_summary_of_a_query(audit, logs):
    code, out, err = audit("--format", "summary", "--errors", "--export", "vm1", *logs)
    assert code == 0 and err == f"proxyd audit: {SKIPPED} unparseable lines skipped\n"
    assert cells(out) == [
        "3 matching lines, 3 op events, 2 connections",
        "",
        "export vm1: 3 op events, 3 errors",
        "op EIO ENOENT ENXIO total",
        "create 1 0 0 1",
        "open 0 0 1 1",
        "remove 0 1 0 1",
        "total 1 1 1 3",
        "",
        "connections",
        "export conn first seen peer_uid requests errors",
        "vm1 1 2026-11-27T10:00:04.000Z 1000 1 1",
        "vm1 2 2026-11-27T11:30:02.000Z 1000 2 2",
    ]


# --- errors --------------------------------------------------------------------------------


def test_missing_file_exit_1_before_any_output(audit, logs, tmp_path):
    missing = str(tmp_path / "proxyd.log.9.gz")
    code, out, err = audit(*logs, missing)
    assert (code, out) == (1, "")
    assert err == f"proxyd audit: error: cannot read {missing}: No such file or directory\n"


def test_damaged_gzip_part_exit_1_after_reading_the_rest(audit, logs, tmp_path):
    damaged = tmp_path / "proxyd.log.3.gz"
    damaged.write_bytes(gzip.compress(b"".join(PART2[:1] * 2000))[:-100])
    code, out, err = audit("--format", "json", "--event", "reload refused", str(damaged), *logs)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"proxyd audit: error: cannot read {damaged}: ")
    assert what(json.loads(x) for x in out.splitlines()) == ["reload refused"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--since", "yesterday"], "argument --since: 'yesterday' is not an ISO 8601 time"),
        (["--until", "5y"], "argument --until: '5y' is not an ISO 8601 time"),
        (["--until", "11:30"], "argument --until: '11:30' is not an ISO 8601 time"),
        (["--op", "unlink"], "argument --op: 'unlink' is not one of chmod, chown, create"),
        (["--result", "ENOPE"], "argument --result: 'ENOPE' is not ok or an errno name"),
        (["--level", "loud"], "argument --level: invalid choice: 'loud'"),
        (["--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["--conn", "x"], "argument --conn: invalid int value: 'x'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(audit, logs, args, message):
    code, out, err = audit(*args, *logs)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(f"proxyd audit: error: {message}"), err


def test_bad_since_from_the_command_line():
    result = subprocess.run(
        [*AUDIT, "--since", "soon"],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "proxyd audit: error: argument --since: 'soon' is not an ISO 8601 time or a duration "
        "like 30s, 15m, 2h, 1d"
    ]


def test_shorten():
    assert shorten("/a/b", 10) == "/a/b"
    assert shorten("0123456789", 10) == "0123456789"
    assert shorten("0123456789abc", 10) == "0123…89abc"


def test_no_input_from_a_terminal_exit_2(audit, monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    assert audit() == (2, "", "proxyd audit: error: no input: name log files or pipe a log in\n")


def test_help_exit_0(audit):
    code, out, _ = audit("--help")
    assert code == 0 and out.startswith("usage: proxyd audit ")


# --- names a terminal would act on (issue 10.7) ---------------------------------------


def _audit_bytes(*args: str) -> bytes:
    """`proxyd audit ARGS` as a separate process: its stdout, byte for byte."""
    result = subprocess.run([*AUDIT, *args], cwd=CHECKOUT, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


_TABLE_PATH = r'("(?:[^"\\]|\\.)*"|[^ "]+)'
_TABLE_PATHS = re.compile(_TABLE_PATH + "(?: -> " + _TABLE_PATH + ")?")


def _table_paths(cell: str) -> tuple[bytes | None, bytes | None]:
    """A PATH cell back to (path, path2) bytes. A path is either one token without a
    space or a quote, or a double-quoted string; two are joined by " -> ". The cell
    must parse in exactly this way: then no name can pass for two paths."""
    match = _TABLE_PATHS.fullmatch(cell)
    assert match is not None, cell

    def one(token: str | None) -> bytes | None:
        if token is None or token == "-":
            return None
        if token.startswith('"'):
            return unescape(token[1:-1], quotes=True)
        return unescape(token)

    return one(match[1]), one(match[2])


def test_dangerous_names_from_a_real_daemon_in_every_format(tmp_path: Path) -> None:
    """Names of every class of character a terminal acts on (and names that look like
    two paths) through a real daemon into its log, then through each output format:
    no dangerous character in the raw output, every path back to its exact bytes, and
    the table's PATH cell parses one way only (a quoted or space-free path, optionally
    " -> " and a second one), so that a one-path look-alike never reads as two."""
    with Daemon(tmp_path, [{"name": "a"}]) as d:
        c = d.connect("a")
        expected = nasty_requests(c)
        c.close()
        d.wait_event("connection closed")
    log = str(d.log_path)

    raw = _audit_bytes("--format", "json", "--event", "op", log)
    logged = [x + b"\n" for x in d.log_path.read_bytes().splitlines() if b'"event":"op"' in x]
    assert raw == b"".join(logged)  # proxyd's own lines: as logged
    events = [json.loads(x) for x in assert_terminal_safe(raw).splitlines()]
    seen = [(e["op"], unescape(e["path"]), e.get("path2")) for e in events]
    assert [(op, p, None if p2 is None else unescape(p2)) for op, p, p2 in seen] == expected

    rows = assert_terminal_safe(_audit_bytes("--event", "op", log)).splitlines()
    path_at, result_at = rows[0].index("PATH"), rows[0].index("RESULT")
    table = [(row.split()[5], *_table_paths(row[path_at:result_at].rstrip())) for row in rows[1:]]
    assert table == expected
    # The one-path look-alike and the real rename cannot be mistaken for each other.
    lookalike = next(r for r in rows if " mkdir " in r and "shadow" in r)
    rename = next(r for r in rows if " rename " in r)
    assert lookalike[path_at:result_at].rstrip() == '"/x -> //etc/shadow"'
    assert rename[path_at:result_at].rstrip() == "/x -> //etc/shadow"

    summary = assert_terminal_safe(_audit_bytes("--format", "summary", log))
    assert f"total {len(expected)} {len(expected)}" in cells(summary)


def test_dangerous_characters_in_lines_proxyd_did_not_write_are_escaped(tmp_path):
    """Older logs and other programs' JSON may hold raw C1 controls, bidi characters,
    separators, bytes that are not UTF-8: every format escapes them, and json keeps
    the same JSON value."""
    nasty = "\u009b2J\u202e\u2028\u200b\x1b"
    lines = [
        json.dumps(
            {
                "timestamp": "2026-11-27T10:00:00Z",
                "level": "info",
                "event": "op",
                "export": f"vm{nasty}",
                "conn": 1,
                "peer_uid": 0,
                "op": "rename",
                "path": f"/a{nasty}",
                "path2": f"/b {nasty}",
                "result": "ok",
                "dur_us": 1,
            },
            ensure_ascii=False,
        ).encode()
        + b"\n",
        line("10:00:01", f"evil{nasty}", export="vm").replace(b"evil", b"\xff\x9bevil"),
    ]
    path = tmp_path / "log"
    path.write_bytes(b"".join(lines))
    assert dangerous(path.read_bytes().decode("utf-8", "surrogateescape"))  # raw in the input

    raw = _audit_bytes("--format", "json", str(path))
    outputs = [json.loads(x) for x in assert_terminal_safe(raw).splitlines()]
    assert outputs == [json.loads(x.decode("utf-8", "surrogateescape")) for x in lines]

    rows = assert_terminal_safe(_audit_bytes(str(path))).splitlines()
    assert rows[1].split()[6:9] == ["/a\\u009b2J\\u202e\\u2028\\u200b\\x1b", "->", '"/b']
    assert "\\xff\\x9bevil" in rows[2]
    summary = assert_terminal_safe(_audit_bytes("--format", "summary", str(path)))
    assert "export vm\\u009b2J\\u202e\\u2028\\u200b\\x1b: 1 op events" in summary
