"""A real guest keeps its share while the worker serving it is killed again and again.

Issue 11's "done when": Debian's stress-ng runs metadata-heavy filesystem stressors in the test
guest, on the 9p share, for SOAK seconds, while a killer thread SIGKILLs the worker serving the
guest every 1-2 s, aiming at a moment when it is executing a request. The guest must keep its
mount to the end, requests that change nothing must be invisible (executed again), and only
mutations in flight may fail, with EIO (README, "When a worker dies").
"""

from __future__ import annotations

import collections
import errno
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.daemon import SYS_OPENAT, SYS_RECVFROM, Daemon, wait_until
from tests.guest import Guest, ensure_guest_built
from tests.test_e2e_guest import accepted_from, show_guest, show_log

SOAK = 180  # seconds of stress-ng on the share
KILL_EVERY = (1.0, 2.0)  # seconds between kills, drawn uniformly
AIM = 2.0  # seconds the killer tries to catch a request executing before killing an idle worker
MIN_IN_FLIGHT = 20  # kills that must land while a request executes ("executed again" or EIO)
KILLER_STOPPED = "killer-stopped"  # left in the export by the host once no kill can come

# Requests that change nothing (README: executed again after a death) and those that may
# change the export (EIO after a death). OPEN is both: read-only without O_CREAT/O_TRUNC
# (executed again), a change with them (EIO); the log names the op, not its flags.
READ_ONLY_OPS = {"lstat", "readlink", "statfs", "lgetxattr", "llistxattr", "getversion"}
MUTATING_OPS = {
    "create", "mknod", "mkdir", "symlink", "link", "chmod", "chown", "truncate", "utime",
    "rename", "remove", "lsetxattr", "lremovexattr",
}  # fmt: skip

# stress-ng's filesystem stressors that run on 9p (each tried alone in this guest) and
# work on metadata in its temporary directory, the share: directories made and removed
# (dir, dentry's creates, unlinks and lookups of missing names), renames, attribute
# changes (chmod, chown, utime), file and node creation (touch, mknod), links and symlinks
# (with readlink); and read-heavy ones: fstat (stat, lstat, open of every file of a
# directory of the share), chdir (path walks: LSTATs), access (permission checks).
STRESSORS = [
    "dir", "dentry", "rename", "chmod", "chown", "utime", "touch", "mknod", "link", "symlink",
    "chdir", "access",
]  # fmt: skip

# Calls whose EIO a stressor may report: they change the export. open and fopen too: the
# stressors that report them (dentry, touch, rename) open to create or truncate; fstat's
# opens are read-only. The daemon's side says only "open", not the flags: they are
# checked where a kill caught the worker in openat.
MUTATING_CALLS = [
    "open", "fopen",
    "mkdir", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat",
    "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown",
    "fchownat", "utime", "utimes", "futimes", "futimens", "utimensat", "creat", "mknod",
    "mknodat",
]  # fmt: skip

WORKLOAD = f"""
# A read-only tree for fstat: files, a directory, a symlink; the host checks it afterwards.
mkdir -p ro/sub stress || echo "FAIL setup"
i=0
while [ $i -lt 32 ]; do echo "file $i" >ro/f$i || echo "FAIL setup f$i"; i=$((i + 1)); done
ln -s f0 ro/link
echo GUEST-SOAK-BEGIN
cd stress || echo "FAIL cd stress"
stress-ng {" ".join(f"--{s} 1" for s in STRESSORS)} --fstat 1 --fstat-dir /mnt/ro \\
    --timeout {SOAK}s --metrics-brief 2>&1
echo "GUEST-STRESS-NG-EXIT=$?"
cd /mnt
echo GUEST-SOAK-END
# The host stops its killer, whose last aim may outlast the soak, and then leaves this
# file: the checks below are of a share whose worker is no longer being killed.
i=0
while [ ! -e /mnt/{KILLER_STOPPED} ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i + 1)); done
[ -e /mnt/{KILLER_STOPPED} ] || echo "FAIL the host did not stop its killer"
# The share after the soak: still mounted, listing, writing, reading, removing, statfs.
ls /mnt >/dev/null || echo "FAIL ls /mnt failed"
echo after >after.txt || echo "FAIL write failed"
[ "$(cat after.txt)" = after ] || echo "FAIL read back failed"
rm after.txt || echo "FAIL rm failed"
i=0
while [ $i -lt 32 ]; do
    [ "$(cat ro/f$i)" = "file $i" ] || echo "FAIL ro/f$i"
    i=$((i + 1))
done
df /mnt >/dev/null || echo "FAIL df failed"
echo GUEST-CHECKED
"""


@dataclass
class Killer:
    """A thread that SIGKILLs the worker serving connection `conn` every KILL_EVERY
    seconds, aimed by ``aim``: each kill lands while a request executes, or, if none was
    caught within AIM seconds, while the worker sleeps waiting for one."""

    daemon: Daemon
    conn: int
    seed: int
    kills: list[tuple[int, list[str]]] = field(default_factory=list)  # (pid, aim's answer)
    errors: list[BaseException] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="killer", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(60)

    def _serving(self) -> int | None:
        killed = {pid for pid, _ in self.kills}
        for pid, text in self.daemon.worker_titles().items():
            if f" conn={self.conn} " in text + " " and pid not in killed:
                return pid
        return None

    def _run(self) -> None:
        rng = random.Random(self.seed)
        try:
            while not self.done.wait(rng.uniform(*KILL_EVERY)):
                pid = self._serving()
                if pid is None:  # between a death and the hand-over: next turn
                    continue
                try:
                    where = aim(pid, AIM)
                    os.kill(pid, signal.SIGKILL)  # also ends a stopped process
                except ProcessLookupError:
                    continue
                self.kills.append((pid, where))
        except BaseException as e:  # shown by the test, not lost in the thread
            self.errors.append(e)


# x86-64 system calls (asm/unistd_64.h) that a worker makes only while it executes a
# request: its handler's file system calls, the ioctl of GETVERSION, the switch to and
# from the guest's uid and gid. Not close (3): it also follows an fd reply's sendmsg.
REQUEST_CALLS = {
    "4", "5", "6", "262", "332",  # stat, fstat, lstat, newfstatat, statx
    "2", "257", "437", "16",  # open, openat, openat2, ioctl
    "76", "77", "82", "264", "316",  # truncate, ftruncate, rename, renameat, renameat2
    "83", "258", "84", "86", "265",  # mkdir, mkdirat, rmdir, link, linkat
    "87", "263", "88", "266", "89", "267",  # unlink(at), symlink(at), readlink(at)
    "90", "91", "268", "92", "93", "94", "260",  # chmod, fchmod(at), (f/l)chown, fchownat
    "133", "259", "137", "138",  # mknod, mknodat, statfs, fstatfs
    "188", "189", "191", "192", "194", "195", "197", "198",  # (l)set/get/list/removexattr
    "132", "235", "280",  # utime, utimes, utimensat
    "117", "119", "126",  # setresuid, setresgid, capset
}  # fmt: skip


def _syscall(pid: int) -> list[str]:
    """/proc/PID/syscall, split: "running", or a system call number ("-1": in user mode;
    for a stopped process, stopped there rather than on the way out of a call) and its six
    arguments (x86-64 keeps them in their registers across the call) in hex."""
    return Path(f"/proc/{pid}/syscall").read_text().split()


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    # Field 3 of /proc/PID/stat: "T" once the stop took effect (proc(5)).
    wait_until(
        lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] == "T",
        30,
        f"worker {pid} stopped",
    )


def aim(pid: int, patience: float) -> list[str]:
    """Leave worker `pid` at a point where a kill lands in a known state, and say which
    (``_syscall``): a system call of the request it is executing (the worker is stopped
    right after it, SIGSTOP), or recvfrom ("45": asleep, waiting for a request) once
    `patience` seconds passed without catching a request.

    Why stop first: /proc/PID/syscall says "running" for a woken worker that is still
    waiting for a CPU as well as for one executing, and on a loaded 2-core machine a kill
    sent on "running" mostly lands before the request was taken or after its reply
    (measured: 1 kill in 5 to 8 hit a request). Stopped, the worker's place is fixed:
    stopped on the way out of one of REQUEST_CALLS, it is executing a request when the
    SIGKILL comes. Anywhere else (in user mode, where the phase cannot be read, in
    recvfrom, or in a send, which may be interrupted before it sent and is then restarted),
    it is resumed with SIGCONT (an interrupted recvfrom is retried). Raises
    ProcessLookupError if the worker is gone, AssertionError if it could not be aimed at
    for a minute past `patience`."""
    deadline = time.monotonic() + patience
    try:
        while True:
            call = _syscall(pid)
            late = time.monotonic() - deadline
            if call[0] == str(SYS_RECVFROM):
                if late > 0:
                    return call
                continue
            if late > 60:  # a worker never idle, never in a request: say so, not spin
                raise AssertionError(f"worker {pid} could not be aimed at: {call}")
            if call[0] != "running" and call[0] not in REQUEST_CALLS:
                continue  # sending, logging, allocating memory: nothing to aim at
            _stop(pid)
            call = _syscall(pid)
            if call[0] in REQUEST_CALLS:
                return call  # stopped: the caller's SIGKILL finds it there
            os.kill(pid, signal.SIGCONT)
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None


def _misreported_eio(reported: int, what: str, directory: str, creates_eio: list[str]) -> bool:
    """A create's failure printed with statfs's ENOENT (no filesystem type), by a stressor
    whose temporary `directory` holds a CREATE the daemon answered EIO."""
    return (
        reported == errno.ENOENT
        and re.match(r"(?:fopen|open|creat)\b", what) is not None
        and "filesystem type" not in what
        and any(directory in path for path in creates_eio)
    )


def stress_ng_failures(
    output: str, creates_answered_eio: list[str]
) -> tuple[list[str], list[str], list[str]]:
    """stress-ng's lines reporting a failed call ("fail:" or "error:" with an errno), as
    (EIO from a call that changes the export, consequences of such an EIO, the rest).
    `creates_answered_eio`: the paths of the CREATEs the daemon answered EIO (their
    `crash recovery` lines name them).

    A consequence: a stressor's rmdir of its own temporary directory (tmp-stress-ng-...)
    failing with ENOTEMPTY. A request answered EIO may or may not have happened (README):
    a create that did, or a remove that did not, leaves an entry the stressor does not
    know of, whether it reported the EIO or, as most do for unlink and rmdir, ignored it.

    An EIO stress-ng misreports: its line for a failed fopen/open/creat names the file's
    filesystem type, found by statfs(2) of the file, in the same call that formats the
    errno; where the create did not happen that statfs fails and its ENOENT is what the
    line prints (no filesystem type). Such a line counts as an EIO only where the daemon
    answered EIO to a CREATE in that stressor's own temporary directory (seen in a QEMU
    trace: the guest's LCREATE got EIO, then a walk to the file got ENOENT)."""
    eio, consequences, other = [], [], []
    for line in output.splitlines():
        match = re.search(r"stress-ng: (?:fail|error): +\[(\d+)\] (\w+): (.*)", line)
        # "errno=5", "failed: 5 (Input/output error)" (access); not the summary lines.
        number = re.search(r"(?:errno=|failed: )(\d+)\b", match[3]) if match else None
        if match is None or number is None:
            continue
        pid, stressor, what = match[1], match[2], match[3]
        reported = int(number[1])
        if (
            reported == errno.EIO
            and any(re.search(rf"\b{call}\b", what) for call in MUTATING_CALLS)
        ) or _misreported_eio(
            reported, what, f"/tmp-stress-ng-{stressor}-{pid}-", creates_answered_eio
        ):
            eio.append(line)
        elif int(number[1]) == errno.ENOTEMPTY and re.search(r"rmdir '?\./tmp-stress-ng-", line):
            consequences.append(line)
        else:
            other.append(line)
    return eio, consequences, other


def test_guest_keeps_its_mount_while_busy_workers_are_killed(tmp_path: Path) -> None:
    ensure_guest_built()
    # audit = mutations, the default: each `crash recovery` line of a mutation answered
    # EIO names its path, which ties a misreported EIO to it (stress_ng_failures).
    with Daemon(tmp_path, [{"name": "vm"}], audit="mutations") as daemon:
        export = Path(daemon.exports["vm"]["path"])
        killer: Killer | None = None
        try:
            with Guest(
                WORKLOAD, socket_path=daemon.exports["vm"]["socket"], programs=["stress-ng"]
            ) as guest:
                try:
                    conn = accepted_from(daemon, guest)["conn"]
                    guest.wait_for_line(r"GUEST-SOAK-BEGIN$", timeout=300)
                    killer = Killer(daemon, conn, seed=conn)
                    guest.wait_for_line(r"GUEST-SOAK-END$", timeout=SOAK + 300)
                    killer.stop()
                    (export / KILLER_STOPPED).touch()
                    result = guest.wait(timeout=SOAK + 600)
                finally:
                    if killer is not None:
                        killer.stop()
                    show_guest("guest", guest)
            closed = daemon.wait_event("connection closed", timeout=30, role="master", conn=conn)
            # Every kill is judged (logged) before the connection could close.
            recoveries = daemon.events("crash recovery", conn=conn)
        finally:
            show_log(daemon)
        assert not killer.errors, killer.errors

        died = daemon.events("worker died")
        outcomes = collections.Counter(e["outcome"] for e in recoveries)
        by_op = collections.Counter(f"{e['outcome']}: {e['op']}" for e in recoveries)
        aimed = collections.Counter(call[0] for _, call in killer.kills)
        creates_eio = [
            e["path"] for e in recoveries if e["outcome"] == "answered EIO" and e["op"] == "create"
        ]
        eio, consequences, unexplained = stress_ng_failures(result.output, creates_eio)
        uncertain = daemon.events("connection closed after a crash: reply state unknown")
        poison = daemon.events("poison connection closed")
        print(
            f"kills: {len(killer.kills)} (system call the worker was stopped at, 45 = idle in "
            f"recvfrom: {dict(aimed)}); outcomes: {dict(outcomes)}; by op: {dict(by_op)}; "
            f"requests served: {closed[0]['requests']}; stress-ng EIO failures: {len(eio)}, "
            f"their consequences: {len(consequences)}, other failures: {len(unexplained)}; "
            f"reply state unknown: {len(uncertain)}; poison: {len(poison)}"
        )

        # The connection lived to the guest's poweroff. README: a death costs the guest its
        # mount only if the worker was replying and the master cannot tell whether the reply
        # left ("reply state unknown"); the kills here aim at requests executing, and the
        # idle kills land there only by bad luck: no run has hit it so far.
        assert not uncertain, uncertain
        assert not poison, poison  # no request killed three workers: none was poisonous
        assert closed[0]["reason"] == "eof", closed  # closed by the guest, at its poweroff
        # The guest kept its mount to the end: the checks after the soak all passed.
        assert result.mounted
        fails = [line for line in result.output.splitlines() if line.startswith("FAIL")]
        assert not fails, fails
        assert "GUEST-CHECKED" in result.output
        assert result.qemu_returncode == 0

        # Every kill was of the worker serving the guest, and was judged once.
        assert len(killer.kills) >= SOAK / 4, "the killer fell behind"
        assert sorted(e["worker_pid"] for e in died) == sorted(pid for pid, _ in killer.kills)
        assert all(e["conn"] == conn and e["signal"] == "SIGKILL" for e in died), died
        assert len(recoveries) == len(killer.kills)

        # A worker stopped right after a system call of a request was executing it: that
        # request was executed again (it changes nothing) or answered EIO (it may have
        # changed the export), and which one, for an OPEN, its flags decide.
        for (_, call), e in zip(killer.kills, recoveries, strict=True):
            if call[0] == str(SYS_RECVFROM):
                continue  # an idle worker: whatever came next, no request was cut short
            assert e["outcome"] in ("request executed again", "answered EIO"), (call, e)
            if call[0] == str(SYS_OPENAT) and e["op"] == "open":
                flags = int(call[3], 16)  # openat(dirfd, path, flags)
                changes = flags & (os.O_CREAT | os.O_TRUNC)
                assert (e["outcome"] == "answered EIO") == bool(changes), (
                    f"an OPEN with flags {flags:#x} killed in openat: {e['outcome']}"
                )
        # Read-only requests were invisible; only mutations got EIO.
        for e in recoveries:
            if e["outcome"] == "request executed again":
                assert e["op"] in READ_ONLY_OPS | {"open"}, e
            elif e["outcome"] == "answered EIO":
                assert e["op"] in MUTATING_OPS | {"open"}, e
        in_flight = outcomes["request executed again"] + outcomes["answered EIO"]
        # For scripts/test's line (imported here: tests/test_chaos.py imports this file).
        from tests.test_chaos import write_coverage

        write_coverage(
            "guest-soak",
            f"guest soak: {len(killer.kills)} kills, {in_flight} while executing",
            kills=len(killer.kills),
            executing=in_flight,
        )
        assert in_flight >= MIN_IN_FLIGHT, f"only {in_flight} kills hit a request executing"

        # What stress-ng saw: EIO from calls that change the export, each one an EIO reply
        # of the daemon's, and what such an EIO leaves behind; nothing else.
        assert not unexplained, unexplained
        assert len(eio) <= outcomes["answered EIO"], "more EIO failures than EIO replies"
        assert len(consequences) <= outcomes["answered EIO"], "more leftovers than EIO replies"

        # The host's copy of the read-only tree is intact.
        for i in range(32):
            assert (export / "ro" / f"f{i}").read_text() == f"file {i}\n"
