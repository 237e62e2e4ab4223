"""End to end: a real Linux guest under QEMU uses a 9p share served over the proxy protocol.

Each test boots the guest of tests/guest.py, runs tests/e2e_workload.sh on the share and then
checks the export on the host. The same test runs against the reference virtfs-proxy-helper
and against proxyd, each reached by a named socket (-s) and by an inherited socketpair (-f).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import pytest

from tests.guest import ROOT, GuestResult, ensure_guest_built, run_guest

REFERENCE = "/usr/lib/qemu/virtfs-proxy-helper"
WORKLOAD = Path(__file__).with_name("e2e_workload.sh")


@dataclass
class Server:
    export: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    socket_path: str | None  # what QEMU is given: a socket path or an inherited descriptor
    sock_fd: int | None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def guest_images() -> None:
    ensure_guest_built()  # build once, up front, outside any test's timing


@pytest.fixture(params=["reference-s", "reference-f", "proxyd-s", "proxyd-f"])
def server(request: pytest.FixtureRequest, tmp_path: Path, guest_images: None) -> Iterator[Server]:
    """Start one server on a fresh export; stop it and show its stderr afterwards."""
    kind, transport = request.param.split("-")
    export = tmp_path / "export"
    export.mkdir()
    argv = [REFERENCE] if kind == "reference" else [sys.executable, "-m", "proxyd"]
    argv += ["-n", "-p", str(export)]
    stderr_path = tmp_path / "server.stderr"
    # Socket paths must fit sun_path (108 bytes); pytest's tmp_path may not.
    sock_dir = tempfile.TemporaryDirectory(prefix="e2e-")
    sock_path: str | None = None
    ours: socket.socket | None = None
    with stderr_path.open("wb") as stderr:
        if transport == "s":
            sock_path = os.path.join(sock_dir.name, "sock")
            argv += ["-s", sock_path, "-u", "0", "-g", "0"]
            proc = subprocess.Popen(argv, cwd=ROOT, stderr=stderr)
        else:
            # How libvirt does it: a connected pair, one end inherited by each side.
            theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            argv += ["-f", str(theirs.fileno())]
            proc = subprocess.Popen(argv, cwd=ROOT, stderr=stderr, pass_fds=[theirs.fileno()])
            theirs.close()
    srv = Server(export, proc, stderr_path, sock_path, ours.fileno() if ours else None)
    try:
        if sock_path is not None:
            # QEMU refuses to start if nobody listens yet.
            deadline = time.monotonic() + 10
            while not os.path.exists(sock_path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{kind} did not create {sock_path}:\n{srv.stderr()}")
                time.sleep(0.02)
        yield srv
    finally:
        if ours is not None:
            ours.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sock_dir.cleanup()
        # pytest shows this (captured) output only when the test failed.
        print(f"--- {request.param} exit status {proc.returncode}, stderr ---\n{srv.stderr()}")


def check_host_tree(export: Path, result: GuestResult) -> None:
    """What tests/e2e_workload.sh leaves in the export, as the host sees it."""
    keep = export / "keep"
    assert not (export / "scratch").exists(), "scratch/ was not removed"

    assert (keep / "hello.txt").read_bytes() == b"hello\nworld\n"
    hello = (keep / "hello.txt").lstat()
    assert stat.S_IMODE(hello.st_mode) == 0o644
    assert (hello.st_uid, hello.st_gid, hello.st_nlink) == (0, 0, 2)
    assert (keep / "hello.hard").lstat().st_ino == hello.st_ino

    match = re.search(r"^BIG-SHA256=([0-9a-f]{64})$", result.output, re.MULTILINE)
    assert match, "the guest printed no BIG-SHA256"
    big = (keep / "big.bin").read_bytes()
    assert len(big) == 8 << 20
    assert sha256(big).hexdigest() == match.group(1)

    assert stat.S_IMODE((keep / "mode640").lstat().st_mode) == 0o640
    owned = (keep / "owned").lstat()
    assert (owned.st_uid, owned.st_gid) == (1234, 5678)
    link = (keep / "link").lstat()
    assert stat.S_ISLNK(link.st_mode) and os.readlink(keep / "link") == "hello.txt"
    assert (link.st_uid, link.st_gid) == (1234, 5678), "chown -h must not follow the link"
    # touch -d '2001-02-03 04:05:06' in the guest's UTC.
    assert (keep / "dated").lstat().st_mtime_ns == 981173106 * 10**9
    assert (keep / "dated").lstat().st_atime_ns == 981173106 * 10**9
    assert (keep / "mtime-only").lstat().st_mtime_ns == 1012709106 * 10**9
    assert (keep / "sized").read_bytes() == b"abc"

    dir711 = (keep / "dir711").lstat()
    assert stat.S_ISDIR(dir711.st_mode) and stat.S_IMODE(dir711.st_mode) == 0o711
    moved = keep / "moved"
    assert (moved / "d2" / "d3").is_dir() and len(list(moved.glob("file-*"))) == 100
    assert (keep / ("n" * 255)).is_file()
    assert os.path.exists(os.fsencode(keep) + b"/sp ace-\xe9-\x01"), "byte-exact name"

    fifo = (keep / "fifo").lstat()
    assert stat.S_ISFIFO(fifo.st_mode)
    null = (keep / "null").lstat()
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)

    # Created by uid 1234 in the guest: the server created them as that user.
    for name, is_type in [
        ("file", stat.S_ISREG),
        ("dir", stat.S_ISDIR),
        ("link", stat.S_ISLNK),
        ("fifo", stat.S_ISFIFO),
    ]:
        st = (keep / "shared" / name).lstat()
        assert is_type(st.st_mode), name
        assert (st.st_uid, st.st_gid) == (1234, 5678), name


def test_guest_workload(server: Server) -> None:
    result = run_guest(WORKLOAD.read_text(), socket_path=server.socket_path, sock_fd=server.sock_fd)
    print(f"--- guest output ({result.duration:.1f} s) ---\n{result.output}")
    failed = [line for line in result.output.splitlines() if line.startswith("FAIL ")]
    assert result.mounted, "the guest could not mount the share"
    assert not failed, "\n".join(failed)
    assert result.exit_status == 0
    assert result.qemu_returncode == 0
    check_host_tree(server.export, result)
