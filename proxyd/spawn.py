"""Forking a worker: the one place where the master becomes two processes."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterable

from proxyd import channel, privileges
from proxyd.config import Config
from proxyd.pool import Pool, Worker
from proxyd.slot import Slot
from proxyd.worker import run_worker


class SpawnError(Exception):
    """The system refused what a new worker needs: `step` (socketpair, memfd, fork)
    failed with `error` (EMFILE, ENFILE, ENOMEM, EAGAIN, ...)."""

    def __init__(self, step: str, error: OSError) -> None:
        super().__init__(f"{step}: {error}")
        self.step, self.error = step, error


def fork_worker(pool: Pool, config: Config, signals: Iterable[int]) -> Worker:
    """Fork a worker of `pool`, its channel and its journal made first; return it as the
    master sees it (starting). In the child, never returns (worker.run_worker). Raises
    SpawnError, with nothing left open."""
    if config.seccomp != "off":
        try:  # built once, here: a worker that built its own would keep 1.3 MB more
            privileges.syscall_filter(config.seccomp)
        except OSError as e:
            raise SpawnError("seccomp filter", e) from None
    try:
        master_end, worker_end = channel.pair()
    except OSError as e:
        raise SpawnError("socketpair", e) from None
    try:
        journal = Slot()
    except OSError as e:
        master_end.close()
        worker_end.close()
        raise SpawnError("memfd", e) from None
    index = pool.next_index
    pool.next_index += 1
    master_pid = os.getpid()
    signals = list(signals)
    # Block our signals across the fork: a signal reaching the child before it resets
    # its handlers must not be written into the master's wake-up pipe. Objects the
    # master has now are the child's too: frozen, the child's garbage collector never
    # walks (and so never copies) the pages they live on.
    gc.freeze()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        pid = os.fork()
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        master_end.close()
        worker_end.close()
        journal.close()
        raise SpawnError("fork", e) from None
    if pid == 0:
        signal.set_wakeup_fd(-1)
        for sig in signals:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        master_end.close()  # its channel's EOF must tell the worker the master is gone
        # Every other descriptor of the master's (listeners, other guests' connections,
        # other workers' channels) the worker closes itself before its sandbox
        # (privileges.keep_only_descriptors).
        run_worker(pool.config, config, index, worker_end, journal, master_pid)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    worker_end.close()
    master_end.setblocking(False)
    return Worker(pid, pool, index, pool.generation, master_end, journal)
