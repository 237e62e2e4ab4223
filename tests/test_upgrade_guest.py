"""Issue 12 with a real guest: upgrades and master deaths under the shipped supervisord.

A real supervisord runs conf/supervisord.conf (localized as tests/test_supervisor.py does);
a QEMU guest (tests/guest.py) mounts the export over 9p through proxyd and touches files
without pause (WORKLOAD: create and write, read back, rename, stat, append, remove, each
step checked) until the test creates `stop` in the export. Meanwhile proxyd is upgraded
between two installed versions (tests/test_upgrade.py `Installed`: the program's command
is a script whose target the test switches), or its master is SIGKILLed and supervisord
starts it again. The guest must see no error either way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import children, title, wait_until
from tests.guest import Guest, GuestResult, ensure_guest_built
from tests.proxyclient import ConnectionClosed, ProxyClient
from tests.test_supervisor import Supervisor
from tests.test_upgrade import Installed

# Runs as /workload.sh in the guest (busybox sh), cwd = the share. MAX_S is set by a line
# put before it. One "FAIL ROUND STEP DETAIL" line per failed step; "GUEST-ROUND N" every
# 5 rounds so the host can see progress; "GUEST-STOPPED by=stop|time rounds=N failures=N"
# at the end; the exit status is non-zero if any step failed.
WORKLOAD = r"""
failures=0 n=0
fail() {
    echo "FAIL $n $*"
    failures=$((failures + 1))
}
rm -rf work journal
mkdir work || fail mkdir
: >journal || fail journal
start=$(date +%s) by=time
while [ $(($(date +%s) - start)) -lt "$MAX_S" ]; do
    if [ -e stop ]; then
        by=stop
        break
    fi
    # 1 to 400 bytes, different in every round.
    data="$n $(printf "%0$((n % 400))d" 0)"
    printf '%s' "$data" >work/a.$n || fail create
    got=$(cat work/a.$n) || fail read
    [ "$got" = "$data" ] || fail read-back "got ${#got} bytes, want ${#data}"
    mv work/a.$n work/b.$n || fail rename
    [ ! -e work/a.$n ] || fail rename "the old name is still there"
    size=$(stat -c %s work/b.$n) || fail stat
    [ "$size" = "${#data}" ] || fail stat "size $size, want ${#data}"
    echo $n >>journal || fail append
    rm work/b.$n || fail remove
    [ ! -e work/b.$n ] || fail remove "still there"
    n=$((n + 1))
    [ $((n % 5)) -ne 0 ] || echo "GUEST-ROUND $n"
done
lines=$(wc -l <journal) || fail journal
[ "$lines" -eq "$n" ] || fail journal "$lines lines after $n rounds"
echo "GUEST-STOPPED by=$by rounds=$n failures=$failures"
[ $failures -eq 0 ]
"""
MAX_S = 900  # the workload's own limit, far beyond what the tests need: they stop it
GUEST_TIMEOUT = MAX_S + 120


@pytest.fixture(scope="module")
def guest_images() -> None:
    ensure_guest_built()  # once, outside any test's timing


def start_guest(sup: Supervisor) -> Guest:
    """Boot a guest on the export's socket; wait until its workload is going."""
    guest = Guest(f"MAX_S={MAX_S}\n{WORKLOAD}", socket_path=str(sup.socket))
    try:
        guest.wait_for_line(r"^GUEST-ROUND 5$", timeout=300)
    except BaseException:
        guest.kill()
        print(f"--- guest ---\n{guest.output()}")
        raise
    return guest


def rounds(guest: Guest) -> int:
    """The last round the guest reported."""
    found = re.findall(r"^GUEST-ROUND (\d+)$", guest.output(), re.M)
    return int(found[-1]) if found else 0


def wait_progress(guest: Guest, what: str) -> None:
    """Wait for two more of the guest's progress lines (10 rounds): it is being served."""
    now = rounds(guest)
    wait_until(lambda: rounds(guest) >= now + 10, 120, f"guest progress ({what})")


def stop_guest(sup: Supervisor, guest: Guest) -> GuestResult:
    """Ask the workload to stop (the file `stop` in the export); its result."""
    (sup.export / "stop").touch()
    result = guest.wait(GUEST_TIMEOUT)
    print(f"--- guest ({result.duration:.0f} s) ---\n{result.output}")
    return result


def check_workload(sup: Supervisor, result: GuestResult) -> int:
    """The workload passed, ran until the test stopped it, and left a journal with one
    line per round, in order. Returns the number of rounds."""
    failed = [line for line in result.output.splitlines() if line.startswith("FAIL ")]
    assert not failed, "\n".join(failed)
    stopped = re.search(r"^GUEST-STOPPED by=(\w+) rounds=(\d+) failures=0$", result.output, re.M)
    assert stopped, "the workload did not finish"
    assert stopped[1] == "stop", "the workload ran out of time before the test was done"
    assert result.exit_status == 0 and result.qemu_returncode == 0
    n = int(stopped[2])
    assert (sup.export / "journal").read_text() == "".join(f"{i}\n" for i in range(n))
    assert list((sup.export / "work").iterdir()) == []
    return n


def master_pid(sup: Supervisor) -> int:
    return int(sup.ctl("pid", "proxyd").stdout)


def uptime(sup: Supervisor) -> int:
    """Seconds supervisord says proxyd has been up (`status`: `uptime H:MM:SS`)."""
    out = sup.ctl("status", "proxyd").stdout
    found = re.search(r"RUNNING\s+pid \d+, uptime (\d+):(\d\d):(\d\d)$", out.strip())
    assert found, out
    hours, minutes, seconds = map(int, found.groups())
    return hours * 3600 + minutes * 60 + seconds


def status(sup: Supervisor) -> dict[str, Any]:
    return json.loads(sup.ctl("proxyd", "status", "--json").stdout)


def records(sup: Supervisor) -> list[dict[str, Any]]:
    """Every proxyd JSON line supervisord captured, in order."""
    found = []
    for line in sup.log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append(record)
    return found


def serving(master: int, guest: Guest) -> int | None:
    """The worker of `master` whose title says it serves the guest's QEMU."""
    for pid in children(master):
        if title(pid).startswith("proxyd: worker ") and f" peer={guest.proc.pid}" in title(pid):
            return pid
    return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# --- 1. upgrades ------------------------------------------------------------------------------


def test_guest_keeps_its_share_across_upgrades(tmp_path: Path, guest_images: None) -> None:
    """Four upgrades between two installed versions, by `supervisorctl proxyd upgrade`
    and `supervisorctl signal USR2 proxyd` in turn, then two refused ones (a copy with a
    syntax error), while a guest touches files without pause."""
    installed = Installed(tmp_path / "installed")
    versions = {name: installed.build(name) for name in ("a", "b")}
    installed.build("broken", {"cli.py": ("def main(", "def main(:")})
    installed.install("a")
    sup = Supervisor(tmp_path / "sup", proxyd=installed.script)
    guest = None
    try:
        pid = sup.wait_running()
        assert status(sup)["version"] == versions["a"]
        guest = start_guest(sup)
        since, up = time.monotonic(), uptime(sup)
        running = versions["a"]
        conn, requests = guest_connection(status(sup), guest)
        for n, name in enumerate(["b", "a", "b", "a"], start=1):
            before = set(children(pid))
            installed.install(name)
            if n % 2:
                answer = sup.ctl("proxyd", "upgrade").stdout
                assert answer == f"upgraded from {running} to {versions[name]}\n"
            else:
                sup.ctl("signal", "USR2", "proxyd")
            wait_until(lambda n=n: len(sup.events("upgrade done")) >= n, 60, f"upgrade {n} done")
            doc = status(sup)
            assert (doc["pid"], doc["version"], doc["upgrades"]) == (pid, versions[name], n)
            assert master_pid(sup) == pid
            # The same connection, its count carried on.
            conn, requests = guest_connection(doc, guest, conn, requests)
            # Never reset: up at least as long as since the first look (it counts whole s).
            assert uptime(sup) >= up + int(time.monotonic() - since) - 1
            # The old program's workers leave at request boundaries, the guest's too: its
            # connection moves to a worker of the new program.
            # Every worker is one the new program spawned (its `worker spawned` line
            # follows `upgrade done`).
            wait_until(
                lambda b=before, n=n: (
                    not b & set(children(pid))
                    and serving(pid, guest) is not None
                    and set(children(pid)) <= new_workers(sup, n)
                ),
                60,
                f"upgrade {n}: only the new program's workers, the guest served by one",
            )
            wait_progress(guest, f"after upgrade {n}")
            print(f"upgrade {n} to {versions[name]}: guest at round {rounds(guest)}")
            running = versions[name]

        # A program that cannot start: refused, by command and by signal.
        installed.install("broken")
        refused = sup.ctl("proxyd", "upgrade", check=False)
        assert refused.returncode != 0
        assert refused.stdout.startswith("Error: upgrade refused: the new program refuses to start")
        sup.ctl("signal", "USR2", "proxyd")
        wait_until(lambda: len(sup.events("upgrade refused")) >= 2, 60, "two upgrades refused")
        doc = status(sup)
        assert (doc["pid"], doc["version"], doc["upgrades"]) == (pid, versions["a"], 4)
        wait_progress(guest, "after the refusals")

        result = stop_guest(sup, guest)
        done = check_workload(sup, result)
        print(f"the guest made {done} rounds; uptime {uptime(sup)} s, master {pid} throughout")
        assert master_pid(sup) == pid
        assert uptime(sup) >= up + int(time.monotonic() - since) - 1
        assert "exited: proxyd" not in sup.supervisord_log.read_text()
        assert not [r for r in records(sup) if r.get("level") in ("error", "critical")]
        assert not sup.events("worker died") and not sup.events("crash recovery")
        assert unaudited(sup, done) == []
        reasons = [r["reason"] for r in sup.events("upgrade refused")]
        assert len(reasons) == 2, reasons
        assert all(r.startswith("the new program refuses to start: SyntaxError") for r in reasons)
    finally:
        if guest is not None:
            guest.kill()
        print(f"--- logs ---\n{sup.logs()}")
        sup.close()


def guest_connection(
    doc: dict[str, Any], guest: Guest, conn: int | None = None, requests: int = 0
) -> tuple[int, int]:
    """(id, requests) of the guest's connection in a `proxyd status` document; it must
    be `conn` (if given) and have served more than `requests`."""
    mine = [c for c in doc["connections"] if c["peer_pid"] == guest.proc.pid]
    assert len(mine) == 1, doc["connections"]
    assert conn is None or mine[0]["id"] == conn, (conn, mine)
    assert mine[0]["requests"] > requests, (requests, mine)
    return mine[0]["id"], mine[0]["requests"]


def unaudited(sup: Supervisor, n: int) -> list[int]:
    """The workload's rounds (of the first `n`) whose CREATE, RENAME or REMOVE has no
    `op` line in the log (the default audit level, mutations, covers all three)."""
    seen = {(r["op"], r["path"].lstrip("/")) for r in records(sup) if r.get("event") == "op"}
    return [
        i
        for i in range(n)
        if not {("create", f"work/a.{i}"), ("rename", f"work/a.{i}"), ("remove", f"work/b.{i}")}
        <= seen
    ]


def new_workers(sup: Supervisor, n: int) -> set[int]:
    """Pids of the workers spawned after the n-th `upgrade done` (by the new program)."""
    spawned, done = set(), 0
    for record in records(sup):
        if record.get("event") == "upgrade done":
            done += 1
        elif record.get("event") == "worker spawned" and done >= n:
            spawned.add(record["worker_pid"])
    return spawned


# --- 2. the master's death ----------------------------------------------------------------------


def first_served(path: Path, timeout: float = 60) -> float:
    """Poll: connect to `path` and ask LSTAT of the export's root until a reply comes.
    Returns time.monotonic() of that reply. Raises AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            client = ProxyClient(sock, timeout=5)
            if client.lstat("/").ok:
                return time.monotonic()
        except (OSError, ConnectionClosed):
            pass  # not bound again yet (ECONNREFUSED, ENOENT), or closed: poll on
        finally:
            sock.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing served {path} within {timeout} s")
        time.sleep(0.01)


def proxyd_processes(sup: Supervisor) -> dict[int, str]:
    """{pid: title} of every live proxyd process of this test: titled `proxyd: `, and
    descended from its supervisord, or naming its directory, or chrooted in its export
    (a dead master's orphaned workers belong to init)."""
    export = sup.export.stat()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        text = title(pid)
        if not text.startswith("proxyd: "):
            continue
        try:
            root = os.stat(f"/proc/{pid}/root")
        except OSError:
            continue
        ours = str(sup.root) in text or (root.st_dev, root.st_ino) == (export.st_dev, export.st_ino)
        if ours or descends(pid, sup.proc.pid):
            found[pid] = text
    return found


def descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False


def test_guest_keeps_its_share_when_the_master_dies(tmp_path: Path, guest_images: None) -> None:
    """SIGKILL the master twice while a guest touches files: once a few rounds into the
    workload, once after the restarted master adopted the guest's connection and moved
    it to a worker of its own. supervisord starts proxyd again each time; the guest sees
    no error; in the end only the last master and its workers are left."""
    sup = Supervisor(tmp_path)
    guest = None
    try:
        master = sup.wait_running()
        guest = start_guest(sup)
        times = []
        for kill in (1, 2):
            # The guest is served by a worker of this master (after the first kill: the
            # adopted connection has moved to one).
            orphan = wait_until(lambda m=master: serving(m, guest), 60, "the guest's worker")
            idle = set(children(master)) - {orphan}
            killed_at, killed_wall, at_round = time.monotonic(), time.time(), rounds(guest)
            os.kill(master, signal.SIGKILL)
            served = first_served(sup.socket) - killed_at
            # The others leave with their master; the guest's goes on (adopted below).
            wait_until(lambda i=idle: not any(alive(p) for p in i), 30, "idle workers gone")
            new = sup.wait_running(timeout=60, not_pid=master)
            adopted = wait_until(
                lambda k=kill: (
                    len(sup.events("connection adopted")) >= k
                    and sup.events("connection adopted")[k - 1]
                ),
                60,
                f"connection adopted after kill {kill}",
            )
            assert (adopted["worker_pid"], adopted["peer_pid"]) == (orphan, guest.proc.pid)
            assert adopted["pid"] == new
            probe = [r for r in sup.events("connection accepted") if r["peer_pid"] == os.getpid()]
            assert probe[-1]["pid"] == new, "the probe was not served by the new master"
            adopted_after = to_unix(adopted["timestamp"]) - killed_wall
            times.append(served)
            print(
                f"kill {kill} at round {at_round}: a new connection served "
                f"{served:.2f} s after the kill, the guest's adopted {adopted_after:.2f} s after"
            )
            # It moves to a worker of the new master at a request boundary.
            wait_until(
                lambda n=new, o=orphan: not alive(o) and serving(n, guest) is not None,
                60,
                "the guest's connection on a worker of the new master",
            )
            wait_progress(guest, f"after kill {kill}")
            master = new

        result = stop_guest(sup, guest)
        done = check_workload(sup, result)
        print(
            f"the guest made {done} rounds; kill to serving: "
            + ", ".join(f"{t:.2f} s" for t in times)
            + f"; rounds with no audit line: {unaudited(sup, done)}"
        )

        # Nothing left but the last master and its workers (exiting ones are reaped soon).
        def only_ours() -> bool:
            left = proxyd_processes(sup)
            workers = set(left) - {master}
            return (
                left.get(master, "").startswith("proxyd: master [")
                and workers == set(children(master))
                and all(left[w].startswith("proxyd: worker ") for w in workers)
            )

        wait_until(only_ours, 30, f"only master {master} and its workers")
        assert master_pid(sup) == master
        assert sup.supervisord_log.read_text().count("terminated by SIGKILL; not expected") == 2
        assert len(sup.events("connection adopted")) == 2
        assert not [r for r in records(sup) if r.get("level") in ("error", "critical")]
    finally:
        if guest is not None:
            guest.kill()
        print(f"--- logs ---\n{sup.logs()}")
        sup.close()


def to_unix(timestamp: str) -> float:
    """A log line's `timestamp` (UTC, ISO 8601 with a Z) as Unix time."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


# --- 3. what a dead master's worker serves is audited --------------------------------------------


def mutate(client: ProxyClient, name: str) -> None:
    """CREATE /NAME, RENAME it to /NAME.2, REMOVE that: three audited requests."""
    reply = client.create(f"/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, 0, 0)
    assert reply.ok, reply
    os.close(reply.fd)
    assert client.rename(f"/{name}", f"/{name}.2").ok
    assert client.remove(f"/{name}.2").ok


def test_what_an_orphan_serves_is_audited(tmp_path: Path) -> None:
    """The master is SIGKILLed and no master can start for a while (the program
    installed has a syntax error; supervisord retries): the worker serving a client goes
    on serving it. The requests it serves meanwhile must reach the audit trail like any
    other, and its `master gone` line reach the log. (Under the shipped supervisord
    configuration a worker's log is its stderr, the pipe to supervisord, which
    supervisord closes when it reaps the master: what the orphan writes then is lost.)"""
    installed = Installed(tmp_path / "installed")
    installed.build("good")
    installed.build("broken", {"cli.py": ("def main(", "def main(:")})
    installed.install("good")
    sup = Supervisor(tmp_path / "sup", proxyd=installed.script)
    try:
        master = sup.wait_running()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(sup.socket))
        client = ProxyClient(sock)
        mutate(client, "before")
        orphan = wait_until(
            lambda: next((p for p in children(master) if f" peer={os.getpid()}" in title(p)), 0),
            10,
            "the client's worker",
        )
        installed.install("broken")
        os.kill(master, signal.SIGKILL)
        # supervisord reaped the master (and closed its pipes) and tried a new one.
        wait_until(
            lambda: "exit status 1; not expected" in sup.supervisord_log.read_text(),
            60,
            "a failed start of the broken program",
        )
        mutate(client, "orphaned")  # no master runs: the orphan serves it
        assert alive(orphan) and not sup.events("connection adopted")

        installed.install("good")

        def running_again() -> bool:
            state = sup.state()
            if state == "FATAL":  # supervisord gave up on the broken program
                sup.ctl("start", "proxyd", check=False)
            return state == "RUNNING"

        wait_until(running_again, 60, "proxyd running again")
        new = sup.wait_running(not_pid=master)
        adopted = wait_until(lambda: sup.events("connection adopted"), 30, "adopted")
        assert (adopted[0]["worker_pid"], adopted[0]["pid"]) == (orphan, new)
        mutate(client, "adopted")  # by the orphan, or by a new worker if it handed on
        wait_until(lambda: not alive(orphan), 30, "the orphan handing on")
        mutate(client, "after")
        client.close()
        wait_until(lambda: sup.events("connection closed"), 30, "connection closed")

        audited = {(r["op"], r["path"]) for r in records(sup) if r.get("event") == "op"}
        missing = [
            (op, path)
            for name in ("before", "orphaned", "adopted", "after")
            for op, path in [
                ("create", f"/{name}"),
                ("rename", f"/{name}"),
                ("remove", f"/{name}.2"),
            ]
            if (op, path) not in audited
        ]
        # The orphan, handing on, finds its master gone and says so (docs/events.md).
        if not [r for r in sup.events("master gone") if r["pid"] == orphan]:
            missing.append(("master gone", f"worker {orphan}"))
        log = status(sup)["log"]
        assert missing == [], f"not in the log: {missing}; proxyd status: {log}"
    finally:
        print(f"--- logs ---\n{sup.logs()}")
        sup.close()
