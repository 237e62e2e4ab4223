"""No guest loses its share when proxyd is upgraded or its master dies (issue 12).

Two "installed" proxyd programs are built from this checkout, differing in their version
(and, for the refusals, in what they can do), behind one `proxyd` script whose target the
tests switch, as a package upgrade switches what /usr/local/bin/proxyd runs. Clients are
separate processes doing verified I/O without pause (CREATE + write, OPEN + read back,
LSTAT, REMOVE); every reply is checked.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, children, title, wait_until
from tests.proxyclient import CHECKOUT, ProxyClient

VERSION = re.search(r'__version__ = "(.*)"', (CHECKOUT / "proxyd" / "__init__.py").read_text())[1]


class Installed:
    """`bin/proxyd` running whichever copy `current` points at."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.script = root / "bin" / "proxyd"
        self.script.parent.mkdir(parents=True)
        self.script.write_text(
            f"#!{sys.executable}\nimport sys\n"
            f"sys.path.insert(0, {str(root / 'current')!r})\n"
            "from proxyd.cli import main\nsys.exit(main())\n"
        )
        self.script.chmod(0o755)

    def build(self, name: str, edits: dict[str, tuple[str, str]] | None = None) -> str:
        """A copy of this checkout's proxyd whose version is VERSION+name; `edits` maps
        a module file to a (text, replacement) pair. Returns the version."""
        target = self.root / name / "proxyd"
        shutil.copytree(CHECKOUT / "proxyd", target, ignore=shutil.ignore_patterns("__pycache__"))
        version = f"{VERSION}+{name}"
        edits = {"__init__.py": (f'"{VERSION}"', f'"{version}"'), **(edits or {})}
        for module, (text, replacement) in edits.items():
            path = target / module
            assert text in path.read_text(), f"{module} has no {text!r}"
            path.write_text(path.read_text().replace(text, replacement))
        return version

    def install(self, name: str) -> None:
        """What `pip install` does for us here: `proxyd` now runs that copy."""
        link = self.root / "current.new"
        link.symlink_to(self.root / name)
        link.rename(self.root / "current")


def verified_io(socket_path: str, index: int, stop: Any, results: Any) -> None:
    rng_data = os.urandom(512)
    sock = __import__("socket").socket(__import__("socket").AF_UNIX)
    sock.connect(socket_path)
    client = ProxyClient(sock, timeout=30)
    rounds, errors = 0, []
    try:
        while not stop.is_set():
            name = f"/u{index}-{rounds}"
            data = rng_data[: 1 + rounds % 500]
            reply = client.create(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600, 0, 0)
            if reply.fd is None:
                errors.append(f"create {name}: {reply}")
                break
            os.write(reply.fd, data)
            os.close(reply.fd)
            reply = client.open(name, os.O_RDONLY)
            if reply.fd is None or os.read(reply.fd, 1024) != data:
                errors.append(f"read back {name}: {reply}")
                break
            os.close(reply.fd)
            if not (client.lstat(name).ok and client.remove(name).ok):
                errors.append(f"lstat/remove {name}")
                break
            rounds += 1
    except Exception as e:  # reported to the test, which fails on it
        errors.append(f"after {rounds} rounds: {e!r}")
    results.put((index, rounds, errors))


class Clients:
    """Client processes doing verified I/O until stopped."""

    def __init__(self, socket_path: str, count: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.stop, self.results = ctx.Event(), ctx.Queue()
        self.procs = [
            ctx.Process(target=verified_io, args=(socket_path, i, self.stop, self.results))
            for i in range(count)
        ]
        for p in self.procs:
            p.start()

    def finish(self) -> list[tuple[int, int, list[str]]]:
        self.stop.set()
        out = [self.results.get(timeout=60) for _ in self.procs]
        for p in self.procs:
            p.join(10)
        return out


def status(control: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "proxyd", "status", "--json", "--socket", control],
        capture_output=True,
        cwd=CHECKOUT,
        check=True,
    )
    return json.loads(done.stdout)


def upgrade(control: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxyd", "upgrade", "--socket", control],
        capture_output=True,
        text=True,
        cwd=CHECKOUT,
    )


@pytest.fixture
def installed(tmp_path: Path) -> Installed:
    return Installed(tmp_path / "installed")


def test_upgrades_keep_pid_connections_and_every_guest(
    tmp_path: Path, installed: Installed
) -> None:
    """Four upgrades between two installed versions (control command and SIGUSR2 in
    turn) while four clients do verified I/O: no client sees an error, the master keeps
    its pid, status shows the version installed, and after each upgrade every worker
    is one the new program forked."""
    versions = {name: installed.build(name) for name in ("a", "b")}
    installed.install("a")
    control = str(tmp_path / "control.sock")
    exports = [{"name": "e", "min_idle": 2}]
    with Daemon(tmp_path, exports, command=[str(installed.script)], control_socket=control) as d:
        pid = d.proc.pid
        assert status(control)["version"] == versions["a"]
        clients = Clients(d.exports["e"]["socket"], 4)
        try:
            for n, name in enumerate(["b", "a", "b", "a"], start=1):
                before = set(d.workers())
                installed.install(name)
                if n % 2:
                    answer = upgrade(control)
                    assert answer.returncode == 0, answer.stderr
                    assert versions[name] in answer.stdout
                else:
                    d.signal(signal.SIGUSR2)
                d.wait_event("upgrade done", count=n, timeout=60)
                doc = status(control)
                assert (doc["pid"], doc["version"], doc["upgrades"]) == (pid, versions[name], n)
                # The old program's workers leave at their next request boundary.
                wait_until(lambda b=before: not b & set(d.workers()), 30, "old workers gone")
        finally:
            out = clients.finish()
        assert d.proc.poll() is None and d.proc.pid == pid
        errors = [e for _, _, errs in out for e in errs]
        assert not errors, errors
        assert all(rounds > 20 for _, rounds, _ in out), out
        assert not [e for e in d.events() if e.get("level") in ("error", "critical")]
        assert d.events("upgrade started") and not d.events("upgrade refused")


@pytest.mark.parametrize(
    "broken, reason",
    [
        ({"cli.py": ("def main(", "def main(:")}, "refuses to start"),  # a syntax error
        ({"handover.py": ("VERSIONS_READ = (1,)", "VERSIONS_READ = (99,)")}, "handover version"),
    ],
)
def test_an_upgrade_the_new_program_cannot_take_is_refused(
    tmp_path: Path, installed: Installed, broken: dict[str, tuple[str, str]], reason: str
) -> None:
    """The new program cannot start, or cannot read the state: the upgrade is refused
    with the reason, before the old program lets go of anything; it goes on serving."""
    installed.build("good")
    installed.build("bad", broken)
    installed.install("good")
    control = str(tmp_path / "control.sock")
    with Daemon(
        tmp_path, [{"name": "e"}], command=[str(installed.script)], control_socket=control
    ) as d:
        client = d.connect("e")
        assert client.lstat("/").ok
        installed.install("bad")
        answer = upgrade(control)
        assert answer.returncode == 1
        assert "upgrade refused" in answer.stderr and reason in answer.stderr, answer.stderr
        d.wait_event("upgrade refused")
        assert client.lstat("/").ok and client.mkdir(0, 0, "/still", 0o755).ok
        assert status(control)["upgrades"] == 0
        d.signal(signal.SIGUSR2)  # the same refusal by signal
        d.wait_event("upgrade refused", count=2)
        assert client.lstat("/still").ok


def orphans(pids: set[int]) -> set[int]:
    """Those of `pids` still alive (not zombies)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def busy(d: Daemon) -> int:
    """How many of the daemon's workers serve a connection."""
    return sum(" conn=" in t for t in d.worker_titles().values())


def test_a_dead_masters_workers_keep_serving_and_are_adopted(tmp_path: Path) -> None:
    """SIGKILL the master while clients do verified I/O: the workers serving them go
    on, idle ones leave; a master started again adopts every connection (`connection
    adopted`) and moves it to a worker of its own at a request boundary; no client sees
    an error, and in the end only the new master's workers remain. Twice: once with the
    first master's workers, once with the second's."""
    exports = [{"name": "e", "min_idle": 2}]
    d = Daemon(tmp_path, exports)
    first = d
    try:
        clients = Clients(d.exports["e"]["socket"], 3)
        for kill in (1, 2):
            wait_until(lambda m=d: busy(m) == 3, 30, "a worker of this master for every client")
            serving = {p for p, t in d.worker_titles().items() if " conn=" in t}
            idle = set(d.workers()) - serving
            killed_at = time.monotonic()
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait()
            wait_until(lambda i=idle: not orphans(i), 10, "idle workers gone")
            assert orphans(serving) == serving, "a serving worker died with its master"
            again = tmp_path / f"again{kill}"
            again.mkdir()
            same = {k: d.exports["e"][k] for k in ("path", "socket")}
            d = Daemon(again, [dict(exports[0], **same)])
            adopted = d.wait_event("connection adopted", count=3, timeout=30)
            back = time.monotonic() - killed_at
            print(f"kill {kill}: a new master adopted every connection {back:.2f} s after")
            assert {e["worker_pid"] for e in adopted} == serving
            wait_until(lambda s=serving: not orphans(s), 30, "adopted workers handing on")
            master = d.proc.pid
            # Nothing but the new master's own workers (exiting ones are reaped soon).
            wait_until(
                lambda m=master: all(title(p).startswith("proxyd: worker") for p in children(m)),
                10,
                "only the new master's workers",
            )
        wait_until(lambda: busy(d) == 3, 30, "the last master serving every client")
        out = clients.finish()
        errors = [e for _, _, errs in out for e in errs]
        assert not errors, errors
        assert all(rounds > 20 for _, rounds, _ in out), out
        assert first.proc.returncode == -signal.SIGKILL
    finally:
        d.stop()
