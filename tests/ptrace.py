"""Holding a process at an exact system call: ptrace(2) from the test process.

A test seizes a worker (or the master), runs it from system call to system call with
PTRACE_SYSCALL and holds it at the entry or the exit of the one it is about: the
kernel says where the process is, no sleep guesses it. Then it kills it there
(SIGKILL ends a ptrace-stopped process) or lets it go. These are ptrace *stops*, not
calls run inside the process (no gdb inferior calls). x86-64 system call numbers.

ptrace requests belong to the thread that seized: use a Tracer from one thread only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# x86-64 system call numbers (asm/unistd_64.h).
SYS_IOCTL = 16
SYS_SENDTO = 44
SYS_RECVFROM = 45
SYS_SENDMSG = 46
SYS_RECVMSG = 47
SYS_TRUNCATE = 76
SYS_MKDIR = 83
SYS_EPOLL_WAIT = 232
SYS_EPOLL_CTL = 233
SYS_OPENAT = 257
SYS_NEWFSTATAT = 262

# ptrace(2) requests, options and events (linux/ptrace.h).
PTRACE_SYSCALL = 24
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_O_TRACESYSGOOD = 1
PTRACE_EVENT_STOP = 128
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2
WALL = 0x40000000  # __WALL: wait for a tracee whatever its kind (wait(2))
SYSCALL_TRAP = signal.SIGTRAP | 0x80  # a syscall-stop's signal with PTRACE_O_TRACESYSGOOD

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


class _Entry(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6)]


class _Exit(ctypes.Structure):
    _fields_ = [("rval", ctypes.c_int64), ("is_error", ctypes.c_uint8)]


class _Seccomp(ctypes.Structure):
    _fields_ = [
        ("nr", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
        ("ret_data", ctypes.c_uint32),
    ]


class _Call(ctypes.Union):
    _fields_ = [("entry", _Entry), ("exit", _Exit), ("seccomp", _Seccomp)]


class SyscallInfo(ctypes.Structure):
    """struct ptrace_syscall_info (linux/ptrace.h), what PTRACE_GET_SYSCALL_INFO fills."""

    _anonymous_ = ("call",)
    _fields_ = [
        ("op", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("stack_pointer", ctypes.c_uint64),
        ("call", _Call),
    ]


@dataclass(frozen=True)
class Stop:
    """Where a tracee is held: at the entry of system call `nr` (not made yet) or at
    its exit (made; `rval` is its return value, -errno on failure). `args` are the
    call's six arguments, as at its entry."""

    nr: int
    entry: bool
    args: tuple[int, ...]
    rval: int | None = None


class TraceError(AssertionError):
    """The tracee did not get where the test wanted it (or could not be traced)."""


def _ptrace(request: int, pid: int, addr: int = 0, data: int | ctypes.Array | None = 0) -> int:
    ref = ctypes.byref(data) if isinstance(data, ctypes.Structure) else data
    result = _libc.ptrace(request, pid, addr, ref)
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}, {pid}): {os.strerror(err)}")
    return result


def ptrace_scope() -> int:
    """Yama's kernel.yama.ptrace_scope (0 without Yama): 3 forbids any attach."""
    path = Path("/proc/sys/kernel/yama/ptrace_scope")
    return int(path.read_text()) if path.exists() else 0


class Tracer:
    """PTRACE_SEIZE of process `pid` (its main thread), held at once (PTRACE_INTERRUPT).

    Raises TraceError (with Yama's ptrace_scope) when the kernel refuses the attach.
    `timeout`: seconds any one wait for the tracee may take before TraceError.
    The tracee's signals are passed on to it; a blocking call it is in when seized
    returns EINTR or is restarted, as for any signal (the serving loop retries).
    """

    def __init__(self, pid: int, timeout: float = 20.0) -> None:
        self.pid = pid
        self.timeout = timeout
        self.gone = False
        self._pending_signal = 0  # a signal for the tracee, given back as it goes on
        self._entry: tuple[int, tuple[int, ...]] | None = None  # the call being made
        try:
            _ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACESYSGOOD)
        except OSError as e:
            raise TraceError(
                f"cannot ptrace pid {pid} ({e}); kernel.yama.ptrace_scope = {ptrace_scope()} "
                "(these tests need root and a scope below 3)"
            ) from None
        _ptrace(PTRACE_INTERRUPT, pid)
        self._wait_stop()

    def _wait(self) -> int:
        """waitpid(2) for the tracee, polled so that a stuck tracee fails the test."""
        deadline = time.monotonic() + self.timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG | WALL)
            if pid:
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    self.gone = True
                return status
            if time.monotonic() > deadline:
                raise TraceError(f"pid {self.pid} did not stop within {self.timeout} s")
            time.sleep(0.001)

    def _wait_stop(self) -> Stop | None:
        """Wait for the next ptrace-stop: the syscall-stop it is (None for another kind
        of stop, such as the one PTRACE_INTERRUPT asked for)."""
        status = self._wait()
        if self.gone:
            raise TraceError(f"pid {self.pid} ended while traced (wait status {status:#x})")
        sig = os.WSTOPSIG(status)
        if sig != SYSCALL_TRAP:
            if status >> 16 == PTRACE_EVENT_STOP or sig == signal.SIGTRAP:
                self._pending_signal = 0
            else:  # a signal for the tracee: delivered when it goes on
                self._pending_signal = sig
            return None
        self._pending_signal = 0
        info = SyscallInfo()
        _ptrace(PTRACE_GET_SYSCALL_INFO, self.pid, ctypes.sizeof(info), info)
        if info.op == PTRACE_SYSCALL_INFO_ENTRY:
            self._entry = (info.entry.nr, tuple(info.entry.args))
            return Stop(info.entry.nr, True, self._entry[1])
        if info.op == PTRACE_SYSCALL_INFO_EXIT:
            nr, args = self._entry if self._entry is not None else (-1, ())
            self._entry = None
            return Stop(nr, False, args, info.exit.rval)
        return None

    def step(self) -> Stop:
        """Let the tracee go on to its next syscall-stop (entry or exit) and hold it."""
        while True:
            _ptrace(PTRACE_SYSCALL, self.pid, 0, self._pending_signal)
            stop = self._wait_stop()
            if stop is not None:
                return stop

    def until(
        self,
        nr: int,
        *,
        entry: bool,
        where: Callable[[Stop], bool] = lambda stop: True,
        not_past: Iterable[int] = (),
    ) -> Stop:
        """Run the tracee to the entry (`entry=True`) or the exit of system call `nr`
        for which `where(stop)` holds, and hold it there. Raises TraceError if it
        enters one of the calls `not_past` on the way (it went past the point wanted),
        or is not there within `timeout` seconds."""
        forbidden = set(not_past)
        deadline = time.monotonic() + self.timeout
        while True:
            stop = self.step()
            if stop.entry and stop.nr in forbidden:
                raise TraceError(f"pid {self.pid} went past the point wanted: {stop}")
            if stop.nr == nr and stop.entry == entry and where(stop):
                return stop
            if time.monotonic() > deadline:
                raise TraceError(f"pid {self.pid} not at system call {nr} within {self.timeout} s")

    def seccomp_filter(self, index: int = 0) -> bytes:
        """The held tracee's seccomp filter number `index` (0: the last one loaded) as
        its BPF program, struct sock_filter[] (PTRACE_SECCOMP_GET_FILTER, ptrace(2))."""
        count = _ptrace(PTRACE_SECCOMP_GET_FILTER, self.pid, index, None)
        program = (ctypes.c_char * (count * 8))()
        _ptrace(PTRACE_SECCOMP_GET_FILTER, self.pid, index, program)
        return program.raw

    def kill(self) -> None:
        """SIGKILL the held tracee and reap it as its tracer: only then does its
        parent (the master) hear of its death."""
        os.kill(self.pid, signal.SIGKILL)
        while not self.gone:
            self._wait()

    def detach(self, sig: int = 0) -> None:
        """Let the held tracee go (with signal `sig` pending, e.g. SIGSTOP)."""
        _ptrace(PTRACE_DETACH, self.pid, 0, sig or self._pending_signal)
        self.gone = True

    def release(self) -> None:
        """Whatever state the test left it in: let a tracee still held go."""
        if self.gone:
            return
        with contextlib.suppress(OSError, TraceError):
            try:
                self.detach()
            except OSError:  # running (a step that timed out): stop it first
                _ptrace(PTRACE_INTERRUPT, self.pid)
                self._wait_stop()
                self.detach()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
