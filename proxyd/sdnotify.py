"""systemd's notification protocol, for a master run as a `Type=notify` service.

sd_notify(3): a service tells systemd how it is doing in datagrams of `NAME=value`
lines sent to the AF_UNIX SOCK_DGRAM socket that $NOTIFY_SOCKET names (a path, or an
abstract name when it starts with '@'). `READY=1` ends the start-up, `RELOADING=1` with
`MONOTONIC_USEC=` (CLOCK_MONOTONIC in µs) opens a reload that the next `READY=1`
closes, `STOPPING=1` announces a stop, `STATUS=` is the line `systemctl status` shows,
`WATCHDOG=1` is the keep-alive that `WatchdogSec=` expects at least once per
$WATCHDOG_USEC (sd_watchdog_enabled(3): meant for the process $WATCHDOG_PID, if set).
`FDSTORE=1` with `FDNAME=` hands descriptors (SCM_RIGHTS) to systemd's file-descriptor
store, `FDSTOREREMOVE=1` with `FDNAME=` takes them out again (systemd.service(5),
FileDescriptorStoreMax=); when the service is restarted, systemd passes them back as
sd_listen_fds(3) describes: LISTEN_FDS descriptors from 3 on, named by the
colon-separated LISTEN_FDNAMES, meant for the process LISTEN_PID.

Nothing here happens when $NOTIFY_SOCKET is unset. The master reads these variables
once and removes them from its environment, so that no worker it forks can speak for
the service (the unit's NotifyAccess=main refuses them anyway); an upgrade puts them
back for the program it executes (exported()), which keeps the pid.

Written here rather than taken from PyPI: `sdnotify` (last release 2017) cannot send
descriptors, which the store needs; `systemd-python` needs libsystemd-dev and a C
compiler at install time and would load libsystemd into the master, and so into every
worker it forks, for what is one sendmsg(2).

The store (used when $FDSTORE, the unit's FileDescriptorStoreMax=, is above 0): the
master keeps a copy of every live connection and of every worker's journal there,
named `conn.ID.EXPORT` and `journal.PID`; the master writes the connection's id into
the journal when it hands the connection to the worker (slot.CONN). Under systemd a
master that dies takes its workers with it (KillMode=mixed: the rest of the cgroup is
killed once the main process is gone); the guests' connections stay open in the store,
and the master systemd starts next takes them back (restore()) and treats each as after
the death of the worker that served it (recovery.py): a guest waits for the restart,
and at worst gets EIO for a request that may have changed the export.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import stat
import time
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING

from proxyd import admission, log, slot
from proxyd.pool import BUSY, IDLE, Connection, Worker
from proxyd.slot import Slot

if TYPE_CHECKING:
    from proxyd.master import Master

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here
# What the master takes from its environment (and puts back across an upgrade's exec).
VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "FDSTORE")
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
STATUS_NAMES = 8  # export names listed in a STATUS line before "..."


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs, as MONOTONIC_USEC= wants it (sd_notify(3))."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def address(value: str) -> str | bytes:
    """The socket address $NOTIFY_SOCKET names: a path, or for '@name' the abstract
    name (a leading NUL byte, unix(7)). Raises ValueError for anything else."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET={value!r} is neither a path nor an abstract name")


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[str, int]]:
    """The descriptors systemd passed this process (sd_listen_fds(3)): (name, fd) for
    fd 3, 4, ... LISTEN_FDS; a name LISTEN_FDNAMES does not give is "unknown". Nothing
    when LISTEN_PID is not this process (the variables were meant for a parent).
    Removes the three variables from `environ` (os.environ by default) and makes the
    descriptors close-on-exec, as sd_listen_fds(1) does."""
    env = os.environ if environ is None else environ
    pid, count, names = (env.pop(name, "") for name in LISTEN_VARIABLES)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    passed = []
    for i, fd in enumerate(fds):
        try:
            os.set_inheritable(fd, False)
        except OSError:  # not open after all: nothing to take
            continue
        passed.append((labels[i] if i < len(labels) and labels[i] else "unknown", fd))
    return passed


class Notifier:
    """The master's voice towards systemd. Every method is a no-op without a socket.

    `address`: $NOTIFY_SOCKET; `watchdog_usec`: $WATCHDOG_USEC (0: no watchdog);
    `fdstore`: $FDSTORE, the most descriptors the store takes (0: not used)."""

    def __init__(self, address: str | None, watchdog_usec: int = 0, fdstore: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address else 0
        self.fdstore = fdstore if address else 0
        self._sock: socket.socket | None = None
        self._environment: dict[str, str] = {}
        self.next_ping = 0.0  # monotonic time of the next WATCHDOG=1
        self.ready = False  # READY=1 sent for the start-up or the reload in progress
        self.started = False  # READY=1 sent once: the start-up is over
        self.stopping: str | None = None  # why, once STOPPING=1 is sent
        self.status = ""  # the last STATUS= sent
        self.refused = ""  # the last reload or upgrade refused, for the status line
        self.stored: dict[str, int] = {}  # FDNAME -> descriptor, as the store holds them
        self.failed = 0  # datagrams the socket did not take

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """A notifier for what systemd set in `environ` (os.environ by default), which
        loses those variables (workers must not see them). $WATCHDOG_PID, if set, must
        be this process. A $NOTIFY_SOCKET that names no socket is ignored, as
        sd_notify(3) ignores it (it returns -EINVAL)."""
        env = os.environ if environ is None else environ
        found = {name: env.pop(name) for name in VARIABLES if name in env}
        raw = found.get("NOTIFY_SOCKET", "")
        try:
            address(raw)
        except ValueError:
            raw = ""
        usec = found.get("WATCHDOG_USEC", "")
        watchdog_pid = found.get("WATCHDOG_PID", str(os.getpid()))
        store = found.get("FDSTORE", "")
        notifier = cls(
            raw or None,
            int(usec) if usec.isdigit() and watchdog_pid == str(os.getpid()) else 0,
            int(store) if store.isdigit() else 0,
        )
        if raw:
            notifier._environment = found
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @contextlib.contextmanager
    def exported(self) -> Iterator[None]:
        """The variables back in os.environ for as long as the block runs: around an
        upgrade's execve(2) (same pid: the new program speaks for the service)."""
        os.environ.update(self._environment)
        try:
            yield
        finally:
            for name in self._environment:
                os.environ.pop(name, None)

    # --- the datagram ---------------------------------------------------------------------

    def send(self, fields: Mapping[str, str | int], fds: list[int] | None = None) -> bool:
        """One datagram of NAME=value lines (values on one line: newlines become
        spaces), with `fds` attached (SCM_RIGHTS). Never blocks: False when the socket
        did not take it (systemd gone or behind); True when sent or when disabled."""
        if self.address is None:
            return True
        text = "".join(f"{k}={str(v).replace(chr(10), ' ')}\n" for k, v in fields.items())
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendmsg(
                [text.encode()], ancillary, socket.MSG_DONTWAIT, address(self.address)
            )
        except OSError:
            self.failed += 1
            return False
        return True

    # --- the service's state --------------------------------------------------------------

    def tick(self, master: Master) -> None:
        """Once per turn of the master's loop: the watchdog's keep-alive (every half
        interval: only a loop that turns sends it), the store brought in line with the
        connections and workers, READY=1 once the start-up (or upgrade) is done, and the
        status line whenever it reads differently."""
        if self.address is None:
            return
        now = time.monotonic()
        if self.watchdog_usec and now >= self.next_ping and self.send({"WATCHDOG": 1}):
            self.next_ping = now + self.watchdog_usec / 2e6
        if self.fdstore:
            self.sync_store(master)
        if not self.ready and self.stopping is None and settled(master):
            status = describe(master, self.refused)
            if self.send({"READY": 1, "STATUS": status, "MAINPID": os.getpid()}):
                self.ready = self.started = True
                self.status = status
            return
        if self.stopping is not None:
            status = describe(master, self.refused, f"stopping ({self.stopping})")
        else:
            status = describe(master, self.refused, None if self.started else "starting")
        if status != self.status and self.send({"STATUS": status}):
            self.status = status

    def reloading(self, what: str) -> None:
        """A reload (or an upgrade: `what`) begins: RELOADING=1, with the time."""
        if self.stopping is not None:
            return
        self.ready = False
        status = f"{what}..."
        if self.send({"RELOADING": 1, "MONOTONIC_USEC": monotonic_usec(), "STATUS": status}):
            self.status = status

    def reloaded(self, master: Master, refused: str | None) -> None:
        """The reload is applied, or refused (`refused` says why, and the status line
        keeps saying it until the next one applies): READY=1 with the new status."""
        if self.stopping is not None:
            return
        self.refused = "" if refused is None else refused
        status = describe(master, self.refused)
        if self.send({"READY": 1, "STATUS": status}):
            self.ready, self.status = True, status

    def stopping_now(self, master: Master, why: str) -> None:
        """STOPPING=1: a stop began (asked for, or start-up given up)."""
        if self.stopping is not None:
            return
        self.stopping = why
        self.status = describe(master, self.refused, f"stopping ({why})")
        self.send({"STOPPING": 1, "STATUS": self.status})

    # --- the file-descriptor store --------------------------------------------------------

    def sync_store(self, master: Master) -> None:
        """Make the store hold exactly what `master` would need after its death: each
        live connection (but one whose next bytes only this master holds: a consumed
        partial request waiting for a worker, or a reply that may not have left) and
        each worker's journal."""
        wanted = wanted_in_store(master)
        # Removals first: a name whose descriptor changed (a pid used again) is removed,
        # then stored again; systemd would otherwise hold both under one name.
        for name in [n for n, fd in self.stored.items() if wanted.get(n) != fd]:
            if self.send({"FDSTOREREMOVE": 1, "FDNAME": name}):
                del self.stored[name]
        for name, fd in wanted.items():
            if name not in self.stored and self.send({"FDSTORE": 1, "FDNAME": name}, [fd]):
                self.stored[name] = fd

    def forget_store(self) -> None:
        """Empty the store (a stop: nothing must keep a guest's connection open)."""
        for name in list(self.stored):
            if self.send({"FDSTOREREMOVE": 1, "FDNAME": name}):
                del self.stored[name]

    def restore(self, master: Master) -> None:
        """Take back what the store held for the master that died (sd_listen_fds(3)):
        each connection the orphan adoption (adopt.py) has not taken already is queued
        again, judged first from the journal of the worker that served it, exactly as
        after that worker's death (recovery.py). The names are taken out of the store;
        the next tick stores the connections again under their new ids."""
        passed = listen_fds()
        for name in sorted({name for name, _ in passed}):
            self.send({"FDSTOREREMOVE": 1, "FDNAME": name})
        if passed:
            take_back(master, passed)


def wanted_in_store(master: Master) -> dict[str, int]:
    """FDNAME -> descriptor for what the store should hold now (see sync_store)."""
    wanted = {}
    for conn in master.connections.values():
        if not conn.prefix and conn.id not in master.recovery.undecided:
            wanted[f"conn.{conn.id}.{conn.export}"] = conn.sock.fileno()
    for w in master.workers.values():
        wanted[f"journal.{w.pid}"] = w.journal.fd
    return wanted


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def take_back(master: Master, passed: list[tuple[str, int]]) -> None:
    """The connections among the `passed` descriptors, recovered into `master` (see
    Notifier.restore). A descriptor of another kind, or a copy of what `master` holds
    already (a connection and journal adopted from a live orphan), is closed."""
    held = {_inode(c.sock.fileno()) for c in master.connections.values()}
    held |= {_inode(w.journal.fd) for w in master.workers.values()}
    conns: list[tuple[int, str, int]] = []  # (id in the dead master, export, fd)
    journals: dict[int, list[Slot]] = {}  # connection id -> the journals naming it
    for name, fd in passed:
        kind, _, rest = name.partition(".")
        number, _, export = rest.partition(".")
        try:
            st = os.fstat(fd)
            mine = (st.st_dev, st.st_ino) not in held and number.isdigit()
            if mine and kind == "conn" and stat.S_ISSOCK(st.st_mode) and export:
                conns.append((int(number), export, fd))
                continue
            if mine and kind == "journal" and stat.S_ISREG(st.st_mode):
                journal = Slot(fd=fd)
                journals.setdefault(journal.fields[slot.CONN], []).append(journal)
                continue
        except OSError:
            pass
        with contextlib.suppress(OSError):
            os.close(fd)
    for old_id, export, fd in sorted(conns):
        _take_connection(master, old_id, export, fd, journals.pop(old_id, []))
    for stale in journals.values():  # workers that served no stored connection
        for journal in stale:
            _relay(journal)
            journal.close()


def _relay(journal: Slot) -> None:
    """Lines a worker left in its journal when its log was gone: to the master's log."""
    for line in journal.relay.take():
        log.relayed(line)


def _take_connection(master: Master, old_id: int, export: str, fd: int, claims: list[Slot]) -> None:
    sock = socket.socket(fileno=fd)
    pool = master.pools.get(export)
    why = None
    if pool is None or pool.removed:
        why = "export no longer configured"
    elif len(claims) > 1:  # the dead master handed it on in the turn it died
        why = "two journals name it: where its stream stands is unknown"
    if why is not None:
        for journal in claims:
            journal.close()
        sock.close()
        master.counters["connections_not_restored"] += 1
        master.log.warning("connection not restored", export=export, old_conn=old_id, reason=why)
        return
    assert pool is not None
    try:
        peer_pid, uid, gid = admission.peer(sock)
    except OSError:
        peer_pid, uid, gid = 0, 0, 0
    conn = Connection(master.next_conn, sock, export, peer_pid, uid, gid)
    master.next_conn += 1
    master.connections[conn.id] = conn
    master.counters["connections_restored"] += 1
    master.log.warning(
        "connection restored",
        export=export,
        conn=conn.id,
        old_conn=old_id,
        peer_pid=peer_pid,
        peer_uid=uid,
        peer_gid=gid,
        served=bool(claims),
    )
    if not claims:  # waiting for a worker when the master died: it waits again
        pool.pending.append(conn)
        return
    (journal,) = claims
    _relay(journal)
    conn.accepted = journal.fields[slot.ACCEPTED] or conn.accepted
    conn.requests = journal.fields[slot.SEQ]  # names the request in flight, as recovery expects
    # The worker that served it is dead (the store outlives it, the worker does not):
    # a stand-in carries its journal through the verdict, then the journal is closed.
    dead = Worker(0, pool, -1, -1, None, journal, state=BUSY, conn=conn)
    try:
        master.recovery.worker_died(dead, conn)
    finally:
        journal.close()


def settled(master: Master) -> bool:
    """Start-up done: every export's socket is bound (an export given to -f has none)
    and its min_idle workers of the current generation are ready, or the export is
    marked unavailable (waiting for it would hold `systemctl start` forever; the
    status line names it)."""
    for pool in master.pools.values():
        if pool.removed or pool.unavailable is not None:
            continue
        if pool.config.socket is not None and pool.listener is None:
            return False
        ready = sum(
            1
            for w in pool.workers.values()
            if w.state in (IDLE, BUSY) and w.generation >= pool.generation
        )
        if ready < pool.min_idle:
            return False
    return True


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:STATUS_NAMES])
    return shown + (", ..." if len(names) > STATUS_NAMES else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe(master: Master, refused: str, state: str | None = None) -> str:
    """The STATUS= line: what is served, to how many, by how many workers, what is
    unavailable and the last refusal, after `state` ("starting", "stopping (why)") if
    any. One line; it changes only when one of them does."""
    pools = [p for p in master.pools.values() if not p.removed]
    served = [p.name for p in pools if p.unavailable is None]
    down = [f"{p.name} ({p.unavailable})" for p in pools if p.unavailable is not None]
    busy = sum(1 for w in master.workers.values() if w.state == BUSY)
    text = (
        f"{f'{state}; ' if state is not None else ''}"
        f"serving {_plural(len(served), 'export')}"
        f"{f' ({_names(served)})' if served else ''}: "
        f"{_plural(len(master.connections), 'connection')}, "
        f"{_plural(len(master.workers), 'worker')} ({busy} busy)"
    )
    if down:
        text += f"; unavailable: {_names(down)}"
    refused_peers = master.counters["refused_peers"] + master.counters["refused_unavailable"]
    if refused_peers:
        text += f"; {_plural(refused_peers, 'connection')} refused"
    if refused:
        text += f"; last refusal: {refused}"
    return text
