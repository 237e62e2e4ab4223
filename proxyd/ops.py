"""One function per proxy request, run inside the chrooted export.

The functions take plain values (paths as bytes, ints as they arrived) and return
plain values or raise OSError; they know nothing of the wire format. Semantics are
the reference helper's (virtfs-proxy-helper), stronger where it is weak:

* OPEN / CREATE never open anything but a regular file or a directory: the type is
  looked at before the open (so a device's open routine never runs and a FIFO never
  hangs the worker) and again on the opened descriptor. open(2)'s own answer comes
  first: a special file is refused (ENXIO) only where open(2) would have got as far as
  the file's own open.
* GETVERSION never opens a special file and returns the 32-bit generation
  zero-extended.
* LSETXATTR refuses a size field that disagrees with the value it came with.
* READLINK / LGETXATTR / LLISTXATTR never allocate what the client asks for.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import sys
from typing import Any

import cython

if cython.compiled:
    from cython.cimports.libc.errno import EINTR, EISDIR
    from cython.cimports.libc.errno import errno as c_errno
    from cython.cimports.libc.stdio import rename as c_rename
    from cython.cimports.libc.string import memcpy
    from cython.cimports.posix.fcntl import open as c_open
    from cython.cimports.posix.stat import chmod as c_chmod
    from cython.cimports.posix.stat import fstat as c_fstat
    from cython.cimports.posix.stat import lstat as c_lstat
    from cython.cimports.posix.stat import mkdir as c_mkdir
    from cython.cimports.posix.stat import mknod as c_mknod
    from cython.cimports.posix.stat import stat as c_stat
    from cython.cimports.posix.stat import struct_stat, utimensat
    from cython.cimports.posix.time import timespec
    from cython.cimports.posix.unistd import lchown as c_lchown
    from cython.cimports.posix.unistd import readlink as c_readlink
    from cython.cimports.posix.unistd import rmdir as c_rmdir
    from cython.cimports.posix.unistd import symlink as c_symlink
    from cython.cimports.posix.unistd import truncate as c_truncate
    from cython.cimports.posix.unistd import unlink as c_unlink
    from cython.cimports.proxyd._libc import c_statfs, linkat, statfs
    from cython.cimports.proxyd._libc import lgetxattr as c_lgetxattr
    from cython.cimports.proxyd._libc import llistxattr as c_llistxattr
    from cython.cimports.proxyd._libc import lremovexattr as c_lremovexattr
    from cython.cimports.proxyd._libc import lsetxattr as c_lsetxattr

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)
_U64 = (1 << 64) - 1

# Filesystems on which the reference asks for inode generations (statfs f_type).
GETVERSION_FILESYSTEMS = {
    0xEF53,  # ext2/3/4
    0x9123683E,  # btrfs
    0x52654973,  # reiserfs
    0x58465342,  # xfs
}

# Flags added to every real open: never acquire a controlling terminal, never leak
# into a child. Not O_NONBLOCK: it would turn a host lease or delegation (Samba
# oplocks, knfsd) into EWOULDBLOCK where open(2) waits for the lease to be broken.
_SAFE_OPEN = cython.declare(cython.int, os.O_NOCTTY | os.O_CLOEXEC)
_O_TMPFILE_BIT = cython.declare(cython.int, os.O_TMPFILE & ~os.O_DIRECTORY)  # __O_TMPFILE

# What the frequent requests test, as C constants when compiled (no attribute lookups).
_O_PATH = cython.declare(cython.int, os.O_PATH)
_O_NOFOLLOW = cython.declare(cython.int, os.O_NOFOLLOW)
_O_CREAT = cython.declare(cython.int, os.O_CREAT)
_O_TMPFILE = cython.declare(cython.int, os.O_TMPFILE)
_O_DIRECTORY = cython.declare(cython.int, os.O_DIRECTORY)
_O_EXCL = cython.declare(cython.int, os.O_EXCL)
_S_IFMT = cython.declare(cython.uint, 0o170000)
_S_IFREG = cython.declare(cython.uint, stat.S_IFREG)
_S_IFDIR = cython.declare(cython.uint, stat.S_IFDIR)
_S_IFIFO = cython.declare(cython.uint, stat.S_IFIFO)
_S_IFSOCK = cython.declare(cython.uint, stat.S_IFSOCK)
_S_IFCHR = cython.declare(cython.uint, stat.S_IFCHR)
_S_IFBLK = cython.declare(cython.uint, stat.S_IFBLK)


class SpecialFileRefused(OSError):
    """OPEN/CREATE/GETVERSION of a device, FIFO or socket (CVE-2023-2861 class)."""

    def __init__(self, path: bytes, mode: int) -> None:
        super().__init__(errno.ENXIO, "not a regular file or directory", path)
        self.file_type = _type_name(mode)


def _type_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "char-device"),
        (stat.S_ISBLK, "block-device"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "unknown"


@cython.cfunc
@cython.inline
def _servable(mode: cython.uint) -> cython.bint:
    """A regular file or a directory."""
    kind: cython.uint = mode & _S_IFMT
    return kind in (_S_IFREG, _S_IFDIR)


@cython.cfunc
@cython.inline
def _special(mode: cython.uint) -> cython.bint:
    """A FIFO, socket or device: a file whose open(2) runs more than the filesystem."""
    kind: cython.uint = mode & _S_IFMT
    return kind in (_S_IFIFO, _S_IFSOCK, _S_IFCHR, _S_IFBLK)


@cython.cfunc
@cython.inline
def _stops_before_a_file_open(flags: cython.int) -> cython.bint:
    """Whether open(2) with `flags` fails on an existing FIFO, socket or device before
    it calls that file's own open (fifo_open, a driver's open), or opens nothing.

    Linux (fs/open.c build_open_flags, then fs/namei.c do_open): O_PATH opens nothing;
    O_DIRECTORY of a non-directory is ENOTDIR and O_CREAT|O_EXCL of an existing name
    EEXIST, both before the file's open; an O_TMPFILE bit (O_TMPFILE holds
    O_DIRECTORY) is ENOTDIR or EINVAL. With these flags open(2) answers for every kind
    of file itself, and no look before it is needed.
    """
    if flags & (_O_PATH | _O_DIRECTORY | _O_TMPFILE_BIT):
        return True
    return (flags & _O_CREAT) != 0 and (flags & _O_EXCL) != 0


def _uid(value: int) -> int:
    """A wire `d` id as the kernel sees it: -1 means "unchanged", others are u32."""
    return value if value == -1 else value & 0xFFFFFFFF


# --- system calls --------------------------------------------------------------------
#
# Compiled (setup.py), the calls the frequent requests make go to libc directly: no
# os.stat_result to build and take apart, no argument parsing. Interpreted, os makes
# the same calls. Either way: the same system call, the same errno in an OSError.

_PATH_MAX = 4096  # what os.readlink reads at most (MAXPATHLEN)
_XATTR_SIZE_MAX = 65536  # the largest value the kernel stores (linux/limits.h)


@cython.cfunc
def _raise_oserror(err: cython.int, path: bytes | None) -> cython.int:
    raise OSError(err, os.strerror(err), path)


@cython.cfunc
def _check(ret: cython.int, path: bytes | None) -> cython.int:
    """A libc call's return: -1 raises OSError with its errno, as os's wrapper would."""
    if ret != 0:
        _raise_oserror(c_errno, path)
    return 0


@cython.cfunc
def _stat_mode(path: bytes, follow: cython.bint) -> cython.uint:
    """st_mode of stat(2), or of lstat(2) when not `follow`. Raises OSError."""
    if cython.compiled:
        st = cython.declare(struct_stat)
        ret = c_stat(path, cython.address(st)) if follow else c_lstat(path, cython.address(st))
        _check(ret, path)
        return st.st_mode
    return os.stat(path, follow_symlinks=follow).st_mode


@cython.cfunc
def _fstat_mode(fd: cython.int) -> cython.uint:
    """st_mode of fstat(2) on `fd`. Raises OSError."""
    if cython.compiled:
        st = cython.declare(struct_stat)
        _check(c_fstat(fd, cython.address(st)), None)
        return st.st_mode
    return os.fstat(fd).st_mode


@cython.cfunc
def _sys_open(path: bytes, flags: cython.int, mode: cython.int) -> cython.int:
    """open(2) (openat(AT_FDCWD)), retried on EINTR as os.open. Raises OSError."""
    if cython.compiled:
        while True:
            fd: cython.int = c_open(path, flags, mode)
            if fd >= 0:
                return fd
            err = c_errno
            if err != EINTR:
                _raise_oserror(err, path)
    return os.open(path, flags, mode)


if cython.compiled:
    _xattr_value = cython.declare(cython.char[65536])  # _XATTR_SIZE_MAX


@cython.cfunc
def _lgetxattr(path: bytes, name: bytes, limit: cython.Py_ssize_t) -> bytes:
    """lgetxattr(2) into a buffer of `limit` bytes (1 to _XATTR_SIZE_MAX): the value,
    ERANGE when it is longer. The kernel allocates what it is asked for: no more."""
    if cython.compiled:
        n = c_lgetxattr(path, name, _xattr_value, limit)
        if n < 0:
            _raise_oserror(c_errno, path)
        return _xattr_value[:n]
    value = os.getxattr(path, name, follow_symlinks=False)
    if len(value) > limit:
        _raise_oserror(errno.ERANGE, path)
    return value


@cython.cfunc
def _lgetxattr_size(path: bytes, name: bytes) -> cython.Py_ssize_t:
    """lgetxattr(2) with size 0: the value's length."""
    if cython.compiled:
        n = c_lgetxattr(path, name, cython.NULL, 0)
        if n < 0:
            _raise_oserror(c_errno, path)
        return n
    return len(os.getxattr(path, name, follow_symlinks=False))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux.
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


def _raise_errno(path: bytes) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), path)


def statfs_fields(path: bytes) -> tuple[int, ...]:
    """statfs(2) as the reference reports it: 11 fields, fsid words sign-extended."""
    if cython.compiled:
        st = cython.declare(statfs)
        fsid = cython.declare(cython.int[2])
        _check(c_statfs(path, cython.address(st)), path)
        memcpy(fsid, cython.address(st.f_fsid), 8)
        return (
            st.f_type,
            st.f_bsize,
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            fsid[0],
            fsid[1],
            st.f_namelen,
            st.f_frsize,
        )
    buf = _Statfs()
    if _libc.statfs(path, ctypes.byref(buf)) != 0:
        _raise_errno(path)
    return (
        buf.f_type,
        buf.f_bsize,
        buf.f_blocks,
        buf.f_bfree,
        buf.f_bavail,
        buf.f_files,
        buf.f_ffree,
        buf.f_fsid[0],
        buf.f_fsid[1],
        buf.f_namelen,
        buf.f_frsize,
    )


@cython.cfunc
def _open(path: bytes, flags: cython.int, mode: cython.int) -> cython.int:
    """open(2) with _SAFE_OPEN added. Raises OSError; SpecialFileRefused for a device.

    The export is bound nodev in the worker, so a device swapped in after the look
    gets EACCES from the kernel before its driver runs. That EACCES is proxyd's, not
    open(2)'s answer on the host: look again, and where the path names a device now,
    give the special-file refusal the reference gives after opening it. Any other
    EACCES is open(2)'s own (a directory the caller may not write, an owner an
    ID-mapped export cannot show), and stands.
    """
    try:
        return _sys_open(path, flags | _SAFE_OPEN, mode)
    except PermissionError as denied:
        try:
            now = _stat_mode(path, not flags & _O_NOFOLLOW)
        except OSError:
            raise denied from None  # nothing there now: open(2)'s EACCES is the answer
        if stat.S_ISCHR(now) or stat.S_ISBLK(now):
            raise SpecialFileRefused(path, now) from None
        raise


class ExportOps:
    """The 20 operations, bound to one sandboxed process.

    `credentials` switches to the guest's uid/gid for CREATE, MKNOD, MKDIR and
    SYMLINK (see privileges.Credentials). `generations` says whether the export's
    filesystem has inode generations worth asking for.
    """

    def __init__(self, credentials: Any, generations: bool) -> None:
        self._creds = credentials
        self._generations = generations
        self._times = (_Timespec * 2)()

    # --- descriptors -----------------------------------------------------------

    def _open_checked(self, path: bytes, flags: int, mode: int) -> int:
        # Look first, so that a FIFO or a device is never opened; what is not there, or
        # is a regular file, a directory or a symlink, open(2) answers itself. No look
        # where open(2) never gets as far as a special file's open (O_PATH, O_DIRECTORY,
        # O_CREAT|O_EXCL): it answers as it would on the host, and a directory's open,
        # QEMU's opendir, makes one path walk as the reference's does.
        if not _stops_before_a_file_open(flags):
            try:
                found = _stat_mode(path, not flags & _O_NOFOLLOW)
            except OSError:
                pass
            else:
                if _special(found):
                    raise SpecialFileRefused(path, found)
        fd = _open(path, flags, mode)
        try:
            # Look again at what was really opened: the path may have been swapped, and
            # an O_PATH descriptor may be of anything.
            opened = _fstat_mode(fd)
            if not _servable(opened):
                raise SpecialFileRefused(path, opened)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open(self, path: bytes, flags: int) -> int:
        """OPEN: a descriptor for an existing file or directory."""
        if flags & _O_CREAT or flags & _O_TMPFILE == _O_TMPFILE:
            # OPEN carries no mode (the reference would use stack garbage): CREATE is
            # the request that creates.
            raise OSError(errno.EINVAL, "OPEN cannot create files; use CREATE", path)
        return self._open_checked(path, flags, 0)

    def create(self, path: bytes, flags: int, mode: int, uid: int, gid: int) -> int:
        """CREATE: open(path, flags, mode) as uid/gid."""
        with self._creds.as_user(uid, gid):
            return self._open_checked(path, flags, mode)

    # --- creating as the guest's user --------------------------------------------

    def mknod(self, uid: int, gid: int, path: bytes, mode: int, rdev: int) -> None:
        with self._creds.as_user(uid, gid):
            if cython.compiled:
                m: cython.int = mode
                _check(c_mknod(path, m, rdev & _U64), path)
            else:
                os.mknod(path, mode, rdev & _U64)

    def mkdir(self, uid: int, gid: int, path: bytes, mode: int) -> None:
        with self._creds.as_user(uid, gid):
            if cython.compiled:
                m: cython.int = mode
                _check(c_mkdir(path, m), path)
            else:
                os.mkdir(path, mode)

    def symlink(self, uid: int, gid: int, target: bytes, linkpath: bytes) -> None:
        with self._creds.as_user(uid, gid):
            if cython.compiled:
                _check(c_symlink(target, linkpath), target)
            else:
                os.symlink(target, linkpath)

    # --- everything else, as root inside the export ---------------------------------

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        """linkat(2) with no flags: a symlink is linked, not followed (link(2) as well)."""
        if cython.compiled:
            _check(linkat(AT_FDCWD, oldpath, AT_FDCWD, newpath, 0), oldpath)
            return
        os.link(oldpath, newpath, follow_symlinks=False)

    def lstat(self, path: bytes) -> tuple:
        """lstat(2) as the reference reports it: st_dev, st_ino, st_nlink, st_mode,
        st_uid, st_gid, st_rdev, st_size, st_blksize, st_blocks, then (seconds,
        nanoseconds) of st_atim, st_mtim, st_ctim."""
        if cython.compiled:
            st = cython.declare(struct_stat)
            _check(c_lstat(path, cython.address(st)), path)
            return (
                st.st_dev,
                st.st_ino,
                st.st_nlink,
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_rdev,
                st.st_size,
                st.st_blksize,
                st.st_blocks,
                st.st_atim.tv_sec,
                st.st_atim.tv_nsec,
                st.st_mtim.tv_sec,
                st.st_mtim.tv_nsec,
                st.st_ctim.tv_sec,
                st.st_ctim.tv_nsec,
            )
        s = os.lstat(path)
        a, m, c = s.st_atime_ns, s.st_mtime_ns, s.st_ctime_ns
        return (
            s.st_dev,
            s.st_ino,
            s.st_nlink,
            s.st_mode,
            s.st_uid,
            s.st_gid,
            s.st_rdev,
            s.st_size,
            s.st_blksize,
            s.st_blocks,
            *divmod(a, 1_000_000_000),
            *divmod(m, 1_000_000_000),
            *divmod(c, 1_000_000_000),
        )

    def readlink(self, path: bytes, bufsize: int) -> bytes:
        """The target, cut to bufsize - 1 bytes as readlink(2) into that buffer."""
        if bufsize < 2:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        if cython.compiled:
            target = cython.declare(cython.char[4096])  # _PATH_MAX
            n = c_readlink(path, target, _PATH_MAX)
            if n < 0:
                _raise_oserror(c_errno, path)
            return target[: min(n, bufsize - 1)]
        return os.readlink(path)[: bufsize - 1]

    def statfs(self, path: bytes) -> tuple[int, ...]:
        return statfs_fields(path)

    def chmod(self, path: bytes, mode: int) -> None:
        if cython.compiled:
            m: cython.int = mode
            _check(c_chmod(path, m), path)
            return
        os.chmod(path, mode)

    def chown(self, path: bytes, uid: int, gid: int) -> None:
        if cython.compiled:  # -1 ("unchanged") as the kernel takes it: (uid_t) -1
            _check(c_lchown(path, _uid(uid) & 0xFFFFFFFF, _uid(gid) & 0xFFFFFFFF), path)
            return
        os.lchown(path, _uid(uid), _uid(gid))

    def truncate(self, path: bytes, length: int) -> None:
        if cython.compiled:
            _check(c_truncate(path, length), path)
            return
        os.truncate(path, length)

    def utime(
        self, path: bytes, atime_sec: int, atime_nsec: int, mtime_sec: int, mtime_nsec: int
    ) -> None:
        """utimensat(AT_SYMLINK_NOFOLLOW); UTIME_NOW / UTIME_OMIT pass through."""
        if cython.compiled:
            ts = cython.declare(timespec[2])
            ts[0].tv_sec, ts[0].tv_nsec = atime_sec, atime_nsec
            ts[1].tv_sec, ts[1].tv_nsec = mtime_sec, mtime_nsec
            _check(utimensat(AT_FDCWD, path, ts, AT_SYMLINK_NOFOLLOW), path)
            return
        times = self._times
        times[0].tv_sec, times[0].tv_nsec = atime_sec, atime_nsec
        times[1].tv_sec, times[1].tv_nsec = mtime_sec, mtime_nsec
        if _libc.utimensat(AT_FDCWD, path, times, AT_SYMLINK_NOFOLLOW) != 0:
            _raise_errno(path)

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        if cython.compiled:
            _check(c_rename(oldpath, newpath), oldpath)
            return
        os.rename(oldpath, newpath)

    def remove(self, path: bytes) -> None:
        """remove(3): unlink, or rmdir for a directory."""
        if cython.compiled:
            if c_unlink(path) != 0:
                if c_errno != EISDIR:
                    _raise_oserror(c_errno, path)
                _check(c_rmdir(path), path)
            return
        try:
            os.unlink(path)
        except IsADirectoryError:
            os.rmdir(path)

    # --- extended attributes -----------------------------------------------------------

    def lgetxattr(self, size: int, path: bytes, name: bytes) -> int | bytes:
        """The value, or with size 0 its length; ERANGE when the value is longer than
        `size`. Never allocates `size` bytes: no value is longer than _XATTR_SIZE_MAX."""
        if size < 0:
            raise OSError(errno.EINVAL, "negative buffer size", path)
        if size == 0:
            return _lgetxattr_size(path, name)
        return _lgetxattr(path, name, min(size, _XATTR_SIZE_MAX))

    def llistxattr(self, size: int, path: bytes) -> int | bytes:
        """The NUL-separated name list, or with size 0 its length."""
        if size < 0:
            raise OSError(errno.EINVAL, "negative buffer size", path)
        if cython.compiled:  # the kernel's list as it is: each name and its NUL
            n = c_llistxattr(path, _xattr_value, _XATTR_SIZE_MAX)
            if n < 0:
                _raise_oserror(c_errno, path)
            names = _xattr_value[:n]
        else:
            listed = os.listxattr(path, follow_symlinks=False)
            names = b"".join(os.fsencode(name) + b"\0" for name in listed)
        if size == 0:
            return len(names)
        if len(names) > size:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE), path)
        return names

    def lsetxattr(self, path: bytes, name: bytes, value: bytes, size: int, flags: int) -> None:
        if size != len(value):
            # The reference would read `size` bytes from a buffer of len(value).
            raise OSError(errno.EINVAL, "size field disagrees with the value", path)
        if cython.compiled:
            f: cython.int = flags
            _check(c_lsetxattr(path, name, cython.cast(cython.p_char, value), size, f), path)
            return
        os.setxattr(path, name, value, flags, follow_symlinks=False)

    def lremovexattr(self, path: bytes, name: bytes) -> None:
        if cython.compiled:
            _check(c_lremovexattr(path, name), path)
            return
        os.removexattr(path, name, follow_symlinks=False)

    # --- generation --------------------------------------------------------------------

    def getversion(self, path: bytes) -> int:
        """FS_IOC_GETVERSION, 0 on filesystems without generations (as the reference)."""
        if not self._generations:
            return 0
        found = _stat_mode(path, True)
        if not _servable(found):
            raise SpecialFileRefused(path, found)
        fd = _open(path, os.O_RDONLY, 0)
        try:
            opened = _fstat_mode(fd)
            if not _servable(opened):
                raise SpecialFileRefused(path, opened)
            buf = bytearray(8)
            fcntl.ioctl(fd, FS_IOC_GETVERSION, buf)
        finally:
            os.close(fd)
        # The kernel writes a 32-bit int: the rest of the buffer is ours, and zero.
        return int.from_bytes(buf[:4], sys.byteorder)


def has_generations(path: bytes = b"/") -> bool:
    """Whether the filesystem at `path` is one the reference asks generations of."""
    return statfs_fields(path)[0] & 0xFFFFFFFF in GETVERSION_FILESYSTEMS


# Access modes and flags that let an OPEN write or change the file.
# O_TMPFILE is tested by its own bit: the flag includes O_DIRECTORY, which alone (a
# directory opened to be listed) changes nothing.
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | _O_TMPFILE_BIT


def _read_only(path: bytes) -> OSError:
    return OSError(errno.EROFS, "the export is read-only", path)


class ReadOnlyOps(ExportOps):
    """A read-only export: every request that could change it gets EROFS."""

    def open(self, path: bytes, flags: int) -> int:
        if flags & _WRITING:
            raise _read_only(path)
        return super().open(path, flags)

    def create(self, path: bytes, flags: int, mode: int, uid: int, gid: int) -> int:
        raise _read_only(path)

    def mknod(self, uid: int, gid: int, path: bytes, mode: int, rdev: int) -> None:
        raise _read_only(path)

    def mkdir(self, uid: int, gid: int, path: bytes, mode: int) -> None:
        raise _read_only(path)

    def symlink(self, uid: int, gid: int, target: bytes, linkpath: bytes) -> None:
        raise _read_only(linkpath)

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise _read_only(newpath)

    def chmod(self, path: bytes, mode: int) -> None:
        raise _read_only(path)

    def chown(self, path: bytes, uid: int, gid: int) -> None:
        raise _read_only(path)

    def truncate(self, path: bytes, length: int) -> None:
        raise _read_only(path)

    def utime(
        self, path: bytes, atime_sec: int, atime_nsec: int, mtime_sec: int, mtime_nsec: int
    ) -> None:
        raise _read_only(path)

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        raise _read_only(oldpath)

    def remove(self, path: bytes) -> None:
        raise _read_only(path)

    def lsetxattr(self, path: bytes, name: bytes, value: bytes, size: int, flags: int) -> None:
        raise _read_only(path)

    def lremovexattr(self, path: bytes, name: bytes) -> None:
        raise _read_only(path)
