"""The host's mounts at and below each export, watched for changes.

A worker's view of its export is a bind mount made in its own mount namespace when it
started (privileges.py). On a host whose mounts are shared (systemd's default) the
host's later mounts and unmounts reach it by slave propagation, but without the
nodev, nosuid and noexec the worker adds; on a host whose mounts are private nothing
reaches it; and a remount (read-only, say) never propagates. So the master watches its
own /proc/self/mountinfo (the kernel flags it with POLLPRI at every change) and
replaces the workers of an export whose mounts changed: the new ones see exactly what
the host sees now.
"""

from __future__ import annotations

import os
import re
import select

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")  # proc(5): space, tab, newline, backslash as \ooo

# One mount as the watcher compares them: (mount ID, mount point, per-mount options,
# filesystem type, source, superblock options).
Mount = tuple[str, bytes, str, str, str, str]


def _unescape(field: bytes) -> bytes:
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def parse(text: bytes) -> list[Mount]:
    """The mounts of a mountinfo text (proc(5) "/proc/pid/mountinfo")."""
    mounts = []
    for line in text.splitlines():
        head, _, tail = line.partition(b" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 6 or len(rest) < 3:
            continue
        mount_id, point, options = fields[0].decode(), _unescape(fields[4]), fields[5].decode()
        fstype, source, super_options = (f.decode(errors="replace") for f in rest[:3])
        mounts.append((mount_id, point, options, fstype, source, super_options))
    return mounts


def below(mounts: list[Mount], path: str) -> frozenset[Mount]:
    """The mounts whose mount point is `path` or lies below it."""
    root = os.fsencode(path.rstrip("/"))
    return frozenset(m for m in mounts if m[1] == root or m[1].startswith(root + b"/"))


class MountWatcher:
    """/proc/self/mountinfo, opened once. `fd` becomes readable when the mount table
    changed (an epoll set waiting for its POLLPRI, which a selector cannot ask for)."""

    def __init__(self) -> None:
        self._file = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._file, select.EPOLLPRI)
        self.fd = self._epoll.fileno()

    def read(self) -> list[Mount]:
        """The mount table now; reading it also clears the change notice."""
        self._epoll.poll(0)
        chunks = []
        offset = 0
        while chunk := os.pread(self._file, 65536, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return parse(b"".join(chunks))

    def close(self) -> None:
        self._epoll.close()
        os.close(self._file)
