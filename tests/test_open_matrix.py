"""OPEN and CREATE answer what open(2) answers: every flag on every kind of file, and
files a host process holds a lease on.

Issue 10.4, the special-file check must not change open(2)'s own answer: a differential
matrix against the reference helper. OPEN and CREATE, each with every combination of
O_EXCL, O_NOFOLLOW, O_DIRECTORY, O_TRUNC and O_NONBLOCK in each access mode, and O_PATH
with and without O_NOFOLLOW / O_DIRECTORY, on every kind of file: 100 flag sets x 10
kinds x 2 requests = 2000 cases, each on a fresh file, each sent to both servers. The
errno, the descriptor's type and its status flags must be identical, and so must the
host trees afterwards. Where the reference blocks (a FIFO opened without O_NONBLOCK: the
test sees it waiting in the kernel and opens the other end so that it can answer) or runs
a device's open routine (seen by an inotify watch on its node), proxyd must have answered
ENXIO without blocking, and the watches on proxyd's nodes must have seen nothing opened.
Every ENXIO must be a logged special-file refusal naming the file's type.

Issue 10.3, host leases are waited for: a real host process holds a lease (F_SETLEASE,
what knfsd delegations and Samba kernel oplocks are), and on the kernel's lease-break
signal (SIGIO) releases it a moment later. Opens that break the lease wait for it and
get a working descriptor, on both servers; only a client that asked for O_NONBLOCK gets
EWOULDBLOCK. A holder that never lets go costs the guest one EIO after request_timeout
(a real daemon, the master's hung-request path), and the guest keeps its mount. A real
guest writes to a leased file with `echo new > f`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import select
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.daemon import Daemon, children, wait_until
from tests.guest import Guest, ensure_guest_built
from tests.proxyclient import (
    CREATE,
    OPEN,
    ProxyClient,
    Reply,
    ServerHandle,
    decode_q,
    errno_of,
    marshal,
    start_server,
)
from tests.test_differential import snapshot, tree_diff
from tests.test_escape import (
    IN_ACCESS,
    IN_CLOSE_NOWRITE,
    IN_CLOSE_WRITE,
    IN_MODIFY,
    IN_OPEN,
    Inotify,
)

RD, WR, RW = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
EXCL, NOFOLLOW, DIRECTORY, TRUNC, NONBLOCK = (
    os.O_EXCL,
    os.O_NOFOLLOW,
    os.O_DIRECTORY,
    os.O_TRUNC,
    os.O_NONBLOCK,
)
O_PATH, CREAT = os.O_PATH, os.O_CREAT
MODIFIERS = (EXCL, NOFOLLOW, DIRECTORY, TRUNC, NONBLOCK)
FLAG_NAMES = (
    ("O_WRONLY", WR),
    ("O_RDWR", RW),
    ("O_CREAT", CREAT),
    ("O_EXCL", EXCL),
    ("O_NOFOLLOW", NOFOLLOW),
    ("O_DIRECTORY", DIRECTORY),
    ("O_TRUNC", TRUNC),
    ("O_NONBLOCK", NONBLOCK),
    ("O_PATH", O_PATH),
)


def flag_sets() -> list[int]:
    """Every subset of MODIFIERS in each access mode, then O_PATH with its two flags."""
    sets = []
    for access in (RD, WR, RW):
        for n in range(len(MODIFIERS) + 1):
            for chosen in itertools.combinations(MODIFIERS, n):
                sets.append(access | sum(chosen))
    for n in range(3):
        for chosen in itertools.combinations((NOFOLLOW, DIRECTORY), n):
            sets.append(O_PATH | sum(chosen))
    return sets


FLAG_SETS = flag_sets()


def flag_text(flags: int) -> str:
    names = [name for name, bit in FLAG_NAMES if flags & bit]
    return "|".join(names) or "O_RDONLY"


# --- the files -------------------------------------------------------------------------

KINDS = (
    "regular",
    "directory",
    "symlink-to-file",
    "symlink-to-dir",
    "dangling-symlink",
    "fifo",
    "socket",
    "char-device",
    "block-device",
    "missing",
)
# The type proxyd's refusal names (docs/events.md, field "refused").
SPECIAL = {
    "fifo": "fifo",
    "socket": "socket",
    "char-device": "char-device",
    "block-device": "block-device",
}
CONTENT = b"host data\n"


def unused_block_device() -> int:
    """A whole block device nobody uses (size 0: an unconfigured zram or loop device):
    the reference helper will open it, and that must harm nothing."""
    candidates = []
    for entry in Path("/sys/class/block").iterdir():
        if (entry / "partition").exists() or any((entry / "holders").iterdir()):
            continue
        if (entry / "size").read_text().strip() == "0":
            candidates.append(((entry.name.startswith("loop"), entry.name), entry))
    assert candidates, "no unused (size 0) block device on this machine"
    major, minor = (min(candidates)[1] / "dev").read_text().split(":")
    return os.makedev(int(major), int(minor))


def make(case: Path, kind: str, block_device: int) -> None:
    """Case directory `case` with `x` of the given kind (and what a symlink points to)."""
    case.mkdir()
    x = case / "x"
    if kind == "regular":
        x.write_bytes(CONTENT)
    elif kind == "directory":
        x.mkdir()
        (x / "inside").write_bytes(b"")
    elif kind == "symlink-to-file":
        (case / "target").write_bytes(CONTENT)
        os.symlink("target", x)
    elif kind == "symlink-to-dir":
        (case / "dir").mkdir()
        os.symlink("dir", x)
    elif kind == "dangling-symlink":
        os.symlink("nowhere", x)
    elif kind == "fifo":
        os.mkfifo(x, 0o666)
    elif kind == "socket":
        os.mknod(x, stat.S_IFSOCK | 0o666)
    elif kind == "char-device":
        os.mknod(x, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null
    elif kind == "block-device":
        os.mknod(x, stat.S_IFBLK | 0o600, block_device)
    else:
        assert kind == "missing", kind


# --- one request, on a server that may block ----------------------------------------------


def wchans(srv: ServerHandle) -> list[str]:
    """Where each process of the server sleeps in the kernel (the master and workers)."""
    found = []
    for pid in [srv.proc.pid, *children(srv.proc.pid)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found.append(Path(f"/proc/{pid}/wchan").read_text())
    return found


def fd_call(srv: ServerHandle, code: int, payload: bytes, fifo: Path | None) -> tuple[Reply, bool]:
    """Send an OPEN/CREATE and read its reply. With `fifo` given, the server may block in
    the FIFO's open waiting for the other end (fifo_open's wait_for_partner): the test then
    opens the other end itself, so that the open completes and the server answers.
    Returns the reply and whether the server blocked."""
    srv.client.send_request(code, payload)
    blocked = False
    partner = -1
    if fifo is not None:

        def settled() -> str | None:
            if select.select([srv.client.sock], [], [], 0.01)[0]:
                return "answered"
            if "wait_for_partner" in wchans(srv):
                return "blocked"
            return None

        blocked = wait_until(settled, what=f"{srv.kind} to answer or block") == "blocked"
        if blocked:
            partner = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a reader and a writer
    try:
        return srv.client.recv_fd_reply(), blocked
    finally:
        if partner >= 0:
            os.close(partner)


def outcome(reply: Reply) -> tuple[int, ...]:
    """What the guest can tell of an fd reply: the errno, or the type and status flags of
    the descriptor (closed here)."""
    if reply.fd is None:
        return (errno_of(reply),)
    try:
        return (0, stat.S_IFMT(os.fstat(reply.fd).st_mode), fcntl.fcntl(reply.fd, fcntl.F_GETFL))
    finally:
        os.close(reply.fd)


def describe(result: tuple[int, ...]) -> str:
    if result[0]:
        return errno.errorcode[result[0]]
    return f"fd type {result[1]:o} flags {flag_text(result[2])} ({result[2]:#o})"


# What shows that a node itself was opened, read or written.
NODE_USED = IN_OPEN | IN_ACCESS | IN_MODIFY | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE


@dataclass
class Tally:
    cases: int = 0
    reference_blocked: int = 0
    reference_opened: int = 0  # a special node, seen by the watch
    documented: list[str] = field(default_factory=list)  # where the two differ, by design
    problems: list[str] = field(default_factory=list)


def refusals_logged(stderr: str) -> list[tuple[str, str]]:
    """(path, refused) of every special-file refusal proxyd logged."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{") and '"refused"' in line:
            event = json.loads(line)
            found.append((event["path"], event["refused"]))
    return sorted(found)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("request_type", ["open", "create"])
def test_open_and_create_answer_as_open2(tmp_path: Path, request_type: str, kind: str) -> None:
    block_device = unused_block_device()
    roots = {"reference": tmp_path / "reference", "proxyd": tmp_path / "proxyd"}
    for root in roots.values():
        root.mkdir()
        for n in range(len(FLAG_SETS)):
            make(root / f"c{n}", kind, block_device)
    watchers = {name: Inotify() for name in roots}
    if kind in SPECIAL:
        for name, root in roots.items():
            for n in range(len(FLAG_SETS)):
                watchers[name].watch(root / f"c{n}" / "x")
    tally = Tally()
    expected_refusals = []
    servers = {name: start_server(name, root) for name, root in roots.items()}
    try:
        for n, flags in enumerate(FLAG_SETS):
            path = f"/c{n}/x"
            if request_type == "create":
                flags |= CREAT
                code, payload = CREATE, marshal("sdddd", path, flags, 0o640, 0, 0)
            else:
                code, payload = OPEN, marshal("sd", path, flags)
            what = f"{request_type.upper()} {flag_text(flags)} of a {kind}"
            results, blocked = {}, {}
            for name, srv in servers.items():
                fifo = roots[name] / f"c{n}" / "x" if kind == "fifo" else None
                reply, blocked[name] = fd_call(srv, code, payload, fifo)
                results[name] = outcome(reply)
            used = {
                name: [e for e in w.read() if e.mask & NODE_USED] for name, w in watchers.items()
            }
            tally.cases += 1
            ref, ours = results["reference"], results["proxyd"]
            if ours != ref:
                tally.problems.append(f"{what}: reference {describe(ref)}, proxyd {describe(ours)}")
            if blocked["proxyd"]:
                tally.problems.append(f"{what}: proxyd blocked in the FIFO's open")
            if used["proxyd"]:
                tally.problems.append(f"{what}: proxyd opened the node: {used['proxyd']}")
            if blocked["reference"]:
                tally.reference_blocked += 1
                tally.documented.append(f"{what}: the reference blocked until a peer came")
            elif any(e.mask & IN_OPEN for e in used["reference"]):
                tally.reference_opened += 1
                tally.documented.append(f"{what}: the reference opened it, then said ENXIO")
            if ours == (errno.ENXIO,):
                refused = SPECIAL.get(kind, "symlink")  # O_PATH|O_NOFOLLOW of a symlink
                expected_refusals.append((path, f"special file ({refused})"))
    finally:
        for srv in servers.values():
            srv.stop()
        for w in watchers.values():
            w.close()
    diff = tree_diff(snapshot(roots["reference"], set()), snapshot(roots["proxyd"], set()))
    if diff:
        tally.problems.append("host trees differ:\n" + "\n".join(diff))
    logged = refusals_logged(servers["proxyd"].stderr)
    if logged != sorted(expected_refusals):
        tally.problems.append(
            f"refusals logged {logged}\n  expected (one per ENXIO) {sorted(expected_refusals)}"
        )
    print(
        f"{request_type} x {kind}: {tally.cases} cases,"
        f" reference blocked {tally.reference_blocked},"
        f" reference opened the node {tally.reference_opened},"
        f" proxyd refused {len(expected_refusals)}, problems {len(tally.problems)}"
    )
    print("\n".join(tally.documented))
    assert not tally.problems, "\n".join(tally.problems)
    assert tally.cases == len(FLAG_SETS) == 100
    # The matrix reaches what it is about: the reference does block on the FIFO, and does
    # run the devices' open routines, where proxyd answers at once and opens nothing.
    if kind == "fifo":
        assert tally.reference_blocked > 0
    if kind in ("char-device", "block-device"):
        assert tally.reference_opened > 0


def test_the_matrix_reaches_the_open_rules() -> None:
    """The flag sets hold the cases of issue 10.4 (and so can fail on them)."""
    assert len(FLAG_SETS) == len(set(FLAG_SETS)) == 100
    assert RW | EXCL in FLAG_SETS  # CREATE O_RDWR|O_CREAT|O_EXCL: EEXIST, not ENXIO
    assert RD | NOFOLLOW | DIRECTORY in FLAG_SETS  # symlink to a directory: ENOTDIR
    assert O_PATH | NOFOLLOW in FLAG_SETS
    assert {"fifo", "socket", "char-device", "block-device", "missing"} <= set(KINDS)


@pytest.mark.parametrize("kind", ["fifo", "char-device"])
def test_a_check_open2_makes_after_the_type_is_not_repeated(tmp_path: Path, kind: str) -> None:
    """A documented difference: open(2) refuses O_NOATIME by a user who does not own the
    node (EPERM) after it has looked at the node's type; proxyd refuses the special file
    (ENXIO) without asking open(2)."""
    for server, want in (("reference", errno.EPERM), ("proxyd", errno.ENXIO)):
        export = tmp_path / server
        export.mkdir()
        make(export / "c", kind, 0)
        with start_server(server, export) as srv:
            reply = srv.client.create("/c/x", CREAT | RD | os.O_NOATIME, 0o600, 1000, 1000)
        assert (reply.fd, errno_of(reply)) == (None, want), (server, reply)


@pytest.mark.parametrize(
    "kind", ["regular", "directory", "symlink-to-file", "dangling-symlink", "missing"]
)
@pytest.mark.parametrize("server", ["reference", "proxyd"])
def test_getversion_keeps_its_answers(tmp_path: Path, server: str, kind: str) -> None:
    """GETVERSION opens read-only, as before: the generation, or open(2)'s errno."""
    export = tmp_path / "export"
    export.mkdir()
    make(export / "c", kind, 0)
    with start_server(server, export) as srv:
        reply = srv.client.getversion("/c/x")
    if kind in ("dangling-symlink", "missing"):
        assert errno_of(reply) == errno.ENOENT, reply
        return
    assert reply.ok, reply
    assert len(reply.data or b"") == 8
    if server == "proxyd":  # the reference's upper 32 bits are stack garbage
        fd = os.open(export / "c" / "x", os.O_RDONLY)
        try:
            want = int.from_bytes(fcntl.ioctl(fd, 0x80087601, bytes(8))[:4], sys.byteorder)
        finally:
            os.close(fd)
        assert decode_q(reply.data or b"") == want


# --- host leases -----------------------------------------------------------------------------

# A host process that takes a lease on a file and, when the kernel tells it another open
# wants the file (SIGIO), lets go a moment later ("hold" seconds: its own work, flushing a
# cache as a Samba oplock break does), or never (hold < 0). It reports on stdout, with
# time.monotonic() (one clock for every process), and lives until it is terminated.
HOLDER = r"""
import fcntl, os, signal, sys, time
path, kind, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGIO])
fd = os.open(path, os.O_RDONLY if kind == "read" else os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK if kind == "read" else fcntl.F_WRLCK)
print("leased", flush=True)
signal.sigwait([signal.SIGIO])
print("breaking", time.monotonic(), flush=True)
if hold >= 0:
    time.sleep(hold)
    print("releasing", time.monotonic(), flush=True)  # no open can complete before this
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
while True:
    signal.pause()
"""
HOLD = 0.3  # seconds the holder takes to let go


class LeaseHolder:
    """The holder process; `finish()` ends it and returns what it reported."""

    def __init__(self, path: Path, kind: str, hold: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), kind, str(hold)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "leased\n", f"the holder could not take a {kind} lease: {line!r}"

    def finish(self) -> dict[str, float]:
        """End the holder (its lease goes with it); {"breaking": t, "releasing": t} as far
        as it got."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        report = {}
        for line in out.splitlines():
            word, at = line.split()
            report[word] = float(at)
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# name: (request, the lease, what the descriptor must do)
LEASE_CASES: dict[str, tuple[Callable[[ProxyClient], Reply], str, str]] = {
    "OPEN O_WRONLY, read lease": (lambda c: c.open("/f", WR), "read", "write"),
    "OPEN O_WRONLY|O_TRUNC, read lease": (lambda c: c.open("/f", WR | TRUNC), "read", "write"),
    "OPEN O_RDONLY|O_TRUNC, write lease": (lambda c: c.open("/f", RD | TRUNC), "write", "empty"),
    "CREATE of the existing file, read lease": (
        lambda c: c.create("/f", CREAT | WR, 0o644, 0, 0),
        "read",
        "write",
    ),
    "OPEN O_RDONLY, write lease": (lambda c: c.open("/f", RD), "write", "read"),
    "GETVERSION, write lease": (lambda c: c.getversion("/f"), "write", "generation"),
}


@pytest.mark.parametrize("case", list(LEASE_CASES))
@pytest.mark.parametrize("server", ["reference", "proxyd"])
def test_open_waits_for_the_lease_break(tmp_path: Path, server: str, case: str) -> None:
    request, lease, use = LEASE_CASES[case]
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_bytes(CONTENT)
    holder = LeaseHolder(export / "f", lease, HOLD)
    try:
        with start_server(server, export) as srv:
            assert srv.client.lstat("/").ok  # serving: time the request alone
            sent = time.monotonic()
            reply = request(srv.client)
            answered = time.monotonic()
        report = holder.finish()
    finally:
        holder.kill()
    assert reply.ok, f"{server} {case}: {reply}"
    # The open cannot complete before the lease is gone: the server waited for the break.
    assert "breaking" in report and "releasing" in report, report
    assert answered > report["releasing"], (answered, report)
    print(
        f"{server}, {case}: answered {answered - sent:.3f} s after the request, "
        f"{answered - report['releasing']:.4f} s after the holder let go"
    )
    if use == "generation":
        assert len(reply.data or b"") == 8
        return
    assert reply.fd is not None
    try:
        if use == "write":
            os.write(reply.fd, b"new\n")
        elif use == "read":
            assert os.read(reply.fd, 100) == CONTENT
    finally:
        os.close(reply.fd)
    if use == "write":
        assert (export / "f").read_bytes().startswith(b"new\n")
    elif use == "empty":
        assert (export / "f").read_bytes() == b""


@pytest.mark.parametrize(
    ("flags", "lease"), [(WR | NONBLOCK, "read"), (RD | NONBLOCK, "write"), (RW | NONBLOCK, "read")]
)
@pytest.mark.parametrize("server", ["reference", "proxyd"])
def test_o_nonblock_asked_for_gets_ewouldblock(
    tmp_path: Path, server: str, flags: int, lease: str
) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_bytes(CONTENT)
    holder = LeaseHolder(export / "f", lease, -1)  # never lets go: an answer did not wait
    try:
        with start_server(server, export) as srv:
            reply = srv.client.open("/f", flags)
            assert (reply.fd, errno_of(reply)) == (None, errno.EWOULDBLOCK), reply
            assert srv.client.lstat("/f").ok
        report = holder.finish()
    finally:
        holder.kill()
    assert "breaking" in report  # the break was started all the same, as open(2) does
    assert (export / "f").read_bytes() == CONTENT


def test_a_lease_never_released_costs_one_eio(tmp_path: Path) -> None:
    """The wait is bounded by request_timeout: the master kills the worker and answers EIO
    (a hung request), the guest keeps its mount, and once the lease is gone the file opens."""
    with Daemon(tmp_path, [{"name": "a"}], request_timeout=1.0) as d:
        host_file = Path(d.exports["a"]["path"]) / "f"
        host_file.write_bytes(CONTENT)
        c = d.connect("a")
        assert c.lstat("/f").ok
        holder = LeaseHolder(host_file, "read", -1)
        try:
            reply = c.open("/f", WR)
            assert (reply.fd, errno_of(reply)) == (None, errno.EIO), reply
            d.wait_event("request timed out, killing worker", op="open")
            d.wait_event("crash recovery", outcome="answered EIO", op="open")
            assert c.lstat("/f").ok  # the guest keeps its mount
            report = holder.finish()
        finally:
            holder.kill()
        assert "breaking" in report and "releasing" not in report
        reply = c.open("/f", WR)  # the holder is gone, and its lease with it
        assert reply.fd is not None, reply
        os.write(reply.fd, b"new\n")
        os.close(reply.fd)
    assert host_file.read_bytes().startswith(b"new\n")


# --- a real guest ----------------------------------------------------------------------------

GUEST_WRITE = """
if echo new > f; then echo "GUEST-WRITE ok"; else echo "GUEST-WRITE failed"; fi
echo "GUEST-READ $(cat f)"
"""


@pytest.mark.parametrize("server", ["reference", "proxyd"])
def test_guest_writes_a_leased_file(tmp_path: Path, server: str) -> None:
    """The reproduction of 10.3: `echo new > f` in a guest while a host process holds a
    read lease on f. It waits for the holder and succeeds (it used to fail with
    "Resource temporarily unavailable")."""
    ensure_guest_built()
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_bytes(CONTENT)
    srv = start_server(server, export, timeout=None)
    holder = LeaseHolder(export / "f", "read", HOLD)
    try:
        # The guest's QEMU talks to the server over our end of the socketpair.
        with Guest(GUEST_WRITE, sock_fd=srv.client.sock.fileno()) as guest:
            result = guest.wait(timeout=300)
        report = holder.finish()
    finally:
        holder.kill()
        srv.stop()
    assert result.mounted, result.output
    assert "GUEST-WRITE ok" in result.output, result.output
    assert "GUEST-READ new" in result.output, result.output
    assert "Resource temporarily unavailable" not in result.output
    assert "breaking" in report and "releasing" in report, report
    assert (export / "f").read_bytes() == b"new\n"
