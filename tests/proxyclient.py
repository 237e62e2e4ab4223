"""An independent, synchronous test client for the 9p proxy protocol.

Written from docs/protocol.md and measurements of the reference helper, deliberately
without importing anything from proxyd, so that tests built on it cross-check proxyd's
own marshalling instead of repeating its mistakes.

Wire facts (host byte order throughout):
  * request  = header(type:u32, size:u32) + payload of `size` bytes
  * `s` string = u16 length + bytes, no NUL
  * fd reply (OPEN, CREATE) = one 4-byte int, 0x7fffffff + SCM_RIGHTS fd, or -errno
  * status / data reply = header(SUCCESS|ERROR, size) + payload
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUCCESS, ERROR = 0, 1
(
    OPEN,
    CREATE,
    MKNOD,
    MKDIR,
    SYMLINK,
    LINK,
    LSTAT,
    READLINK,
    STATFS,
    CHMOD,
    CHOWN,
    TRUNCATE,
    UTIME,
    RENAME,
    REMOVE,
    LGETXATTR,
    LLISTXATTR,
    LSETXATTR,
    LREMOVEXATTR,
    GETVERSION,
) = range(2, 22)
# The request names, in code order (lower case, as proxyd's audit events spell them).
OP_NAMES = (
    "open",
    "create",
    "mknod",
    "mkdir",
    "symlink",
    "link",
    "lstat",
    "readlink",
    "statfs",
    "chmod",
    "chown",
    "truncate",
    "utime",
    "rename",
    "remove",
    "lgetxattr",
    "llistxattr",
    "lsetxattr",
    "lremovexattr",
    "getversion",
)
FD_VALID = 0x7FFFFFFF
MAX_IO = 65536
HEADER = struct.Struct("=II")

REFERENCE_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"
CHECKOUT = Path(__file__).resolve().parent.parent

# LSTAT record: q dev, ino, nlink; d mode, uid, gid; q rdev ... ctime_nsec.
# Packed without padding, so it is 13*8 + 3*4 = 116 bytes (protocol.md says 112).
STAT_REC = struct.Struct("=QQQIIIQQQQQQQQQQ")
STAT_FIELDS = (
    "dev",
    "ino",
    "nlink",
    "mode",
    "uid",
    "gid",
    "rdev",
    "size",
    "blksize",
    "blocks",
    "atime_sec",
    "atime_nsec",
    "mtime_sec",
    "mtime_nsec",
    "ctime_sec",
    "ctime_nsec",
)
STATFS_REC = struct.Struct("=11Q")
STATFS_FIELDS = (
    "type",
    "bsize",
    "blocks",
    "bfree",
    "bavail",
    "files",
    "ffree",
    "fsid0",
    "fsid1",
    "namelen",
    "frsize",
)


class ConnectionClosed(Exception):
    """The server closed the connection (EOF), possibly in the middle of a reply."""


class ProtocolError(Exception):
    """The server sent something that is not a well-formed reply."""


@dataclass
class Reply:
    kind: str  # "fd", "status" or "data"
    type: int | None  # SUCCESS/ERROR for header replies, None for fd replies
    value: int  # status value, -errno, or the fd marker
    data: bytes | None = None  # raw payload after the header (header replies only)
    fd: int | None = None  # received descriptor (fd replies only); caller closes it

    @property
    def ok(self) -> bool:
        if self.kind == "fd":
            return self.value == FD_VALID
        return self.type == SUCCESS


def errno_of(reply: Reply) -> int:
    """Positive errno of a failed reply, 0 for a successful one."""
    return 0 if reply.ok else -reply.value


# --- marshalling -------------------------------------------------------------------


def _bytes(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def pack_s(v: bytes | str) -> bytes:
    b = _bytes(v)
    return struct.pack("=H", len(b)) + b


def pack_d(v: int) -> bytes:
    return struct.pack("=I", v & 0xFFFFFFFF)  # accept signed and unsigned values


def pack_q(v: int) -> bytes:
    return struct.pack("=Q", v & 0xFFFFFFFFFFFFFFFF)


def marshal(fmt: str, *args: bytes | str | int) -> bytes:
    packers = {"s": pack_s, "d": pack_d, "q": pack_q}
    assert len(fmt) == len(args)
    return b"".join(packers[f](a) for f, a in zip(fmt, args, strict=True))  # type: ignore[operator]


def unpack_s(data: bytes) -> bytes:
    """Decode a reply payload that is exactly one `s` string."""
    (n,) = struct.unpack_from("=H", data)
    if n + 2 != len(data):
        raise ProtocolError(f"string length {n} does not match payload of {len(data)}")
    return data[2:]


def decode_stat(data: bytes) -> dict[str, int]:
    if len(data) != STAT_REC.size:
        raise ProtocolError(f"stat record of {len(data)} bytes, want {STAT_REC.size}")
    return dict(zip(STAT_FIELDS, STAT_REC.unpack(data), strict=True))


def decode_statfs(data: bytes) -> dict[str, int]:
    if len(data) != STATFS_REC.size:
        raise ProtocolError(f"statfs record of {len(data)} bytes, want {STATFS_REC.size}")
    return dict(zip(STATFS_FIELDS, STATFS_REC.unpack(data), strict=True))


def decode_q(data: bytes) -> int:
    (v,) = struct.unpack("=Q", data)
    return v


# --- the client --------------------------------------------------------------------


class ProxyClient:
    def __init__(self, sock: socket.socket, timeout: float | None = 10.0) -> None:
        self.sock = sock
        # A timeout turns a hung server into a TimeoutError instead of a hung test.
        sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    # raw I/O

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_request(self, code: int, payload: bytes, size: int | None = None) -> None:
        """Send a header + payload; `size` overrides the header size for malformed tests."""
        self.send_raw(HEADER.pack(code, len(payload) if size is None else size) + payload)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError as exc:  # peer closed with our request unread
                raise ConnectionClosed(f"reset after {len(buf)} of {n} bytes") from exc
            if not chunk:
                raise ConnectionClosed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def recv_fd_reply(self) -> Reply:
        fds = array.array("i")
        flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
        try:
            msg, anc, _flags, _addr = self.sock.recvmsg(4, socket.CMSG_SPACE(16), flags)
        except ConnectionResetError as exc:
            raise ConnectionClosed("reset waiting for fd reply") from exc
        if not msg:
            raise ConnectionClosed("EOF waiting for fd reply")
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        if len(msg) < 4:  # short read: the rest of the int follows without ancillary data
            msg += self._recv_exact(4 - len(msg))
        (value,) = struct.unpack("=i", msg)
        if len(fds) > 1:
            for extra in fds[1:]:
                os.close(extra)
            raise ProtocolError(f"{len(fds)} descriptors in one fd reply")
        return Reply("fd", None, value, None, fds[0] if fds else None)

    def recv_header_reply(self, kind: str) -> Reply:
        typ, size = HEADER.unpack(self._recv_exact(HEADER.size))
        if size > MAX_IO:
            raise ProtocolError(f"reply size {size} > {MAX_IO}")
        data = self._recv_exact(size)
        if typ not in (SUCCESS, ERROR):
            raise ProtocolError(f"reply type {typ}")
        value = 0
        if kind == "status" or typ == ERROR:
            if size != 4:
                raise ProtocolError(f"{kind} reply type {typ} with size {size}, want 4")
            (value,) = struct.unpack("=i", data)
        return Reply(kind, typ, value, data, None)

    def call(self, code: int, payload: bytes, kind: str) -> Reply:
        self.send_request(code, payload)
        if kind == "fd":
            return self.recv_fd_reply()
        if kind in ("status", "data"):
            return self.recv_header_reply(kind)
        raise ValueError(f"unknown reply kind {kind!r}")

    # one method per request type, fields in protocol.md order

    def open(self, path: bytes | str, flags: int) -> Reply:
        return self.call(OPEN, marshal("sd", path, flags), "fd")

    def create(self, path: bytes | str, flags: int, mode: int, uid: int, gid: int) -> Reply:
        return self.call(CREATE, marshal("sdddd", path, flags, mode, uid, gid), "fd")

    def mknod(self, uid: int, gid: int, path: bytes | str, mode: int, rdev: int) -> Reply:
        return self.call(MKNOD, marshal("ddsdq", uid, gid, path, mode, rdev), "status")

    def mkdir(self, uid: int, gid: int, path: bytes | str, mode: int) -> Reply:
        return self.call(MKDIR, marshal("ddsd", uid, gid, path, mode), "status")

    def symlink(self, uid: int, gid: int, target: bytes | str, linkpath: bytes | str) -> Reply:
        return self.call(SYMLINK, marshal("ddss", uid, gid, target, linkpath), "status")

    def link(self, oldpath: bytes | str, newpath: bytes | str) -> Reply:
        return self.call(LINK, marshal("ss", oldpath, newpath), "status")

    def lstat(self, path: bytes | str) -> Reply:
        return self.call(LSTAT, pack_s(path), "data")

    def readlink(self, path: bytes | str, bufsize: int) -> Reply:
        return self.call(READLINK, marshal("sd", path, bufsize), "data")

    def statfs(self, path: bytes | str) -> Reply:
        return self.call(STATFS, pack_s(path), "data")

    def chmod(self, path: bytes | str, mode: int) -> Reply:
        return self.call(CHMOD, marshal("sd", path, mode), "status")

    def chown(self, path: bytes | str, uid: int, gid: int) -> Reply:
        return self.call(CHOWN, marshal("sdd", path, uid, gid), "status")

    def truncate(self, path: bytes | str, length: int) -> Reply:
        return self.call(TRUNCATE, marshal("sq", path, length), "status")

    def utime(
        self, path: bytes | str, atime_sec: int, atime_nsec: int, mtime_sec: int, mtime_nsec: int
    ) -> Reply:
        payload = marshal("sqqqq", path, atime_sec, atime_nsec, mtime_sec, mtime_nsec)
        return self.call(UTIME, payload, "status")

    def rename(self, oldpath: bytes | str, newpath: bytes | str) -> Reply:
        return self.call(RENAME, marshal("ss", oldpath, newpath), "status")

    def remove(self, path: bytes | str) -> Reply:
        return self.call(REMOVE, pack_s(path), "status")

    def lgetxattr(self, size: int, path: bytes | str, name: bytes | str) -> Reply:
        # size 0 asks for the value length, which comes back as a status reply
        kind = "status" if size == 0 else "data"
        return self.call(LGETXATTR, marshal("dss", size, path, name), kind)

    def llistxattr(self, size: int, path: bytes | str) -> Reply:
        kind = "status" if size == 0 else "data"
        return self.call(LLISTXATTR, marshal("ds", size, path), kind)

    def lsetxattr(
        self,
        path: bytes | str,
        name: bytes | str,
        value: bytes | str,
        size: int | None = None,
        flags: int = 0,
    ) -> Reply:
        size = len(_bytes(value)) if size is None else size
        return self.call(LSETXATTR, marshal("sssdd", path, name, value, size, flags), "status")

    def lremovexattr(self, path: bytes | str, name: bytes | str) -> Reply:
        return self.call(LREMOVEXATTR, marshal("ss", path, name), "status")

    def getversion(self, path: bytes | str) -> Reply:
        return self.call(GETVERSION, pack_s(path), "data")


# --- starting a server -------------------------------------------------------------


class ServerHandle:
    """A running helper on one end of a socketpair; `client` talks to it."""

    def __init__(self, kind: str, export: Path, timeout: float | None = 10.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = theirs.fileno()
        if kind == "reference":
            argv = [REFERENCE_HELPER, "-n", "-p", str(export), "-f", str(fd)]
        elif kind == "proxyd":
            argv = [sys.executable, "-m", "proxyd", "-n", "-p", str(export), "-f", str(fd)]
        else:
            raise ValueError(f"unknown server kind {kind!r}")
        self.kind = kind
        # A file, not a pipe, so a chatty server can't block; it outlives the process so
        # failure messages can include it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                argv,
                pass_fds=[fd],
                cwd=CHECKOUT,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
            )
        finally:
            theirs.close()  # the child has its copy; ours would keep EOF from ever arriving
        self.client = ProxyClient(ours, timeout)

    @property
    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self, wait: float = 5.0) -> int:
        """Close the connection (the server exits at EOF), kill it if it doesn't."""
        self.client.close()
        try:
            return self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            return self.proc.wait()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(kind: str, export: Path, timeout: float | None = 10.0) -> ServerHandle:
    """`with start_server("reference", export) as srv: srv.client.lstat("/")`"""
    return ServerHandle(kind, export, timeout)
