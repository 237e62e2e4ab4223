"""Named listening sockets: claim the path safely, bind it atomically.

QEMU connects to the socket path and then unlinks it, so its uid may write the
socket's directory: any entry there (our private directory, the socket path) can be
swapped for a symlink at any moment (renameat2(RENAME_EXCHANGE)). So no root operation
here follows a path: a directory is opened one component at a time (open_directory),
and everything inside it is an *at call on that descriptor that never follows a
symlink. A path that holds a socket no process has open any more is stale (a crashed
helper) and is replaced; a path with a live socket or a file that is not a socket is
never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import socket
import stat
from dataclasses import dataclass

from proxyd.config import EXIT_SOCKET_IN_USE, EXIT_USAGE, ConfigError

_libc = ctypes.CDLL(None, use_errno=True)
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # what the kernel allows in one path walk (MAXSYMLINKS)
RENAME_NOREPLACE = 1  # renameat2(2) flags, <linux/fs.h>
RENAME_EXCHANGE = 2
_SOCKET = "s"  # the socket's name inside the private directory


def others_may_write(st: os.stat_result) -> bool:
    """Whether a user other than root may add, remove or rename entries of the
    directory `st` describes (owner, group or other write permission)."""
    return st.st_uid != 0 or bool(st.st_mode & 0o002) or bool(st.st_mode & 0o020 and st.st_gid)


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def open_directory(path: str, create: bool = False, dir_fd: int | None = None) -> int:
    """A descriptor (O_RDONLY|O_DIRECTORY) of the directory `path`, relative to `dir_fd`
    (default: the working directory) unless absolute.

    The path is walked one component at a time with openat(O_NOFOLLOW): a symlink is
    followed (its target walked the same way) only when the directory holding it is
    writable by root alone, so no other user can redirect the walk. With `create`,
    missing components are made with mode 0755 (mkdirat).

    Raises OSError: ELOOP for a symlink in a directory others may write (or more than
    40 symlinks), ENOENT, ENOTDIR, EACCES as openat(2) and mkdirat(2) do.
    """
    start = "/" if path.startswith("/") else "."
    fd = os.open(start, _DIRECTORY, dir_fd=None if start == "/" else dir_fd)
    try:
        todo = _components(path)[::-1]  # a stack: a symlink's target is pushed on it
        links = 0
        while todo:
            name = todo.pop()
            try:
                child = os.open(name, _DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                child = os.open(name, _DIRECTORY, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                target = _trusted_symlink(fd, name)
                if target is None:
                    raise
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(
                        errno.ELOOP, f"more than {_MAX_SYMLINKS} symlinks in '{path}'"
                    ) from None
                todo += _components(target)[::-1]
                if target.startswith("/"):
                    child = os.open("/", _DIRECTORY)
                else:
                    continue
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _trusted_symlink(dir_fd: int, name: str) -> str | None:
    """The target of symlink `name` in `dir_fd`; None if it is not a symlink.

    Raises OSError(ELOOP) if a user other than root could have placed or swapped it.
    """
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        return None
    if others_may_write(os.fstat(dir_fd)):
        raise OSError(errno.ELOOP, f"'{name}' is a symlink in a directory other users can write")
    return os.readlink(name, dir_fd=dir_fd)


def split(path: str) -> tuple[str, str]:
    """(directory, last component) of a path naming a file; OSError(EINVAL) otherwise."""
    directory, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise OSError(errno.EINVAL, f"'{path}' does not name a file")
    return directory or ".", name


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """openat(2) of `path`'s last component (O_NOFOLLOW, O_CLOEXEC added) in its
    directory opened by open_directory; a symlink there is followed only when that
    directory is writable by root alone. Returns the descriptor; raises OSError as
    openat(2) does, ELOOP as open_directory does."""
    dir_fd: int | None = None
    try:
        for _ in range(_MAX_SYMLINKS):
            directory, name = split(path)
            parent = open_directory(directory, dir_fd=dir_fd)
            if dir_fd is not None:
                os.close(dir_fd)
            dir_fd = parent
            try:
                return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
            except OSError as e:
                if e.errno != errno.ELOOP or (target := _trusted_symlink(dir_fd, name)) is None:
                    raise
                path = target  # relative to dir_fd, or absolute
        raise OSError(errno.ELOOP, f"too many symlinks in '{path}'")
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _renameat2(old_dir: int, old: str, new_dir: int, new: str, flags: int) -> None:
    """renameat2(2): `old` in `old_dir` to `new` in `new_dir`; neither is followed."""
    if _libc.renameat2(old_dir, os.fsencode(old), new_dir, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), new)


def _has_listener(path: str) -> bool:
    """Whether a live socket is bound at `path` (the socket file of a process still
    running), without making a connection to it.

    The probe is a SOCK_DGRAM connect: the kernel finds the socket bound to the file's
    inode and, it being a stream socket, refuses with EPROTOTYPE (connect(2): "connect
    a UNIX domain datagram socket to a stream socket"); a file no live socket is bound
    to any more (left by a crashed helper) gets ECONNREFUSED. A datagram connect queues
    nothing at the other end, so a running proxyd sees no connection, logs nothing and
    counts nothing; a stream probe would be accepted there as a guest's connection
    (and, under --once, taken for its one connection).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as e:
        return e.errno == errno.EPROTOTYPE
    finally:
        probe.close()
    return True  # a live datagram socket: in use as well


def _claim(dir_fd: int, name: str, path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a stale socket at `name` in `dir_fd`, None if nothing is there.

    The entry is pinned by an O_PATH|O_NOFOLLOW descriptor: its type is read and the
    probe connects through that descriptor, never through a symlink. Raises
    ConfigError if it is a live socket or not a socket.
    """
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"socket path '{path}' exists and is not a socket", EXIT_USAGE)
        if _has_listener(f"/proc/self/fd/{fd}"):
            raise ConfigError(
                f"socket path '{path}' is in use by a live listener", EXIT_SOCKET_IN_USE
            )
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


def claim_path(path: str) -> bool:
    """Make sure binding `path` harms nobody. Returns True if a stale socket was there.

    Raises ConfigError if the path is a live socket or not a socket at all, or its
    directory cannot be opened safely (open_directory).
    """
    try:
        directory, name = split(path)
        dir_fd = open_directory(directory)
    except FileNotFoundError:
        return False  # bind creates the directory
    except OSError as e:
        raise ConfigError(f"cannot listen on '{path}': {e.strerror}", EXIT_USAGE) from None
    try:
        return _claim(dir_fd, name, path) is not None
    finally:
        os.close(dir_fd)


@dataclass
class Listener:
    sock: socket.socket
    path: str
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file we created
    directory: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the directory it was put in

    def still_bound(self) -> bool:
        """Whether `path` still names our socket (QEMU unlinks it after connecting)."""
        try:
            st = os.lstat(self.path)  # only looks: a wrong answer costs a re-bind
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def close(self, unlink: bool = True) -> None:
        """Stop listening; remove the path if it is still ours, never a successor's.

        The removal is an unlinkat on the directory's descriptor, after fstatat
        (AT_SYMLINK_NOFOLLOW) found our socket's inode under that name in the same
        directory we bound in; anything else there is left alone.
        """
        if unlink:
            with contextlib.suppress(OSError):  # gone already, or the directory is
                self._unlink()
        # A worker forked while this socket was open may still hold a copy: after
        # shutdown the kernel refuses connections to it (ECONNREFUSED) whoever holds it.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _unlink(self) -> None:
        directory, name = split(self.path)
        dir_fd = open_directory(directory)
        try:
            st = os.fstat(dir_fd)
            if (st.st_dev, st.st_ino) != self.directory:
                return
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


def bind(path: str, uid: int, gid: int, mode: int = 0o770, backlog: int = 16) -> Listener:
    """Listen on `path`, owned by uid:gid with `mode`, swapped in by one rename.

    Every step is safe against a user who may write the socket's directory (QEMU's uid
    does) and swaps its entries for symlinks at any moment:
      * the directory is opened by open_directory (created if missing, mode 0755);
      * a private directory (mode 0700, root's) is made there with mkdirat and opened
        with O_NOFOLLOW, and must then be a root-owned directory nobody else can enter;
      * the socket gets its mode before it has a file: fchmod on the socket, then
        bind(2) under umask 0 through /proc/self/fd/<private directory descriptor>;
      * its owner is set with fchownat(AT_SYMLINK_NOFOLLOW) inside the private
        directory, where nobody else can swap anything;
      * renameat2 puts it in place: RENAME_NOREPLACE onto a free name, or
        RENAME_EXCHANGE with the stale socket, which must then be the inode probed
        (otherwise it is exchanged back and the bind fails).
    No client ever sees the socket with other permissions. Raises ConfigError (exit
    code 2, 4 for a live listener) naming the path and the reason.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    dir_fd = private_fd = -1
    private = ""
    try:
        directory, name = split(path)
        dir_fd = open_directory(directory, create=True)  # /run/proxyd is gone after a reboot
        stale = _claim(dir_fd, name, path)
        private, private_fd = _make_private(dir_fd, path)
        os.fchmod(sock.fileno(), mode)  # bind gives the file this mode, less the umask
        umask = os.umask(0)
        try:
            sock.bind(f"/proc/self/fd/{private_fd}/{_SOCKET}")
        finally:
            os.umask(umask)
        os.chown(_SOCKET, uid, gid, dir_fd=private_fd, follow_symlinks=False)
        sock.listen(backlog)
        st = os.stat(_SOCKET, dir_fd=private_fd, follow_symlinks=False)
        _move_into_place(private_fd, dir_fd, name, stale, path)
        where = os.fstat(dir_fd)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on '{path}': {e.strerror}", EXIT_USAGE) from None
    except BaseException:
        sock.close()
        raise
    finally:
        if private_fd >= 0:
            _remove_private(dir_fd, private, private_fd)
        if dir_fd >= 0:
            os.close(dir_fd)
    return Listener(sock, path, (st.st_dev, st.st_ino), (where.st_dev, where.st_ino))


def _make_private(dir_fd: int, path: str) -> tuple[str, int]:
    """mkdirat a fresh root-only directory in `dir_fd`: (its name, a descriptor of it)."""
    while True:
        name = f".proxyd-{secrets.token_hex(6)}"
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue  # someone took the name first: draw another
    fd = os.open(name, _DIRECTORY, dir_fd=dir_fd)  # ENOTDIR if swapped for a symlink
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o077:
        os.close(fd)
        raise ConfigError(
            f"cannot listen on '{path}': its private directory was replaced", EXIT_USAGE
        )
    return name, fd


def _move_into_place(
    private_fd: int, dir_fd: int, name: str, stale: tuple[int, int] | None, path: str
) -> None:
    if stale is not None:
        try:
            _renameat2(private_fd, _SOCKET, dir_fd, name, RENAME_EXCHANGE)
        except FileNotFoundError:
            stale = None  # the stale socket went away meanwhile
        else:
            st = os.stat(_SOCKET, dir_fd=private_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == stale:
                return  # the stale socket is in the private directory, removed with it
            _renameat2(private_fd, _SOCKET, dir_fd, name, RENAME_EXCHANGE)  # put it back
            raise ConfigError(f"socket path '{path}' changed while it was replaced", EXIT_USAGE)
    _renameat2(private_fd, _SOCKET, dir_fd, name, RENAME_NOREPLACE)


def _remove_private(dir_fd: int, name: str, fd: int) -> None:
    """Empty and remove the private directory, if `name` still names it."""
    with contextlib.suppress(OSError):
        os.unlink(_SOCKET, dir_fd=fd)  # a stale socket, or ours after a failure
    st = os.fstat(fd)
    os.close(fd)
    with contextlib.suppress(OSError):
        here = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
            os.rmdir(name, dir_fd=dir_fd)


class DirectoryWatcher:
    """inotify on the directories of our socket paths, to re-bind the moment QEMU
    unlinks one (the master also checks on every tick, in case an event is missed)."""

    _IN_NONBLOCK = os.O_NONBLOCK
    _IN_CLOEXEC = os.O_CLOEXEC
    _EVENTS = 0x200 | 0x40 | 0x400 | 0x800  # IN_DELETE IN_MOVED_FROM IN_DELETE_SELF IN_MOVE_SELF

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(self._IN_NONBLOCK | self._IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self._watched: dict[str, int] = {}

    def watch(self, directory: str) -> None:
        if directory in self._watched:
            return
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), self._EVENTS)
        if wd >= 0:  # without a watch the master's periodic check still re-binds
            self._watched[directory] = wd

    def drain(self) -> None:
        """Consume pending events; the caller then checks every listener."""
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)
