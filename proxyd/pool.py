"""One export's pool: its workers, the connections waiting for one, and the rules that
size it. Plain data and decisions; the master does the forking, handing and killing.

A pool keeps `min_idle` spare workers (sandboxed, waiting for a connection), starts one
more for every connection that waits, never runs more than `max_workers`, and retires
spare workers beyond `min_idle` once they have been idle IDLE_TRIM seconds (a worker that
just finished a connection serves the next one instead of being replaced by a fork).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from proxyd import listener, mounts
from proxyd.config import ExportConfig
from proxyd.slot import Slot

IDLE_TRIM = 30.0  # seconds an excess spare worker stays before it is retired
PENDING_LIMIT = 64  # connections waiting in the master before the backlog takes over
BACKOFF_FIRST = 0.1  # seconds before the second start after a failed one, doubling ...
BACKOFF_MAX = 10.0  # ... up to this

# Worker states.
STARTING = "starting"  # forked, sandboxing itself; not ready yet
IDLE = "idle"  # ready, no connection
BUSY = "busy"  # serving a connection
RETIRING = "retiring"  # asked to leave (idle: channel closed; busy: at its next boundary)


@dataclass(eq=False)
class Connection:
    """A guest's connection, as the master keeps it (its own copy of the socket)."""

    id: int
    sock: socket.socket
    export: str
    peer_pid: int
    peer_uid: int
    peer_gid: int
    accepted: float = field(default_factory=time.time)
    requests: int = 0
    errors: int = 0
    # Worker deaths while `poison_suspect` (recovery.Verdict.executed) was executing or
    # replying, as monotonic times.
    deaths: list[float] = field(default_factory=list)
    poison_suspect: tuple[int, str] | None = None
    prefix: bytes = b""  # start of a request consumed by a worker that then died


@dataclass(eq=False)
class Worker:
    """A forked worker of one pool, seen from the master."""

    pid: int
    pool: Pool
    index: int
    generation: int
    # The master's end of the worker's channel; None once closed (the worker is told to
    # leave, or is gone) and for a worker adopted from a dead master (it has none).
    channel: socket.socket | None
    journal: Slot
    started: float = field(default_factory=time.time)
    state: str = STARTING
    conn: Connection | None = None
    connections: int = 0  # served so far
    requests: int = 0  # by connections it finished
    # The watchdog: the journal's progress mark while the worker owes its guest
    # something, since when (monotonic); and what it was killed for, when.
    watch_mark: tuple[int, int, int] | None = None
    watch_since: float = 0.0
    killed_for: str | None = None  # recovery.HUNG or recovery.UNRESPONSIVE
    killed_at: float = 0.0
    # A worker adopted from a master that died is not our child: its pidfd tells when
    # it exits (proxyd/adopt.py).
    pidfd: int | None = None
    idle_since: float = 0.0  # monotonic time it last became idle

    @property
    def name(self) -> str:
        return f"{self.pool.config.name}#{self.index}"

    @property
    def available(self) -> bool:
        """Idle, its channel open: a connection can be handed to it. An idle worker
        whose channel closed (at its EOF: it died or is leaving; or killed for a bad
        message) is on its way out until SIGCHLD reaps it: neither handed a connection
        nor counted as a spare."""
        return self.state == IDLE and self.channel is not None

    def signal(self, sig: int) -> None:
        """Send `sig` to the worker, if it still runs. An adopted worker goes by its
        pidfd: not our child, its pid may be another process's as soon as it exits
        (ours stay zombies until we reap them)."""
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)


@dataclass(eq=False)
class Pool:
    """The workers and waiting connections of one export."""

    config: ExportConfig
    min_idle: int
    listener: listener.Listener | None = None
    workers: dict[int, Worker] = field(default_factory=dict)
    pending: collections.deque[Connection] = field(default_factory=collections.deque)
    next_index: int = 0
    start_failures: int = 0  # consecutive starts that never got ready
    next_start: float = 0.0  # monotonic time before which no worker is started
    exhausted: bool = False  # "pool exhausted" was logged and still holds
    backlogged: bool = False  # PENDING_LIMIT connections wait: leave more in the backlog
    accepting: bool = False  # its listener is in the master's selector
    removed: bool = False  # dropped from the configuration by a reload
    # Bumped when a reload changes what this export's workers were forked with: workers
    # of an older generation are replaced at request boundaries.
    generation: int = 0
    # Why the export cannot be served (its workers kept failing to start), or None.
    # While set, its connections are refused and one start is tried per back-off.
    unavailable: str | None = None
    unavailable_since: float = 0.0  # wall-clock time
    # The host's mounts at and below the export when its workers were forked.
    host_mounts: frozenset[mounts.Mount] = frozenset()

    @property
    def name(self) -> str:
        return self.config.name

    def live(self) -> int:
        return len(self.workers)

    def idle_worker(self) -> Worker | None:
        """An available idle worker of the current generation, if there is one."""
        for w in self.workers.values():
            if w.available and w.generation == self.generation:
                return w
        return None

    def spare(self) -> int:
        """Workers of the current generation that are, or will soon be, free."""
        return sum(
            1
            for w in self.workers.values()
            if (w.state == STARTING or w.available) and w.generation == self.generation
        )

    def starts_wanted(self, now: float) -> int:
        """How many workers to start now: enough for min_idle spares plus one per
        waiting connection, within max_workers and the start back-off."""
        if now < self.next_start:
            return 0
        room = self.config.max_workers - self.live()
        if self.unavailable is not None:  # one probe at a time, until one gets ready
            probing = any(w.state == STARTING for w in self.workers.values())
            return 0 if probing else min(1, room)
        wanted = self.min_idle + len(self.pending) - self.spare()
        return max(0, min(wanted, room))

    def is_exhausted(self) -> bool:
        """Connections wait that no starting or idle worker will take, and no more
        workers may start."""
        return len(self.pending) > self.spare() and self.live() >= self.config.max_workers

    def excess_idle(self, now: float, at_once: bool = False) -> list[Worker]:
        """Idle workers beyond what the pool wants, longest idle first, that have been
        idle IDLE_TRIM seconds (or all of them, `at_once`)."""
        excess = self.spare() - self.min_idle - len(self.pending)
        idle = sorted((w for w in self.workers.values() if w.available), key=lambda w: w.idle_since)
        return [w for w in idle[: max(excess, 0)] if at_once or now - w.idle_since >= IDLE_TRIM]

    def is_newly_exhausted(self) -> bool:
        """Whether the pool just became exhausted (for one warning per episode); an
        episode ends when no connection waits any more."""
        if self.is_exhausted():
            newly, self.exhausted = not self.exhausted, True
            return newly
        if not self.pending:
            self.exhausted = False
        return False

    def adopted_to_release(self) -> list[Worker]:
        """Adopted workers (proxyd/adopt.py) to ask to leave now: one per idle worker
        of ours not already promised to another one leaving."""
        adopted = [w for w in self.workers.values() if w.pidfd is not None and w.conn]
        idle = sum(1 for w in self.workers.values() if w.available)
        free = idle - sum(1 for w in adopted if w.state == RETIRING)
        return [w for w in adopted if w.state == BUSY][: max(free, 0)]

    def start_failed(self, now: float) -> float:
        """Count a start that never got ready; returns the back-off (seconds) before
        the next one: BACKOFF_FIRST doubling up to BACKOFF_MAX."""
        self.start_failures += 1
        delay = min(BACKOFF_FIRST * 2 ** (self.start_failures - 1), BACKOFF_MAX)
        self.next_start = now + delay
        return delay

    def mounts_changed(self, table: list[mounts.Mount]) -> tuple[list[str], list[str]] | None:
        """The mount points (mounted, unmounted) at or below the export that differ in
        the host's mount `table` from those its workers were forked with, or None when
        nothing there changed (a remount changes a mount, both lists empty). Takes the
        new table as the pool's."""
        now = mounts.below(table, os.path.realpath(self.config.path))
        if now == self.host_mounts:
            return None
        before, after = {m[1] for m in self.host_mounts}, {m[1] for m in now}
        self.host_mounts = now
        return sorted(map(os.fsdecode, after - before)), sorted(map(os.fsdecode, before - after))

    def update_backlogged(self) -> bool:
        """Whether to leave new connections in the listen backlog: from PENDING_LIMIT
        waiting connections until fewer than half of that wait."""
        if len(self.pending) >= PENDING_LIMIT:
            self.backlogged = True
        elif len(self.pending) < PENDING_LIMIT // 2:
            self.backlogged = False
        return self.backlogged


def export_problem(export: ExportConfig) -> str | None:
    """Why the export's directory cannot be served now (missing, not a directory, or
    replaced by another one since the configuration was read), or None. Looks at the
    directory itself (stat), never into it: the worker's sandbox checks it again
    through a descriptor."""
    try:
        st = os.stat(export.path)
    except OSError as e:
        return f"directory: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory any more"
    if export.identity != (0, 0) and (st.st_dev, st.st_ino) != export.identity:
        return "replaced by another directory (device and inode changed)"
    return None


def unavailable_reason(how: dict[str, Any]) -> str:
    """Why an export whose workers keep failing to start cannot be served, from the
    last failure: the master's look at the directory (`reason`), or how the worker
    ended (`signal`, `exit_code`)."""
    if "reason" in how:
        return str(how["reason"])
    if "signal" in how:
        return f"its workers die at start ({how['signal']})"
    return f"its workers cannot enter the sandbox (exit code {how.get('exit_code')})"
