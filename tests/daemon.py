"""Running a real proxyd daemon for tests: config in a temp dir, logs captured as JSON."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.proxyclient import CHECKOUT, ProxyClient

# The master holds, per worker, its channel and its journal memfd, which Python's mmap
# duplicates (proxyd/slot.py): three descriptors that come and go with the worker.
FDS_PER_WORKER = 3


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def write_config(path: Path, daemon: dict[str, Any], exports: list[dict[str, Any]]) -> Path:
    lines = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in daemon.items()]
    for export in exports:
        lines += ["", "[[export]]"] + [f"{k} = {toml_value(v)}" for k, v in export.items()]
    # Atomically, as an editor saves: a daemon reloading meanwhile reads one whole file.
    temporary = path.with_name(path.name + ".new")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.rename(path)
    return path


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(c) for c in text.split()]


# x86-64 system call numbers the tests wait for (asm/unistd_64.h).
SYS_RECVFROM, SYS_RECVMSG, SYS_TRUNCATE, SYS_OPENAT = 45, 47, 76, 257


def syscall(pid: int) -> int | None:
    """The system call `pid` is blocked in (/proc/PID/syscall), None when it is running
    or gone."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[0]) if fields and fields[0].lstrip("-").isdigit() else None


def wait_in_syscall(pid: int, number: int, timeout: float = 10.0) -> None:
    """Wait until `pid` is blocked in system call `number`."""
    wait_until(lambda: syscall(pid) == number, timeout, f"pid {pid} in system call {number}")


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except FileNotFoundError:
        return ""


class Daemon:
    """proxyd --config FILE -n, stderr in a file, with helpers to talk to it."""

    def __init__(
        self,
        tmp: Path,
        exports: list[dict[str, Any]],
        *,
        nofile: int | None = None,
        command: list[str] | None = None,
        **daemon: Any,
    ) -> None:
        """`daemon` are [daemon] keys; `nofile` sets RLIMIT_NOFILE (soft and hard);
        `command` runs another proxyd program than this checkout's."""
        self._configure(tmp, exports, daemon)
        self.stderr_path = tmp / "proxyd.stderr"
        # Events are read from the log file when one is configured, else from stderr.
        self.log_path = Path(daemon["log_file"]) if "log_file" in daemon else self.stderr_path
        self._log = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "proxyd"]), "-n", "--config", str(self.config)],
            cwd=CHECKOUT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
            if nofile
            else None,
        )
        try:
            self._wait_started()
        except BaseException:
            self.stop()
            raise

    def _configure(self, tmp: Path, exports: list[dict[str, Any]], daemon: dict[str, Any]) -> None:
        """Each export's directory and socket path in `tmp` (unless given), and the
        configuration file."""
        self.tmp = tmp
        self.exports = {}
        for export in exports:
            export.setdefault("path", str(tmp / export["name"]))
            export.setdefault("socket", str(tmp / f"{export['name']}.sock"))
            Path(export["path"]).mkdir(exist_ok=True)
            self.exports[export["name"]] = export
        daemon.setdefault("stop_timeout", 3.0)
        self.daemon_settings = daemon
        self.config = write_config(tmp / "proxyd.toml", daemon, exports)

    def _wait_started(self) -> None:
        """Until every export with spare workers has one spawned."""
        for export in self.exports.values():
            if export.get("min_idle", 1) > 0:
                self.wait_event("worker spawned", export=export["name"])

    # --- logs ---

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        found = []
        if not self.log_path.exists():
            return found
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if event is not None and record.get("event") != event:
                continue
            if all(record.get(k) == v for k, v in match.items()):
                found.append(record)
        return found

    def wait_event(self, event: str, timeout: float = 10.0, count: int = 1, **match: Any):
        try:
            return wait_until(
                lambda: len(self.events(event, **match)) >= count and self.events(event, **match),
                timeout,
                f"log event {event!r} {match} x{count}",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_text()}") from None

    def log_text(self) -> str:
        text = self.stderr_path.read_text(errors="replace")
        if self.log_path != self.stderr_path and self.log_path.exists():
            text += self.log_path.read_text(errors="replace")
        return text[-6000:]

    # --- processes ---

    def workers(self) -> list[int]:
        return children(self.proc.pid)

    def master_fds_besides_workers(self) -> int:
        """The master's descriptors other than its workers' (FDS_PER_WORKER each): what
        a forgotten connection, channel or journal would grow. Read while the pool holds
        still (a worker may be spawned or retired at any time)."""
        while True:
            before = self.workers()
            count = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
            if self.workers() == before:
                return count - FDS_PER_WORKER * len(before)

    def worker_titles(self) -> dict[int, str]:
        return {pid: title(pid) for pid in self.workers()}

    def serving_worker(self, conn_id: int) -> int:
        """The pid of the worker whose title says it serves connection `conn_id`."""

        def find() -> int | None:
            for pid, text in self.worker_titles().items():
                if f" conn={conn_id} " in text + " ":
                    return pid
            return None

        return wait_until(find, what=f"a worker serving conn {conn_id}")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    # --- clients ---

    def connect(self, export: str, unlink: bool = True, timeout: float = 10.0) -> ProxyClient:
        """Connect as QEMU does: connect, then unlink the socket path."""
        path = self.exports[export]["socket"]
        wait_until(lambda: os.path.exists(path), what=f"socket {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        if unlink:
            os.unlink(path)
        return ProxyClient(sock, timeout)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
