"""Where one process's log lines go, without the process ever waiting for the reader.

A reader that stops (supervisord stopped or busy, a full disk, a syslog daemon behind)
must cost the guests nothing. So a line is written once, without blocking; what the
destination does not take now is held (up to BACKLOG_BYTES) and tried again before the
next line and on the process's idle ticks; beyond that, lines are dropped and counted.
When everything held has gone out, the next line is a `log lines dropped` warning
saying how many lines were lost and since when. With `on_log_blocked = "wait"` the
process waits for a slow or full destination instead, and nothing is lost while it
can still accept.

How each destination is written without waiting:

* a pipe, FIFO or terminal: through a description of our own, opened again through
  /proc/self/fd/N with O_NONBLOCK. O_NONBLOCK belongs to the open file description,
  which the inherited stderr shares with the shell or supervisord: it is never set
  on that one. A line of at most PIPE_BUF bytes goes into a pipe whole or not at all
  (pipe(7)), so the lines of the master and its workers never interleave.
* a socket (systemd's journal stream, syslog's /dev/log): send(MSG_DONTWAIT).
* a regular file never blocks on a reader, but fails with ENOSPC, EDQUOT or EIO. A
  short write (the disk filled in the middle of a line) leaves part of the line in the
  file; the rest goes out first when space is back, unless another process appended
  after it meanwhile, in which case both lines are lost and counted.

Workers inherit the master's sink with the fork and start with nothing held and
nothing counted (os.register_at_fork); each publishes its counts in its journal
(proxyd/slot.py) for the master's status.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxyd.slot import Relay

BACKLOG_BYTES = 256 * 1024  # lines held per process while the destination does not take them
RETRY_MS = 250  # how often a full disk is tried again (by an idle worker, or with "wait")
_U32_MAX = 0xFFFFFFFF
# What a destination that may accept again fails with: "wait" waits for these. Anything
# else (EPIPE: the reader is gone, EBADF) is dropped and counted in both modes.
_TRANSIENT = {errno.EAGAIN, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOBUFS, errno.ENOMEM}
_SYSLOG_GONE = {errno.ECONNREFUSED, errno.ENOTCONN}  # the syslog daemon was restarted
_READER_GONE = {errno.EPIPE, errno.ECONNRESET}  # a pipe or stream whose reader closed it


class Sink:
    """One process's log destination: `write` never blocks (unless `wait`).

    `fd` is the descriptor written to; `sock` the same descriptor as a socket (sent
    to with MSG_DONTWAIT); `regular` a regular file; `owned` whether the descriptor
    is ours to close (not the inherited stderr); `address` the syslog socket's path,
    connected again after the daemon restarted (master only: workers cannot reach it
    from their chroot).
    """

    def __init__(
        self,
        fd: int,
        *,
        sock: socket.socket | None = None,
        regular: bool = False,
        owned: bool = False,
        address: str | None = None,
    ) -> None:
        self.fd = fd
        self.sock = sock
        self.regular = regular
        self.owned = owned
        self.address = address
        self.syslog = address is not None  # lines are framed as syslog messages
        self.wait = False
        # A worker's journal relay (slot.Relay): where its lines go once the destination
        # is gone for good (the supervisor closed the pipe when the master died).
        self.relay: Relay | None = None
        self._gone = False
        # Renders the warning that `lines` were dropped since `since` (time.time()),
        # the last failure being the errno `error`; None when the level filters it out.
        self.report: Callable[[int, float, int], bytes | None] = lambda *_: None
        self._counts: tuple[memoryview, int, int] | None = None
        self._forget()

    def _forget(self) -> None:
        self._held: collections.deque[bytes] = collections.deque()
        self._held_bytes = 0
        self._fragment_end = -1  # regular file: where our short write ended (held[0] is the rest)
        self.dropped = 0  # lines dropped in this process's life
        self._unreported = 0  # dropped since the last warning
        self._since = 0.0  # when the first of those was dropped
        self._error = 0  # errno of the last failure

    # --- the hot path ---

    def write(self, line: bytes) -> None:
        """Hand over one line (its newline included; at most PIPE_BUF bytes).

        Written at once when nothing is held, else after what is held; kept when the
        destination does not take it, dropped and counted when BACKLOG_BYTES are held.
        Never raises, never blocks (with `wait`: blocks while the destination is full).
        """
        if (self._held or self._unreported) and not self.flush():
            self._hold(line)
        else:
            rest = self._send(line)
            if not rest:
                return
            self._held.append(rest)
            self._held_bytes += len(rest)
            self._publish()
        while self.wait and self._error in _TRANSIENT and not self.flush():
            self._pause()

    def flush(self) -> bool:
        """Try the held lines, then the `log lines dropped` warning, without waiting.
        True when nothing is left; cheap when nothing was held."""
        while self._held or self._unreported:
            if not self._held:
                warning = self.report(self._unreported, self._since, self._error)
                self._unreported = 0
                if warning is None:
                    break
                self._held.append(warning)
                self._held_bytes += len(warning)
            head = self._held[0]
            if self._fragment_end >= 0 and self._appended_after_fragment():
                # Another process's line went after our cut one: both are garbage.
                self._fragment_end = -1
                self._pop()
                self._drop(2)
                continue
            rest = self._send(head)
            if rest:
                self._held[0] = rest
                self._held_bytes -= len(head) - len(rest)
                self._publish()
                return False
            self._pop()
        self._publish()
        return True

    def flush_until_readable(self, fd: int) -> None:
        """Idle: until `fd` is readable, try the held lines again whenever the
        destination may take them (POLLOUT after EAGAIN), or every RETRY_MS (a full
        disk). Returns at once when nothing is held. poll(2): the sandbox allows it."""
        while not self.flush():
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if self._error == errno.EAGAIN:
                poller.register(self.fd, select.POLLOUT)
            if any(ready == fd for ready, _ in poller.poll(RETRY_MS)):
                return

    # --- the rest ---

    def pending(self) -> int:
        """Lines held, waiting for the destination."""
        return len(self._held)

    def count_in(self, fields: memoryview, dropped: int, pending: int) -> None:
        """Publish `dropped` and `pending` at these indexes of `fields` (a worker's
        journal, read by the master) whenever they change."""
        self._counts = (fields, dropped, pending)
        self._publish()

    def forked(self) -> None:
        """In a new child: the parent's held lines and counts are the parent's."""
        self._counts = None
        self.address = None
        self._forget()

    def adopt(self, old: Sink) -> None:
        """Take over what `old` holds and has counted (a reopened log file)."""
        if old._fragment_end >= 0:  # the rest of a cut line belongs to the old file
            old._pop()
            old._drop(1)
        self._held, self._held_bytes = old._held, old._held_bytes
        self.dropped, self._unreported = old.dropped, old._unreported
        self._since, self._error = old._since, old._error
        self.wait, self.report, self._counts = old.wait, old.report, old._counts
        old._counts = None
        old._forget()
        self._publish()

    def replaced(self) -> None:
        """The file under `fd` was replaced (dup2 of a reopened log file)."""
        if self._fragment_end >= 0:
            self._fragment_end = -1
            self._pop()
            self._drop(1)

    def close(self, timeout: float) -> None:
        """Try to write what is held for up to `timeout` seconds (at exit), then close
        the descriptor if it is ours."""
        deadline = time.monotonic() + timeout
        while not self.flush() and time.monotonic() < deadline:
            self._pause()
        if self.sock is not None:
            self.sock.close()
        elif self.owned:
            os.close(self.fd)

    def _send(self, data: bytes) -> bytes:
        """Write `data` once, never waiting; what is left of it (b"" when all went out)."""
        if self._gone:
            assert self.relay is not None
            if self.relay.put(data):
                return b""
            self._error = errno.ENOBUFS  # the relay is full until the master takes lines
            return data
        try:
            if self.sock is not None:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            else:
                sent = os.write(self.fd, data)
        except OSError as e:
            self._error = e.errno or errno.EIO
            if self.address is not None and e.errno in _SYSLOG_GONE:
                self._reconnect()
            elif e.errno in _READER_GONE and self.relay is not None and not self.syslog:
                self._gone = True  # for good: the next master takes our lines from the relay
                return self._send(data)
            return data
        if sent == len(data):
            self._fragment_end = -1
            return b""
        if self.regular:  # the disk filled mid-line: nobody can append until it has room
            self._fragment_end = self._size()
            self._error = errno.ENOSPC
        else:
            self._error = errno.EAGAIN
        return data[sent:]

    def _hold(self, line: bytes) -> None:
        if self._held_bytes + len(line) > BACKLOG_BYTES:
            self._drop(1)
        else:
            self._held.append(line)
            self._held_bytes += len(line)
        self._publish()

    def _pop(self) -> None:
        self._held_bytes -= len(self._held.popleft())

    def _drop(self, lines: int) -> None:
        if not self._unreported:
            self._since = time.time()
        self._unreported += lines
        self.dropped += lines

    def _publish(self) -> None:
        if self._counts is not None:
            fields, dropped, pending = self._counts
            fields[dropped] = min(self.dropped, _U32_MAX)
            fields[pending] = min(len(self._held), _U32_MAX)

    def _size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError:
            return -1

    def _appended_after_fragment(self) -> bool:
        return self._size() != self._fragment_end

    def _pause(self) -> None:
        """Wait for the destination: until it is writable (EAGAIN), or RETRY_MS (a full
        disk cannot be waited for). poll(2): a worker's system call filter allows it."""
        poller = select.poll()
        if self._error == errno.EAGAIN:
            poller.register(self.fd, select.POLLOUT)
        poller.poll(RETRY_MS)

    def _reconnect(self) -> None:
        assert self.sock is not None and self.address is not None
        with contextlib.suppress(OSError):  # still gone: counted like any failure
            self.sock.connect(self.address)


def for_descriptor(fd: int) -> Sink:
    """A sink for an inherited descriptor (stderr). A pipe, FIFO or terminal gets a
    description of its own, non-blocking; a socket is sent to with MSG_DONTWAIT; a
    regular file is written as is (and a closed one fails, counted)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return Sink(fd)
    if stat.S_ISREG(mode):
        return Sink(fd, regular=True)
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(fd))  # a copy: closing the sink keeps stderr
        return Sink(sock.fileno(), sock=sock, owned=True)
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        own = os.open(f"/proc/self/fd/{fd}", flags)
    except OSError:
        # ENXIO: a FIFO with no reader now. Written as is: that fails at once (EPIPE),
        # but would block should a reader come back and stop reading.
        return Sink(fd)
    return Sink(own, owned=True)


def for_file(fd: int) -> Sink:
    """A sink for a log file proxyd opened (a regular file, O_APPEND)."""
    return Sink(fd, regular=True, owned=True)


SYSLOG_PATH = "/dev/log"


def for_syslog(path: str = SYSLOG_PATH) -> Sink:
    """A sink connected to the syslog daemon's datagram socket at `path` (before the
    workers' chroot hides it). Raises OSError (ENOENT: no syslog daemon, ECONNREFUSED:
    nobody listens, EPROTOTYPE: not a datagram socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return Sink(sock.fileno(), sock=sock, owned=True, address=path)
