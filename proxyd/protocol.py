"""The 9p proxy wire format, as QEMU's proxy fs driver speaks it.

Only bytes in, values out (and back). Nothing here touches a socket or a file.
All integers are in host byte order; strings are a u16 length and raw bytes, with
no terminating NUL. See docs/protocol.md in the shared docs for the contract.
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

import cython

if cython.compiled:
    from cython.cimports.cpython.bytes import PyBytes_AS_STRING, PyBytes_FromStringAndSize
    from cython.cimports.libc.string import memcpy

HEADER = struct.Struct("=II")  # type, size
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 65536  # PROXY_MAX_IO_SZ
BUFFER_SIZE = HEADER_SIZE + MAX_PAYLOAD

# Reply types.
T_SUCCESS = 0
T_ERROR = 1

# Request codes.
T_OPEN = 2
T_CREATE = 3
T_MKNOD = 4
T_MKDIR = 5
T_SYMLINK = 6
T_LINK = 7
T_LSTAT = 8
T_READLINK = 9
T_STATFS = 10
T_CHMOD = 11
T_CHOWN = 12
T_TRUNCATE = 13
T_UTIME = 14
T_RENAME = 15
T_REMOVE = 16
T_LGETXATTR = 17
T_LLISTXATTR = 18
T_LSETXATTR = 19
T_LREMOVEXATTR = 20
T_GETVERSION = 21

FD_VALID = 0x7FFFFFFF  # V9FS_FD_VALID: "a descriptor rides along"

# How each request is answered.
FD = "fd"  # 4-byte int by sendmsg, SCM_RIGHTS on success, no header
STATUS = "status"  # header + d
DATA = "data"  # header + payload, or header + d(-errno)

_D = struct.Struct("=i")
_Q = struct.Struct("=q")
_U16 = struct.Struct("=H")

STATUS_REPLY = struct.Struct("=IIi")  # header + d, one pack
FD_REPLY = _D

# Stat record: dev ino nlink mode uid gid rdev size blksize blocks, then three
# (sec, nsec) pairs. Unsigned where the kernel's type is unsigned so that any
# value the kernel can produce packs.
STAT = struct.Struct("=QQQIIIQqqqqqqqqq")
STAT_REPLY = struct.Struct("=II" + STAT.format[1:])
STATFS = struct.Struct("=11Q")
STATFS_REPLY = struct.Struct("=II" + STATFS.format[1:])
GETVERSION_REPLY = struct.Struct("=IIQ")


class MalformedRequest(Exception):
    """A request whose payload does not hold what its type needs.

    The connection stays usable: the request is answered with an errno. ENOBUFS is
    what the reference answers for a short payload or a string running past it.
    """

    errno = errno.ENOBUFS


class NulInPath(MalformedRequest):
    """A path or name with a NUL byte (the reference would silently cut it there)."""

    errno = errno.EINVAL


class FatalProtocolError(Exception):
    """The stream cannot be trusted any more (unknown code, oversized header)."""


class Request(NamedTuple):
    name: str
    reply: str  # FD, STATUS or DATA
    mutates: bool  # can change the export (audit "mutations", read-only exports)


REQUESTS: dict[int, Request] = {
    T_OPEN: Request("open", FD, False),
    T_CREATE: Request("create", FD, True),
    T_MKNOD: Request("mknod", STATUS, True),
    T_MKDIR: Request("mkdir", STATUS, True),
    T_SYMLINK: Request("symlink", STATUS, True),
    T_LINK: Request("link", STATUS, True),
    T_LSTAT: Request("lstat", DATA, False),
    T_READLINK: Request("readlink", DATA, False),
    T_STATFS: Request("statfs", DATA, False),
    T_CHMOD: Request("chmod", STATUS, True),
    T_CHOWN: Request("chown", STATUS, True),
    T_TRUNCATE: Request("truncate", STATUS, True),
    T_UTIME: Request("utime", STATUS, True),
    T_RENAME: Request("rename", STATUS, True),
    T_REMOVE: Request("remove", STATUS, True),
    T_LGETXATTR: Request("lgetxattr", DATA, False),
    T_LLISTXATTR: Request("llistxattr", DATA, False),
    T_LSETXATTR: Request("lsetxattr", STATUS, True),
    T_LREMOVEXATTR: Request("lremovexattr", STATUS, True),
    T_GETVERSION: Request("getversion", DATA, False),
}


def check_header(type_: int, size: int) -> None:
    """Refuse a header the reference would stop serving on."""
    if size > MAX_PAYLOAD:
        raise FatalProtocolError(f"request size {size} exceeds {MAX_PAYLOAD} bytes")
    if type_ not in REQUESTS:
        raise FatalProtocolError(f"unknown request code {type_}")


# --- decoding ------------------------------------------------------------------
#
# Each decoder takes the payload (the bytes after the header) and returns a tuple of
# the fields in wire order, strings as bytes. A field that runs past the end raises
# MalformedRequest. Trailing bytes are ignored, as the reference does.
#
# Compiled (setup.py), the fixed-size fields are copied straight out of the bytes
# object; interpreted, struct reads them. Both read host byte order.


@cython.cfunc
@cython.inline
def _i32(buf: bytes, off: cython.Py_ssize_t) -> cython.long:
    """The `d` at `off` (the caller has checked that it is there)."""
    if cython.compiled:
        v = cython.declare(cython.int)
        memcpy(cython.address(v), cython.cast(cython.p_char, buf) + off, 4)
        return v
    return _D.unpack_from(buf, off)[0]


@cython.cfunc
@cython.inline
def _i64(buf: bytes, off: cython.Py_ssize_t) -> cython.longlong:
    """The `q` at `off` (the caller has checked that it is there)."""
    if cython.compiled:
        v = cython.declare(cython.longlong)
        memcpy(cython.address(v), cython.cast(cython.p_char, buf) + off, 8)
        return v
    return _Q.unpack_from(buf, off)[0]


@cython.cfunc
@cython.inline
def _u16(buf: bytes, off: cython.Py_ssize_t) -> cython.Py_ssize_t:
    """A string's length at `off` (the caller has checked that it is there)."""
    if cython.compiled:
        v = cython.declare(cython.ushort)
        memcpy(cython.address(v), cython.cast(cython.p_char, buf) + off, 2)
        return v
    return _U16.unpack_from(buf, off)[0]


@cython.cfunc
@cython.inline
def _bytes_at(buf: bytes, off: cython.Py_ssize_t, n: cython.Py_ssize_t) -> bytes:
    """buf[off:off + n] (the caller has checked that it is there): compiled, one copy,
    no slice object."""
    if cython.compiled:
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(buf) + off, n)
    return buf[off : off + n]


@cython.cfunc
def _need(buf: bytes, off: cython.Py_ssize_t, size: cython.Py_ssize_t) -> cython.int:
    if off + size > len(buf):
        raise MalformedRequest("payload too short for its request type")
    return 0


@cython.cfunc
def _string(buf: bytes, off: cython.Py_ssize_t) -> tuple:
    end: cython.Py_ssize_t = len(buf)
    if off + 2 > end:
        raise MalformedRequest("string length runs past the payload")
    n: cython.Py_ssize_t = _u16(buf, off)
    off += 2
    if off + n > end:
        raise MalformedRequest(f"string of {n} bytes runs past the payload")
    return _bytes_at(buf, off, n), off + n


@cython.cfunc
def _checked_path(s: bytes) -> bytes:
    if b"\0" in s:
        # QEMU counts the C string's terminating NUL in the length of the paths it
        # looks up ("/\0"): that is the end of the path. A NUL with more after it is
        # not something QEMU sends, and cutting the path there would act on another.
        s = s.rstrip(b"\0")
        if b"\0" in s:
            raise NulInPath("path or name contains a NUL byte")
    return s


@cython.cfunc
def _path(buf: bytes, off: cython.Py_ssize_t) -> tuple:
    s, off = _string(buf, off)
    return _checked_path(s), off


def decode_path(buf: bytes) -> tuple[bytes]:
    """LSTAT, STATFS, REMOVE, GETVERSION: `s path`. (_path inlined: LSTAT is the most
    frequent request of all.)"""
    if len(buf) < 2:
        raise MalformedRequest("string length runs past the payload")
    n: cython.Py_ssize_t = _u16(buf, 0)
    if n + 2 > len(buf):
        raise MalformedRequest(f"string of {n} bytes runs past the payload")
    return (_checked_path(_bytes_at(buf, 2, n)),)


def decode_path_int(buf: bytes) -> tuple[bytes, int]:
    """OPEN (`s path, d flags`), READLINK (`s path, d bufsize`), CHMOD (`s path, d mode`)."""
    off: cython.Py_ssize_t
    path, off = _path(buf, 0)
    _need(buf, off, 4)
    return path, _i32(buf, off)


def decode_two_paths(buf: bytes) -> tuple[bytes, bytes]:
    """LINK, RENAME (`s old, s new`), LREMOVEXATTR (`s path, s name`)."""
    off: cython.Py_ssize_t
    a, off = _path(buf, 0)
    b, _ = _path(buf, off)
    return a, b


def decode_create(buf: bytes) -> tuple[bytes, int, int, int, int]:
    """CREATE: `s path, d flags, d mode, d uid, d gid`."""
    off: cython.Py_ssize_t
    path, off = _path(buf, 0)
    _need(buf, off, 16)
    return path, _i32(buf, off), _i32(buf, off + 4), _i32(buf, off + 8), _i32(buf, off + 12)


def decode_mknod(buf: bytes) -> tuple[int, int, bytes, int, int]:
    """MKNOD: `d uid, d gid, s path, d mode, q rdev`."""
    off: cython.Py_ssize_t
    _need(buf, 0, 8)
    path, off = _path(buf, 8)
    _need(buf, off, 12)
    return _i32(buf, 0), _i32(buf, 4), path, _i32(buf, off), _i64(buf, off + 4)


def decode_mkdir(buf: bytes) -> tuple[int, int, bytes, int]:
    """MKDIR: `d uid, d gid, s path, d mode`."""
    off: cython.Py_ssize_t
    _need(buf, 0, 8)
    path, off = _path(buf, 8)
    _need(buf, off, 4)
    return _i32(buf, 0), _i32(buf, 4), path, _i32(buf, off)


def decode_symlink(buf: bytes) -> tuple[int, int, bytes, bytes]:
    """SYMLINK: `d uid, d gid, s target, s linkpath`."""
    off: cython.Py_ssize_t
    _need(buf, 0, 8)
    target, off = _path(buf, 8)
    linkpath, _ = _path(buf, off)
    return _i32(buf, 0), _i32(buf, 4), target, linkpath


def decode_chown(buf: bytes) -> tuple[bytes, int, int]:
    """CHOWN: `s path, d uid, d gid`."""
    off: cython.Py_ssize_t
    path, off = _path(buf, 0)
    _need(buf, off, 8)
    return path, _i32(buf, off), _i32(buf, off + 4)


def decode_truncate(buf: bytes) -> tuple[bytes, int]:
    """TRUNCATE: `s path, q length`."""
    off: cython.Py_ssize_t
    path, off = _path(buf, 0)
    _need(buf, off, 8)
    return path, _i64(buf, off)


def decode_utime(buf: bytes) -> tuple[bytes, int, int, int, int]:
    """UTIME: `s path, q atime_sec, q atime_nsec, q mtime_sec, q mtime_nsec`."""
    off: cython.Py_ssize_t
    path, off = _path(buf, 0)
    _need(buf, off, 32)
    return path, _i64(buf, off), _i64(buf, off + 8), _i64(buf, off + 16), _i64(buf, off + 24)


def decode_getxattr(buf: bytes) -> tuple[int, bytes, bytes]:
    """LGETXATTR: `d size, s path, s name`."""
    off: cython.Py_ssize_t
    _need(buf, 0, 4)
    path, off = _path(buf, 4)
    name, _ = _path(buf, off)
    return _i32(buf, 0), path, name


def decode_listxattr(buf: bytes) -> tuple[int, bytes]:
    """LLISTXATTR: `d size, s path`."""
    _need(buf, 0, 4)
    path, _ = _path(buf, 4)
    return _i32(buf, 0), path


def decode_setxattr(buf: bytes) -> tuple[bytes, bytes, bytes, int, int]:
    """LSETXATTR: `s path, s name, s value, d size, d flags` (value may hold NULs)."""
    off: cython.Py_ssize_t
    path, off = _path(buf, 0)
    name, off = _path(buf, off)
    value, off = _string(buf, off)
    _need(buf, off, 8)
    return path, name, value, _i32(buf, off), _i32(buf, off + 4)


DECODERS = {
    T_OPEN: decode_path_int,
    T_CREATE: decode_create,
    T_MKNOD: decode_mknod,
    T_MKDIR: decode_mkdir,
    T_SYMLINK: decode_symlink,
    T_LINK: decode_two_paths,
    T_LSTAT: decode_path,
    T_READLINK: decode_path_int,
    T_STATFS: decode_path,
    T_CHMOD: decode_path_int,
    T_CHOWN: decode_chown,
    T_TRUNCATE: decode_truncate,
    T_UTIME: decode_utime,
    T_RENAME: decode_two_paths,
    T_REMOVE: decode_path,
    T_LGETXATTR: decode_getxattr,
    T_LLISTXATTR: decode_listxattr,
    T_LSETXATTR: decode_setxattr,
    T_LREMOVEXATTR: decode_two_paths,
    T_GETVERSION: decode_path,
}


# --- encoding ------------------------------------------------------------------


def encode_status(value: int) -> bytes:
    """Status reply: SUCCESS with a value >= 0, or ERROR with -errno; `value` is a `d`
    (STATUS_REPLY; compiled, written straight into the reply: a guest's lookups of
    names that do not exist make it frequent)."""
    if cython.compiled:
        d: cython.int = value
        reply: bytes = PyBytes_FromStringAndSize(cython.NULL, 12)  # STATUS_REPLY.size
        out: cython.p_char = PyBytes_AS_STRING(reply)
        _put_u32(out, 0, T_ERROR if d < 0 else T_SUCCESS)
        _put_u32(out, 4, 4)
        memcpy(out + 8, cython.address(d), 4)
        return reply
    return STATUS_REPLY.pack(T_ERROR if value < 0 else T_SUCCESS, 4, value)


def encode_error(err: int) -> bytes:
    """The failure form of a status or data reply."""
    return encode_status(-err)


def encode_string_data(value: bytes) -> bytes:
    """Data reply carrying one `s` (READLINK target, xattr value or list); compiled,
    written straight into the reply, as encode_stat."""
    n: cython.Py_ssize_t = len(value)
    if n + 2 > MAX_PAYLOAD:
        return encode_error(errno.ENOBUFS)
    if cython.compiled:
        reply: bytes = PyBytes_FromStringAndSize(cython.NULL, 10 + n)  # header, u16, value
        out: cython.p_char = PyBytes_AS_STRING(reply)
        _put_u32(out, 0, T_SUCCESS)
        _put_u32(out, 4, n + 2)
        _put_u16(out, 8, n)
        memcpy(out + 10, PyBytes_AS_STRING(value), n)
        return reply
    return HEADER.pack(T_SUCCESS, n + 2) + _U16.pack(n) + value


def encode_fd_reply(value: int) -> bytes:
    """The 4-byte body of an fd reply: FD_VALID, or -errno."""
    return FD_REPLY.pack(value)


FD_REPLY_VALID = encode_fd_reply(FD_VALID)


def encode_stat(fields: tuple) -> bytes:
    """Data reply for LSTAT from the 16 values of ops.ExportOps.lstat, in wire order
    (STAT_REPLY; compiled, written straight into the reply: LSTAT is the most frequent
    request of all)."""
    if cython.compiled:
        reply: bytes = PyBytes_FromStringAndSize(cython.NULL, 124)  # STAT_REPLY.size
        out: cython.p_char = PyBytes_AS_STRING(reply)
        i: cython.Py_ssize_t
        _put_u32(out, 0, T_SUCCESS)
        _put_u32(out, 4, 116)  # STAT.size
        for i in range(3):  # dev ino nlink: Q
            _put_u64(out, 8 + 8 * i, fields[i])
        for i in range(3):  # mode uid gid: I
            _put_u32(out, 32 + 4 * i, fields[3 + i])
        _put_u64(out, 44, fields[6])  # rdev: Q
        for i in range(9):  # size blksize blocks, the three (sec, nsec): q
            _put_i64(out, 52 + 8 * i, fields[7 + i])
        return reply
    return STAT_REPLY.pack(T_SUCCESS, STAT.size, *fields)


@cython.cfunc
@cython.inline
def _put_u16(out: cython.p_char, off: cython.Py_ssize_t, v: cython.ushort) -> cython.int:
    memcpy(out + off, cython.address(v), 2)
    return 0


@cython.cfunc
@cython.inline
def _put_u32(out: cython.p_char, off: cython.Py_ssize_t, v: cython.uint) -> cython.int:
    memcpy(out + off, cython.address(v), 4)
    return 0


@cython.cfunc
@cython.inline
def _put_u64(out: cython.p_char, off: cython.Py_ssize_t, v: cython.ulonglong) -> cython.int:
    memcpy(out + off, cython.address(v), 8)
    return 0


@cython.cfunc
@cython.inline
def _put_i64(out: cython.p_char, off: cython.Py_ssize_t, v: cython.longlong) -> cython.int:
    memcpy(out + off, cython.address(v), 8)
    return 0


_U64 = (1 << 64) - 1


def encode_statfs(fields: tuple[int, ...]) -> bytes:
    """Data reply for STATFS from the 11 fields in wire order (fsid words signed)."""
    return STATFS_REPLY.pack(T_SUCCESS, STATFS.size, *(v & _U64 for v in fields))


def encode_getversion(generation: int) -> bytes:
    return GETVERSION_REPLY.pack(T_SUCCESS, 8, generation)
