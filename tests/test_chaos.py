"""Chaos: SIGKILL busy workers while eight clients hammer one export; nothing may be lost.

Eight client processes talk to a real daemon the way QEMU does and do mixed requests
whose results they verify (CREATE + write through the fd, OPEN + read back, LSTAT,
LSETXATTR/LGETXATTR, RENAME over a final name, MKDIR/REMOVE, READLINK), each in its own
directory. Meanwhile a killer thread SIGKILLs a random busy worker every 100-200 ms,
aiming in turn at a request executing, at a reply being sent, and at no place in
particular: the worker is stopped (SIGSTOP) and killed only once /proc/PID/syscall shows
it stopped right after one of the request's own system calls, or right after the send
of its reply (aim_at). A client may see, per kill, nothing (the connection moved to a
fresh worker), -EIO on the request in flight (it then re-checks what happened and goes
on), or a closed connection (it reconnects). Anything else fails the test, and so does
a hang. The clients run CHAOS_SECONDS, and on, EXTEND seconds at a time up to
CHAOS_LIMIT, until the killer has reached each aim often enough (a loaded machine kills
less often).

Afterwards, from the master's log: at least MIN_EXECUTING deaths judged while a request
executed (executed again or EIO) and MIN_REPLYING while a reply was sent; every aimed
kill judged as its aim says; no poison close, and no closed connection but the one
README allows (killed sending a reply, then a guest quiet for 200 ms), at most 1 % of
the deaths; the host tree holds exactly what every client last wrote; the master holds
no more descriptors than before. Restart latencies are printed and written, with the
rest of the numbers, to var/chaos-summary.json (scripts/test prints a line of it).

Design choices:
* Clients are processes, not threads: with threads the eight clients and the killer
  would share one GIL (one core's worth of Python out of two), which serialises the
  clients' think time and distorts the client-side latencies; separate processes
  behave like separate VMs, and each has its own pid, so the master's "connection
  accepted" events (peer_pid) tell which connection belongs to which client.
* Poison is the same request executing or replying at three deaths (docs/events.md):
  deaths during different requests never count, so the killer may kill on any
  connection as often as it likes. Clients still reconnect every 0.5-1.5 s (a VM
  restart), so that kills also meet connections being opened and closed.
* Every wait is bounded, and a watchdog SIGKILLs the clients and the daemon at
  HARD_DEADLINE, so that nothing can hang CI.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import queue
import random
import re
import shutil
import signal
import socket
import stat
import threading
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import SYS_RECVFROM, SYS_RECVMSG, Daemon, children, title, wait_until
from tests.proxyclient import (
    CHECKOUT,
    ConnectionClosed,
    ProxyClient,
    Reply,
    decode_stat,
    errno_of,
    unpack_s,
)
from tests.test_guest_soak import REQUEST_CALLS

EXPORT = "chaos"
CLIENTS = 8
MIN_IDLE, MAX_WORKERS = 2, 12
REQUEST_TIMEOUT = 5.0
CHAOS_SECONDS = 60.0  # how long the clients run while the killer kills (~340 kills: enough
# for the 99 % below to be a stable verdict, not a coin toss around 3 closes)
MIN_REQUESTS = 2000  # per client: a few thousand verified requests at least
SLOTS = 4  # final files per client, renamed over again and again
KILL_EVERY = (0.1, 0.2)  # seconds between two kills (plus the time an aim takes)
AIM_PATIENCE = 1.0  # seconds the killer tries for its aim before it kills all the same
ROTATE_EVERY = (0.5, 1.5)  # seconds a client keeps one connection
MAX_TRIES = 10  # uncertain answers in a row for one step before giving up
MIN_KILLS = 100  # fewer kills would make the 99% below meaningless
# Kills that must hit a request executing and a reply being sent: a third of the kills
# aims at each (measured on a loaded 2-core machine: 110-140 of each in 60 s).
MIN_EXECUTING = 50
MIN_REPLYING = 50
RECOVERED_SHARE = 0.99
# Beyond CHAOS_SECONDS the clients go on, EXTEND seconds at a time, while the killer has
# not yet reached its aims MIN_EXECUTING and MIN_REPLYING times (a heavily loaded machine
# kills less often: 214 kills at load average 11), CHAOS_LIMIT seconds at most.
EXTEND, CHAOS_LIMIT = 5.0, 120.0
HARD_DEADLINE = 150.0  # seconds for the whole test, whatever happens
XATTR = "user.chaos"
LINK_TARGET = "some/where/else"
SUMMARY = CHECKOUT / "var" / "chaos-summary.json"
COVERAGE = CHECKOUT / "var" / "coverage"  # what each long test reached: scripts/test shows it
DAEMON_LOG = CHECKOUT / "var" / "chaos-daemon.log"  # kept: pytest's tmp dirs rotate away

TRANSPARENT = (
    "nothing was in flight",
    "partly received request handed on",
    "received request handed on",
    "reply had been sent",
)
UNCERTAIN_CLOSE = "connection closed after a crash: reply state unknown"
REPLY_UNKNOWN = "died sending a reply; the guest sent nothing since"  # its one allowed detail
POISON_CLOSE = "poison connection closed"
# The master's verdicts (README, "When a worker dies") on a death while a request executes
# and while its reply is sent, as fates_of_kills() names them.
EXECUTING_FATES = {"request executed again", "answered EIO"}
REPLYING_FATES = {"reply had been sent", f"closed: {REPLY_UNKNOWN}"}


def write_coverage(name: str, line: str, **figures: Any) -> None:
    """Record what a long test reached, as one short phrase (`line`) and its figures, in
    var/coverage/NAME.json; scripts/test prints the phrases after the suite."""
    COVERAGE.mkdir(parents=True, exist_ok=True)
    (COVERAGE / f"{name}.json").write_text(json.dumps({"line": line, **figures}) + "\n")


# --- what a client writes: reproducible from (client, round), so the host check can
# --- recompute it without shipping file contents back ----------------------------------


def payload(client: int, rnd: int) -> bytes:
    rng = random.Random(f"{client}:{rnd}")
    return rng.randbytes(rng.randint(1, 8192))


def tag(client: int, rnd: int) -> bytes:
    return f"client {client} round {rnd}".encode()


# --- the client ------------------------------------------------------------------------


class Uncertain(Exception):
    """The request may or may not have run: -EIO from the master, or a lost connection."""


class ChaosClient:
    """One VM: its own directory, verified rounds, reconnects when it must (or, every
    second or so, because it rebooted)."""

    def __init__(self, index: int, daemon: Daemon, connect_lock: Any, seed: int) -> None:
        self.index = index
        self.daemon = daemon
        self.connect_lock = connect_lock
        self.rng = random.Random(seed * 1000 + index)
        self.dir = f"/c{index}"
        self.link = f"{self.dir}/link"
        self.conn: ProxyClient | None = None
        self.counts: Counter[str] = Counter()
        self.timelines: list[list[tuple[float, float, str]]] = []  # per connection
        self.finals: dict[int, int] = {}  # slot -> round whose content it holds
        self.closed_during: list[str] = []  # the request a closed connection cut short
        self.rotate_at = 0.0

    def connect(self) -> None:
        if self.conn is not None:
            self.conn.close()
        # Daemon.connect unlinks the socket path, as QEMU does; one client at a time,
        # so that nobody finds the path gone between its check and its connect.
        if not self.connect_lock.acquire(timeout=15):
            raise AssertionError(f"client {self.index}: connect lock not free in 15 s")
        try:
            self.conn = self.daemon.connect(EXPORT)
        finally:
            self.connect_lock.release()
        self.timelines.append([])
        self.rotate_at = time.time() + self.rng.uniform(*ROTATE_EVERY)

    def request(self, op: str, *args: Any) -> Reply:
        """One request; Uncertain on -EIO or a closed connection (then reconnected)."""
        assert self.conn is not None
        start = time.time()
        self.counts["requests"] += 1
        try:
            reply = getattr(self.conn, op)(*args)
        except (ConnectionClosed, BrokenPipeError, ConnectionResetError) as e:
            self._note(start, "closed")
            self.counts["closes"] += 1
            self.closed_during.append(op)  # the op after the lost one: its reply had come
            self.connect()
            raise Uncertain(f"{op}: connection closed ({e!r})") from e
        except TimeoutError:
            raise AssertionError(
                f"client {self.index}: {op}{args!r} hung: no reply within the socket timeout"
            ) from None
        if not reply.ok and errno_of(reply) == errno.EIO:
            self._note(start, "eio")
            self.counts["eio"] += 1
            raise Uncertain(f"{op}: EIO")
        self._note(start, "ok")
        return reply

    def _note(self, start: float, outcome: str) -> None:
        self.timelines[-1].append((start, time.time(), outcome))

    def ensure(self, op: str, *args: Any, done_if: tuple[int, ...] = ()) -> Reply:
        """Send until the answer is definite. After an uncertain try, an errno in
        `done_if` means that the lost try did the work (EEXIST after MKDIR, ...)."""
        uncertain = False
        for _ in range(MAX_TRIES):
            try:
                reply = self.request(op, *args)
            except Uncertain:
                uncertain = True
                continue
            err = errno_of(reply)
            if err == 0 or (uncertain and err in done_if):
                return reply
            raise AssertionError(
                f"client {self.index}: {op}{args!r} failed with {errno.errorcode.get(err, err)}"
                f"{' after an uncertain try' if uncertain else ''}"
            )
        raise AssertionError(f"client {self.index}: {op}{args!r} uncertain {MAX_TRIES} times")

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            raise AssertionError(f"client {self.index}: {what}")

    # the work

    def run(self, stop_at: Any) -> None:
        """Rounds until time.time() passes `stop_at` (a shared value the test may move
        on), then returns."""
        self.connect()
        self.ensure("mkdir", 0, 0, self.dir, 0o755, done_if=(errno.EEXIST,))
        self.ensure("symlink", 0, 0, LINK_TARGET, self.link, done_if=(errno.EEXIST,))
        rnd = 0
        while time.time() < stop_at.value:  # only whole rounds: no half-done step left behind
            if time.time() >= self.rotate_at:
                self.counts["rotations"] += 1
                self.connect()
            self.round(rnd)
            rnd += 1
        self.counts["rounds"] = rnd
        assert self.conn is not None
        self.conn.close()

    def round(self, rnd: int) -> None:
        data, value = payload(self.index, rnd), tag(self.index, rnd)
        temp = f"{self.dir}/n{rnd}"
        self.create_file(temp, data)
        self.check_content(temp, data)
        st = decode_stat(self.ensure("lstat", temp).data)
        self.check(stat.S_ISREG(st["mode"]) and st["size"] == len(data), f"lstat {temp}: {st}")
        self.ensure("lsetxattr", temp, XATTR, value)
        got = unpack_s(self.ensure("lgetxattr", 256, temp, XATTR).data)
        self.check(got == value, f"xattr of {temp} is {got!r}, want {value!r}")
        slot = rnd % SLOTS
        final = f"{self.dir}/final{slot}"
        # ENOENT after an uncertain RENAME: the temp name is gone, so the rename ran.
        self.ensure("rename", temp, final, done_if=(errno.ENOENT,))
        self.check_content(final, data)  # proves it, whichever way it went
        self.finals[slot] = rnd
        directory = f"{self.dir}/d{rnd}"
        self.ensure("mkdir", 0, 0, directory, 0o755, done_if=(errno.EEXIST,))
        st = decode_stat(self.ensure("lstat", directory).data)
        self.check(stat.S_ISDIR(st["mode"]), f"{directory} is not a directory: {st}")
        self.ensure("remove", directory, done_if=(errno.ENOENT,))
        target = unpack_s(self.ensure("readlink", self.link, 256).data)
        self.check(target == LINK_TARGET.encode(), f"readlink {self.link}: {target!r}")

    def create_file(self, path: str, data: bytes) -> None:
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
        reply = self.ensure("create", path, flags, 0o644, 0, 0, done_if=(errno.EEXIST,))
        if not reply.ok:  # a lost CREATE made the file; its descriptor died with the worker
            reply = self.ensure("open", path, os.O_RDWR | os.O_TRUNC)
        self.check(reply.fd is not None, f"no descriptor with the reply for {path}")
        try:
            self.check(os.write(reply.fd, data) == len(data), f"short write to {path}")
        finally:
            os.close(reply.fd)

    def check_content(self, path: str, want: bytes) -> None:
        reply = self.ensure("open", path, os.O_RDONLY)
        self.check(reply.fd is not None, f"no descriptor with the reply for {path}")
        try:
            got = os.read(reply.fd, len(want) + 1)
        finally:
            os.close(reply.fd)
        self.check(got == want, f"{path}: read {len(got)} bytes, not the {len(want)} written")

    def report(self, error: str | None = None) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": os.getpid(),
            "counts": dict(self.counts),
            "finals": self.finals,
            "closed_during": self.closed_during,
            "timelines": self.timelines,
            "error": error,
        }


def client_main(
    index: int, daemon: Daemon, lock: Any, go: Any, results: Any, seed: int, stop_at: Any
) -> None:
    """A client process: wait for the start, run, send back a report (even on failure)."""
    client = ChaosClient(index, daemon, lock, seed)
    try:
        if not go.wait(30):
            raise AssertionError("never told to start")
        client.run(stop_at)
        results.put(client.report())
    except BaseException as e:  # the parent fails the test with this text
        results.put(client.report(f"{e!r}\n{traceback.format_exc()}"))


# --- the killer ----------------------------------------------------------------------------

# Where a kill is aimed (Killer.AIMS, in turn): a request executing, a reply being sent, or
# wherever the worker happens to be (the verdicts the aimed kills cannot reach: nothing in
# flight, a request partly or just received).
EXECUTING, REPLYING, ANYWHERE = "executing", "replying", "anywhere"
FATES_OF_AIM = {EXECUTING: EXECUTING_FATES, REPLYING: REPLYING_FATES}
# x86-64 system calls (asm/unistd_64.h) of a reply: send(2) (sendto) and the fd reply's
# sendmsg(2), both with MSG_NOSIGNAL | MSG_DONTWAIT on the connection (proxyd/server.py);
# the channel to the master is written without flags, a syslog socket with MSG_DONTWAIT
# alone, and a log file with write(2).
SYS_SENDTO, SYS_SENDMSG = "44", "46"
REPLY_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT


@dataclass
class Kill:
    at: float
    pid: int
    conn: int
    aim: str  # EXECUTING, REPLYING or ANYWHERE: what the killer tried for
    # /proc/PID/syscall of the stopped worker when the aim was reached (then the kill
    # lands there), None for a kill sent without stopping the worker first
    call: list[str] | None = None


def syscall_fields(pid: int) -> list[str]:
    """/proc/PID/syscall, split: "running", or the number of the system call the task is
    in (or stopped on the way out of), then its six arguments in hex; "-1" outside one.
    Raises ProcessLookupError when the process is gone."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None


def stop(pid: int) -> None:
    """SIGSTOP `pid` and wait until it is stopped (state "T" in /proc/PID/stat)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessLookupError(pid) from None
        if state == "T":
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {pid} did not stop in 30 s (state {state})")
        time.sleep(0.0005)  # polling the state: a stop takes effect when the task next runs


def reached(aim: str, call: list[str]) -> bool:
    """Whether a worker stopped at `call` (syscall_fields) is where `aim` wants it.

    Stopped on the way out of one of a request's own system calls (REQUEST_CALLS), the
    worker is executing that request: it records "executing" before its first one and
    "replying" only after its last. Stopped on the way out of the send of a reply, it has
    recorded "replying" and not yet "receiving" again (the store after the send)."""
    if aim == EXECUTING:
        return call[0] in REQUEST_CALLS
    if call[0] == SYS_SENDTO:  # sendto(fd, buf, len, flags, addr, addrlen)
        return int(call[4], 16) == REPLY_FLAGS
    if call[0] == SYS_SENDMSG:  # sendmsg(fd, msg, flags)
        return int(call[3], 16) == REPLY_FLAGS
    return False


def aim_at(pid: int, aim: str, patience: float) -> list[str] | None:
    """Leave worker `pid` stopped where `aim` wants it and return its syscall_fields, or
    None (the worker running) when that did not happen within `patience` seconds.

    Why stop first: /proc/PID/syscall says "running" for a worker that executes a request
    and for one woken up and waiting for a CPU alike, and a kill sent on that lands
    mostly between requests (measured: 257 of 384 kills found nothing in flight).
    Stopped, its place is fixed until the SIGKILL. A worker asleep in recvfrom has
    nothing in flight (nor has one waiting in recvmsg for its next connection): it is
    left alone, and looked at again. Raises ProcessLookupError
    if the worker is gone."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if syscall_fields(pid)[0] in (str(SYS_RECVFROM), str(SYS_RECVMSG)):
            continue  # waiting for a request, or (connection gone) for the next one
        stop(pid)
        call = syscall_fields(pid)
        if reached(aim, call):
            return call
        os.kill(pid, signal.SIGCONT)  # an interrupted recvfrom or send is restarted
    return None


class Killer(threading.Thread):
    """SIGKILLs a random busy worker every KILL_EVERY, aimed in turn (AIMS) at a request
    executing, at a reply being sent and at no place in particular."""

    AIMS = (EXECUTING, REPLYING, ANYWHERE)

    def __init__(self, master_pid: int, seed: int) -> None:
        super().__init__(name="killer", daemon=True)
        self.master_pid = master_pid
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.kills: list[Kill] = []
        self.skipped = 0  # rounds with no busy worker to kill
        self.missed: Counter[str] = Counter()  # aims not reached within AIM_PATIENCE
        self.errors: list[str] = []  # shown by the test, not lost in the thread

    def run(self) -> None:
        try:
            rounds = 0
            while not self.stop_event.wait(self.rng.uniform(*KILL_EVERY)):
                target = self.pick()
                if target is None:
                    self.skipped += 1
                    continue
                aim = self.AIMS[rounds % len(self.AIMS)]
                rounds += 1
                with contextlib.suppress(ProcessLookupError):  # it left meanwhile
                    self.kill(*target, aim)
        except BaseException:
            self.errors.append(traceback.format_exc())

    def kill(self, pid: int, conn: int, aim: str) -> None:
        call = None
        if aim != ANYWHERE:
            call = aim_at(pid, aim, AIM_PATIENCE)
            if call is None:
                self.missed[aim] += 1
                aim = ANYWHERE  # killed all the same: the death is what the clients face
        os.kill(pid, signal.SIGKILL)  # also ends a stopped process
        self.kills.append(Kill(time.time(), pid, conn, aim, call))

    def reached(self, aim: str) -> int:
        """How many kills so far landed where `aim` wanted them."""
        return sum(1 for k in list(self.kills) if k.aim == aim and k.call is not None)

    def pick(self) -> tuple[int, int] | None:
        busy = []
        for pid in children(self.master_pid):
            match = re.search(r" conn=(\d+) ", title(pid) + " ")
            if match:
                busy.append((pid, int(match[1])))
        return self.rng.choice(busy) if busy else None

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


# --- the daemon, seen from outside ------------------------------------------------------------


def fd_targets(pid: int) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}").split(":[")[0])
    return sorted(found)


def settled(d: Daemon) -> bool:
    """Every worker idle, none busy (excess idle workers stay 30 s before they go)."""
    titles = [title(pid) for pid in d.workers()]
    return len(titles) >= MIN_IDLE and all(t.endswith(" idle") for t in titles)


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def warm_up(d: Daemon) -> None:
    """One short connection, so that the baseline counts whatever the master opens lazily."""
    client = d.connect(EXPORT)
    assert client.lstat("/").ok
    client.close()
    wait_until(lambda: settled(d), 10, "the pool to settle after the warm-up")


class Watchdog:
    """At the hard deadline, SIGKILL the clients and the daemon: every wait then ends."""

    def __init__(self, seconds: float, d: Daemon) -> None:
        self.fired = False
        self.procs: list[multiprocessing.Process] = []
        self.daemon = d
        self.timer = threading.Timer(seconds, self.fire)
        self.timer.daemon = True
        self.timer.start()

    def fire(self) -> None:
        self.fired = True
        for proc in self.procs:
            proc.kill()
        self.daemon.proc.kill()

    def cancel(self) -> None:
        self.timer.cancel()


def run_clients(
    d: Daemon, watchdog: Watchdog, seed: int, deadline: float
) -> tuple[list[dict[str, Any]], Killer]:
    ctx = multiprocessing.get_context("fork")
    lock, go, results = ctx.Lock(), ctx.Event(), ctx.Queue()
    began = time.time()
    stop_at = ctx.Value("d", began + CHAOS_SECONDS + 1.0)  # +1: the clients' start
    procs = [
        ctx.Process(
            target=client_main, args=(i, d, lock, go, results, seed, stop_at), name=f"client{i}"
        )
        for i in range(CLIENTS)
    ]
    watchdog.procs = procs
    for proc in procs:
        proc.start()
    killer = Killer(d.proc.pid, seed)
    killer.start()
    go.set()
    reports = []
    try:
        while len(reports) < CLIENTS and time.monotonic() < deadline:
            short = min(killer.reached(EXECUTING), killer.reached(REPLYING)) < max(
                MIN_EXECUTING, MIN_REPLYING
            )
            if short and time.time() > stop_at.value - 2 and stop_at.value < began + CHAOS_LIMIT:
                stop_at.value += EXTEND
            try:  # drain before join: a child blocks until its report is read
                reports.append(results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic()))))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        killer.stop()
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return reports, killer


# --- the log ----------------------------------------------------------------------------------


def read_log(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            event["ts"] = datetime.fromisoformat(event["timestamp"]).timestamp()
            events.append(event)
    return events


def latency_stats(seconds: list[float]) -> dict[str, Any]:
    if not seconds:
        return {"n": 0}
    ms = sorted(s * 1000 for s in seconds)

    def rank(q: float) -> float:  # nearest-rank percentile
        return round(ms[min(len(ms) - 1, max(0, round(q * len(ms)) - 1))], 2)

    return {"n": len(ms), "median_ms": rank(0.5), "p99_ms": rank(0.99), "max_ms": round(ms[-1], 2)}


def restart_latencies(master: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per "worker died": the time until the next "worker spawned" of the export, and
    until its own replacement ("worker replaced" names it) was ready. The master's own
    events, so their order is the order they happened in."""
    next_spawned, own_replacement = [], []
    spawned_at = {e["worker_pid"]: e["ts"] for e in master if e["event"] == "worker spawned"}
    replaced_by = {e["old_pid"]: e["worker_pid"] for e in master if e["event"] == "worker replaced"}
    for i, event in enumerate(master):
        if event["event"] != "worker died":
            continue
        spawned = next(
            (
                e
                for e in master[i + 1 :]
                if e["event"] == "worker spawned" and e.get("export") == EXPORT
            ),
            None,
        )
        if spawned is not None:
            next_spawned.append(spawned["ts"] - event["ts"])
        new = replaced_by.get(event["worker_pid"])
        if new in spawned_at:
            own_replacement.append(spawned_at[new] - event["ts"])
    return next_spawned, own_replacement


def served_again_latencies(
    master: list[dict[str, Any]], reports: list[dict[str, Any]]
) -> list[float]:
    """Per death on a connection: time until the client got the next reply a worker
    served on that connection (not the master's EIO). A client's k-th connection is its
    pid's k-th "connection accepted"."""
    accepted: dict[int, list[int]] = defaultdict(list)
    for event in master:
        if event["event"] == "connection accepted":
            accepted[event["peer_pid"]].append(event["conn"])
    timeline_of = {}
    for report in reports:
        for conn, timeline in zip(accepted[report["pid"]], report["timelines"], strict=False):
            timeline_of[conn] = timeline
    found = []
    for event in master:
        if event["event"] == "worker died" and event.get("conn") in timeline_of:
            ends = [end for _, end, how in timeline_of[event["conn"]] if how == "ok"]
            later = [end for end in ends if end > event["ts"]]
            if later:
                found.append(later[0] - event["ts"])
    return found


def grouped(events: list[dict[str, Any]]) -> list[str]:
    """Log lines in short: "25x accept failed (Bad file descriptor), first at ..."."""
    first: dict[str, str] = {}
    count: Counter[str] = Counter()
    for e in events:
        key = f"{e['event']} ({e.get('error') or e.get('detail') or e.get('level')})"
        count[key] += 1
        first.setdefault(key, e["timestamp"])
    return [f"{n}x {key}, first at {first[key]}" for key, n in count.items()]


def fates_of_kills(master: list[dict[str, Any]], killer: Killer) -> list[tuple[Kill, str | None]]:
    """Each kill with what the master made of its worker's death: the `crash recovery`
    outcome, "closed: <detail>" or "closed: poison"; None for a worker that died with no
    connection (its guest had just left). A connection's deaths and their fates come in
    the same order in the master's log (a connection has one worker at a time)."""
    deaths: dict[int, list[int]] = defaultdict(list)  # conn -> pids of its dead workers
    fates: dict[int, list[str]] = defaultdict(list)
    for e in master:
        if e["event"] == "worker died" and e.get("conn") is not None:
            deaths[e["conn"]].append(e["worker_pid"])
        elif e["event"] == "crash recovery":
            fates[e["conn"]].append(e["outcome"])
        elif e["event"] == UNCERTAIN_CLOSE:
            fates[e["conn"]].append(f"closed: {e.get('detail')}")
        elif e["event"] == POISON_CLOSE:
            fates[e["conn"]].append("closed: poison")
    fate_of = {}
    for conn, pids in deaths.items():
        fate_of.update(zip(pids, fates[conn], strict=False))
    return [(kill, fate_of.get(kill.pid)) for kill in killer.kills]


def analyse(events: list[dict[str, Any]], killer: Killer, reports: list[dict[str, Any]]) -> dict:
    master = [e for e in events if e.get("role") == "master"]
    died = [e for e in master if e["event"] == "worker died"]
    killed = {k.pid: k for k in killer.kills}
    on_conn = [e for e in died if e.get("conn") is not None]
    outcomes = Counter(e["outcome"] for e in master if e["event"] == "crash recovery")
    uncertain = [e for e in master if e["event"] == UNCERTAIN_CLOSE]
    poison = [e for e in master if e["event"] == POISON_CLOSE]
    recovered = sum(outcomes.values())
    fates = fates_of_kills(master, killer)
    next_spawned, own_replacement = restart_latencies(master)
    counts: Counter[str] = Counter()
    for report in reports:
        counts.update(report["counts"])
    return {
        "kills": len(killer.kills),
        "kill_rounds_without_target": killer.skipped,
        "kills_aimed": dict(Counter(k.aim for k in killer.kills)),
        "aims_missed": dict(killer.missed),
        "killer_errors": killer.errors,
        # What the kills hit, by the master's verdicts (aimed or not).
        "in_flight": {
            EXECUTING: sum(fate in EXECUTING_FATES for _, fate in fates),
            REPLYING: sum(fate in REPLYING_FATES for _, fate in fates),
        },
        "fates_by_aim": {
            aim: dict(Counter(str(fate) for k, fate in fates if k.aim == aim))
            for aim in Killer.AIMS
        },
        # An aimed kill whose death the master judged otherwise than its aim says.
        "aimed_but_judged_otherwise": [
            {"aim": k.aim, "syscall": k.call, "fate": fate}
            for k, fate in fates
            if k.aim != ANYWHERE and fate not in FATES_OF_AIM[k.aim]
        ],
        "deaths_logged": len(died),
        "deaths_not_ours": [e for e in died if e["worker_pid"] not in killed],
        "deaths_on_a_connection": len(on_conn),
        "recoveries_by_outcome": dict(outcomes),
        "closed_reply_state_unknown": len(uncertain),
        "closed_reply_state_unknown_details": [
            {"conn": e["conn"], "op": e.get("op"), "detail": e.get("detail")} for e in uncertain
        ],
        "closed_beyond_the_allowance": [
            {"conn": e["conn"], "op": e.get("op"), "detail": e.get("detail")}
            for e in uncertain
            if e.get("detail") != REPLY_UNKNOWN
        ],
        "closed_poison": len(poison),
        "recovered_share": round(recovered / len(on_conn), 4) if on_conn else None,
        "transparent_share": (
            round(sum(outcomes[o] for o in TRANSPARENT) / len(on_conn), 4) if on_conn else None
        ),
        "client_eio": counts["eio"],
        "client_closes": counts["closes"],
        "client_closed_during": [op for r in reports for op in r["closed_during"]],
        "client_rotations": counts["rotations"],
        "requests": counts["requests"],
        "requests_per_client": sorted(r["counts"].get("requests", 0) for r in reports),
        "rounds": counts["rounds"],
        "kill_to_reaped": latency_stats(
            [e["ts"] - killed[e["worker_pid"]].at for e in died if e["worker_pid"] in killed]
        ),
        "restart_latency_died_to_spawned": latency_stats(next_spawned),
        "restart_latency_died_to_own_replacement_ready": latency_stats(own_replacement),
        "restart_latency_died_to_next_served": latency_stats(
            served_again_latencies(master, reports)
        ),
        "errors_logged": grouped([e for e in events if e.get("level") in ("error", "critical")]),
        "protocol_trouble": grouped(
            [e for e in events if e["event"] in ("protocol error", "peer stalled mid-request")]
        ),
    }


# --- the host tree ------------------------------------------------------------------------------


def host_problems(export: Path, reports: list[dict[str, Any]]) -> list[str]:
    """Each client's directory holds exactly its link and its final files, with the
    content and xattr of the round it last renamed over each."""
    problems = []
    for report in reports:
        if report["error"]:
            continue  # it stopped mid-round; its error is the story
        index, finals = report["index"], report["finals"]
        directory = export / f"c{index}"
        if not directory.is_dir():
            problems.append(f"c{index}: no directory")
            continue
        want = {"link"} | {f"final{slot}" for slot in finals}
        have = set(os.listdir(directory))
        if have != want:
            problems.append(f"c{index}: extra {sorted(have - want)}, missing {sorted(want - have)}")
        if "link" in have and os.readlink(directory / "link") != LINK_TARGET:
            problems.append(f"c{index}/link points to {os.readlink(directory / 'link')!r}")
        for slot, rnd in finals.items():
            path = directory / f"final{slot}"
            if not path.exists():
                continue
            if path.read_bytes() != payload(index, rnd):
                problems.append(f"{path}: content is not round {rnd}'s")
            if os.getxattr(path, XATTR, follow_symlinks=False) != tag(index, rnd):
                problems.append(f"{path}: xattr is not round {rnd}'s")
    return problems


# --- the test ---------------------------------------------------------------------------------


def test_chaos_kills_busy_workers_under_load(tmp_path: Path) -> None:
    started = time.monotonic()
    deadline = started + HARD_DEADLINE - 10  # leave time to stop and analyse
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 1_000_000))
    print(f"\nchaos seed {seed} (CHAOS_SEED={seed} repeats the random choices, not the timing)")
    exports = [{"name": EXPORT, "min_idle": MIN_IDLE, "max_workers": MAX_WORKERS}]
    d = Daemon(tmp_path, exports, request_timeout=REQUEST_TIMEOUT)
    watchdog = Watchdog(HARD_DEADLINE - (time.monotonic() - started), d)
    try:
        warm_up(d)
        fds_before = fd_targets(d.proc.pid)
        baseline = d.master_fds_besides_workers()
        reports, killer = run_clients(d, watchdog, seed, deadline)
        after = after_the_run(d, baseline, deadline)
    finally:
        watchdog.cancel()
        exit_code = d.stop()
    summary = analyse(read_log(d.log_path), killer, reports)
    summary.update(
        seed=seed,
        wall_s=round(time.monotonic() - started, 1),
        watchdog_fired=watchdog.fired,
        clients_reported=len(reports),
        client_errors=[r["error"] for r in reports if r["error"]],
        master_fds_baseline=baseline,
        master_fds_after=after["fds_beside_workers"] if after else None,
        master_fds_new=sorted((Counter(after["fds"]) - Counter(fds_before)).elements())
        if after
        else None,
        rss_kib=after["rss"] if after else None,
        daemon_exit_code=exit_code,
        proxyd_digest=source_digest(),
        load_average=os.getloadavg(),  # other work on the machine slows recovery down
        host_problems=host_problems(Path(d.exports[EXPORT]["path"]), reports),
    )
    SUMMARY.parent.mkdir(exist_ok=True)
    SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
    closes = summary["closed_reply_state_unknown"] + summary["closed_poison"]
    write_coverage(
        "chaos",
        f"chaos: {summary['kills']} kills, {summary['in_flight'][EXECUTING]} while executing, "
        f"{summary['in_flight'][REPLYING]} while replying, {closes} connections closed",
        kills=summary["kills"],
        in_flight=summary["in_flight"],
        closes=closes,
    )
    shutil.copyfile(d.log_path, DAEMON_LOG)
    print_summary(summary)
    found = failures(summary)
    if found:  # no traceback: the list says it all
        pytest.fail("\n".join(["chaos test failed:"] + found + [f"details: {SUMMARY}"]), False)


def source_digest() -> str:
    """Which proxyd this run tested (its sources may change between runs)."""
    digest = hashlib.sha256()
    for path in sorted((CHECKOUT / "proxyd").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def after_the_run(d: Daemon, fds_baseline: int, deadline: float) -> dict[str, Any] | None:
    """Once every client is gone the pool shrinks back, and the master's descriptors
    with it (a connection or channel it forgot to close would stay): wait for that,
    then take the descriptors and memory. None if the daemon died."""
    if d.proc.poll() is not None:
        return None
    pid = d.proc.pid
    with contextlib.suppress(AssertionError):  # failures() reports the descriptors
        wait_until(
            lambda: settled(d) and d.master_fds_besides_workers() <= fds_baseline,
            max(1.0, min(10.0, deadline + 5 - time.monotonic())),
            "the pool and the master's descriptors to settle",
        )
    return {
        "fds": fd_targets(pid),
        "fds_beside_workers": d.master_fds_besides_workers(),
        "rss": {"master": rss_kib(pid), "workers": [rss_kib(w) for w in d.workers()]},
    }


def failures(s: dict[str, Any]) -> list[str]:
    """Everything that went wrong, all at once: one run tells the whole story."""
    found = []

    def expect(condition: bool, message: str) -> None:
        if not condition:
            found.append(message)

    expect(not s["watchdog_fired"], f"hard deadline of {HARD_DEADLINE} s hit: something hung")
    expect(s["rss_kib"] is not None, "the daemon died during the run")
    expect(s["clients_reported"] == CLIENTS, f"{s['clients_reported']}/{CLIENTS} clients reported")
    found += [f"client error: {e}" for e in s["client_errors"]]
    found += [f"killer error: {e}" for e in s["killer_errors"]]
    expect(
        bool(s["requests_per_client"]) and min(s["requests_per_client"]) >= MIN_REQUESTS,
        f"too few requests per client: {s['requests_per_client']}",
    )
    found += [f"host tree: {p}" for p in s["host_problems"]]
    found += [f"a worker died that we did not kill: {e}" for e in s["deaths_not_ours"]]
    found += [f"error logged: {e}" for e in s["errors_logged"]]
    found += [f"protocol trouble logged: {e}" for e in s["protocol_trouble"]]
    expect(s["kills"] >= MIN_KILLS, f"only {s['kills']} kills, want {MIN_KILLS}")
    # What the test is about: deaths while a request executes and while its reply is
    # sent, each often enough to be more than luck.
    for where, least in ((EXECUTING, MIN_EXECUTING), (REPLYING, MIN_REPLYING)):
        expect(
            s["in_flight"][where] >= least,
            f"only {s['in_flight'][where]} kills hit a request {where}, want {least} "
            f"(aims missed: {s['aims_missed']})",
        )
    found += [f"aimed kill judged otherwise: {k}" for k in s["aimed_but_judged_otherwise"]]
    # Every death of a worker serving a connection has exactly one fate in the log.
    fates = (
        sum(s["recoveries_by_outcome"].values())
        + s["closed_reply_state_unknown"]
        + s["closed_poison"]
    )
    expect(
        fates == s["deaths_on_a_connection"],
        f"{s['deaths_on_a_connection']} deaths on a connection but {fates} recoveries/closes",
    )
    # Poison is one request killing every worker that runs it (3 deaths): no request
    # here kills anything, and the killer picks at random among all busy workers.
    expect(s["closed_poison"] == 0, f"{s['closed_poison']} poison closes")
    # README: the one close a death may cost is a reply whose fate the master cannot
    # know (killed sending it, and the guest then quiet for 200 ms); none other.
    found += [f"closed beyond the allowance: {c}" for c in s["closed_beyond_the_allowance"]]
    expect(
        s["recovered_share"] is not None and s["recovered_share"] >= RECOVERED_SHARE,
        f"recovered share {s['recovered_share']} < {RECOVERED_SHARE}: closed "
        f"{s['closed_reply_state_unknown_details']}",
    )
    # The clients saw exactly the EIOs the master sent, and no close it did not decide.
    eio_sent = s["recoveries_by_outcome"].get("answered EIO", 0)
    expect(
        s["client_eio"] == eio_sent, f"clients saw {s['client_eio']} EIO, master sent {eio_sent}"
    )
    crash_closes = s["closed_reply_state_unknown"] + s["closed_poison"]
    expect(
        s["client_closes"] <= crash_closes,
        f"clients saw {s['client_closes']} closes, the master closed {crash_closes} after crashes",
    )
    expect(
        s["master_fds_after"] is not None and s["master_fds_after"] <= s["master_fds_baseline"],
        f"master descriptors {s['master_fds_baseline']} -> {s['master_fds_after']}: "
        f"new {s['master_fds_new']}",
    )
    expect(s["daemon_exit_code"] == 0, f"daemon exit code {s['daemon_exit_code']}")
    return found


def print_summary(s: dict[str, Any]) -> None:
    print(
        f"kills {s['kills']} (rounds without a target {s['kill_rounds_without_target']}), "
        f"deaths on a connection {s['deaths_on_a_connection']}\n"
        f"aims {s['kills_aimed']}, missed {s['aims_missed']}; hit in flight {s['in_flight']}\n"
        f"fates by aim {s['fates_by_aim']}\n"
        f"recoveries {s['recoveries_by_outcome']}\n"
        f"closed: reply state unknown {s['closed_reply_state_unknown']}, "
        f"poison {s['closed_poison']}; "
        f"recovered {s['recovered_share']}, "
        f"transparent {s['transparent_share']}\n"
        f"clients: requests {s['requests']} (per client {s['requests_per_client']}), "
        f"EIO {s['client_eio']}, closes {s['client_closes']} {s['client_closed_during']}, "
        f"reconnects by choice {s['client_rotations']}\n"
        f"restart latency died->next spawned {s['restart_latency_died_to_spawned']}\n"
        f"restart latency died->own replacement ready "
        f"{s['restart_latency_died_to_own_replacement_ready']}\n"
        f"restart latency died->next served {s['restart_latency_died_to_next_served']}\n"
        f"kill->reaped {s['kill_to_reaped']}\n"
        f"master fds {s['master_fds_baseline']} -> {s['master_fds_after']}; "
        f"RSS KiB {s['rss_kib']}\nwall {s['wall_s']} s, load average {s['load_average']}; "
        f"summary in {SUMMARY}"
    )
