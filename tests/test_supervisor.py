"""proxyd operated as a host daemon, with the files shipped in conf/.

A real supervisord (the one pip installs with proxyd) runs conf/supervisord.conf, or
conf/proxyd.conf under a main configuration, with the host paths moved into a temporary
directory by localize(): nothing else of the shipped files changes. The logrotate file
is checked by logrotate (the systemd unit: tests/test_systemd_unit.py). Last, `proxyd
status` against a daemon with live connections, and without one.
"""

from __future__ import annotations

import configparser
import contextlib
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.daemon import Daemon, wait_until, write_config
from tests.proxyclient import CHECKOUT, ProxyClient

CONF = CHECKOUT / "conf"
Completed = subprocess.CompletedProcess
BIN = Path(sys.executable).parent  # the environment running the tests has proxyd
STOPWAITSECS = 15

# The host paths the shipped files use, and where each goes under a test's root.
_HOST_PATHS = re.compile(r"/usr/local/bin|/etc/proxyd|/run/proxyd-|/run/proxyd|/var/log/proxyd")


def localize(text: str, root: Path) -> str:
    """A shipped file with its host paths moved under `root` (one pass, nothing else)."""
    places = {
        "/usr/local/bin": str(BIN),
        "/etc/proxyd": f"{root}/etc",
        "/run/proxyd-": f"{root}/run/",  # supervisord's own socket and pid file
        "/run/proxyd": f"{root}/run",
        "/var/log/proxyd": f"{root}/log",
    }
    text = _HOST_PATHS.sub(lambda m: places[m.group()], text)
    # A test must never touch the real host: no other host path may be left (but in comments).
    for line in text.splitlines():
        if not line.lstrip().startswith((";", "#")):
            assert not re.search(r"(?<![\w.-])/(etc|run|var|srv|usr)/", line), line
    return text


def ini(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)  # systemd units repeat keys
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(path.read_text())
    return parser


def mentioning(text: str) -> list[int]:
    """Processes whose command line (or proxyd title) contains `text`, but this one."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def connect(path: Path) -> ProxyClient:
    """Connect as QEMU does: connect, then unlink the socket path."""
    wait_until(path.exists, 15, f"socket {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    os.unlink(path)
    return ProxyClient(sock)


def serves(path: Path, export: Path) -> None:
    """A client on `path` creates a file; it appears in `export` on the host."""
    name = f"probe-{time.monotonic_ns()}"
    client = connect(path)
    try:
        reply = client.create(f"/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, 0, 0)
        assert reply.ok, reply
        os.close(reply.fd)
        assert client.lstat(f"/{name}").ok
    finally:
        client.close()
    assert (export / name).is_file()


# --- a supervisord in a temporary directory ---------------------------------------------------

MAIN_CONF = """\
; A main supervisord configuration like Debian's /etc/supervisor/supervisord.conf.
[unix_http_server]
file={root}/run/supervisor.sock
chmod=0700

[supervisord]
logfile={root}/log/supervisord.log
pidfile={root}/run/supervisord.pid
childlogdir={root}/log

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{root}/run/supervisor.sock

[include]
files = {root}/etc/conf.d/*.conf
"""


class Supervisor:
    """`supervisord -n` on the shipped configuration, localized under `root`."""

    def __init__(
        self,
        root: Path,
        export_path: Path | None = None,
        include: bool = False,
        proxyd: Path | None = None,
    ):
        """`proxyd`: the program [program:proxyd] runs instead of this environment's
        `proxyd` (tests/test_upgrade_guest.py switches what it runs)."""
        self.root = root
        for d in ("etc/conf.d", "run", "log", "srv/vm1"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.export = root / "srv" / "vm1"
        self.socket = root / "run" / "vm1.sock"
        self.control = root / "run" / "control.sock"
        self.log = root / "log" / "proxyd.log"
        self.supervisord_log = root / "log" / "supervisord.log"
        write_config(
            root / "etc" / "proxyd.toml",
            {"control_socket": str(self.control)},
            [{"name": "vm1", "path": str(export_path or self.export), "socket": str(self.socket)}],
        )
        self.conf = root / "etc" / "supervisord.conf"
        shipped = localize(
            (CONF / ("proxyd.conf" if include else "supervisord.conf")).read_text(), root
        )
        if proxyd is not None:
            command = f"command={BIN}/proxyd "
            assert shipped.count(command) == 1, shipped
            shipped = shipped.replace(command, f"command={proxyd} ")
        if include:
            self.conf.write_text(MAIN_CONF.format(root=root))
            (root / "etc" / "conf.d" / "proxyd.conf").write_text(shipped)
        else:
            self.conf.write_text(shipped)
        self._out = open(root / "supervisord.out", "wb")  # noqa: SIM115
        # -n: our child, so that the test can always end it.
        self.proc = subprocess.Popen(
            [BIN / "supervisord", "-n", "-c", self.conf],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(lambda: self.ctl("pid", check=False).returncode == 0, 30, "supervisord")
        except BaseException:
            self.close()
            raise

    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> Completed:
        result = subprocess.run(
            [BIN / "supervisorctl", "-c", self.conf, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"supervisorctl {' '.join(args)}: {result}\n{self.logs()}")
        return result

    def state(self) -> str:
        words = self.ctl("status", "proxyd", check=False).stdout.split()
        return words[1] if len(words) > 1 else ""

    def wait_running(self, timeout: float = 30, not_pid: int | None = None) -> int:
        """Wait until proxyd is RUNNING (as another process than `not_pid`); its pid."""

        def running() -> int | None:
            if self.state() != "RUNNING":
                return None
            pid = int(self.ctl("pid", "proxyd").stdout)
            return pid if pid != not_pid else None

        try:
            return wait_until(running, timeout, "proxyd RUNNING")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def events(self, event: str) -> list[dict]:
        """The proxyd JSON lines supervisord captured, with this event name."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines() if self.log.exists() else []:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found

    def logs(self) -> str:
        parts = []
        for path in (self.supervisord_log, self.log, self.root / "supervisord.out"):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Shut supervisord down (it stops proxyd); kill whatever is left of this test."""
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("shutdown", check=False, timeout=30)
            try:
                self.proc.wait(STOPWAITSECS + 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in mentioning(str(self.root)):  # a master that outlived supervisord
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._out.close()


@pytest.fixture
def supervised(tmp_path: Path):
    sup = Supervisor(tmp_path)
    try:
        sup.wait_running()
        yield sup
    finally:
        sup.close()


# --- the shipped files ---------------------------------------------------------------------------


def test_shipped_files_agree() -> None:
    full, include = ini(CONF / "supervisord.conf"), ini(CONF / "proxyd.conf")
    program = dict(full["program:proxyd"])
    assert program == dict(include["program:proxyd"])
    proxyd = tomllib.loads((CONF / "proxyd.toml").read_text())
    assert full["ctlplugin:proxyd"]["control_socket"] == proxyd["daemon"]["control_socket"]
    assert program["command"] == "/usr/local/bin/proxyd -n --config /etc/proxyd/proxyd.toml"
    assert int(program["stopwaitsecs"]) == STOPWAITSECS > proxyd["daemon"]["stop_timeout"]
    assert program["stopsignal"] == "TERM"
    assert (program["stopasgroup"], program["killasgroup"]) == ("false", "true")
    assert full["supervisorctl"]["serverurl"] == "unix://" + full["unix_http_server"]["file"]

    unit = ini(CONF / "proxyd.service")["Service"]
    assert unit["ExecStart"] == program["command"]
    assert float(unit["TimeoutStopSec"]) == STOPWAITSECS
    # Both give proxyd a descriptor limit enough for 16 exports at max_workers (16) and
    # many more connections; supervisord's stays below common hard limits (it refuses to
    # start when it cannot raise its own that far).
    minfds = int(full["supervisord"]["minfds"])
    assert int(unit["LimitNOFILE"]) >= minfds >= 16 * (16 * 4 + 65)
    assert minfds <= 20000

    log_file = re.search(r'^# log_file = "(.*)"$', (CONF / "proxyd.toml").read_text(), re.M)
    assert log_file and f"{log_file[1]} {{" in (CONF / "logrotate.proxyd").read_text()


def test_logrotate_rotates_and_proxyd_reopens(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    (tmp_path / "etc").mkdir()
    log_file = tmp_path / "log" / "proxyd.json"
    rules = tmp_path / "logrotate.conf"
    rules.write_text(localize((CONF / "logrotate.proxyd").read_text(), tmp_path))
    state = tmp_path / "logrotate.state"

    def logrotate(*flags: str) -> str:
        result = subprocess.run(
            ["logrotate", *flags, "-s", state, rules], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0 and "error" not in result.stderr, result.stderr
        return result.stderr

    logrotate("-d")  # the syntax alone
    # The postrotate script finds the master by its title, which names this configuration.
    with Daemon(tmp_path / "etc", [{"name": "vm1"}], log_file=str(log_file)) as d:
        assert d.config == tmp_path / "etc" / "proxyd.toml"
        logrotate("-f")
        d.wait_event("log reopened")  # in the new file
        rotated = Path(f"{log_file}.1")
        assert any(json.loads(line)["event"] == "start" for line in rotated.open())
        serves(Path(d.exports["vm1"]["socket"]), Path(d.exports["vm1"]["path"]))
        d.wait_event("connection closed")
        logrotate("-f")  # delaycompress: the previous file is compressed now
        d.wait_event("log reopened")
        with gzip.open(f"{log_file}.2.gz", "rt") as f:
            assert any(json.loads(line)["event"] == "start" for line in f)
        assert "connection closed" in Path(f"{log_file}.1").read_text()
        assert d.proc.poll() is None


# --- supervisord with conf/supervisord.conf ------------------------------------------------------


def test_supervised_proxyd_serves_and_reports(supervised: Supervisor) -> None:
    sup = supervised
    assert "RUNNING" in sup.ctl("status").stdout
    client = connect(sup.socket)  # held open: a live connection in the status
    try:
        assert client.lstat("/").ok
        status = sup.ctl("proxyd", "status")
        table = status.stdout
        export, socket_path = re.escape(str(sup.export)), re.escape(str(sup.socket))
        row = rf"^vm1\s+serving\s+{export}\s+{socket_path}\s+no\s"
        assert re.search(row, table, re.M), table
        busy = re.findall(r"^(vm1#\d+)\s+\d+\s+busy\s+1\s", table, re.M)
        assert len(busy) == 1, table
        # The connection's worker named as in the worker table, with the 1 request it served.
        row = rf"^1\s+vm1\s+{os.getpid()}\s+0\s+\S+\s+1\s+0\s+{busy[0]}\s+1$"
        assert re.search(row, table, re.M), table

        document = json.loads(sup.ctl("proxyd", "status", "--json").stdout)
        assert [e["name"] for e in document["exports"]] == ["vm1"]
        assert document["pid"] == int(sup.ctl("pid", "proxyd").stdout)

        # HUP: reload (the configuration is unchanged: the worker stays); still served.
        sup.ctl("signal", "HUP", "proxyd")
        wait_until(lambda: sup.events("reload applied"), 15, "reload applied")
        assert client.lstat("/").ok
    finally:
        client.close()
    serves(sup.socket, sup.export)

    # What `supervisorctl tail` shows is proxyd's JSON lines (the first may be cut).
    tail = sup.ctl("tail", "-8000", "proxyd").stdout.splitlines()
    records = [json.loads(line) for line in tail[1:] if line]  # supervisorctl adds a newline
    events = [r["event"] for r in records]
    assert {"reload applied", "connection accepted", "connection closed"} <= set(events)
    assert all(r["level"] and r["timestamp"] and r["pid"] for r in records)


def test_stop_start_restart(supervised: Supervisor) -> None:
    sup = supervised
    master = int(sup.ctl("pid", "proxyd").stdout)
    started = time.monotonic()
    sup.ctl("stop", "proxyd")
    assert time.monotonic() - started < STOPWAITSECS
    assert sup.state() == "STOPPED"
    assert not sup.socket.exists() and not sup.control.exists()
    assert mentioning(f"proxyd: master [{sup.root}") == []
    assert sup.events("stop")[-1]["exit_code"] == 0
    assert not os.path.exists(f"/proc/{master}")

    down = sup.ctl("proxyd", "status", check=False)
    assert down.returncode != 0
    assert down.stdout.strip() == f"Error: no daemon: control socket {sup.control} does not exist"

    sup.ctl("start", "proxyd")
    second = sup.wait_running(not_pid=master)
    serves(sup.socket, sup.export)
    sup.ctl("restart", "proxyd")
    sup.wait_running(not_pid=second)
    serves(sup.socket, sup.export)
    assert sup.ctl("proxyd", "status").returncode == 0


def test_restarted_after_a_crash_not_after_a_stop(supervised: Supervisor) -> None:
    sup = supervised
    master = int(sup.ctl("pid", "proxyd").stdout)
    os.kill(master, signal.SIGKILL)
    sup.wait_running(not_pid=master)
    # Its socket files were left behind: the new master replaces them.
    wait_until(lambda: sup.events("stale socket replaced"), 15, "stale socket replaced")
    assert sup.events("stale socket replaced")[-1]["socket"] == str(sup.socket)
    serves(sup.socket, sup.export)
    assert sup.ctl("proxyd", "status").returncode == 0
    assert "exited: proxyd (terminated by SIGKILL; not expected)" in sup.logs()

    # A clean stop (exit 0), here through the plugin, is left alone: autorestart=unexpected.
    assert sup.ctl("proxyd", "stop").stdout == "stopping\n"
    wait_until(lambda: sup.state() == "EXITED", 15, "EXITED")
    time.sleep(2)  # supervisord would have restarted it after 1 s
    assert sup.state() == "EXITED" and not sup.socket.exists()


def test_missing_export_ends_fatal(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, export_path=tmp_path / "missing")
    try:
        # 1 start + 3 retries, each failing at once (exit 3), 1+2+3 s apart.
        wait_until(lambda: sup.state() == "FATAL", 60, "FATAL")
        output = sup.log.read_text()
        why = f"proxyd: error: export 'vm1'.path '{tmp_path}/missing': No such file or directory"
        assert output.count(why) == 4, sup.logs()
        assert sup.supervisord_log.read_text().count("exit status 3") == 4
        down = sup.ctl("proxyd", "status", check=False)
        assert down.returncode != 0 and "Error: no daemon" in down.stdout
    finally:
        sup.close()


def test_include_file_under_an_existing_supervisord(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, include=True)
    try:
        master = sup.wait_running()
        serves(sup.socket, sup.export)
        sup.ctl("stop", "proxyd")
        assert not sup.socket.exists() and not os.path.exists(f"/proc/{master}")
    finally:
        sup.close()


# --- proxyd status, straight on the control socket ------------------------------------------------


def run_proxyd(*args: str) -> Completed:
    return subprocess.run(
        [sys.executable, "-m", "proxyd", *args],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_proxyd_status_with_live_connections(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    exports = [{"name": "a"}, {"name": "b", "readonly": True}]
    with Daemon(tmp_path, exports, control_socket=str(control)) as d:
        clients = {"a1": d.connect("a"), "a2": d.connect("a"), "b1": d.connect("b")}
        done = {"a1": 3, "a2": 1, "b1": 2}
        for name, count in done.items():
            for _ in range(count):
                assert clients[name].lstat("/").ok

        result = run_proxyd("status", "--json", "--socket", str(control))
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["pid"] == d.proc.pid and status["source"] == str(d.config)
        assert {e["name"]: (e["readonly"], e["busy"]) for e in status["exports"]} == {
            "a": (False, 2),
            "b": (True, 1),
        }
        for w in status["workers"]:
            assert {"pid", "export", "index", "state", "conn", "requests"} <= w.keys()
            assert w["pid"] in d.workers() and w["state"] in ("idle", "busy", "starting")
        busy = {w["conn"]: w for w in status["workers"] if w["state"] == "busy"}
        connections = status["connections"]
        assert len(connections) == 3 and set(busy) == {c["id"] for c in connections}
        for c in connections:
            assert (c["peer_pid"], c["peer_uid"]) == (os.getpid(), 0)
            assert c["worker_pid"] == busy[c["id"]]["pid"]
            assert c["requests"] == busy[c["id"]]["requests"]
        # Connections are numbered in the order they came: a1, a2, b1.
        assert [(c["export"], c["requests"]) for c in connections] == [
            ("a", 3),
            ("a", 1),
            ("b", 2),
        ]
        assert status["counters"]["connections"] == 3

        table = run_proxyd("status", "--config", str(d.config))
        assert table.returncode == 0, table.stderr
        assert re.search(r"^b\s+serving\s+\S+\s+\S+\s+yes\s+", table.stdout, re.M)
        assert len(re.findall(rf"^\d+\s+[ab]\s+{os.getpid()}\s+0\s", table.stdout, re.M)) == 3
        for client in clients.values():
            client.close()


def test_proxyd_status_without_a_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "control.sock"
    result = run_proxyd("status", "--socket", str(missing))
    assert (result.returncode, result.stdout) == (1, "")
    why = f"no daemon: control socket {missing} does not exist"
    assert result.stderr == f"proxyd status: error: {why}\n"

    stale = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on
    stale.bind(str(missing))
    stale.close()
    result = run_proxyd("status", "--json", "--socket", str(missing))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"proxyd status: error: no daemon is listening on {missing}\n"
