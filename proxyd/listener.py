"""Named listening sockets: claim the path safely, bind it atomically.

QEMU connects to the socket path and then unlinks it. A path that holds a socket
nobody listens on any more is stale (a crashed helper) and is replaced; a path with
a live listener or a file that is not a socket is never touched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass

from proxyd.config import EXIT_SOCKET_IN_USE, EXIT_USAGE, ConfigError


def _has_listener(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a listener whose backlog is full is still alive
    except OSError as e:
        return e.errno == errno.EAGAIN
    finally:
        probe.close()
    return True


def claim_path(path: str) -> bool:
    """Make sure binding `path` harms nobody. Returns True if a stale socket was there.

    Raises ConfigError if the path is a live socket or not a socket at all.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"socket path '{path}' exists and is not a socket", EXIT_USAGE)
    if _has_listener(path):
        raise ConfigError(f"socket path '{path}' is in use by a live listener", EXIT_SOCKET_IN_USE)
    return True


@dataclass
class Listener:
    sock: socket.socket
    path: str
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file we created

    def still_bound(self) -> bool:
        """Whether `path` still names our socket (QEMU unlinks it after connecting)."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def close(self, unlink: bool = True) -> None:
        """Stop listening; remove the path if it is still ours, never a successor's."""
        if unlink and self.still_bound():
            os.unlink(self.path)
        self.sock.close()


def bind(path: str, uid: int, gid: int, mode: int = 0o770, backlog: int = 16) -> Listener:
    """Listen on `path`, owned by uid:gid with `mode`, swapped in by one rename.

    The socket is bound in a private directory (mode 0700, root's) next to `path` and
    gets its owner and mode there, where nobody else can replace it by a symlink to
    some host file for us to chmod; then one rename puts it in place, so no client
    ever sees it with the wrong permissions and a stale socket is replaced atomically.
    """
    directory = os.path.dirname(path) or "."
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    private = None
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)  # /run/proxyd is gone after a reboot
        private = tempfile.mkdtemp(prefix=".proxyd-", dir=directory)
        temporary = os.path.join(private, "s")
        _bind_path(sock, private, temporary)
        os.chmod(temporary, mode)
        os.lchown(temporary, uid, gid)
        sock.listen(backlog)
        st = os.lstat(temporary)
        os.rename(temporary, path)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on '{path}': {e.strerror}", EXIT_USAGE) from None
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    return Listener(sock, path, (st.st_dev, st.st_ino))


def _bind_path(sock: socket.socket, directory: str, path: str) -> None:
    """bind(2), relative to `directory` when the full path would not fit sun_path."""
    if len(os.fsencode(path)) <= 107:
        sock.bind(path)
        return
    cwd = os.open(".", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.chdir(directory)
        sock.bind(os.path.basename(path))
    finally:
        os.fchdir(cwd)
        os.close(cwd)


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
