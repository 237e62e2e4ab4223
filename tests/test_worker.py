"""proxyd serving a real socketpair from a real chroot: every request type, success
and failure, credentials seen on host files, and the sandbox read from /proc."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import wait_until
from tests.proxyclient import (
    LSTAT,
    ConnectionClosed,
    ProxyClient,
    ServerHandle,
    decode_q,
    decode_stat,
    decode_statfs,
    errno_of,
    marshal,
    pack_s,
    start_server,
    unpack_s,
)

WORKER_CAPS = 0x80000DB  # CHOWN DAC_OVERRIDE FOWNER FSETID SETGID SETUID MKNOD
UTIME_OMIT = (1 << 30) - 2
SIOCOUTQ = 0x5411  # linux/sockios.h
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    path = tmp_path / "export"
    path.mkdir()
    return path


@pytest.fixture
def server(export: Path) -> Iterator[ServerHandle]:
    with start_server("proxyd", export) as handle:
        yield handle


@pytest.fixture
def client(server: ServerHandle) -> ProxyClient:
    return server.client


def ok(reply) -> None:  # type: ignore[no-untyped-def]
    assert reply.ok, f"expected success, got {os.strerror(errno_of(reply))}"


def fails(reply, err: int) -> None:  # type: ignore[no-untyped-def]
    assert errno_of(reply) == err, f"expected {errno.errorcode[err]}, got {reply}"


# --- the sandbox -------------------------------------------------------------------


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def worker_pids(master_pid: int) -> list[int]:
    """The master's children: its workers."""
    text = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text()
    return [int(pid) for pid in text.split()]


def test_serving_process_is_sandboxed(server: ServerHandle, export: Path) -> None:
    ok(server.client.lstat("/"))  # a reply means a worker is serving, sandboxed
    (worker,) = worker_pids(server.proc.pid)
    status = _status_fields(worker)
    assert int(status["CapEff"], 16) == WORKER_CAPS
    assert int(status["CapPrm"], 16) == WORKER_CAPS
    assert int(status["CapBnd"], 16) == WORKER_CAPS
    assert int(status["CapInh"], 16) == 0
    assert int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert os.readlink(f"/proc/{worker}/root") == str(export)
    assert os.readlink(f"/proc/{worker}/cwd") == str(export)
    # Nothing outside the export is held open: stdio, the connection, the channel to
    # the master; no listener, no other guest's connection, no file of the host.
    for fd in os.listdir(f"/proc/{worker}/fd"):
        target = os.readlink(f"/proc/{worker}/fd/{fd}")
        held = ("socket:", "pipe:", "/dev/null", str(export), "/memfd:proxyd-journal")
        assert target.startswith(held) or (
            target.startswith("/tmp/#")  # the test's stderr capture file
        ), target
    # The master stays root and unconfined, and holds no file of the export.
    master = _status_fields(server.proc.pid)
    assert os.readlink(f"/proc/{server.proc.pid}/root") == "/"
    assert master["NoNewPrivs"] == "0"
    for fd in os.listdir(f"/proc/{server.proc.pid}/fd"):
        target = os.readlink(f"/proc/{server.proc.pid}/fd/{fd}")
        assert not target.startswith(str(export)), target


def test_paths_cannot_leave_the_export(client: ProxyClient, export: Path) -> None:
    (export / "inside").write_text("x")
    for path in ("/../../../etc/passwd", "../etc/passwd", "/proc/self/status"):
        fails(client.lstat(path), errno.ENOENT)
    ok(client.symlink(0, 0, "/../../etc", "/escape"))
    fails(client.lstat("/escape/passwd"), errno.ENOENT)
    st = decode_stat(client.lstat("/../inside").data)
    assert st["size"] == 1


# --- descriptors --------------------------------------------------------------------


def test_open_gives_a_working_descriptor_with_the_clients_flags(
    client: ProxyClient, export: Path
) -> None:
    (export / "f").write_bytes(b"hello")
    reply = client.open("/f", os.O_RDWR | os.O_APPEND)
    ok(reply)
    try:
        flags = fcntl.fcntl(reply.fd, fcntl.F_GETFL)
        assert flags & os.O_APPEND
        assert not flags & os.O_NONBLOCK  # our safety flag is not handed to the guest
        os.write(reply.fd, b" world")
    finally:
        os.close(reply.fd)
    assert (export / "f").read_bytes() == b"hello world"
    reply = client.open("/", os.O_RDONLY | os.O_DIRECTORY)
    ok(reply)
    assert stat.S_ISDIR(os.fstat(reply.fd).st_mode)
    os.close(reply.fd)


def test_open_failures(client: ProxyClient, export: Path) -> None:
    (export / "f").write_text("")
    os.symlink("f", export / "link")
    fails(client.open("/missing", os.O_RDONLY), errno.ENOENT)
    fails(client.open("/f", os.O_RDONLY | os.O_DIRECTORY), errno.ENOTDIR)
    fails(client.open("/link", os.O_RDONLY | os.O_NOFOLLOW), errno.ELOOP)
    fails(client.open("/f", os.O_RDONLY | os.O_CREAT), errno.EINVAL)  # OPEN has no mode
    reply = client.open("/link", os.O_RDONLY)  # followed, inside the export
    ok(reply)
    os.close(reply.fd)


@pytest.mark.parametrize("kind", ["fifo", "chardev", "socket"])
def test_special_files_are_never_opened(
    client: ProxyClient, server: ServerHandle, export: Path, kind: str
) -> None:
    target = export / kind
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "chardev":
        os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null
    else:
        os.mknod(target, stat.S_IFSOCK | 0o666)
    # ENXIO at once: a worker that opened a FIFO would sit in open(2) until the client's
    # socket timeout (TimeoutError), as the reference does; it never answers ENXIO.
    fails(client.open(f"/{kind}", os.O_RDONLY), errno.ENXIO)
    fails(client.open(f"/{kind}", os.O_WRONLY), errno.ENXIO)
    fails(client.create(f"/{kind}", os.O_RDWR | os.O_CREAT, 0o600, 0, 0), errno.ENXIO)
    fails(client.open(f"/{kind}", os.O_RDONLY | os.O_DIRECTORY), errno.ENOTDIR)
    fails(client.getversion(f"/{kind}"), errno.ENXIO)
    ok(client.lstat("/"))
    server.stop()
    refusals = [line for line in server.stderr.splitlines() if '"refused":"special file' in line]
    assert len(refusals) == 4 and all('"level":"warning"' in line for line in refusals)


def test_create_as_the_guests_user(client: ProxyClient, export: Path) -> None:
    os.chmod(export, 0o755)  # root's directory: only DAC_OVERRIDE lets uid 1000 in
    reply = client.create("/new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o4755, 1000, 1001)
    ok(reply)
    os.write(reply.fd, b"data")
    os.close(reply.fd)
    st = os.lstat(export / "new")
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert stat.S_IMODE(st.st_mode) == 0o4755  # umask 0: exactly what was asked
    assert (export / "new").read_bytes() == b"data"
    fails(
        client.create("/new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, 1000, 1000), errno.EEXIST
    )
    fails(client.create("/no/dir/f", os.O_CREAT | os.O_WRONLY, 0o644, 1000, 1000), errno.ENOENT)


def test_credentials_are_restored_after_every_request(client: ProxyClient, export: Path) -> None:
    # A failure under uid 1000 ...
    fails(client.mkdir(1000, 1000, "/missing/d", 0o755), errno.ENOENT)
    # ... and root powers are back: a device node and a chown need CAP_MKNOD / CAP_CHOWN.
    ok(client.mknod(0, 0, "/null", stat.S_IFCHR | 0o600, os.makedev(1, 3)))
    ok(client.mkdir(1000, 1000, "/d", 0o700))
    ok(client.chown("/d", 0, 0))
    assert os.lstat(export / "d").st_uid == 0
    # As the reference: with a non-root id only CAP_DAC_OVERRIDE stays effective,
    # so uid 0 with gid 1000 cannot make a device node, and root again can.
    fails(client.mknod(0, 1000, "/null2", stat.S_IFCHR | 0o600, os.makedev(1, 3)), errno.EPERM)
    fails(client.mknod(1000, 1000, "/null2", stat.S_IFCHR | 0o600, os.makedev(1, 3)), errno.EPERM)
    ok(client.mknod(0, 0, "/null2", stat.S_IFCHR | 0o600, os.makedev(1, 3)))
    assert os.lstat(export / "null2").st_rdev == os.makedev(1, 3)


def test_mknod_mkdir_symlink_as_user(client: ProxyClient, export: Path) -> None:
    ok(client.mknod(1000, 1000, "/fifo", stat.S_IFIFO | 0o640, 0))
    ok(client.mknod(1000, 1000, "/reg", stat.S_IFREG | 0o600, 0))
    ok(client.mkdir(1234, 5678, "/dir", 0o1775))  # mkdir(2) honours only the sticky bit
    ok(client.symlink(1234, 5678, "dir", "/sym"))
    for name, kind in (
        ("fifo", stat.S_ISFIFO),
        ("reg", stat.S_ISREG),
        ("dir", stat.S_ISDIR),
        ("sym", stat.S_ISLNK),
    ):
        assert kind(os.lstat(export / name).st_mode), name
    assert os.lstat(export / "dir").st_uid == 1234
    assert stat.S_IMODE(os.lstat(export / "dir").st_mode) == 0o1775
    assert os.lstat(export / "sym").st_gid == 5678
    assert os.readlink(export / "sym") == "dir"
    fails(client.mkdir(0, 0, "/dir", 0o755), errno.EEXIST)
    fails(client.symlink(0, 0, "x", "/sym"), errno.EEXIST)
    fails(client.mknod(0, 0, "/reg", stat.S_IFREG, 0), errno.EEXIST)


# --- plain operations ------------------------------------------------------------------


def test_link_rename_remove(client: ProxyClient, export: Path) -> None:
    (export / "a").write_text("A")
    os.symlink("a", export / "sl")
    ok(client.link("/a", "/b"))
    assert os.lstat(export / "a").st_nlink == 2
    ok(client.link("/sl", "/sl2"))  # link(2) does not follow the symlink
    assert os.path.islink(export / "sl2")
    fails(client.link("/a", "/b"), errno.EEXIST)
    ok(client.rename("/b", "/c"))
    assert (export / "c").read_text() == "A"
    fails(client.rename("/nope", "/x"), errno.ENOENT)
    (export / "d").mkdir()
    (export / "d" / "f").write_text("")
    fails(client.remove("/d"), errno.ENOTEMPTY)
    ok(client.remove("/d/f"))
    ok(client.remove("/d"))  # rmdir for a directory
    ok(client.remove("/sl"))
    assert not os.path.lexists(export / "sl") and (export / "a").exists()
    fails(client.remove("/d"), errno.ENOENT)


def test_lstat_readlink_statfs(client: ProxyClient, export: Path) -> None:
    (export / "f").write_bytes(b"12345")
    os.symlink("target-of-link", export / "l")
    st = decode_stat(client.lstat("/f").data)
    host = os.lstat(export / "f")
    assert (st["ino"], st["size"], st["mode"], st["nlink"]) == (host.st_ino, 5, host.st_mode, 1)
    assert (st["mtime_sec"], st["mtime_nsec"]) == divmod(host.st_mtime_ns, 10**9)
    assert stat.S_ISLNK(decode_stat(client.lstat("/l").data)["mode"])
    assert unpack_s(client.readlink("/l", 4096).data) == b"target-of-link"
    assert unpack_s(client.readlink("/l", 7).data) == b"target"  # bufsize - 1 bytes
    fails(client.readlink("/l", 1), errno.EINVAL)
    fails(client.readlink("/f", 100), errno.EINVAL)
    fails(client.readlink("/l", -5), errno.EINVAL)
    ok(client.readlink("/l", 2**31 - 1))  # never allocates what it is told
    fs = decode_statfs(client.statfs("/").data)
    host_fs = os.statvfs(export)
    assert fs["type"] == host_f_type(export)
    assert (fs["bsize"], fs["blocks"], fs["namelen"]) == (
        host_fs.f_bsize,
        host_fs.f_blocks,
        host_fs.f_namemax,
    )
    fails(client.statfs("/missing"), errno.ENOENT)
    fails(client.lstat("/missing"), errno.ENOENT)


def host_f_type(path: Path) -> int:
    """The f_type statfs(2) gives this process for `path` (os.statvfs has none): the
    first field of struct statfs, a long on x86-64."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return struct.unpack_from("=q", buf)[0]


def test_chmod_chown_truncate_utime(client: ProxyClient, export: Path) -> None:
    f = export / "f"
    f.write_bytes(b"0123456789")
    os.symlink("f", export / "l")
    ok(client.chmod("/l", 0o4711))  # chmod follows the symlink
    assert stat.S_IMODE(os.lstat(f).st_mode) == 0o4711
    ok(client.chown("/l", 1000, 1000))  # lchown does not
    assert os.lstat(export / "l").st_uid == 1000 and os.lstat(f).st_uid == 0
    ok(client.chown("/f", -1, 1234))  # -1 leaves the uid alone
    assert (os.lstat(f).st_uid, os.lstat(f).st_gid) == (0, 1234)
    ok(client.truncate("/f", 4))
    assert f.read_bytes() == b"0123"
    ok(client.truncate("/f", 1 << 20))
    assert f.stat().st_size == 1 << 20
    fails(client.truncate("/f", -1), errno.EINVAL)
    ok(client.utime("/f", 1000, 5, 2000, 7))
    host = os.lstat(f)
    assert (host.st_atime_ns, host.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    ok(client.utime("/f", 0, UTIME_OMIT, 3000, 0))  # UTIME_OMIT passes through
    host = os.lstat(f)
    assert (host.st_atime_ns, host.st_mtime_ns) == (1000 * 10**9 + 5, 3000 * 10**9)
    ok(client.utime("/l", 50, 0, 60, 0))  # the link itself, not its target
    assert os.lstat(export / "l").st_mtime == 60 and os.lstat(f).st_mtime == 3000
    fails(client.utime("/f", 0, 2 * 10**9, 0, 0), errno.EINVAL)
    fails(client.chmod("/missing", 0o644), errno.ENOENT)


def test_xattrs(client: ProxyClient, export: Path) -> None:
    (export / "f").write_text("")
    os.symlink("f", export / "l")
    ok(client.lsetxattr("/f", "user.one", b"\0value\0"))
    ok(client.lsetxattr("/f", "user.two", b"2"))
    assert os.getxattr(export / "f", "user.one") == b"\0value\0"
    fails(client.lsetxattr("/f", "user.one", b"x", flags=os.XATTR_CREATE), errno.EEXIST)
    fails(client.lsetxattr("/f", "user.new", b"x", flags=os.XATTR_REPLACE), errno.ENODATA)
    fails(client.lsetxattr("/f", "user.bad", b"abc", size=10), errno.EINVAL)
    fails(client.lsetxattr("/l", "user.x", b"x"), errno.EPERM)  # user.* not on symlinks
    reply = client.lgetxattr(0, "/f", "user.one")
    assert (reply.type, reply.value) == (0, 7)  # size 0: the length
    assert unpack_s(client.lgetxattr(100, "/f", "user.one").data) == b"\0value\0"
    fails(client.lgetxattr(3, "/f", "user.one"), errno.ERANGE)
    fails(client.lgetxattr(100, "/f", "user.none"), errno.ENODATA)
    fails(client.lgetxattr(100, "/l", "user.one"), errno.ENODATA)  # not followed
    names = b"user.one\0user.two\0"
    assert client.llistxattr(0, "/f").value == len(names)
    assert sorted(unpack_s(client.llistxattr(100, "/f").data).split(b"\0")) == sorted(
        names.split(b"\0")
    )
    fails(client.llistxattr(4, "/f"), errno.ERANGE)
    ok(client.lremovexattr("/f", "user.one"))
    fails(client.lremovexattr("/f", "user.one"), errno.ENODATA)
    assert os.listxattr(export / "f") == ["user.two"]


def test_getversion_is_the_real_generation(client: ProxyClient, export: Path) -> None:
    (export / "f").write_text("")
    fd = os.open(export / "f", os.O_RDONLY)
    buf = bytearray(8)
    fcntl.ioctl(fd, 0x80087601, buf)
    os.close(fd)
    expected = struct.unpack_from("=I", buf)[0]
    assert decode_q(client.getversion("/f").data) == expected
    fails(client.getversion("/missing"), errno.ENOENT)


# --- the stream -----------------------------------------------------------------------


def test_malformed_requests_get_an_errno_and_the_connection_lives(client: ProxyClient) -> None:
    # ENOBUFS for a payload too short for its type, as the reference answers.
    client.send_request(LSTAT, b"\xff\x00abc")  # string longer than the payload
    fails(client.recv_header_reply("data"), errno.ENOBUFS)
    client.send_request(LSTAT, b"\x01")  # shorter than a string length
    fails(client.recv_header_reply("data"), errno.ENOBUFS)
    client.send_request(2, pack_s("/"))  # OPEN without its flags
    fails(client.recv_fd_reply(), errno.ENOBUFS)
    fails(client.lstat(b"/a\0b"), errno.EINVAL)  # NUL inside a path: refused, not cut
    ok(client.lstat("/"))


def unread(sock: socket.socket) -> int:
    """Bytes sent on `sock` that the peer has not read yet (SIOCOUTQ, unix(7))."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), SIOCOUTQ, buf)
    return int.from_bytes(buf, sys.byteorder)


def test_requests_split_or_pipelined(client: ProxyClient) -> None:
    one = struct.pack("=II", LSTAT, 3) + pack_s("/")
    for byte in one:  # one byte at a time, each read by the worker before the next
        client.send_raw(bytes([byte]))
        wait_until(lambda: unread(client.sock) == 0, what="the worker reading the byte")
    ok(client.recv_header_reply("data"))
    client.send_raw(one * 3)  # three requests in one write
    for _ in range(3):
        ok(client.recv_header_reply("data"))


@pytest.mark.parametrize("header", [(99, 0), (0, 0), (1, 4), (LSTAT, 65537), (LSTAT, 2**32 - 1)])
def test_fatal_protocol_errors_close_the_connection(
    server: ServerHandle, header: tuple[int, int]
) -> None:
    server.client.send_raw(struct.pack("=II", *header) + marshal("s", "/"))
    with pytest.raises(ConnectionClosed):
        server.client.recv_header_reply("data")
    assert server.proc.wait(5) == 0
    assert '"event":"protocol error"' in server.stderr
