"""Robustness against hostile or broken peers, resource use over long runs, and
durability while workers are killed; every test against a real daemon and socket.

* Fuzzing over a real socket (hypothesis): valid requests of every type, mutated ones,
  random bytes behind a plausible header, sometimes several in one write. Every
  complete request gets exactly one well-formed reply (errno-exact for a payload our
  own decoder below refuses), or, at an unknown code or a size past 64 KiB, the
  connection is closed with a "protocol error" warning. No worker ever crashes, and
  LSTAT of "/" works after every example.
* One test per malformed class: oversized headers, negative and huge buffer sizes
  (the worker's memory must not follow them), strings running past the payload, empty
  paths, NUL bytes, non-UTF-8 names, unknown codes, a request split over time, a peer
  stalled mid-request, a peer that never reads its replies.
* Resource limits: max_connections_per_uid; flat descriptor counts and memory over
  100 000 requests (worker) and 10 000 connections (master), run to the count.
* No data lost: files written through descriptors from CREATE/OPEN and renamed into
  place while the busy worker is SIGKILLed every 50-150 ms, aimed at the request it
  executes; at least 50 requests and 20 renames cut short, each found out.
* The atheris harness fuzz/fuzz_decoder.py, run here without atheris so it cannot rot.

Numbers (rates, counts) are printed: run with -s to see them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyd import server, slot
from tests.daemon import Daemon, children, syscall, title, wait_until, write_config
from tests.proxyclient import (
    CHECKOUT,
    CHMOD,
    CHOWN,
    CREATE,
    FD_VALID,
    GETVERSION,
    HEADER,
    LGETXATTR,
    LINK,
    LLISTXATTR,
    LREMOVEXATTR,
    LSETXATTR,
    LSTAT,
    MAX_IO,
    MKDIR,
    MKNOD,
    OPEN,
    READLINK,
    REMOVE,
    RENAME,
    STAT_REC,
    STATFS,
    STATFS_REC,
    SYMLINK,
    TRUNCATE,
    UTIME,
    ConnectionClosed,
    ProxyClient,
    Reply,
    decode_stat,
    errno_of,
    marshal,
    pack_s,
    unpack_s,
)
from tests.ptrace import SYS_RECVFROM, SYS_SENDTO, Tracer
from tests.test_chaos import EXECUTING, aim_at, write_coverage

EXPORT = "r"
CRASHES = ("worker died", "worker crashed", "request failed unexpectedly", "non-JSON line")
# The long runs: as many as fit in their time budget (the numbers are printed).
# Run to the count, however long it takes (measured: 5 s and 4 s on a 2-core machine).
MANY_REQUESTS, MANY_CONNECTIONS = 100_000, 10_000
# Requests, and renames, a death must cut short: the writer goes on until both counts
# are reached (measured: 20 s alone, 25-30 s beside a CPU hog), KILLING_LIMIT at most.
MIN_CUT_SHORT, MIN_RENAMES_CUT = 50, 20
KILLING_LIMIT = 180.0

# Wire layout of every request (docs/protocol.md): s = path or name (NUL-checked),
# v = raw string (an xattr value), d = i32, q = i64.
LAYOUTS = {
    OPEN: "sd",
    CREATE: "sdddd",
    MKNOD: "ddsdq",
    MKDIR: "ddsd",
    SYMLINK: "ddss",
    LINK: "ss",
    LSTAT: "s",
    READLINK: "sd",
    STATFS: "s",
    CHMOD: "sd",
    CHOWN: "sdd",
    TRUNCATE: "sq",
    UTIME: "sqqqq",
    RENAME: "ss",
    REMOVE: "s",
    LGETXATTR: "dss",
    LLISTXATTR: "ds",
    LSETXATTR: "ssvdd",
    LREMOVEXATTR: "ss",
    GETVERSION: "s",
}
FD_CODES = (OPEN, CREATE)
# Success payload sizes of the fixed-size data replies.
DATA_SIZES = {LSTAT: STAT_REC.size, STATFS: STATFS_REC.size, GETVERSION: 8}


def ok(reply: Reply) -> None:
    assert reply.ok, f"expected success, got {os.strerror(errno_of(reply))}"


def fails(reply: Reply, err: int) -> None:
    assert errno_of(reply) == err, f"expected {errno.errorcode[err]}, got {reply}"


def encode(code: int, fields: list[Any]) -> bytes:
    return marshal(LAYOUTS[code].replace("v", "s"), *fields)


def request_bytes(code: int, payload: bytes) -> bytes:
    return HEADER.pack(code, len(payload)) + payload


# --- the export, the daemon, its processes and its log ------------------------------------


def populate(export: Path) -> None:
    """(Re)create the few files every test may use, whatever a test did to them."""
    os.chown(export, 0, 0)
    export.chmod(0o755)
    for name, is_kind in (("file", stat.S_ISREG), ("dir", stat.S_ISDIR), ("link", stat.S_ISLNK)):
        path = export / name
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and is_kind(mode):
            continue
        if mode is not None and stat.S_ISDIR(mode):
            shutil.rmtree(path)
        elif mode is not None:
            path.unlink()
        if name == "file":
            path.write_bytes(b"content")
        elif name == "dir":
            path.mkdir()
        else:
            path.symlink_to("file")
    (export / "dir" / "inner").touch()
    os.setxattr(export / "file", "user.a", b"value")


def start(tmp: Path, export: dict[str, Any] | None = None, **daemon: Any) -> Daemon:
    """A daemon with one populated export; audit=all so that every request is logged."""
    path = tmp / EXPORT
    path.mkdir(exist_ok=True)
    populate(path)
    daemon.setdefault("request_timeout", 5.0)
    daemon.setdefault("audit", "all")
    return Daemon(
        tmp, [{"name": EXPORT, "min_idle": 1, "max_workers": 4, **(export or {})}], **daemon
    )


def connect(d: Daemon, timeout: float = 10.0) -> tuple[ProxyClient, int]:
    """A served connection (socket path kept) and its id in the master's log."""
    client = d.connect(EXPORT, unlink=False, timeout=timeout)
    ok(client.lstat("/"))  # served, so the master has logged the acceptance
    return client, d.events("connection accepted")[-1]["conn"]


def export_path(d: Daemon) -> Path:
    return Path(d.exports[EXPORT]["path"])


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0])
    return values


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def blocked_in_send(pid: int) -> bool:
    """Waiting for the peer to take a reply: in poll(2) for POLLOUT after a send(2)
    that could not go out (server._send_all), or in a blocking send of an older proxyd."""
    return syscall(pid) in (7, 44, 46)  # poll, sendto, sendmsg (x86-64)


class LogTail:
    """The daemon's events, read incrementally; a line that is not JSON is an event too."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]
        self.offset += len(data)
        events = []
        for line in data.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "non-JSON line", "line": line.decode(errors="replace")})
        return events


def crashes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") in CRASHES]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the malformed-request classes that need no special settings."""
    with start(tmp_path_factory.mktemp("shared")) as d:
        yield d
        assert not crashes(LogTail(d.log_path).new()), d.log_text()


# --- 1. fuzzing over a real socket ------------------------------------------------------


def decode(code: int, payload: bytes) -> list[Any] | int:
    """Our own decoder: the fields, or the errno a malformed payload must get (ENOBUFS
    for a field running past the payload, EINVAL for a NUL inside a path or name, where
    trailing NULs end the string as QEMU sends them)."""
    fields: list[Any] = []
    off = 0
    for kind in LAYOUTS[code]:
        if kind in "sv":
            if off + 2 > len(payload):
                return errno.ENOBUFS
            (n,) = struct.unpack_from("=H", payload, off)
            value, off = payload[off + 2 : off + 2 + n], off + 2 + n
            if off > len(payload):
                return errno.ENOBUFS
            if kind == "s" and b"\0" in value.rstrip(b"\0"):
                return errno.EINVAL
            fields.append(value)
        else:
            fmt = "=i" if kind == "d" else "=q"
            if off + struct.calcsize(fmt) > len(payload):
                return errno.ENOBUFS
            fields.append(struct.unpack_from(fmt, payload, off)[0])
            off += struct.calcsize(fmt)
    return fields


def plan(stream: bytes) -> tuple[bytes, list[tuple[int, bytes]], bool]:
    """What to send, the requests in it, and whether it ends in a fatal header.

    A request the stream cuts short is completed with zero bytes (a stalled peer is
    tested separately); everything after a fatal header is dropped.
    """
    out, pos, requests = bytearray(stream), 0, []
    while pos < len(out):
        out += bytes(max(0, pos + HEADER.size - len(out)))
        code, size = HEADER.unpack_from(out, pos)
        if code not in LAYOUTS or size > MAX_IO:
            return bytes(out[: pos + HEADER.size]), requests, True
        end = pos + HEADER.size + size
        out += bytes(max(0, end - len(out)))
        requests.append((code, bytes(out[pos + HEADER.size : end])))
        pos = end
    return bytes(out), requests, False


def check_reply(client: ProxyClient, code: int, payload: bytes) -> None:
    """Exactly one well-formed reply, of the kind `code` needs, that fits the request."""
    fields = decode(code, payload)
    if code in FD_CODES:
        reply = client.recv_fd_reply()
        if reply.fd is not None:
            os.close(reply.fd)
        assert (reply.fd is not None) == (reply.value == FD_VALID), reply
    else:
        reply = client.recv_header_reply("data")  # checks the type, and size 4 for ERROR
    if isinstance(fields, int):
        fails(reply, fields)
    if not reply.ok:
        assert 0 < errno_of(reply) < 4096, reply
        return
    if code in FD_CODES:
        return
    data = reply.data
    assert data is not None
    if code in DATA_SIZES:
        assert len(data) == DATA_SIZES[code], reply
    elif code == READLINK:
        assert len(unpack_s(data)) <= fields[1] - 1, reply
    elif code in (LGETXATTR, LLISTXATTR) and fields[0] == 0:
        assert len(data) == 4 and struct.unpack("=i", data)[0] >= 0, reply
    elif code in (LGETXATTR, LLISTXATTR):
        assert len(unpack_s(data)) <= fields[0], reply
    else:
        assert data == struct.pack("=i", 0), reply


NAMES = [b"/", b"/file", b"/dir", b"/dir/inner", b"/link", b"link", b"/missing", b"", b"/new"]
NAMES += [b"/dir/new", b"/file\0", b"/fi\0le", b"/caf\xe9", b"user.a", b"user.new", b"trusted.t"]
INTS = [0, -1, 1, 2, 0o644, 0o40755, 0o100644, 0o10644, 2**31 - 1, -(2**31), MAX_IO, MAX_IO + 1]
INTS += [os.O_WRONLY | os.O_CREAT | os.O_TRUNC, os.O_RDONLY | os.O_DIRECTORY, os.O_PATH]
FIELDS = {
    "s": st.sampled_from(NAMES) | st.binary(max_size=48),
    "v": st.binary(max_size=48),
    "d": st.sampled_from(INTS) | st.integers(-(2**31), 2**31 - 1),
    "q": st.sampled_from([0, -1, 1, 2**40]) | st.integers(-(2**63), 2**63 - 1),
}
SIZES = st.integers(0, 300) | st.sampled_from([MAX_IO - 1, MAX_IO, MAX_IO + 1, 2**31, 2**32 - 1])
SIZES |= st.integers(0, 2**32 - 1)


@st.composite
def valid_request(draw: st.DrawFn) -> bytes:
    code = draw(st.sampled_from(sorted(LAYOUTS)))
    fields = [draw(FIELDS[kind]) for kind in LAYOUTS[code]]
    if code == LSETXATTR and draw(st.booleans()):
        fields[3] = len(fields[2])  # a size that agrees with the value
    return request_bytes(code, encode(code, fields))


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_request()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "cut", "insert", "u16", "size", "code"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and data:
            data[i] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "u16" and i + 2 <= len(data):  # a string length, or any two bytes
            struct.pack_into(
                "=H", data, i, draw(st.sampled_from([0, 1, 0xFFFF]) | st.integers(0, 0xFFFF))
            )
        elif kind == "size" and len(data) >= HEADER.size:
            struct.pack_into("=I", data, 4, draw(SIZES))
        elif kind == "code" and len(data) >= HEADER.size:
            struct.pack_into("=I", data, 0, draw(st.integers(0, 23) | st.integers(0, 2**32 - 1)))
    return bytes(data)


@st.composite
def random_request(draw: st.DrawFn) -> bytes:
    """Random bytes behind a plausible header (a known code, a small size)."""
    body = draw(st.binary(max_size=160))
    size = draw(st.just(len(body)) | st.integers(0, 200))
    return HEADER.pack(draw(st.sampled_from(sorted(LAYOUTS))), size) + body


STREAMS = st.lists(
    st.one_of(valid_request(), mutated_request(), random_request()), min_size=1, max_size=3
).map(b"".join)


class FuzzRig:
    """The fuzzed daemon, its log and the current connection (replaced when closed)."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.log = LogTail(d.log_path)
        self._client: ProxyClient | None = None
        self.counts: Counter[str] = Counter()

    def client(self) -> ProxyClient:
        if self._client is None:
            self._client = self.d.connect(EXPORT, unlink=False, timeout=5.0)
            self.counts["connections"] += 1
        return self._client

    def drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


@pytest.fixture(scope="module")
def fuzz_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzRig]:
    with start(tmp_path_factory.mktemp("fuzz")) as d:
        rig = FuzzRig(d)
        yield rig
        rig.drop()
        print(f"\nfuzz over a socket: {dict(rig.counts)}")


@settings(
    max_examples=300,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=STREAMS)
def test_fuzzed_requests_over_a_real_socket(fuzz_rig: FuzzRig, stream: bytes) -> None:
    rig = fuzz_rig
    populate(export_path(rig.d))
    data, requests, fatal = plan(stream)
    client = rig.client()
    client.send_raw(data)
    for code, payload in requests:
        check_reply(client, code, payload)
    rig.counts["requests"] += len(requests)
    if fatal:
        with pytest.raises(ConnectionClosed):
            client.recv_header_reply("data")
        rig.drop()
        rig.counts["fatal"] += 1
    events = rig.log.new()
    assert not crashes(events), crashes(events)
    if fatal:
        assert [e for e in events if e["event"] == "protocol error" and e["level"] == "warning"]
    reply = rig.client().lstat("/")  # the same connection, or a fresh one after a fatal error
    ok(reply)
    assert decode_stat(reply.data)["ino"] == os.lstat(export_path(rig.d)).st_ino


# --- 2. malformed classes, one test each ----------------------------------------------------


def closed_for_protocol_error(d: Daemon, client: ProxyClient, conn: int, cause: str) -> None:
    with pytest.raises(ConnectionClosed):
        client.recv_header_reply("data")
    event = d.wait_event("protocol error", conn=conn)[-1]
    assert event["level"] == "warning" and cause in event["error"], event
    d.wait_event("connection closed", conn=conn, reason="protocol error")


@pytest.mark.parametrize("size", [MAX_IO + 1, 2**31, 2**32 - 1])
def test_size_past_64k_closes_the_connection(shared: Daemon, size: int) -> None:
    client, conn = connect(shared)
    client.send_raw(HEADER.pack(LSTAT, size) + pack_s("/"))
    closed_for_protocol_error(shared, client, conn, f"request size {size} exceeds")


def test_size_of_exactly_64k_is_served(shared: Daemon) -> None:
    client, _ = connect(shared)
    payload = pack_s("/file").ljust(MAX_IO, b"x")  # trailing bytes are ignored
    client.send_raw(request_bytes(LSTAT, payload))
    reply = client.recv_header_reply("data")
    ok(reply)
    assert decode_stat(reply.data)["size"] == len(b"content")


@pytest.mark.parametrize("code", [0, 1, 22, 99, 2**32 - 1])
def test_unknown_code_closes_the_connection(shared: Daemon, code: int) -> None:
    client, conn = connect(shared)
    client.send_raw(request_bytes(code, pack_s("/")))
    closed_for_protocol_error(shared, client, conn, f"unknown request code {code}")


def test_negative_sizes_get_an_errno(shared: Daemon) -> None:
    client, _ = connect(shared)
    for bufsize in (-1, -(2**31), 0, 1):
        fails(client.readlink("/link", bufsize), errno.EINVAL)
    fails(client.lgetxattr(-5, "/file", "user.a"), errno.EINVAL)
    fails(client.llistxattr(-1, "/file"), errno.EINVAL)
    fails(client.lsetxattr("/file", "user.neg", b"v", size=-1), errno.EINVAL)
    assert "user.neg" not in os.listxattr(export_path(shared) / "file")
    ok(client.lstat("/"))


def test_huge_buffer_sizes_are_answered_without_allocating_them(shared: Daemon) -> None:
    client, conn = connect(shared)
    worker = shared.serving_worker(conn)

    def ask(size: int) -> None:
        reply = client.readlink("/link", size)
        ok(reply)
        assert unpack_s(reply.data) == b"file"
        reply = client.lgetxattr(size, "/file", "user.a")
        ok(reply)
        assert unpack_s(reply.data) == b"value"
        reply = client.llistxattr(size, "/file")
        ok(reply)
        assert b"user.a\0" in unpack_s(reply.data)

    for size in (4096, MAX_IO):  # warm-up: what any size costs
        ask(size)
    before = memory_kb(worker)
    for size in (MAX_IO + 1, 2**20, 2**30, 2**31 - 2, 2**31 - 1):
        ask(size)
    after = memory_kb(worker)
    print(f"\nworker memory around huge sizes: {before} -> {after} kB")
    assert after["VmHWM"] - before["VmHWM"] < 4096, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 4096, (before, after)


def string_past_payload(code: int, which: int) -> bytes:
    """A valid payload of `code` whose string number `which` claims 65535 bytes."""
    values = {"s": b"/file", "v": b"value", "d": 0, "q": 0}
    payload, strings = b"", []
    for kind in LAYOUTS[code]:
        if kind in "sv":
            strings.append(len(payload))
        payload += marshal(kind.replace("v", "s"), values[kind])
    at = strings[which]
    return payload[:at] + b"\xff\xff" + payload[at + 2 :]


@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
@pytest.mark.parametrize("code", sorted(LAYOUTS))
def test_string_longer_than_the_payload(shared: Daemon, code: int, which: int) -> None:
    client, _ = connect(shared)
    client.send_raw(request_bytes(code, string_past_payload(code, which)))
    reply = client.recv_fd_reply() if code in FD_CODES else client.recv_header_reply("data")
    fails(reply, errno.ENOBUFS)  # in the reply kind of the request
    ok(client.lstat("/"))


def test_zero_length_paths_are_enoent(shared: Daemon) -> None:
    client, _ = connect(shared)
    replies = {
        "open": client.open("", os.O_RDONLY),
        "create": client.create("", os.O_WRONLY | os.O_CREAT, 0o644, 0, 0),
        "mknod": client.mknod(0, 0, "", 0o100644, 0),
        "mkdir": client.mkdir(0, 0, "", 0o755),
        "symlink": client.symlink(0, 0, "file", ""),
        "link": client.link("", "/new"),
        "lstat": client.lstat(""),
        "readlink": client.readlink("", 100),
        "statfs": client.statfs(""),
        "chmod": client.chmod("", 0o644),
        "chown": client.chown("", 0, 0),
        "truncate": client.truncate("", 0),
        "utime": client.utime("", 0, 0, 0, 0),
        "rename": client.rename("", "/new"),
        "remove": client.remove(""),
        "lgetxattr": client.lgetxattr(100, "", "user.a"),
        "llistxattr": client.llistxattr(100, ""),
        "lsetxattr": client.lsetxattr("", "user.a", b"v"),
        "lremovexattr": client.lremovexattr("", "user.a"),
        "getversion": client.getversion(""),
        "only-nul": client.lstat(b"\0"),  # the terminator alone: an empty path
    }
    for reply in replies.values():
        if reply.fd is not None:
            os.close(reply.fd)
    got = {name: errno.errorcode.get(errno_of(r), errno_of(r)) for name, r in replies.items()}
    assert got == dict.fromkeys(replies, "ENOENT")
    assert not (export_path(shared) / "new").exists()


def test_nul_bytes_trailing_accepted_embedded_refused(shared: Daemon) -> None:
    client, _ = connect(shared)
    export = export_path(shared)
    ok(client.lstat(b"/file\0"))  # QEMU counts the C terminator in the length
    ok(client.lstat(b"/file\0\0"))
    reply = client.open(b"/file\0", os.O_RDONLY)
    ok(reply)
    os.close(reply.fd)
    reply = client.lgetxattr(100, b"/file\0", b"user.a\0")
    ok(reply)
    assert unpack_s(reply.data) == b"value"
    fails(client.lstat(b"/fi\0le"), errno.EINVAL)
    fails(client.lstat(b"\0/file"), errno.EINVAL)
    fails(client.mkdir(0, 0, b"/a\0b", 0o755), errno.EINVAL)
    assert not (export / "a").exists()  # the reference would have made "a"
    fails(client.rename("/file", b"/x\0y"), errno.EINVAL)
    assert (export / "file").exists() and not (export / "x").exists()
    reply = client.open(b"/fi\0le", os.O_RDONLY)
    fails(reply, errno.EINVAL)
    ok(client.lsetxattr("/file", "user.nul", b"a\0b"))  # a value is not a path
    assert os.getxattr(export / "file", "user.nul") == b"a\0b"
    ok(client.lstat("/"))


def test_non_utf8_names_work_and_are_logged_escaped(shared: Daemon) -> None:
    client, conn = connect(shared)
    export = export_path(shared)
    ok(client.mkdir(0, 0, b"/caf\xe9\xff", 0o755))
    reply = client.create(b"/caf\xe9\xff/f\x80", os.O_WRONLY | os.O_CREAT, 0o600, 0, 0)
    ok(reply)
    os.write(reply.fd, b"bytes")
    os.close(reply.fd)
    ok(client.lstat(b"/caf\xe9\xff/f\x80"))
    assert (Path(os.fsdecode(bytes(export) + b"/caf\xe9\xff/f\x80"))).read_bytes() == b"bytes"
    shared.wait_event("op", conn=conn, op="mkdir", path="/caf\\xe9\\xff", result="ok")
    shared.wait_event("op", conn=conn, op="create", path="/caf\\xe9\\xff/f\\x80", result="ok")
    shared.wait_event("op", conn=conn, op="lstat", path="/caf\\xe9\\xff/f\\x80", result="ok")


# --- a quiet connection: no timer armed, woken by the master (proxyd/server.py) --------

SYS_SETSOCKOPT = 54  # x86-64


def _switches(pid: int) -> int:
    """Context switches of `pid` so far (a process blocked in a call makes none); -1
    once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return -1
    return sum(int(v) for k, v in re.findall(r"^(\w*ctxt_switches):\s+(\d+)$", status, re.M))


def _waiting(pid: int) -> bool:
    """Blocked in recvfrom(2), not held by a tracer."""
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state == "S" and syscall(pid) == SYS_RECVFROM


def test_the_last_of_a_stall_allowance_is_still_a_timeout() -> None:
    """However little of request_timeout is left, the receive timeout set for it is
    not a zero timeval, which would mean no timeout at all."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        for seconds, none in ((1e-9, False), (0.25, False), (3.0, False), (0, True)):
            server._set_receive_timeout(ours, seconds)
            raw = ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("@ll"))
            assert (struct.unpack("@ll", raw) == (0, 0)) == none, (seconds, raw)


def test_a_quiet_connection_costs_its_worker_no_wake_ups(tmp_path: Path) -> None:
    with start(tmp_path) as d:
        client, conn = connect(d)
        worker = d.serving_worker(conn)
        wait_until(lambda: _waiting(worker), what="the worker waiting for the next request")
        before = _switches(worker)
        time.sleep(1.6)  # the quiet is what is tested (a 0.5 s receive timeout woke 3 times)
        assert _switches(worker) == before, "the worker ran on a quiet connection"
        ok(client.lstat("/"))


@pytest.mark.parametrize("window", ["before its recv", "in its recv"])
def test_the_masters_wake_up_is_never_lost(tmp_path: Path, window: str) -> None:
    """WAKE_SIGNAL after the worker looked at its journal but before its recv(2), or
    while it is blocked in it: either way that recv returns at once (the handler's 1 µs
    receive timeout), the worker clears the timeout, looks again and waits again."""
    with start(tmp_path) as d:
        client, conn = connect(d)
        worker = d.serving_worker(conn)
        wait_until(lambda: _waiting(worker), what="the worker waiting for the next request")
        with Tracer(worker) as tracer:
            if window == "before its recv":
                client.send_raw(request_bytes(LSTAT, pack_s("/")))
                tracer.until(SYS_SENDTO, entry=False)  # the reply is out: the boundary next
                os.kill(worker, slot.WAKE_SIGNAL)  # handled as the worker leaves sendto
            else:
                tracer.until(SYS_RECVFROM, entry=True)  # the wait the tracer interrupted

                def wake_when_blocked() -> None:
                    wait_until(lambda: _waiting(worker), what="the worker blocked in recv")
                    os.kill(worker, slot.WAKE_SIGNAL)

                waker = threading.Thread(target=wake_when_blocked)
                waker.start()
            # Past the restart of an interrupted call (-ERESTARTSYS, 512: not a return).
            woken = tracer.until(SYS_RECVFROM, entry=False, where=lambda s: s.rval != -512)
            assert woken.rval == -errno.EAGAIN, woken
            cleared = tracer.until(
                SYS_SETSOCKOPT, entry=True, where=lambda s: s.args[0] == woken.args[0]
            )
            assert cleared.args[1:3] == (socket.SOL_SOCKET, socket.SO_RCVTIMEO), cleared
            tracer.until(SYS_RECVFROM, entry=True)  # waiting again, with no timeout
            if window == "in its recv":
                waker.join()
        if window == "before its recv":
            reply = client.recv_header_reply("data")
            ok(reply)
        ok(client.lstat("/"))
        assert not d.events("worker died")


def test_a_reload_moves_a_quiet_connection_without_waiting_for_its_guest(
    tmp_path: Path,
) -> None:
    """The master wakes the busy worker it retires: the connection moves to a new
    worker with no request from the guest, which then finds it served as before."""
    with start(tmp_path) as d:
        client, conn = connect(d)
        old = d.serving_worker(conn)
        wait_until(lambda: _waiting(old), what="the worker waiting for the next request")
        settings = {**d.daemon_settings, "audit": "mutations"}  # workers forked differently
        write_config(d.config, settings, list(d.exports.values()))
        d.signal(signal.SIGHUP)
        d.wait_event("worker exited", worker_pid=old)
        assert d.serving_worker(conn) != old
        ok(client.lstat("/"))


# A slow peer, not a stalled one (time is the behaviour under test): every third byte of
# a request comes after SLOW_GAP, and SLOW_TIMEOUT - SLOW_GAP = 2.25 s short of
# request_timeout (the margin a loaded machine may add to a gap), the whole request
# taking longer than it.
SLOW_TIMEOUT, SLOW_GAP = 3.0, 0.75


def test_request_split_byte_by_byte_over_time_is_served(tmp_path: Path) -> None:
    with start(tmp_path, request_timeout=SLOW_TIMEOUT) as d:
        client, conn = connect(d)
        request = request_bytes(LSTAT, pack_s("/file"))
        started = time.monotonic()
        for i, byte in enumerate(request):
            if i % 3 == 2:
                time.sleep(SLOW_GAP)  # the gap is what is tested
            client.send_raw(bytes([byte]))
        reply = client.recv_header_reply("data")
        ok(reply)
        assert decode_stat(reply.data)["size"] == len(b"content")
        # 15 bytes, 5 gaps: the request took longer in all than request_timeout.
        assert time.monotonic() - started > SLOW_TIMEOUT
        # Quiet between requests for longer than request_timeout (load only makes it
        # longer): an idle guest, never "stalled".
        time.sleep(SLOW_TIMEOUT + SLOW_GAP)
        ok(client.lstat("/"))
        assert not d.events("peer stalled mid-request", conn=conn)


@pytest.mark.parametrize("sent", [4, 10], ids=["half-header", "half-payload"])
def test_peer_stalled_mid_request_is_cut_off_and_its_worker_freed(
    tmp_path: Path, sent: int
) -> None:
    # One worker only: the next connection is served only if the stall freed it.
    with start(tmp_path, {"max_workers": 1}, request_timeout=1.0) as d:
        client, conn = connect(d)
        worker = d.serving_worker(conn)
        client.send_raw(request_bytes(LSTAT, pack_s("/file"))[:sent])
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):  # not TimeoutError: within the socket's 10 s
            client.recv_header_reply("data")
        waited = time.monotonic() - started
        print(f"\nstalled peer ({sent} bytes) closed after {waited:.2f} s")
        # Time is the behaviour: cut off only after request_timeout (1 s) of silence. The
        # silence began when the worker took the bytes, after they were sent (0.05 s:
        # between send_raw returning and `started`); load can only lengthen it.
        assert waited > 1.0 - 0.05, waited
        event = d.wait_event("peer stalled mid-request", conn=conn)[-1]
        assert event["level"] == "warning" and event["have"] == sent
        d.wait_event("connection closed", conn=conn, reason="stalled")
        _, conn2 = connect(d)
        assert d.serving_worker(conn2) == worker


def flood(client: ProxyClient, quiet: float = 1.0) -> int:
    """Send LSTATs without reading a reply until sending blocks for `quiet` seconds."""
    request = request_bytes(LSTAT, pack_s("/"))
    client.sock.settimeout(quiet)
    sent = 0
    with contextlib.suppress(TimeoutError):
        while True:
            client.sock.sendall(request)
            sent += 1
    return sent


def test_peer_that_never_reads_blocks_only_its_own_worker(tmp_path: Path) -> None:
    with start(tmp_path, request_timeout=2.0, stop_timeout=1.0) as d:
        hog, conn = connect(d)
        worker = d.serving_worker(conn)
        sent = flood(hog, quiet=0.5)
        wait_until(lambda: blocked_in_send(worker), 5, "the worker to block sending")
        other, _ = connect(d)  # the master and the rest of the pool go on meanwhile
        for _ in range(200):
            ok(other.lstat("/file"))
        hog.close()  # the peer goes away: the worker's send fails and it is freed
        closed = d.wait_event("connection closed", conn=conn)[-1]
        print(
            f"\nunread replies: {sent} requests sent before blocking; then"
            f" {closed['reason']!r} after {closed['requests']} requests"
        )
        assert closed["reason"].startswith(("peer gone", "peer not reading"))
        wait_until(lambda: f"conn={conn} " not in title(worker) + " ", 5, "the worker freed")
        ok(other.lstat("/"))
        assert d.proc.poll() is None and not crashes(LogTail(d.log_path).new())


def test_peer_that_neither_reads_nor_closes_is_cut_off(tmp_path: Path) -> None:
    with start(tmp_path, request_timeout=1.0, stop_timeout=1.0) as d:
        hog, conn = connect(d)
        worker = d.serving_worker(conn)
        flood(hog)
        d.wait_event("connection closed", timeout=5.0, conn=conn, reason="peer not reading")
        d.wait_event("peer not reading its replies", conn=conn)
        wait_until(lambda: f"conn={conn} " not in title(worker) + " ", 5, "the worker freed")


def test_a_peer_not_reading_is_cut_off_however_often_the_master_wakes_its_worker(
    tmp_path: Path,
) -> None:
    """request_timeout after its reply stopped going out, a peer that reads nothing is
    cut off, even while log reopens (SIGUSR1) make the master wake that busy worker
    again and again: a wake-up must not start the wait over (a send with a timeout is
    not restarted, SA_RESTART or not), nor leave the worker to the watchdog's SIGABRT
    (twice request_timeout with a reply unsent). Found by a review of the wake-up."""
    timeout = 2.0
    log_file = tmp_path / "proxyd.json"
    with start(tmp_path, request_timeout=timeout, stop_timeout=1.0, log_file=str(log_file)) as d:
        hog, conn = connect(d)
        worker = d.serving_worker(conn)
        flood(hog, quiet=0.3)
        wait_until(lambda: blocked_in_send(worker), 5, "the worker blocked sending a reply")
        blocked_at = time.monotonic()
        wakes = 0
        # Each reopen: the master stores a new LOG_EPOCH and sends WAKE_SIGNAL; the next
        # once this one reached the worker (it ran) and the master logged it. A loaded
        # machine can only make them fewer.
        while not d.events("peer not reading its replies", conn=conn):
            if time.monotonic() > blocked_at + 3 * timeout or d.events("worker died"):
                break
            before = _switches(worker)
            d.signal(signal.SIGUSR1)
            wakes += 1
            wait_until(lambda n=wakes: len(d.events("log reopened")) >= n, what="the reopen")
            wait_until(lambda b=before: _switches(worker) != b, what="the wake-up delivered")
        waited = time.monotonic() - blocked_at
        died = [e["event"] for e in d.events() if "kill" in e["event"] or "died" in e["event"]]
        assert not died, f"{died} {waited:.1f} s after the worker blocked, woken {wakes} times"
        assert d.events("peer not reading its replies", conn=conn), (
            f"not cut off {waited:.1f} s after the worker blocked sending, woken {wakes} times"
        )
        assert wakes > 1, wakes  # the wake-ups did land in the wait


# --- 3. resource limits ---------------------------------------------------------------------


def test_max_connections_per_uid(tmp_path: Path) -> None:
    public = Path(tempfile.mkdtemp(prefix="proxyd-robust-"))  # reachable by another uid
    public.chmod(0o755)
    export = {"max_connections_per_uid": 2, "socket_mode": "0777", "socket": str(public / "s")}
    try:
        with start(tmp_path, export) as d:
            first, first_conn = connect(d)
            second, _ = connect(d)
            third = d.connect(EXPORT, unlink=False)
            with pytest.raises((ConnectionClosed, BrokenPipeError)):
                third.lstat("/")
            event = d.wait_event("connection refused")[-1]
            assert event["level"] == "warning" and event["peer_uid"] == 0
            assert event["reason"] == "peer uid already holds 2 connections"
            # Another uid is not counted against uid 0.
            code = f"""
import os, socket, sys
sys.path.insert(0, {str(CHECKOUT)!r})
from tests.proxyclient import ProxyClient
os.setgid(4242); os.setuid(4242)
s = socket.socket(socket.AF_UNIX); s.connect({export["socket"]!r})
sys.exit(0 if ProxyClient(s).lstat("/").ok else 1)
"""
            assert subprocess.run([sys.executable, "-c", code], timeout=20).returncode == 0
            # The limit counts live connections: one closed, one more admitted.
            first.close()
            d.wait_event("connection closed", conn=first_conn)
            fourth, _ = connect(d)
            ok(second.lstat("/"))
            assert len(d.events("connection refused")) == 1
    finally:
        shutil.rmtree(public, ignore_errors=True)


MIXED = [  # (request, errno expected)
    (lambda c: c.lstat("/file"), 0),
    (lambda c: c.open("/file", os.O_RDONLY), 0),
    (lambda c: c.create("/scratch", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, 0, 0), 0),
    (lambda c: c.open("/dir", os.O_RDONLY | os.O_DIRECTORY), 0),
    (lambda c: c.open("/missing", os.O_RDONLY), errno.ENOENT),
    (lambda c: c.readlink("/link", 4096), 0),
    (lambda c: c.lgetxattr(4096, "/file", "user.a"), 0),
    (lambda c: c.llistxattr(0, "/file"), 0),
    (lambda c: c.statfs("/"), 0),
    (lambda c: c.getversion("/file"), 0),
    (lambda c: c.mkdir(0, 0, "/d", 0o755), 0),
    (lambda c: c.remove("/d"), 0),
    (lambda c: c.lstat("/missing"), errno.ENOENT),
    (lambda c: c.chmod("/file", 0o644), 0),
]


def run_mixed(client: ProxyClient, count: int) -> int:
    """At least `count` requests from MIXED (descriptors closed as they arrive): how many."""
    done = 0
    while done < count:
        for request, err in MIXED:
            reply = request(client)
            if reply.fd is not None:
                os.close(reply.fd)
            assert errno_of(reply) == err, reply
        done += len(MIXED)
    return done


def test_worker_descriptors_and_memory_stay_flat_over_many_requests(tmp_path: Path) -> None:
    with start(tmp_path, audit="none") as d:
        client, conn = connect(d)
        worker, master = d.serving_worker(conn), d.proc.pid
        warm = run_mixed(client, 3000)
        fds, mem, master_mem = fd_count(worker), memory_kb(worker), memory_kb(master)
        started = time.monotonic()
        done = run_mixed(client, MANY_REQUESTS)
        elapsed = time.monotonic() - started
        after, mem_after, master_after = fd_count(worker), memory_kb(worker), memory_kb(master)
        print(
            f"\n{done} mixed requests in {elapsed:.1f} s ({done / elapsed:.0f}/s); worker fds"
            f" {fds} -> {after}; worker {mem} -> {mem_after} kB; master {master_mem} ->"
            f" {master_after} kB"
        )
        write_coverage("many-requests", f"{done} requests on one connection", requests=done)
        assert after == fds
        assert mem_after["VmRSS"] - mem["VmRSS"] < 2048
        assert master_after["VmRSS"] - master_mem["VmRSS"] < 2048
        assert d.serving_worker(conn) == worker and not crashes(LogTail(d.log_path).new())
        client.close()  # the daemon's own count: connect()'s LSTAT, the warm-up, the run
        closed = d.wait_event("connection closed", conn=conn)[-1]
        rounds = (warm + done) // len(MIXED)  # each with two requests answered ENOENT
        assert (closed["requests"], closed["errors"]) == (1 + warm + done, 2 * rounds)


def test_master_descriptors_and_memory_stay_flat_over_many_connections(tmp_path: Path) -> None:
    with start(tmp_path, audit="none") as d:
        master = d.proc.pid

        def connections(count: int) -> None:
            for _ in range(count):
                client = d.connect(EXPORT, unlink=False)
                ok(client.lstat("/"))
                client.close()

        def settled(total: int) -> None:
            wait_until(
                # Every connection closed and every worker idle (excess idle workers
                # are retired only after 30 s, so their number varies).
                lambda: (
                    len(d.events("connection closed")) >= total
                    and not any(" conn=" in t for t in d.worker_titles().values())
                ),
                20,
                f"{total} connections closed and every worker idle",
            )

        warm = 100
        connections(warm)
        settled(warm)
        fds, mem = d.master_fds_besides_workers(), memory_kb(master)
        started = time.monotonic()
        connections(MANY_CONNECTIONS)
        done = MANY_CONNECTIONS
        elapsed = time.monotonic() - started
        settled(warm + done)
        # Each of them was accepted and closed by the master, and served by a worker.
        assert len(d.events("connection accepted")) == warm + done
        spawned = len(d.events("worker spawned"))
        print(
            f"\n{done} connections in {elapsed:.1f} s ({done / elapsed:.0f}/s), {spawned} workers"
            f" spawned; master fds {fds} -> {d.master_fds_besides_workers()}, memory {mem} ->"
            f" {memory_kb(master)} kB"
        )
        write_coverage("many-connections", f"{done} connections", connections=done)
        assert d.master_fds_besides_workers() == fds
        assert memory_kb(master)["VmRSS"] - mem["VmRSS"] < 2048
        assert not crashes(LogTail(d.log_path).new())


def journal_pages_mapped(pid: int) -> list[int]:
    """kB of each worker journal (a memfd named proxyd-journal) that process `pid` has
    mapped in (/proc/PID/smaps Rss)."""
    sizes, journal = [], False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            journal = "proxyd-journal" in line
        elif journal and line.startswith("Rss:"):
            sizes.append(int(line.split()[1]))
    return sizes


def test_the_master_maps_no_request_buffer_of_its_workers(tmp_path: Path) -> None:
    """The master clears each journal's 64 KiB request buffer for every connection it
    hands over, and its watchdog reads those of quiet connections every tick: through
    the memfd, so that 200 workers do not add 12.5 MB to the master's RSS."""
    with start(tmp_path, audit="none") as d:
        clients = [d.connect(EXPORT, unlink=False) for _ in range(3)]
        for client in clients:
            ok(client.lstat("/"))
        time.sleep(1.0)  # four watchdog ticks over three quiet connections (TICK 0.25 s)
        mapped = journal_pages_mapped(d.proc.pid)
        for client in clients:
            client.close()
    assert len(mapped) >= 3  # a journal per worker serving, and the spare's
    # The fields page, those of the relay and the metrics: 4-12 kB; the buffer is 68.
    assert max(mapped) <= 16, mapped


# --- 4. no data lost while workers are killed ----------------------------------------------


def content(i: int) -> bytes:
    rng = random.Random(i)
    return rng.randbytes(rng.randint(1, 65536))


def holds(path: Path, data: bytes) -> bool:
    return path.is_file() and path.read_bytes() == data


class Writer:
    """A guest writing files: descriptors from CREATE/OPEN, RENAME into place. An -EIO or
    a closed connection leaves the step's outcome unknown: reconnect if need be, check the
    state, and do the step again."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.client: ProxyClient | None = None
        self.counts: Counter[str] = Counter()

    def call(self, op: str, *args: Any) -> Reply | None:
        """One request; None when its outcome is unknown."""
        if self.client is None:
            self.client = self.d.connect(EXPORT, unlink=False, timeout=10.0)
            self.counts["connections"] += 1
        try:
            reply = getattr(self.client, op)(*args)
        except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
            self.counts["connection lost"] += 1
            self.client.close()
            self.client = None
            return None
        if errno_of(reply) == errno.EIO:
            self.counts["EIO"] += 1
            return None
        return reply

    def descriptor(self, op: str, *args: Any) -> int:
        """CREATE (with O_TRUNC) and OPEN can simply be done again."""
        while (reply := self.call(op, *args)) is None:
            pass
        ok(reply)
        assert reply.fd is not None
        return reply.fd

    def rename(self, old: str, new: str) -> bool:
        """RENAME until it is known to have happened: True if its reply said so."""
        while True:
            reply = self.call("rename", old, new)
            if reply is not None:
                ok(reply)
                return True
            self.counts["renames cut short"] += 1
            while (there := self.call("lstat", old)) is None:
                pass
            if not there.ok:  # gone: the uncertain RENAME did happen
                fails(there, errno.ENOENT)
                return False

    def write_file(self, i: int) -> bool:
        data = content(i)
        half = len(data) // 2
        tmp = f"/f{i}.tmp"
        fd = self.descriptor("create", tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, 0, 0)
        assert os.write(fd, data[:half]) == half
        os.close(fd)
        fd = self.descriptor("open", tmp, os.O_WRONLY)
        assert os.pwrite(fd, data[half:], half) == len(data) - half
        os.fsync(fd)
        os.close(fd)
        return self.rename(tmp, f"/f{i}")


def kill_busy_workers(
    d: Daemon, stop: threading.Event, killed: list[int], errors: list[str]
) -> None:
    """Every 50-150 ms, SIGKILL the worker serving the writer, aimed (test_chaos.aim_at)
    at a request it executes: a CREATE, OPEN or RENAME whose outcome the writer must then
    find out, or an LSTAT it checks with. Missed within a second, it is killed all the
    same."""
    rng = random.Random()
    try:
        while not stop.wait(rng.uniform(0.05, 0.15)):
            for pid in children(d.proc.pid):
                if " conn=" in title(pid):
                    with contextlib.suppress(ProcessLookupError):
                        aim_at(pid, EXECUTING, 1.0)
                        os.kill(pid, signal.SIGKILL)  # also ends a stopped process
                        killed.append(pid)
    except BaseException:  # shown by the test, not lost in the thread
        errors.append(traceback.format_exc())


def test_no_acknowledged_write_is_lost_while_workers_are_killed(tmp_path: Path) -> None:
    with start(tmp_path, {"min_idle": 2}, audit="none") as d:
        writer, stop, killed, errors = Writer(d), threading.Event(), [], []
        killer = threading.Thread(target=kill_busy_workers, args=(d, stop, killed, errors))
        acknowledged, verified = [], []
        killer.start()
        try:
            started, i = time.monotonic(), 0
            while (
                writer.counts["EIO"] < MIN_CUT_SHORT
                or writer.counts["renames cut short"] < MIN_RENAMES_CUT
            ) and time.monotonic() - started < KILLING_LIMIT:
                (acknowledged if writer.write_file(i) else verified).append(i)
                i += 1
        finally:
            stop.set()
            killer.join(5)
        export = export_path(d)
        lost = [i for i in acknowledged + verified if not holds(export / f"f{i}", content(i))]
        outcomes = Counter(e["outcome"] for e in d.events("crash recovery"))
        closes = {
            "poison": len(d.events("poison connection closed")),
            "reply state unknown": len(
                d.events("connection closed after a crash: reply state unknown")
            ),
        }
        print(
            f"\nfiles: {len(acknowledged)} renames acknowledged, {len(verified)} verified after an"
            f" unknown outcome, {len(lost)} lost; {len(killed)} workers killed;"
            f" client {dict(writer.counts)}; recoveries {dict(outcomes)}; closes {closes}"
        )
        write_coverage(
            "writes-under-kills",
            f"writes under kills: {len(killed)} kills, {writer.counts['EIO']} requests cut "
            f"short, {writer.counts['renames cut short']} of them renames, {len(lost)} lost",
            kills=len(killed),
            cut_short=writer.counts["EIO"],
            renames_cut_short=writer.counts["renames cut short"],
            lost=len(lost),
        )
        assert not errors, errors
        assert not lost, lost
        assert not list(export.glob("*.tmp"))
        # What the test is about: writes cut short by a death. A kill while a change
        # executes is answered EIO (the writer saw each one), and a RENAME so cut short
        # was checked and found done or not done.
        assert writer.counts["EIO"] == outcomes["answered EIO"] >= MIN_CUT_SHORT
        assert writer.counts["renames cut short"] >= MIN_RENAMES_CUT
        assert len(acknowledged) >= 100
        assert d.proc.poll() is None
        unexpected = crashes(LogTail(d.log_path).new())
        assert not [e for e in unexpected if e["event"] != "worker died"], unexpected


# --- 5. the atheris harness, without atheris ------------------------------------------------


@functools.cache
def harness() -> Any:
    spec = importlib.util.spec_from_file_location(
        "fuzz_decoder", CHECKOUT / "fuzz" / "fuzz_decoder.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300)
    | st.tuples(st.integers(0, 255), valid_request()).map(lambda t: bytes([t[0]]) + t[1][8:])
)
def test_fuzz_harness_runs_without_atheris(data: bytes) -> None:
    harness().TestOneInput(data)
