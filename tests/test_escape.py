"""Escape attempts against a real proxyd, the sandbox measured, the seccomp filter proven.

The guest is untrusted: every request below is one a hostile guest could send. Before
the attempts, canaries are planted OUTSIDE the export: a sibling directory and a file
next to the export, and a directory with a file under /tmp at a known absolute path.
Their content, mode, owner, size, link count, xattrs and all three times are recorded
(atime set far in the past first, so that relatime records any read), and inotify
watches them. After every attempt the canaries must be unchanged and unread, and
nothing new may appear outside the export.

Sections: `..` chains and absolute paths in every request; where `..` lands instead;
symlinks; the export root; device nodes, FIFOs and sockets; setuid files and file
capabilities; O_PATH; races from a second connection (each run until it was seen both
ways); nested exports and a socket inside an export (refused at start: they would be
escapes); capabilities and descriptors read from /proc; seccomp exercised on the
worker's own sandbox set-up, in a child process.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import fcntl
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from proxyd import privileges
from tests.daemon import Daemon, children, title, wait_until, write_config
from tests.proxyclient import (
    CHECKOUT,
    ConnectionClosed,
    ProxyClient,
    Reply,
    ServerHandle,
    decode_q,
    decode_stat,
    decode_statfs,
    errno_of,
    start_server,
)
from tests.ptrace import Tracer
from tests.test_chaos import write_coverage

WORKER_CAPS = 0x80000DB  # CHOWN DAC_OVERRIDE FOWNER FSETID SETGID SETUID MKNOD
OLD_ATIME_NS = 1_000_000_000 * 10**9  # 2001: any read under relatime moves it
RACE_SECONDS = 2.0  # one round of a swap race; rounds go on until it was seen both ways
RACE_LIMIT = 30.0  # seconds: a race not yet seen both ways goes on this long at most
RACE_SIDES = 50  # outcomes required each way (see each race test)
REBINDS = 50  # sockets re-bound under an attacker's symlinks
SYS_TRUNCATE = 76  # x86_64
TOKEN = secrets.token_hex(6)  # in every canary's and every would-be escapee's name

# --- inotify, through ctypes ---------------------------------------------------------

IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_OPEN = (
    0x1,
    0x2,
    0x4,
    0x8,
    0x10,
    0x20,
)
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = (
    0x40,
    0x80,
    0x100,
    0x200,
    0x400,
    0x800,
)
IN_ALL_EVENTS = 0xFFF
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
_IN_NAMES = {
    IN_ACCESS: "ACCESS",
    IN_MODIFY: "MODIFY",
    IN_ATTRIB: "ATTRIB",
    IN_CLOSE_WRITE: "CLOSE_WRITE",
    IN_CLOSE_NOWRITE: "CLOSE_NOWRITE",
    IN_OPEN: "OPEN",
    IN_MOVED_FROM: "MOVED_FROM",
    IN_MOVED_TO: "MOVED_TO",
    IN_CREATE: "CREATE",
    IN_DELETE: "DELETE",
    IN_DELETE_SELF: "DELETE_SELF",
    IN_MOVE_SELF: "MOVE_SELF",
    IN_Q_OVERFLOW: "Q_OVERFLOW",
}
_EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len; then the name
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Event:
    path: str  # the watched path
    mask: int
    name: str  # the child's name, "" for the watched object itself

    def __str__(self) -> str:
        kinds = "|".join(n for bit, n in _IN_NAMES.items() if self.mask & bit)
        return f"{kinds} {os.path.join(self.path, self.name)}"


class Inotify:
    """What the kernel saw happen to some files: opens, reads, writes, changes."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, f"inotify_init1: {os.strerror(ctypes.get_errno())}"
        self.paths: dict[int, str] = {}

    def watch(self, path: Path | str, mask: int = IN_ALL_EVENTS) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        assert wd >= 0, f"inotify_add_watch {path}: {os.strerror(ctypes.get_errno())}"
        self.paths[wd] = str(path)

    def read(self) -> list[Event]:
        events = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                if not mask & IN_IGNORED:
                    events.append(Event(self.paths.get(wd, "?"), mask, os.fsdecode(name)))

    def close(self) -> None:
        os.close(self.fd)


# --- canaries ------------------------------------------------------------------------

_STAT_FIELDS = (
    "st_mode",
    "st_ino",
    "st_dev",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
)
# Harmless events on the export itself, seen from the directory that holds it.
_EXPORT_ITSELF = IN_OPEN | IN_ACCESS | IN_CLOSE_NOWRITE | IN_CLOSE_WRITE | IN_ATTRIB | IN_MODIFY


def _read_noatime(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _list_noatime(path: Path) -> list[str]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def _stat_record(path: Path) -> dict[str, int]:
    st = os.lstat(path)
    return {name: getattr(st, name) for name in _STAT_FIELDS}


@dataclass
class Host:
    """The export and the canaries around it.

    tmp/host/export          the export (the worker's "/")
    tmp/host/sibling/secret  a sibling directory of the export, with a file
    tmp/host/host-file       a file next to the export
    /tmp/proxyd-canary-<token>/secret, .../sub/   a known absolute host path
    """

    root: Path
    token: str
    export: Path = field(init=False)
    sibling: Path = field(init=False)
    host_file: Path = field(init=False)
    canary_dir: Path = field(init=False)
    files: list[Path] = field(init=False)
    dirs: list[Path] = field(init=False)
    baseline: dict[str, object] = field(init=False)
    inotify: Inotify = field(init=False)

    def __post_init__(self) -> None:
        self.export = self.root / "export"
        self.sibling = self.root / "sibling"
        self.host_file = self.root / "host-file"
        self.canary_dir = Path(f"/tmp/proxyd-canary-{self.token}")
        self.export.mkdir()
        self.sibling.mkdir()
        (self.canary_dir / "sub").mkdir(parents=True)
        self.files = [self.sibling / "secret", self.host_file, self.canary_dir / "secret"]
        for i, path in enumerate(self.files):
            path.write_bytes(f"canary {i} {self.token}\n".encode())
            os.chmod(path, 0o640)
            os.setxattr(path, "user.canary", self.token.encode())
        self.dirs = [self.root, self.sibling, self.canary_dir, self.canary_dir / "sub"]
        for path in self.files + self.dirs:
            st = os.lstat(path)
            os.utime(path, ns=(OLD_ATIME_NS, st.st_mtime_ns), follow_symlinks=False)
        self.inotify = Inotify()
        for path in self.dirs:
            self.inotify.watch(path)
        self.baseline = self._snapshot()
        self.inotify.read()  # our own reads in _snapshot

    def _snapshot(self) -> dict[str, object]:
        """Everything observable about the canaries, read without touching atime."""
        snap: dict[str, object] = {}
        for path in self.files + self.dirs:
            snap[f"stat {path}"] = _stat_record(path)
        for path in self.files:
            snap[f"content {path}"] = _read_noatime(path)
            snap[f"xattrs {path}"] = {
                n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path)
            }
        for path in self.dirs:
            snap[f"entries {path}"] = _list_noatime(path)
        snap["token names in / and /tmp"] = self._token_names()
        return snap

    def _token_names(self) -> list[str]:
        """Host paths bearing our token: only the canary directory may."""
        found = []
        for top in ("/", "/tmp"):
            found += [os.path.join(top, n) for n in os.listdir(top) if self.token in n]
        return sorted(found)

    def _suspicious_events(self) -> list[Event]:
        events = []
        for event in self.inotify.read():
            # Requests on the export's root touch the export itself, which is fine.
            harmless = not event.mask & ~(_EXPORT_ITSELF | IN_ISDIR)
            if event.path == str(self.root) and event.name == "export" and harmless:
                continue
            events.append(event)
        return events

    def assert_untouched(self, attempt: str = "") -> None:
        """The canaries were neither read, nor changed, nor joined by anything new."""
        events = self._suspicious_events()  # before our own reads below add events
        assert not events, f"{attempt}: inotify saw host files outside the export: " + "; ".join(
            map(str, events)
        )
        now = self._snapshot()
        self.inotify.read()  # our own reads in _snapshot
        changed = [key for key in self.baseline if now[key] != self.baseline[key]]
        assert not changed, f"{attempt}: canaries outside the export changed: " + "; ".join(
            f"{key}: {self.baseline[key]!r} -> {now[key]!r}" for key in changed
        )

    def close(self) -> None:
        self.inotify.close()
        shutil.rmtree(self.canary_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("escape") / "host"
    root.mkdir()
    h = Host(root, TOKEN)
    yield h
    h.close()


@pytest.fixture(scope="module")
def server(host: Host) -> Iterator[ServerHandle]:
    with start_server("proxyd", host.export) as handle:
        yield handle


@pytest.fixture
def client(server: ServerHandle) -> ProxyClient:
    assert server.proc.poll() is None, f"proxyd is gone:\n{server.stderr[-3000:]}"
    return server.client


_work_ids = itertools.count()


@pytest.fixture
def work(host: Host) -> str:
    """A fresh directory in the export for one test, as the guest names it ("/wN"),
    holding a regular file "inside"."""
    name = f"w{next(_work_ids)}"
    (host.export / name).mkdir()
    (host.export / name / "inside").write_text("inside")
    return f"/{name}"


def ups(host: Host) -> str:
    """Enough "../" to climb from the export to the real root, had the chroot failed."""
    return "../" * (len(host.export.parts) + 4)


def close_fd(reply: Reply) -> None:
    if reply.fd is not None:
        os.close(reply.fd)


def expect_errno(reply: Reply, err: int, attempt: str) -> None:
    close_fd(reply)  # an unexpected success must not leak the descriptor
    got = errno_of(reply)
    assert got == err, (
        f"{attempt}: expected {errno.errorcode[err]}, got "
        f"{'success' if got == 0 else errno.errorcode.get(got, got)}"
    )


def expect_ok(reply: Reply, attempt: str) -> None:
    err = errno_of(reply)
    assert err == 0, f"{attempt}: expected success, got {errno.errorcode.get(err, err)}"


def fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# --- 1. `..` chains and absolute paths, in every request ----------------------------------


def outward_forms(host: Host) -> dict[str, tuple[str, str]]:
    """(directory, file) outside the export, spelled as a guest might try."""
    canary = str(host.canary_dir).lstrip("/")
    return {
        "absolute": (str(host.canary_dir), f"{host.canary_dir}/secret"),
        "dotdot-absolute": (f"/{ups(host)}{canary}", f"/{ups(host)}{canary}/secret"),
        "dotdot-relative": (f"{ups(host)}{canary}", f"{ups(host)}{canary}/secret"),
        "neighbour": ("/../sibling", "/../host-file"),
    }


FORMS = ("absolute", "dotdot-absolute", "dotdot-relative", "neighbour")
E = f"esc-{TOKEN}"  # the name of anything an attempt would create

# Each request, aimed at directory `d` / file `f` outside the export; `w` is the test's
# own directory in the export (holding "inside").
OUTWARD: dict[str, Callable[[ProxyClient, str, str, str], Reply]] = {
    "lstat": lambda c, d, f, w: c.lstat(f),
    "open-read": lambda c, d, f, w: c.open(f, os.O_RDONLY),
    "open-write-trunc": lambda c, d, f, w: c.open(f, os.O_WRONLY | os.O_TRUNC),
    "open-path": lambda c, d, f, w: c.open(f, os.O_PATH),
    "open-dir": lambda c, d, f, w: c.open(d, os.O_RDONLY | os.O_DIRECTORY),
    "create-new": lambda c, d, f, w: c.create(
        f"{d}/{E}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, 0, 0
    ),
    "create-existing": lambda c, d, f, w: c.create(
        f, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644, 0, 0
    ),
    "mknod": lambda c, d, f, w: c.mknod(0, 0, f"{d}/{E}", stat.S_IFREG | 0o644, 0),
    "mkdir": lambda c, d, f, w: c.mkdir(0, 0, f"{d}/{E}", 0o755),
    "symlink-linkpath": lambda c, d, f, w: c.symlink(0, 0, "x", f"{d}/{E}"),
    "link-src": lambda c, d, f, w: c.link(f, f"{w}/{E}"),
    "link-dst": lambda c, d, f, w: c.link(f"{w}/inside", f"{d}/{E}"),
    "rename-src": lambda c, d, f, w: c.rename(f, f"{w}/{E}"),
    "rename-dst": lambda c, d, f, w: c.rename(f"{w}/inside", f"{d}/{E}"),
    "remove": lambda c, d, f, w: c.remove(f),
    "readlink": lambda c, d, f, w: c.readlink(f, 4096),
    "statfs": lambda c, d, f, w: c.statfs(f),
    "chmod": lambda c, d, f, w: c.chmod(f, 0o777),
    "chown": lambda c, d, f, w: c.chown(f, 1000, 1000),
    "truncate": lambda c, d, f, w: c.truncate(f, 0),
    "utime": lambda c, d, f, w: c.utime(f, 0, 0, 0, 0),
    "lsetxattr": lambda c, d, f, w: c.lsetxattr(f, "user.escaped", b"1"),
    "lgetxattr": lambda c, d, f, w: c.lgetxattr(0, f, "user.canary"),
    "llistxattr": lambda c, d, f, w: c.llistxattr(0, f),
    "lremovexattr": lambda c, d, f, w: c.lremovexattr(f, "user.canary"),
    "getversion": lambda c, d, f, w: c.getversion(f),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("request_name", list(OUTWARD))
def test_outward_paths_do_not_reach_the_host(
    client: ProxyClient, host: Host, work: str, request_name: str, form: str
) -> None:
    directory, file = outward_forms(host)[form]
    attempt = f"{request_name} on {form} path {file!r}"
    reply = OUTWARD[request_name](client, directory, file, work)
    if (request_name, form) == ("create-existing", "neighbour"):
        # "/../host-file" is "/host-file" in the chroot: O_CREAT makes it there.
        expect_ok(reply, attempt)
        try:
            assert fd_target(reply.fd) == f"{host.export}/host-file", f"{attempt}: went astray"
        finally:
            os.close(reply.fd)
            os.unlink(host.export / "host-file")
    else:
        # Inside the chroot these paths name nothing: the export has no such entries.
        expect_errno(reply, errno.ENOENT, attempt)
    assert (host.export / work[1:] / "inside").exists(), f"{attempt}: moved the test's file"
    host.assert_untouched(attempt)


# --- 2. where `..` lands instead: the export's root ----------------------------------------


@pytest.mark.parametrize("spelling", ["/..", "..", "/../../..", "dotdot-chain", "/w/../.."])
def test_dotdot_stops_at_the_export_root(
    client: ProxyClient, host: Host, work: str, spelling: str
) -> None:
    path = {"dotdot-chain": ups(host), "/w/../..": f"{work}/../../.."}.get(spelling, spelling)
    reply = client.lstat(path)
    expect_ok(reply, f"lstat {path!r}")
    assert decode_stat(reply.data)["ino"] == host.export.stat().st_ino, (
        f"lstat {path!r} is not the export's root: `..` climbed out of the chroot"
    )
    host.assert_untouched(f"lstat {path!r}")


CREATIONS: dict[str, Callable[[ProxyClient, str, str], Reply]] = {
    "create": lambda c, p, w: c.create(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, 0, 0),
    "mkdir": lambda c, p, w: c.mkdir(0, 0, p, 0o755),
    "mknod": lambda c, p, w: c.mknod(0, 0, p, stat.S_IFIFO | 0o644, 0),
    "symlink": lambda c, p, w: c.symlink(0, 0, "/../../etc/passwd", p),
    "link": lambda c, p, w: c.link(f"{w}/inside", p),
    "rename": lambda c, p, w: c.rename(f"{w}/inside", p),
}


@pytest.mark.parametrize("request_name", list(CREATIONS))
def test_dotdot_creations_land_inside_the_export(
    client: ProxyClient, host: Host, work: str, request_name: str
) -> None:
    name = f"{E}-{request_name}-{work[1:]}"
    path = f"/{ups(host)}{name}"
    reply = CREATIONS[request_name](client, path, work)
    close_fd(reply)
    expect_ok(reply, f"{request_name} {path!r}")
    assert os.path.lexists(host.export / name), f"{request_name} {path!r}: not in the export"
    assert not os.path.lexists(host.root / name), f"{request_name} {path!r}: beside the export"
    assert not os.path.lexists(f"/{name}"), f"{request_name} {path!r}: created at the host's /"
    host.assert_untouched(f"{request_name} {path!r}")


def test_getversion_of_dotdot_is_the_export_roots(client: ProxyClient, host: Host) -> None:
    reply = client.getversion(f"/{ups(host)}")
    expect_ok(reply, "getversion of a `..` chain")
    fd = os.open(host.export, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, 0x80087601, buf)  # FS_IOC_GETVERSION
    finally:
        os.close(fd)
    expected = int.from_bytes(buf[:4], sys.byteorder)
    assert decode_q(reply.data) == expected, "getversion of `..` reached another directory"
    host.assert_untouched("getversion of a `..` chain")


def test_statfs_of_dotdot_is_the_exports_filesystem(client: ProxyClient, host: Host) -> None:
    reply = client.statfs(f"/{ups(host)}")
    expect_ok(reply, "statfs of a `..` chain")
    fsid = os.statvfs(host.export).f_fsid
    got = decode_statfs(reply.data)
    assert (got["fsid0"] & 0xFFFFFFFF | (got["fsid1"] & 0xFFFFFFFF) << 32) == fsid, (
        "statfs of `..` reports another filesystem"
    )
    host.assert_untouched("statfs of a `..` chain")


@pytest.mark.parametrize(
    "path", ["/proc/self/exe", "/proc/self/root", "/proc/1/root", "/proc/self/cwd"]
)
def test_no_proc_inside_the_chroot(client: ProxyClient, host: Host, path: str) -> None:
    expect_errno(client.readlink(path, 4096), errno.ENOENT, f"readlink {path}")
    expect_errno(client.open(path, os.O_RDONLY), errno.ENOENT, f"open {path}")
    host.assert_untouched(f"readlink {path}")


def test_nul_in_a_path_is_refused(client: ProxyClient, host: Host, work: str) -> None:
    path = f"{work}/inside\0/{ups(host)}{str(host.canary_dir).lstrip('/')}/secret"
    expect_errno(client.open(path.encode(), os.O_RDONLY), errno.EINVAL, "open with a NUL")
    host.assert_untouched("open with a NUL")


def test_path_longer_than_path_max_is_refused(client: ProxyClient, host: Host) -> None:
    path = "/" + "../" * 1400 + str(host.canary_dir).lstrip("/") + "/secret"
    expect_errno(client.lstat(path), errno.ENAMETOOLONG, "lstat of a 4 KiB path")
    host.assert_untouched("lstat of a 4 KiB path")


# --- 3. symlinks ---------------------------------------------------------------------------


def plant_decoy(host: Host, relative: str, content: bytes) -> Path:
    """A file inside the export at the path a host path would have inside the chroot."""
    decoy = host.export / relative.lstrip("/")
    decoy.parent.mkdir(parents=True, exist_ok=True)
    decoy.write_bytes(content)
    return decoy


def remove_decoys(host: Host) -> None:
    shutil.rmtree(host.export / "tmp", ignore_errors=True)


@pytest.mark.parametrize(
    "target_kind", ["absolute", "dotdot-relative", "dotdot-absolute", "neighbour"]
)
def test_outward_symlink_opens_nothing_outside(
    client: ProxyClient, host: Host, work: str, target_kind: str
) -> None:
    _, target = outward_forms(host)[target_kind]
    link = f"{work}/link"
    expect_ok(client.symlink(0, 0, target, link), f"symlink -> {target!r}")
    assert os.readlink(host.export / link[1:]) == target, "the link text was altered"
    for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND):
        expect_errno(client.open(link, flags), errno.ENOENT, f"open({flags:#o}) via {target!r}")
    expect_errno(client.getversion(link), errno.ENOENT, f"getversion via {target!r}")
    expect_errno(client.truncate(link, 0), errno.ENOENT, f"truncate via {target!r}")
    expect_errno(client.chmod(link, 0o777), errno.ENOENT, f"chmod via {target!r}")
    expect_errno(client.statfs(link), errno.ENOENT, f"statfs via {target!r}")
    host.assert_untouched(f"symlink to {target!r}")


@pytest.mark.parametrize("target_kind", ["absolute", "dotdot-relative"])
def test_outward_symlink_resolves_to_the_decoy_inside(
    client: ProxyClient, host: Host, work: str, target_kind: str
) -> None:
    _, target = outward_forms(host)[target_kind]
    decoy = plant_decoy(host, f"{host.canary_dir}/secret", b"decoy inside the export")
    try:
        link = f"{work}/link"
        expect_ok(client.symlink(0, 0, target, link), f"symlink -> {target!r}")
        reply = client.open(link, os.O_RDWR)
        expect_ok(reply, f"open via {target!r}")
        try:
            assert os.fstat(reply.fd).st_ino == decoy.stat().st_ino, (
                f"open via {target!r} is not the decoy: {fd_target(reply.fd)}"
            )
            assert os.pread(reply.fd, 100, 0) == b"decoy inside the export"
        finally:
            os.close(reply.fd)
        expect_ok(client.chmod(link, 0o600), "chmod via the link")
        expect_ok(client.truncate(link, 5), "truncate via the link")
        assert decoy.stat().st_size == 5 and stat.S_IMODE(decoy.stat().st_mode) == 0o600
    finally:
        remove_decoys(host)
    host.assert_untouched(f"open through a symlink to {target!r}")


def test_dangling_outward_symlink_is_not_created_through(
    client: ProxyClient, host: Host, work: str
) -> None:
    target = f"{host.canary_dir}/{E}-dangling"
    expect_ok(client.symlink(0, 0, target, f"{work}/dangling"), "symlink")
    reply = client.create(f"{work}/dangling", os.O_CREAT | os.O_WRONLY, 0o644, 0, 0)
    expect_errno(reply, errno.ENOENT, "create through a dangling symlink to the host")
    assert not os.path.lexists(target), "the host file was created"
    host.assert_untouched("create through a dangling symlink")


def test_chained_symlinks_stay_inside(client: ProxyClient, host: Host, work: str) -> None:
    canary = str(host.canary_dir).lstrip("/")
    expect_ok(client.symlink(0, 0, "b", f"{work}/a"), "symlink a")
    expect_ok(client.symlink(0, 0, f"{work}/c", f"{work}/b"), "symlink b")
    expect_ok(client.symlink(0, 0, f"../../{ups(host)}{canary}", f"{work}/c"), "symlink c")
    via = f"{work}/a"
    expect_errno(client.open(f"{via}/secret", os.O_RDONLY), errno.ENOENT, "open a/secret")
    expect_errno(client.lstat(f"{via}/secret"), errno.ENOENT, "lstat a/secret")
    expect_errno(client.chmod(f"{via}/secret", 0o777), errno.ENOENT, "chmod a/secret")
    expect_errno(
        client.create(f"{via}/{E}", os.O_CREAT | os.O_WRONLY, 0o644, 0, 0),
        errno.ENOENT,
        "create a/new",
    )
    expect_errno(client.mkdir(0, 0, f"{via}/{E}", 0o755), errno.ENOENT, "mkdir a/new")
    expect_errno(client.rename(f"{work}/inside", f"{via}/{E}"), errno.ENOENT, "rename to a/")
    expect_errno(client.link(f"{via}/secret", f"{work}/{E}"), errno.ENOENT, "link a/secret")
    host.assert_untouched("chained symlinks")


@pytest.mark.parametrize("target", ["/proc/self/root", "/proc/1/root", "/proc/self/cwd/.."])
def test_symlink_to_proc_root_is_nothing(
    client: ProxyClient, host: Host, work: str, target: str
) -> None:
    expect_ok(client.symlink(0, 0, target, f"{work}/proc"), f"symlink -> {target}")
    through = f"{work}/proc{host.canary_dir}/secret"
    expect_errno(client.open(through, os.O_RDONLY), errno.ENOENT, f"open via {target}")
    expect_errno(client.lstat(through), errno.ENOENT, f"lstat via {target}")
    expect_errno(client.truncate(through, 0), errno.ENOENT, f"truncate via {target}")
    host.assert_untouched(f"symlink to {target}")


LOOPED: dict[str, Callable[[ProxyClient, str], Reply]] = {
    "open": lambda c, p: c.open(p, os.O_RDONLY),
    "create": lambda c, p: c.create(p, os.O_CREAT | os.O_WRONLY, 0o644, 0, 0),
    "getversion": lambda c, p: c.getversion(p),
    "statfs": lambda c, p: c.statfs(p),
    "truncate": lambda c, p: c.truncate(p, 0),
    "chmod": lambda c, p: c.chmod(p, 0o777),
    "lstat-through": lambda c, p: c.lstat(f"{p}/x"),
    "mkdir-through": lambda c, p: c.mkdir(0, 0, f"{p}/x", 0o755),
}


@pytest.mark.parametrize("request_name", list(LOOPED))
def test_looping_symlinks_give_eloop(
    client: ProxyClient, host: Host, work: str, request_name: str
) -> None:
    expect_ok(client.symlink(0, 0, "loop2", f"{work}/loop1"), "symlink loop1")
    expect_ok(client.symlink(0, 0, f"{work}/loop1", f"{work}/loop2"), "symlink loop2")
    reply = LOOPED[request_name](client, f"{work}/loop1")
    expect_errno(reply, errno.ELOOP, f"{request_name} on a symlink loop")
    host.assert_untouched(f"{request_name} on a symlink loop")


# --- 4. the export root --------------------------------------------------------------------

ROOT_ATTACKS: dict[str, tuple[Callable[[ProxyClient, str], Reply], int]] = {
    "rename /": (lambda c, w: c.rename("/", f"{w}/{E}"), errno.EBUSY),
    "rename onto /": (lambda c, w: c.rename(f"{w}/inside", "/"), errno.EBUSY),
    "rename /..": (lambda c, w: c.rename("/..", f"{w}/{E}"), errno.EBUSY),
    "rename w/../..": (lambda c, w: c.rename(f"{w}/../..", f"{w}/{E}"), errno.EBUSY),
    "remove /": (lambda c, w: c.remove("/"), errno.EBUSY),
    "remove .": (lambda c, w: c.remove("."), errno.EINVAL),
    "remove ..": (lambda c, w: c.remove(".."), errno.ENOTEMPTY),
    "remove /..": (lambda c, w: c.remove("/.."), errno.ENOTEMPTY),
    "link /": (lambda c, w: c.link("/", f"{w}/{E}"), errno.EPERM),
    "mkdir ..": (lambda c, w: c.mkdir(0, 0, "..", 0o755), errno.EEXIST),
}


@pytest.mark.parametrize("attack", list(ROOT_ATTACKS))
def test_the_export_root_cannot_be_moved_or_removed(
    client: ProxyClient, host: Host, work: str, attack: str
) -> None:
    before = host.export.stat().st_ino
    request, err = ROOT_ATTACKS[attack]
    expect_errno(request(client, work), err, attack)
    assert host.export.stat().st_ino == before, f"{attack}: the export root changed"
    host.assert_untouched(attack)


# --- 5. device nodes, FIFOs, sockets ---------------------------------------------------------


def root_disk() -> tuple[int, int]:
    """major:minor of the block device holding the host's /."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            major, minor = fields[2].split(":")
            return int(major), int(minor)
    dev = os.stat("/").st_dev
    return os.major(dev), os.minor(dev)


DEVICES = {
    "root-disk": (stat.S_IFBLK, root_disk()),
    "mem": (stat.S_IFCHR, (1, 1)),
    "kmem": (stat.S_IFCHR, (1, 2)),
    "port": (stat.S_IFCHR, (1, 4)),
    "null": (stat.S_IFCHR, (1, 3)),  # opens for anyone: an open would surely be seen
}
DEVICE_REQUESTS: dict[str, tuple[Callable[[ProxyClient, str], Reply], int]] = {
    "open-read": (lambda c, p: c.open(p, os.O_RDONLY), errno.ENXIO),
    "open-rdwr": (lambda c, p: c.open(p, os.O_RDWR), errno.ENXIO),
    "open-nonblock": (lambda c, p: c.open(p, os.O_RDONLY | os.O_NONBLOCK), errno.ENXIO),
    "open-path": (lambda c, p: c.open(p, os.O_PATH), errno.ENXIO),
    "create-existing": (
        lambda c, p: c.create(p, os.O_CREAT | os.O_RDWR, 0o600, 0, 0),
        errno.ENXIO,
    ),
    "getversion": (lambda c, p: c.getversion(p), errno.ENXIO),
    "truncate": (lambda c, p: c.truncate(p, 0), errno.EINVAL),
    "readlink": (lambda c, p: c.readlink(p, 4096), errno.EINVAL),
    "chmod": (lambda c, p: c.chmod(p, 0o666), 0),
}
# What would show that the node itself was opened, read or written.
_NODE_USED = IN_OPEN | IN_ACCESS | IN_MODIFY | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE


@pytest.mark.parametrize("request_name", list(DEVICE_REQUESTS))
@pytest.mark.parametrize("device", list(DEVICES))
def test_device_nodes_are_never_opened(
    client: ProxyClient, host: Host, work: str, device: str, request_name: str
) -> None:
    kind, (major, minor) = DEVICES[device]
    node = f"{work}/{device}"
    expect_ok(client.mknod(0, 0, node, kind | 0o600, os.makedev(major, minor)), "mknod")
    st = os.lstat(host.export / node[1:])
    assert (stat.S_IFMT(st.st_mode), st.st_rdev) == (kind, os.makedev(major, minor))
    watcher = Inotify()
    try:
        watcher.watch(host.export / node[1:])  # follows the node's inode, not its name
        request, err = DEVICE_REQUESTS[request_name]
        reply = request(client, node)
        if err:
            expect_errno(reply, err, f"{request_name} of {device} {major}:{minor}")
        else:
            expect_ok(reply, f"{request_name} of {device}")
        used = [e for e in watcher.read() if e.mask & _NODE_USED]
        assert not used, f"{request_name} of {device}: the node was opened: {used}"
    finally:
        watcher.close()
    host.assert_untouched(f"{request_name} of a {device} node")


def test_inotify_would_see_a_device_open(client: ProxyClient, host: Host, work: str) -> None:
    """The control for the test above: opening the node is visible to the watch."""
    node = f"{work}/null"
    expect_ok(client.mknod(0, 0, node, stat.S_IFCHR | 0o600, os.makedev(1, 3)), "mknod")
    watcher = Inotify()
    try:
        watcher.watch(host.export / node[1:])
        os.close(os.open(host.export / node[1:], os.O_RDONLY))
        assert any(e.mask & IN_OPEN for e in watcher.read()), "inotify missed an open"
    finally:
        watcher.close()


def test_symlink_to_a_device_node_is_refused(client: ProxyClient, host: Host, work: str) -> None:
    major, minor = root_disk()
    expect_ok(
        client.mknod(0, 0, f"{work}/disk", stat.S_IFBLK | 0o600, os.makedev(major, minor)), "mknod"
    )
    expect_ok(client.symlink(0, 0, "disk", f"{work}/link"), "symlink")
    expect_errno(client.open(f"{work}/link", os.O_RDWR), errno.ENXIO, "open through a link")
    expect_errno(client.getversion(f"{work}/link"), errno.ENXIO, "getversion through a link")
    host.assert_untouched("device behind a symlink")


SPECIALS = {"fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}
SPECIAL_REQUESTS: dict[str, Callable[[ProxyClient, str], Reply]] = {
    "open-read": lambda c, p: c.open(p, os.O_RDONLY),
    "open-write": lambda c, p: c.open(p, os.O_WRONLY),
    "open-rdwr": lambda c, p: c.open(p, os.O_RDWR),
    "create-existing": lambda c, p: c.create(p, os.O_CREAT | os.O_WRONLY, 0o600, 0, 0),
    "getversion": lambda c, p: c.getversion(p),
}


@pytest.mark.parametrize("request_name", list(SPECIAL_REQUESTS))
@pytest.mark.parametrize("kind", list(SPECIALS))
def test_fifos_and_sockets_give_enxio_without_hanging(
    client: ProxyClient, host: Host, work: str, kind: str, request_name: str
) -> None:
    node = f"{work}/{kind}"
    expect_ok(client.mknod(1000, 1000, node, SPECIALS[kind] | 0o666, 0), f"mknod {kind}")
    watcher = Inotify()
    try:
        watcher.watch(host.export / node[1:])
        # Without hanging: a worker that opened the FIFO would sit in open(2) until the
        # client's socket timeout (TimeoutError) or request_timeout (EIO), never ENXIO.
        reply = SPECIAL_REQUESTS[request_name](client, node)
        expect_errno(reply, errno.ENXIO, f"{request_name} of a {kind}")
        used = [e for e in watcher.read() if e.mask & _NODE_USED]
        assert not used, f"{request_name} of a {kind}: it was opened: {used}"
    finally:
        watcher.close()
    host.assert_untouched(f"{request_name} of a {kind}")


# --- 6. setuid files and file capabilities ----------------------------------------------------
# proxyd runs as root inside the export (as the reference does), so a guest CAN make a
# setuid-root file there. These tests pin down what the host gets and that it stays in the
# export: an export on a filesystem mounted without nosuid is exposed to it.


def test_setuid_file_created_as_a_guest_user(client: ProxyClient, host: Host, work: str) -> None:
    reply = client.create(f"{work}/suid", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o4755, 1000, 1000)
    expect_ok(reply, "create 04755 as uid 1000")
    os.close(reply.fd)
    st = os.lstat(host.export / work[1:] / "suid")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (1000, 0o4755), (
        f"setuid file on the host is uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):o}"
    )
    host.assert_untouched("setuid create")


def test_setuid_root_file_via_chmod_and_chown(client: ProxyClient, host: Host, work: str) -> None:
    path, on_host = f"{work}/tool", host.export / work[1:] / "tool"
    reply = client.create(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o755, 1000, 1000)
    expect_ok(reply, "create")
    os.close(reply.fd)
    expect_ok(client.chmod(path, 0o6755), "chmod 06755")
    assert stat.S_IMODE(on_host.stat().st_mode) == 0o6755, "chmod 06755 did not stick"
    expect_ok(client.chown(path, 0, 0), "chown 0:0")
    st = on_host.stat()
    # The kernel clears setuid/setgid on chown, even for root ...
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755), oct(st.st_mode)
    # ... but a chmod afterwards makes a setuid-root file inside the export.
    expect_ok(client.chmod(path, 0o6755), "chmod 06755 after chown")
    st = on_host.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o6755), oct(st.st_mode)
    assert on_host.resolve().is_relative_to(host.export), "the setuid file left the export"
    host.assert_untouched("setuid root via chmod/chown")


@pytest.mark.parametrize(
    "name", ["security.capability", "trusted.overlay.opaque", "security.evm", "security.ima"]
)
def test_privileged_xattrs_are_refused(
    client: ProxyClient, host: Host, work: str, name: str
) -> None:
    # VFS_CAP_REVISION_2 granting CAP_SYS_ADMIN when executed: needs CAP_SETFCAP.
    value = struct.pack("=IIIII", 0x02000000, 1 << 21, 0, 0, 0)
    reply = client.lsetxattr(f"{work}/inside", name, value)
    assert errno_of(reply) in (errno.EPERM, errno.EOPNOTSUPP), (
        f"lsetxattr {name}: expected EPERM, got {errno_of(reply)}"
    )
    assert name not in os.listxattr(host.export / work[1:] / "inside")
    host.assert_untouched(f"lsetxattr {name}")


# --- 7. O_PATH ----------------------------------------------------------------------------------


def test_o_path_descriptor_of_root_is_the_export(client: ProxyClient, host: Host) -> None:
    reply = client.open(f"/{ups(host)}", os.O_PATH | os.O_DIRECTORY)
    expect_ok(reply, "O_PATH open of a `..` chain")
    try:
        assert fd_target(reply.fd) == str(host.export), "the descriptor is not the export"
    finally:
        os.close(reply.fd)
    host.assert_untouched("O_PATH of `..`")


def test_o_path_nofollow_on_an_outward_symlink(client: ProxyClient, host: Host, work: str) -> None:
    expect_ok(client.symlink(0, 0, str(host.canary_dir), f"{work}/out"), "symlink")
    reply = client.open(f"{work}/out", os.O_PATH | os.O_NOFOLLOW)
    expect_errno(reply, errno.ENXIO, "O_PATH|O_NOFOLLOW of a symlink")
    reply = client.open(f"{work}/out", os.O_PATH | os.O_DIRECTORY)
    expect_errno(reply, errno.ENOENT, "O_PATH|O_DIRECTORY through the symlink")
    host.assert_untouched("O_PATH of an outward symlink")


@pytest.mark.parametrize("flags", [os.O_TMPFILE | os.O_RDWR, os.O_CREAT | os.O_RDWR])
def test_open_cannot_create(client: ProxyClient, host: Host, work: str, flags: int) -> None:
    expect_errno(client.open(work, flags), errno.EINVAL, f"open({flags:#o})")
    host.assert_untouched(f"open({flags:#o})")


# --- 8. races from a second connection --------------------------------------------------------


def race_daemon(tmp_path: Path, host: Host) -> Daemon:
    return Daemon(tmp_path, [{"name": "race", "path": str(host.export), "min_idle": 2}])


def swap_loop(swapper: ProxyClient, a: str, b: str, park: str, until: float) -> int:
    """Exchange the entries `a` and `b` over and over with four RENAMEs."""
    swaps = 0
    while time.monotonic() < until:
        swapper.rename(a, park)
        swapper.rename(b, a)
        swapper.rename(a, b)
        swapper.rename(park, a)
        swaps += 1
    return swaps


def executing(event: dict) -> tuple[float, float]:
    """When the request of an audit `op` event ran in its worker, as (start, end) in
    seconds since the epoch: from the start of its execution to the audit line, written
    once the reply was sent (timestamp and dur_us, docs/events.md)."""
    end = datetime.fromisoformat(event["timestamp"]).timestamp()
    return end - event["dur_us"] / 1e6, end


def overlapping(requests: list[dict], renames: list[dict]) -> int:
    """How many of `requests` (audit events) ran while one of `renames` ran in another
    worker. The renames come from one connection, one at a time: sorted by start."""
    spans = sorted(executing(e) for e in renames)
    starts = [start for start, _ in spans]
    found = 0
    for start, end in map(executing, requests):
        i = bisect.bisect_left(starts, end) - 1  # the last rename that started before `end`
        found += i >= 0 and spans[i][1] > start
    return found


def test_directory_swapped_for_outward_symlink_race(tmp_path: Path, host: Host) -> None:
    """A second connection swaps the directory /race/d with /race/s, a symlink to the
    canary directory's absolute host path, while the first sends requests through
    /race/d (open, create, chmod, truncate, utime, lsetxattr, link, mkdir, getversion).
    In the chroot the symlink resolves to a decoy at that path inside the export, so the
    descriptor of each OPEN and CREATE says which way its path went. What must hold: no
    descriptor of anything outside the export, the canaries untouched. And the race must
    have been run: RACE_SIDES descriptors that came through the directory and as many
    through the symlink, and RACE_SIDES requests that executed while a RENAME of the
    swapper executed in the other worker (the workers' audit lines: timestamp and
    dur_us of each request)."""
    canary = str(host.canary_dir).lstrip("/")
    race = host.export / "race"
    race.mkdir()
    (race / "d").mkdir()
    (race / "d" / "secret").write_text("inside")
    decoys = plant_decoy(host, f"{host.canary_dir}/secret", b"decoy inside the export").parent
    sides = {"directory": 0, "symlink": 0}
    attempts = overlapped = 0
    started = time.monotonic()
    try:
        with race_daemon(tmp_path, host) as d:
            worker, swapper = d.connect("race"), d.connect("race")
            expect_ok(swapper.symlink(0, 0, f"/{ups(host)}{canary}", "/race/s"), "symlink")
            requests = [
                lambda: worker.open("/race/d/secret", os.O_RDWR),
                lambda: worker.create("/race/d/new", os.O_CREAT | os.O_WRONLY, 0o644, 0, 0),
                lambda: worker.chmod("/race/d/secret", 0o640),
                lambda: worker.truncate("/race/d/secret", 5),
                lambda: worker.utime("/race/d/secret", 1, 0, 1, 0),
                lambda: worker.lsetxattr("/race/d/secret", "user.race", b"1"),
                lambda: worker.link("/race/d/secret", f"/race/l{attempts}"),
                lambda: worker.mkdir(0, 0, "/race/d/sub", 0o755),
                lambda: worker.getversion("/race/d/secret"),
            ]
            while min(sides.values()) < RACE_SIDES or overlapped < RACE_SIDES:
                assert time.monotonic() - started < RACE_LIMIT, (
                    f"the race was not run both ways in {RACE_LIMIT:.0f} s: descriptors "
                    f"{sides}, requests executed during a rename {overlapped}"
                )
                until = time.monotonic() + RACE_SECONDS
                names = ("/race/d", "/race/s", "/race/p")
                swaps = threading.Thread(target=swap_loop, args=(swapper, *names, until))
                swaps.start()
                while swaps.is_alive():
                    reply = requests[attempts % len(requests)]()
                    attempts += 1
                    if reply.fd is not None:
                        target = fd_target(reply.fd)
                        os.close(reply.fd)
                        if target.startswith(f"{decoys}/"):
                            sides["symlink"] += 1
                        else:  # race/d or race/p: the directory, wherever it was moved
                            assert target.startswith(f"{race}/"), f"race opened {target}"
                            sides["directory"] += 1
                swaps.join()
                ops = d.events("op")  # audit = mutations: every request here but GETVERSION
                renames = [e for e in ops if e["op"] == "rename"]
                overlapped = overlapping([e for e in ops if e["op"] != "rename"], renames)
    finally:
        remove_decoys(host)
    print(
        f"directory/symlink swap race, {time.monotonic() - started:.1f} s: {attempts} requests, "
        f"descriptors {sides}, {overlapped} requests executed during a rename"
    )
    write_coverage(
        "swap-race-directory",
        f"directory/symlink swap: {sides['directory']} via the directory, {sides['symlink']} "
        f"via the symlink, {overlapped} during a rename",
        sides=sides,
        during_a_rename=overlapped,
    )
    host.assert_untouched(f"directory/symlink swap race ({attempts} requests)")


def test_regular_file_swapped_for_device_race(tmp_path: Path, host: Host) -> None:
    """The pre-open check and the open are two steps, and a second connection swaps a
    device node in and out under the name being opened. What must hold, whoever wins
    each round: no device descriptor ever reaches the client, and the device is never
    opened (inotify would see IN_OPEN on the node; the control is
    test_inotify_would_see_a_device_open). Which errno a refusal gets depends on where
    the swap landed (ENXIO: the check saw the device; EACCES: the open did, on the
    worker's nodev mount; ENOENT: the name was parked), so only the sides are counted:
    the race must really have been run both ways."""
    race = host.export / "devrace"
    race.mkdir()
    (race / "f").write_text("regular")
    os.mknod(race / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null: harmless
    watcher = Inotify()
    watcher.watch(race / "dev")  # the node's inode, under whichever name it has
    sides = {"file": 0, "device": 0}
    errnos: dict[str, int] = {}
    started = time.monotonic()
    try:
        with race_daemon(tmp_path, host) as d:
            worker, swapper = d.connect("race"), d.connect("race")
            while min(sides.values()) < RACE_SIDES and time.monotonic() - started < RACE_LIMIT:
                until = time.monotonic() + RACE_SECONDS
                names = ("/devrace/f", "/devrace/dev", "/devrace/p")
                swaps = threading.Thread(target=swap_loop, args=(swapper, *names, until))
                swaps.start()
                while swaps.is_alive():
                    reply = worker.open("/devrace/f", os.O_RDONLY)
                    if reply.fd is not None:
                        mode = os.fstat(reply.fd).st_mode
                        os.close(reply.fd)
                        assert stat.S_ISREG(mode), f"the client got a descriptor of mode {mode:o}"
                        sides["file"] += 1
                        continue
                    name = errno.errorcode.get(errno_of(reply), str(errno_of(reply)))
                    errnos[name] = errnos.get(name, 0) + 1
                    if name in ("ENXIO", "EACCES"):
                        sides["device"] += 1
                swaps.join()
        opened = [str(e) for e in watcher.read() if e.mask & _NODE_USED]
    finally:
        watcher.close()
    took = time.monotonic() - started
    print(f"device swap race, {took:.1f} s: {sides['file']} file descriptors, refusals {errnos}")
    write_coverage(
        "swap-race-device",
        f"file/device swap: {sides['file']} as the file, {sides['device']} as the device",
        sides=sides,
        refusals=errnos,
    )
    assert not opened, f"the device node was opened: {opened}"
    assert min(sides.values()) >= RACE_SIDES, (
        f"the race was not run both ways in {took:.0f} s: {sides}, refusals {errnos}"
    )
    host.assert_untouched("regular/device swap race")


# --- 9. what would be escapes, refused at start: nested exports, a socket in an export ---


def outside_file(tmp_path: Path) -> Path:
    secret = tmp_path / "outside-secret"
    secret.write_text("host only")
    os.chmod(secret, 0o600)
    return secret


def start_failure(tmp_path: Path, exports: list[dict]) -> subprocess.CompletedProcess:
    config = tmp_path / "refused.toml"
    lines = []
    for e in exports:
        lines += ["[[export]]"] + [f'{k} = "{v}"' for k, v in e.items()] + [""]
    config.write_text("\n".join(lines))
    return subprocess.run(
        [sys.executable, "-m", "proxyd", "-n", "--config", str(config)],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_nested_exports_are_refused(tmp_path: Path) -> None:
    """A guest of an enclosing export could swap the nested export's directory for a
    symlink to / (its next worker would chroot there), or move directories out from
    under a `..` walk of the nested export's worker: overlapping exports are refused."""
    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    for order in ((outer, outer / "inner"), (outer / "inner", outer)):
        exports = [
            {"name": f"e{i}", "path": str(p), "socket": str(tmp_path / f"{i}.sock")}
            for i, p in enumerate(order)
        ]
        result = start_failure(tmp_path, exports)
        assert result.returncode == 2, result.stderr
        assert "exports must not overlap" in result.stderr


def test_socket_inside_an_export_is_refused(tmp_path: Path) -> None:
    """Its guest could replace the socket (or the master's temporary one) by a symlink."""
    export = tmp_path / "export"
    export.mkdir()
    result = start_failure(
        tmp_path, [{"name": "a", "path": str(export), "socket": str(export / "s.sock")}]
    )
    assert result.returncode == 2 and "where its guest could replace it" in result.stderr


def test_export_replaced_by_a_symlink_is_not_served(tmp_path: Path) -> None:
    """Workers chroot through a descriptor checked against the directory configured: an
    export path swapped for a symlink to / after start is refused, never served."""
    secret = outside_file(tmp_path)
    export = tmp_path / "moving"
    export.mkdir()
    d = Daemon(tmp_path, [{"name": "m", "path": str(export), "min_idle": 0}])
    try:
        d.wait_event("export bound", export="m")
        os.rename(export, tmp_path / "moved")
        os.symlink("/", export)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(d.exports["m"]["socket"])
        client = ProxyClient(sock, timeout=20)
        with pytest.raises((ConnectionClosed, BrokenPipeError, TimeoutError)):
            client.lstat(str(secret))  # never answered from /
        assert d.proc.wait(30) == 3  # no worker was ever ready: start-up, exit code 3
        # The master sees the swap before it forks (the worker's sandbox would refuse
        # it again through its checked descriptor, should the swap come later).
        reasons = [e.get("reason", "") for e in d.events("worker failed to start", export="m")]
        refusals = [e["error"] for e in d.events("export cannot be served")]
        assert len(reasons) == 5
        assert all("replaced by another directory" in r for r in reasons) or all(
            "no longer the directory configured" in r for r in refusals
        ), (reasons, refusals)
    finally:
        if export.is_symlink():
            os.unlink(export)
        d.stop()


def test_sandbox_refuses_a_directory_that_is_not_the_one_configured(tmp_path: Path) -> None:
    """The worker's own check, for a swap after the master's: confine_to_export opens the
    path and compares the descriptor's device and inode with the configured ones."""
    export = tmp_path / "export"
    export.mkdir()
    configured = os.stat(export)
    os.rename(export, tmp_path / "moved")
    os.symlink("/", export)
    pid = os.fork()
    if pid == 0:  # chroot is for the whole process: a child of its own
        code = 1
        try:
            privileges.confine_to_export(str(export), (configured.st_dev, configured.st_ino))
        except privileges.SandboxError as e:
            code = 0 if "no longer the directory configured" in str(e) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_master_binds_sockets_in_a_private_directory(tmp_path: Path) -> None:
    """The master gives the socket its owner and mode where nobody else can swap it for
    a symlink (a root chmod/chown by path would otherwise hit any host file)."""
    secret = outside_file(tmp_path)
    public = tmp_path / "public"
    public.mkdir(mode=0o1777)
    public.chmod(0o1777)
    exports = [{"name": "a", "socket": str(public / "a.sock"), "socket_uid": 4321}]
    with Daemon(tmp_path, exports) as d:
        started = time.monotonic()
        rebinds = 0  # sockets the master bound again after the attacker removed them
        while rebinds < REBINDS:
            assert time.monotonic() - started < RACE_LIMIT, f"only {rebinds} re-binds"
            # An attacker with write access to the directory plants symlinks at every
            # name it can see and guess; the master keeps re-binding.
            for entry in list(public.iterdir()) + [public / f".a.sock.{d.proc.pid}.tmp"]:
                if entry.name != "a.sock" and not entry.is_dir():
                    with contextlib.suppress(OSError):
                        entry.unlink()
                        os.symlink(secret, entry)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(public / "a.sock")
                rebinds += 1
    st = secret.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert not [e for e in public.iterdir() if e.name.startswith(".proxyd-")]


# --- 10. least privilege, measured ---------------------------------------------------------------


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def assert_sandboxed(pid: int, export: Path, log_file: Path, role: str) -> None:
    status = status_fields(pid)
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[key], 16) == WORKER_CAPS, f"{role} {pid}: {key} {status[key]}"
    for key in ("CapInh", "CapAmb"):
        assert int(status[key], 16) == 0, f"{role} {pid}: {key} {status[key]}"
    assert status["NoNewPrivs"] == "1", f"{role} {pid}: NoNewPrivs {status['NoNewPrivs']}"
    assert status["Seccomp"] == "2", f"{role} {pid}: Seccomp {status['Seccomp']} (2 = filter)"
    assert status["Uid"].split() == ["0"] * 4, f"{role} {pid}: Uid {status['Uid']}"
    assert os.readlink(f"/proc/{pid}/root") == str(export), f"{role} {pid}: root"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        # Sockets (its channel, its connection), stdio, files of the export, the log, and
        # its own journal (a memfd: memory shared with the master, no file of the host).
        allowed = ("socket:", "/dev/null", f"{export}/", str(log_file), "/memfd:proxyd-journal")
        assert target.startswith(allowed) or target == str(export), (
            f"{role} {pid} holds fd {fd} -> {target}"
        )


def test_every_worker_is_sandboxed_idle_and_busy(tmp_path: Path) -> None:
    export = tmp_path / "lp"
    export.mkdir()
    leased = export / "leased"
    leased.write_text("data")
    exports = [{"name": "lp", "path": str(export), "min_idle": 2, "max_workers": 4}]
    with Daemon(tmp_path, exports) as d:
        between, busy = d.connect("lp"), d.connect("lp")
        expect_ok(between.lstat("/"), "lstat")
        expect_ok(busy.lstat("/leased"), "lstat")

        def settled() -> bool:  # 4 workers, each serving or idle (sandboxed), none starting
            titles = d.worker_titles().values()
            return len(titles) == 4 and all(" idle" in t or " conn=" in t for t in titles)

        wait_until(settled, what="2 serving and 2 spare workers")
        # A read lease makes truncate() block in the kernel: a worker busy mid-request.
        old = signal.signal(signal.SIGIO, signal.SIG_IGN)
        fd = os.open(leased, os.O_RDONLY)
        replies: list[Reply] = []
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            thread = threading.Thread(target=lambda: replies.append(busy.truncate("/leased", 0)))
            thread.start()

            def in_truncate() -> int | None:
                for pid in d.workers():
                    with contextlib.suppress(FileNotFoundError):
                        syscall = Path(f"/proc/{pid}/syscall").read_text().split()
                        if syscall and syscall[0] == str(SYS_TRUNCATE):
                            return pid
                return None

            busy_pid = wait_until(in_truncate, what="a worker blocked in truncate")
            titles = d.worker_titles()
            assert sum(" idle" in t for t in titles.values()) == 2, titles
            assert sum(" conn=" in t for t in titles.values()) == 2, titles
            for pid, text in titles.items():
                role = "busy worker" if pid == busy_pid else text
                assert_sandboxed(pid, export, d.stderr_path, role)
        finally:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(fd)
            signal.signal(signal.SIGIO, old)
        thread.join(10)
        assert replies and replies[0].ok, f"the blocked truncate: {replies}"
        master = d.proc.pid
        assert os.readlink(f"/proc/{master}/root") == "/", "the master is chrooted"
        held = [os.readlink(f"/proc/{master}/fd/{fd}") for fd in os.listdir(f"/proc/{master}/fd")]
        inside = [t for t in held if t == str(export) or t.startswith(f"{export}/")]
        assert not inside, f"the master holds export files: {inside}"


def descriptors(pid: int) -> dict[int, str]:
    """Every open descriptor of `pid` and what it points at; sockets as "socket"."""
    held = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            held[int(fd)] = "socket" if target.startswith("socket:") else target
    return held


def leaking_parent(argv: list[str], stderr: Path) -> tuple[subprocess.Popen[bytes], int]:
    """proxyd started by a careless parent: an O_DIRECTORY descriptor of / inherited
    (the pid, and that descriptor's number in proxyd)."""
    leak = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxyd", *argv],
                cwd=CHECKOUT,
                pass_fds=[leak],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
    finally:
        os.close(leak)
    return proc, leak


def workers_settled(master: int) -> dict[int, str]:
    """The master's workers, once there is one serving a connection and one idle."""

    def settled() -> dict[int, str] | None:
        titles = worker_titles(master)
        serving = [t for t in titles.values() if " conn=" in t]
        idle = [t for t in titles.values() if t.endswith(" idle")]
        return titles if len(serving) == 1 and len(idle) >= 1 else None

    return wait_until(settled, what="a worker serving and one idle")


def worker_titles(master: int) -> dict[int, str]:
    return {pid: title(pid) for pid in children(master)}


@pytest.mark.parametrize("destination", ["stderr", "log_file"])
def test_workers_hold_only_their_own_descriptors(tmp_path: Path, destination: str) -> None:
    """A descriptor leaked by proxyd's parent stays in the master (trusted, unconfined)
    and never reaches a worker: a worker holds stdin/stdout/stderr, its channel to the
    master, its log file and the connection it serves, nothing else."""
    export, sock = tmp_path / "export", tmp_path / "s.sock"
    export.mkdir()
    stderr, log_file = tmp_path / "stderr", tmp_path / "proxyd.log"
    argv = ["-n", "-p", str(export), "-s", str(sock), "-u", "0", "-g", "0"]
    if destination == "log_file":
        argv += ["--log-file", str(log_file)]
    proc, leak = leaking_parent(argv, stderr)
    try:
        wait_until(sock.exists, what="the socket")
        assert descriptors(proc.pid).get(leak) == "/", "the master did not inherit the leak"
        client_sock = socket.socket(socket.AF_UNIX)
        client_sock.connect(str(sock))
        client = ProxyClient(client_sock)
        expect_ok(client.lstat("/"), "lstat")
        titles = workers_settled(proc.pid)
        for pid, text in titles.items():
            held = descriptors(pid)
            files = [held[fd] for fd in (0, 1, 2)]
            assert files == ["/dev/null", str(stderr), str(stderr)], f"{text}: stdio {held}"
            rest = sorted(target for fd, target in held.items() if fd > 2)
            # Its channel, its journal (a memfd), and its connection when it has one.
            journal = "/memfd:proxyd-journal (deleted)"
            expected = sorted(["socket", journal] + (["socket"] if " conn=" in text else []))
            if destination == "log_file":
                expected = sorted([*expected, str(log_file)])
            assert rest == expected, f"{text} holds {held}"
        client.close()
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_worker_logging_to_syslog_keeps_its_connection_to_it(tmp_path: Path) -> None:
    """Daemon mode without a log file logs to syslog: a worker closes every inherited
    descriptor, libc's syslog socket included, and connects to /dev/log again before
    its chroot. proxyd runs in a mount namespace of its own whose /dev/log is a
    datagram socket of this test (this machine has no syslog daemon)."""
    export, sock, pidfile = tmp_path / "export", tmp_path / "s.sock", tmp_path / "pid"
    export.mkdir()
    syslog_path = tmp_path / "log"
    syslogd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslogd.bind(str(syslog_path))
    syslogd.settimeout(10)
    dev = (
        "mount -t tmpfs dev /dev && mknod -m 666 /dev/null c 1 3 && touch /dev/log && "
        'mount --bind "$0" /dev/log && exec "$@"'
    )
    argv = ["-p", str(export), "-s", str(sock), "-u", "0", "-g", "0", "--pidfile", str(pidfile)]
    shell = ["unshare", "--mount", "--propagation", "private", "sh", "-c", dev, str(syslog_path)]
    started = subprocess.run(
        [*shell, sys.executable, "-m", "proxyd", *argv],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert started.returncode == 0, started.stderr
    wait_until(pidfile.exists, what="the pidfile")
    master = int(pidfile.read_text())
    try:
        wait_until(sock.exists, what="the socket")
        client_sock = socket.socket(socket.AF_UNIX)
        client_sock.connect(str(sock))
        client = ProxyClient(client_sock)
        expect_ok(client.mkdir(0, 0, "/audited", 0o755), "mkdir")  # a worker's audit line
        titles = workers_settled(master)
        (serving,) = [pid for pid, text in titles.items() if " conn=" in text]
        seen = []
        while not any(f"proxyd[{serving}]" in m and '"op":"mkdir"' in m for m in seen):
            seen.append(syslogd.recv(65536).decode(errors="replace"))  # TimeoutError: none
        for pid, text in titles.items():
            held = descriptors(pid)
            stdio, rest = [held.pop(fd) for fd in (0, 1, 2)], sorted(held.values())
            assert stdio == ["/dev/null"] * 3, f"{text}: {stdio}"
            # The channel, the syslog socket, the journal, and the connection if serving.
            sockets = ["socket"] * (3 if " conn=" in text else 2)
            assert rest == sorted(["/memfd:proxyd-journal (deleted)", *sockets]), f"{text}: {rest}"
        client.close()
    finally:
        os.kill(master, signal.SIGTERM)
        wait_until(lambda: not worker_titles(master), 15, "the daemon's workers to stop")
        syslogd.close()


# --- 11. seccomp, on the worker's own sandbox set-up -----------------------------------------
# A child process runs privileges.enter_sandbox (the very function a worker runs) on a
# temporary export, says so, waits for a byte on stdin (so that its /proc/PID/status can be
# read while it is sandboxed), then makes one system call through libc and reports what it
# returned. No debugger: the call is the child's own.

SANDBOXED_CALL = """
import ctypes, errno, os, sys
from proxyd import privileges

export, mode, call = sys.argv[1:]
libc = ctypes.CDLL(None, use_errno=True)
handle = ctypes.create_string_buffer(b"\\x08" + bytes(15))  # struct file_handle, 8 bytes
calls = {
    "socket(AF_INET)": lambda: libc.socket(2, 1, 0),
    "socket(AF_UNIX)": lambda: libc.socket(1, 1, 0),
    "mount": lambda: libc.mount(b"none", b"/", b"tmpfs", 0, None),
    "ptrace": lambda: libc.ptrace(16, os.getpid(), None, None),  # PTRACE_ATTACH
    "unshare": lambda: libc.unshare(0x20000),  # CLONE_NEWNS
    "setns": lambda: libc.setns(-1, 0),
    "chroot": lambda: libc.chroot(b"/"),
    "open_by_handle_at": lambda: libc.open_by_handle_at(-100, handle, 0),
    "execve": lambda: libc.execve(b"/bin/sh", None, None),
    "memfd_create": lambda: libc.memfd_create(b"x", 0),
    "kill": lambda: libc.kill(os.getppid(), 0),
}
privileges.enter_sandbox(export, mode)
os.write(1, b"sandboxed\\n")
os.read(0, 1)
result = calls[call]()
err = errno.errorcode.get(ctypes.get_errno(), "") if result == -1 else ""
os.write(1, f"returned {result} {err}\\n".encode())
os._exit(0)
"""


@dataclass
class SandboxedCall:
    status: dict[str, str]  # /proc/PID/status of the child, sandboxed, before the call
    returncode: int
    output: str  # what the child wrote: "sandboxed", then "returned RESULT ERRNO"


def call_in_sandbox(tmp_path: Path, mode: str, call: str) -> SandboxedCall:
    """Make `call` from a process sandboxed as a worker is, seccomp `mode`."""
    export = tmp_path / "export"
    export.mkdir(exist_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", SANDBOXED_CALL, str(export), mode, call],
        cwd=CHECKOUT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert child.stdin and child.stdout
    try:
        first = child.stdout.readline()
        assert first == "sandboxed\n", f"the child did not sandbox itself: {first}"
        status = status_fields(child.pid)
        child.stdin.write("x")
        child.stdin.close()
        rest = child.stdout.read()
        returncode = child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return SandboxedCall(status, returncode, first + rest)


# What each call does in a sandboxed worker when the filter is off: it reaches the kernel,
# which refuses most of them for want of a capability.
UNFILTERED = {
    "socket(AF_INET)": "a descriptor",
    "socket(AF_UNIX)": "a descriptor",
    "mount": "EPERM",  # CAP_SYS_ADMIN dropped
    "ptrace": "EPERM",  # never oneself
    "unshare": "EPERM",
    "setns": "EBADF",
    "chroot": "EPERM",  # CAP_SYS_CHROOT dropped
    "open_by_handle_at": "EPERM",  # CAP_DAC_READ_SEARCH dropped
    "execve": "ENOENT",  # nothing to run in the export
    "memfd_create": "a descriptor",
    "kill": "0",
}
FORBIDDEN = [call for call in UNFILTERED if call != "socket(AF_UNIX)"]


def returned(run: SandboxedCall) -> str:
    """The child's report of its call: "a descriptor", "0", or an errno name."""
    match = re.search(r"^returned (-?\d+) (\w*)$", run.output, re.M)
    assert match, f"the call did not return: exit {run.returncode}, output {run.output!r}"
    value, err = int(match.group(1)), match.group(2)
    if value == -1:
        return err
    return "a descriptor" if value > 2 else str(value)


@pytest.mark.parametrize("call", FORBIDDEN)
def test_forbidden_syscall_kills_the_sandboxed_process(tmp_path: Path, call: str) -> None:
    run = call_in_sandbox(tmp_path, "kill", call)
    assert run.status["Seccomp"] == "2", f"not filtered: Seccomp {run.status['Seccomp']}"
    assert int(run.status["CapEff"], 16) == WORKER_CAPS, run.status["CapEff"]
    assert run.returncode == -signal.SIGSYS, (
        f"{call}: exit {run.returncode}, output {run.output!r} (SIGSYS expected)"
    )
    assert "returned" not in run.output, f"{call} returned: {run.output!r}"


def test_unix_socket_is_refused_without_killing(tmp_path: Path) -> None:
    """glibc's syslog reconnects after a syslogd restart: refused quietly, not fatal."""
    run = call_in_sandbox(tmp_path, "kill", "socket(AF_UNIX)")
    assert run.status["Seccomp"] == "2"
    assert (run.returncode, returned(run)) == (0, "EACCES"), run.output


@pytest.mark.parametrize("mode", ["off", "log"])
@pytest.mark.parametrize("call", list(UNFILTERED))
def test_without_the_filter_the_same_call_runs(tmp_path: Path, call: str, mode: str) -> None:
    """The control for the tests above: the same calls, in the same sandbox, reach the
    kernel and return when the filter is off, or only logs ("log")."""
    run = call_in_sandbox(tmp_path, mode, call)
    assert run.status["Seccomp"] == ("0" if mode == "off" else "2")
    assert int(run.status["CapEff"], 16) == WORKER_CAPS, run.status["CapEff"]
    expected = UNFILTERED[call]
    if mode == "log" and call == "socket(AF_UNIX)":
        expected = "EACCES"  # the filter's quiet refusal holds in both modes
    assert (run.returncode, returned(run)) == (0, expected), run.output


def test_each_worker_loads_the_filter_of_the_configured_mode(tmp_path: Path) -> None:
    """The master builds the filter once per mode and every worker loads that program:
    read back from the workers (ptrace), before and after a reload changes the mode."""
    kill, log = privileges.syscall_filter("kill"), privileges.syscall_filter("log")
    assert kill != log and len(kill) == len(log) and len(kill) % 8 == 0

    def loaded(d: Daemon, exclude: int = 0) -> tuple[int, bytes]:
        def idle() -> int | None:
            found = [p for p, t in d.worker_titles().items() if " idle" in t and p != exclude]
            return found[0] if found else None

        pid = wait_until(idle, what="a sandboxed idle worker")
        with Tracer(pid) as tracer:
            return pid, tracer.seccomp_filter()

    with Daemon(tmp_path, [{"name": "sc", "min_idle": 1}], seccomp="log") as d:
        first, program = loaded(d)
        assert program == log
        write_config(d.config, {**d.daemon_settings, "seccomp": "kill"}, list(d.exports.values()))
        d.signal(signal.SIGHUP)
        d.wait_event("worker exited", worker_pid=first)
        _, program = loaded(d, exclude=first)
        assert program == kill


SYS_RECVFROM = 45  # x86_64: where a worker waits for its next request (recv_into)


def test_a_worker_killed_by_sigsys_is_replaced_and_the_guest_keeps_its_mount(
    tmp_path: Path,
) -> None:
    """What the master does when the filter kills a worker. Nothing a guest can send
    makes a worker call outside the filter (that would be a bug), so the signal comes
    from kill(2); the filter's own kill is shown above to end a sandboxed process the
    same way (killed by SIGSYS)."""
    d = Daemon(tmp_path, [{"name": "sc", "min_idle": 1}])
    with d:
        client = d.connect("sc")
        expect_ok(client.mkdir(0, 0, "/d", 0o755), "mkdir")
        victim = d.serving_worker(d.wait_event("connection accepted")[-1]["conn"])
        wait_until(lambda: len(d.workers()) == 2, what="a spare worker")

        def waiting_for_a_request() -> bool:
            syscall = Path(f"/proc/{victim}/syscall").read_text().split()
            return bool(syscall) and syscall[0] == str(SYS_RECVFROM)

        wait_until(waiting_for_a_request, what="the worker back at its request boundary")
        others = [pid for pid in d.workers() if pid != victim]
        os.kill(victim, signal.SIGSYS)
        died = d.wait_event("worker died", worker_pid=victim)
        assert died[0].get("signal") == "SIGSYS", died
        d.wait_event("crash recovery", outcome="nothing was in flight")
        expect_ok(client.lstat("/d"), "the next request")  # the guest noticed nothing
        assert victim not in d.workers(), "the killed worker is still there"
        assert all(os.path.exists(f"/proc/{pid}") for pid in others), "another worker died"
        assert d.proc.poll() is None, "the master died"
