"""The pool's sizing rules (proxyd/pool.py): spares, one start per waiting connection,
max_workers, trimming, start back-off, exhaustion and back-pressure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from proxyd import pool as pl
from proxyd.config import ExportConfig
from proxyd.pool import Connection, Pool, Worker
from proxyd.slot import Slot


@pytest.fixture
def make():
    made: list = []

    def pool(min_idle: int = 1, max_workers: int = 4) -> Pool:
        config = ExportConfig(
            name="e",
            path="/srv/e",
            socket="/run/e.sock",
            min_idle=min_idle,
            max_workers=max_workers,
        )
        return Pool(config=config, min_idle=min_idle)

    def worker(p: Pool, state: str, generation: int = 0, idle_since: float = 0.0) -> Worker:
        a, b = socket.socketpair()
        journal = Slot()
        made.extend([a, b, journal])
        w = Worker(len(p.workers) + 100, p, len(p.workers), generation, a, journal)
        w.state, w.idle_since = state, idle_since
        p.workers[w.pid] = w
        return w

    def conn(p: Pool) -> Connection:
        a, b = socket.socketpair()
        made.extend([a, b])
        c = Connection(len(p.pending) + 1, a, "e", 1, 0, 0)
        p.pending.append(c)
        return c

    yield pool, worker, conn
    for thing in made:
        thing.close()


def test_starts_spares_and_one_per_waiting_connection(make) -> None:
    pool, worker, conn = make
    p = pool(min_idle=2, max_workers=4)
    assert p.starts_wanted(now=0.0) == 2
    worker(p, pl.STARTING)
    assert p.starts_wanted(now=0.0) == 1
    conn(p)
    conn(p)
    assert p.starts_wanted(now=0.0) == 3  # 2 spares + 2 waiting - 1 starting ...
    worker(p, pl.BUSY)
    worker(p, pl.BUSY)
    assert p.starts_wanted(now=0.0) == 1  # ... within max_workers 4


def test_workers_of_an_older_generation_are_not_spares(make) -> None:
    pool, worker, _ = make
    p = pool(min_idle=1)
    old = worker(p, pl.IDLE, generation=0)
    assert p.spare() == 1 and p.idle_worker() is old
    p.generation = 1  # a reload changed what its workers are forked with
    assert p.spare() == 0 and p.idle_worker() is None
    assert p.starts_wanted(now=0.0) == 1


def test_exhausted_when_connections_wait_and_no_worker_may_start(make) -> None:
    pool, worker, conn = make
    p = pool(min_idle=0, max_workers=1)
    worker(p, pl.BUSY)
    assert not p.is_exhausted()
    conn(p)
    assert p.is_exhausted()
    assert p.starts_wanted(now=0.0) == 0


def test_excess_idle_workers_are_trimmed_after_idle_trim(make) -> None:
    pool, worker, _ = make
    p = pool(min_idle=1)
    first = worker(p, pl.IDLE, idle_since=10.0)
    worker(p, pl.IDLE, idle_since=20.0)
    worker(p, pl.IDLE, idle_since=30.0)
    assert p.excess_idle(now=10.0 + pl.IDLE_TRIM - 1) == []
    trimmed = p.excess_idle(now=20.0 + pl.IDLE_TRIM)
    assert len(trimmed) == 2 and trimmed[0] is first  # longest idle first; one spare stays
    assert len(p.excess_idle(now=0.0, at_once=True)) == 2


def test_start_back_off_doubles_to_its_cap(make) -> None:
    pool, _, _ = make
    p = pool()
    delays = [p.start_failed(now=0.0) for _ in range(10)]
    assert delays[:3] == [pl.BACKOFF_FIRST, 2 * pl.BACKOFF_FIRST, 4 * pl.BACKOFF_FIRST]
    assert delays[-1] == pl.BACKOFF_MAX and p.start_failures == 10
    assert p.starts_wanted(now=pl.BACKOFF_MAX - 0.01) == 0
    assert p.starts_wanted(now=pl.BACKOFF_MAX) == 1


def test_back_pressure_pauses_at_the_limit_and_resumes_at_half(make) -> None:
    pool, _, conn = make
    p = pool()
    for _ in range(pl.PENDING_LIMIT - 1):
        conn(p)
    assert not p.update_backlogged()
    conn(p)
    assert p.update_backlogged()
    while len(p.pending) >= pl.PENDING_LIMIT // 2:
        assert p.update_backlogged()
        p.pending.pop()
    assert not p.update_backlogged()


def test_an_adopted_worker_is_signalled_through_its_pidfd_not_its_pid() -> None:
    """Not our child, an adopted worker's pid may be another process's once it exits:
    the master signals it through the pidfd it watches it by; its own children by pid."""
    decoy, adopted = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    pidfd = os.pidfd_open(adopted.pid)
    try:
        # The pid recorded is the decoy's, as when the adopted worker's pid was reused.
        Worker(decoy.pid, None, 0, -1, None, None, pidfd=pidfd).signal(signal.SIGTERM)
        assert adopted.wait(10) == -signal.SIGTERM
        assert decoy.poll() is None
        # Gone (and reaped): its pidfd still names it, and nothing else; no error.
        Worker(decoy.pid, None, 0, -1, None, None, pidfd=pidfd).signal(signal.SIGTERM)
        assert decoy.poll() is None
        Worker(decoy.pid, None, 1, 0, None, None).signal(signal.SIGTERM)  # our child: by pid
        assert decoy.wait(10) == -signal.SIGTERM
    finally:
        os.close(pidfd)
        for child in (decoy, adopted):
            child.kill()
            child.wait()


def test_an_idle_worker_whose_channel_closed_is_no_spare(make) -> None:
    """A spare whose channel the master closed (it died or was killed, not yet reaped)
    takes no connection, is no spare, is not trimmed: a replacement is started."""
    pool, worker, conn = make
    p = pool(min_idle=1, max_workers=4)
    gone, ready = worker(p, pl.IDLE), worker(p, pl.IDLE)
    gone.channel = None
    conn(p)
    assert p.idle_worker() is ready
    assert p.spare() == 1
    assert p.excess_idle(now=1e9, at_once=True) == []
    assert p.starts_wanted(now=0.0) == 1  # one spare for min_idle and one waiting: ready
    ready.channel = None
    assert p.idle_worker() is None
    assert p.starts_wanted(now=0.0) == 2
