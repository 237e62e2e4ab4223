"""The reference's command line: same flags, same meanings, one-line errors with
distinct exit codes, named sockets claimed safely, daemon mode."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.proxyclient import CHECKOUT, ProxyClient

PROXYD = [sys.executable, "-m", "proxyd"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [*PROXYD, *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=30, **kw
    )


def one_line_error(result: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("proxyd: error: ") and text in lines[0], lines[0]


@pytest.fixture
def export(tmp_path: Path) -> Path:
    path = tmp_path / "export"
    path.mkdir()
    return path


def test_help_lists_the_reference_flags() -> None:
    result = run("--help")
    assert result.returncode == 0
    for flag in (
        "-p",
        "--path",
        "-f",
        "--fd",
        "-s",
        "--socket",
        "-u",
        "--uid",
        "-g",
        "--gid",
        "-n",
        "--nodaemon",
    ):
        assert flag in result.stdout


def test_usage_errors(export: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "s")
    one_line_error(run(), 2, "no export path")
    one_line_error(run("-p", str(export), "-n"), 2, "give a socket path (-s)")
    one_line_error(
        run("-p", str(export), "-s", sock, "-f", "0", "-u", "0", "-g", "0"),
        2,
        "cannot be used together",
    )
    one_line_error(run("-p", str(export), "-s", sock), 2, "-u UID and -g GID")
    one_line_error(run("-p", str(export), "-s", sock, "-u", "0"), 2, "-u UID and -g GID")
    one_line_error(
        run("-p", str(export), "-s", sock, "-u", "root", "-g", "0"), 2, "'root' is not a number"
    )
    one_line_error(run("-p", str(export), "--bogus"), 2, "unrecognized arguments")
    one_line_error(run("-p", str(export), "-f", "999", "-n"), 2, "no such open descriptor")
    with open(export / "file", "w") as f:
        one_line_error(
            run("-p", str(export), "-f", str(f.fileno()), "-n", pass_fds=[f.fileno()]),
            2,
            "not a socket",
        )


def test_export_errors(export: Path) -> None:
    (export / "file").write_text("")
    one_line_error(
        run("-p", str(export / "missing"), "-f", "0", "-n"), 3, "No such file or directory"
    )
    one_line_error(run("-p", str(export / "file"), "-f", "0", "-n"), 3, "is not a directory")


def test_socket_path_errors(export: Path, tmp_path: Path) -> None:
    long_path = str(tmp_path / ("x" * 120))
    one_line_error(
        run("-p", str(export), "-s", long_path, "-u", "0", "-g", "0", "-n"),
        2,
        "longer than the 107 bytes",
    )
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    one_line_error(
        run("-p", str(export), "-s", str(regular), "-u", "0", "-g", "0", "-n"),
        2,
        "exists and is not a socket",
    )
    assert regular.read_text() == "keep me"
    live = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(live))
    listener.listen(1)
    try:
        one_line_error(
            run("-p", str(export), "-s", str(live), "-u", "0", "-g", "0", "-n"),
            4,
            "in use by a live listener",
        )
        assert stat.S_ISSOCK(os.lstat(live).st_mode)
    finally:
        listener.close()


def _wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _connect(path: Path) -> ProxyClient:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    return ProxyClient(sock)


def test_named_socket_serves_one_client(export: Path, tmp_path: Path) -> None:
    sock_path = tmp_path / "proxy.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))  # bound, never listening: what a crashed helper leaves
    stale.close()
    proc = subprocess.Popen(
        [
            *PROXYD,
            "-n",
            "--once",
            "-p",
            str(export),
            "-s",
            str(sock_path),
            "-u",
            "1234",
            "-g",
            "5678",
        ],
        cwd=CHECKOUT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # the stale socket is replaced by ours
            st = os.lstat(sock_path)
            if (st.st_uid, st.st_gid) == (1234, 5678):
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert stat.S_IMODE(st.st_mode) == 0o770
        client = _connect(sock_path)
        os.unlink(sock_path)  # as QEMU does after connecting
        assert client.lstat("/").ok
        client.close()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
    stderr = proc.stderr.read()
    assert '"stale socket replaced"' in stderr
    assert '"connection closed"' in stderr


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _master_serving(export: Path) -> int:
    """The pid of the master whose title names `export` (its argv is overwritten)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"proxyd: master") and f"-p {export} ".encode() in title:
                return int(entry)
    raise AssertionError(f"no master serving {export}")


def test_daemon_mode_detaches_and_serves(export: Path, tmp_path: Path) -> None:
    sock_path, log_file = tmp_path / "daemon.sock", tmp_path / "proxyd.log"
    # A log file: detached without one proxyd logs to syslog, which this machine lacks
    # (that refusal: tests/test_log_sinks.py).
    args = ("-p", str(export), "-s", str(sock_path), "-u", "0", "-g", "0")
    result = run(*args, "--log-file", str(log_file))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the daemon's stderr is /dev/null, logs go to the log file
    _wait_for(sock_path)
    client = _connect(sock_path)
    (export / "seen").write_text("")
    assert client.lstat("/seen").ok
    # SO_PEERCRED names the process that listened, which daemonizing left behind.
    pid = _master_serving(export)
    assert os.getsid(pid) != os.getsid(0)  # a session of its own
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    client.close()
    # Long-running: QEMU unlinks the path after connecting; the daemon binds it again.
    os.unlink(sock_path)
    _wait_for(sock_path)
    second = _connect(sock_path)
    assert second.lstat("/seen").ok
    second.close()
    assert _alive(pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "daemon did not stop on SIGTERM"
        time.sleep(0.05)
    assert not sock_path.exists()  # a stopping daemon removes its socket


def test_pidfile_is_written_and_guards_against_a_second_instance(
    export: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "proxyd.pid"
    args = (
        "-p",
        str(export),
        "-s",
        str(tmp_path / "a.sock"),
        "-u",
        "0",
        "-g",
        "0",
        "--pidfile",
        str(pidfile),
        "--log-file",  # detached without one, proxyd needs syslog, which this machine lacks
        str(tmp_path / "proxyd.log"),
    )
    assert run(*args).returncode == 0  # detaches
    _wait_for(pidfile)
    pid = int(pidfile.read_text())
    assert _alive(pid) and Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"proxyd: master")
    second = run(
        "-p",
        str(export),
        "-s",
        str(tmp_path / "b.sock"),
        "-u",
        "0",
        "-g",
        "0",
        "--pidfile",
        str(pidfile),
    )
    one_line_error(second, 4, f"another proxyd (pid {pid}) is running")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not pidfile.exists()


def test_check_validates_and_exits(export: Path, tmp_path: Path) -> None:
    ok = run("-p", str(export), "-s", str(tmp_path / "s.sock"), "-u", "0", "-g", "0", "--check")
    assert ok.returncode == 0 and "valid (1 exports: export)" in ok.stdout
    assert not (tmp_path / "s.sock").exists()  # nothing was bound
    one_line_error(run("-p", str(export / "missing"), "-f", "0", "--check"), 3, "missing")


# --- issue 18: what the operator is told is true ------------------------------------------
# (imports local to these tests: the file's head belongs to other changes)


def _events(text: str) -> list[dict]:
    import json

    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _loud(events: list[dict]) -> list[dict]:
    """The lines no normal operation may write: level error or critical."""
    return [e for e in events if e.get("level") in ("error", "critical")]


def test_help_names_every_command() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("status", "reload", "stop", "upgrade", "audit"):
        assert f"\n  proxyd {command} " in result.stdout, command
        own = run(command, "--help")
        assert own.returncode == 0 and f"proxyd {command}" in own.stdout, own
    # -n: stderr only without a log file; detached: log file or syslog.
    assert "with -n on stderr, or only to log_file when one is set" in result.stdout


def _once_daemon(export: Path, sock_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*PROXYD, "-n", "--once", "-p", str(export), "-s", str(sock_path), "-u", "0", "-g", "0"],
        cwd=CHECKOUT,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(sock_path)
    return proc


def test_once_logs_no_error_and_starts_no_second_worker(export: Path, tmp_path: Path) -> None:
    """--once, three runs: the one connection is served, the daemon exits 0, and its
    log holds no error line, no `accept failed`, and one worker only (no spare is
    started after the one connection)."""
    for n in range(3):
        sock_path = tmp_path / f"once{n}.sock"
        proc = _once_daemon(export, sock_path)
        try:
            client = _connect(sock_path)
            os.unlink(sock_path)  # as QEMU does
            assert client.lstat("/").ok and client.mkdir(0, 0, f"/d{n}", 0o755).ok
            client.close()
            assert proc.wait(15) == 0
        finally:
            proc.kill()
        events = _events(proc.stderr.read())
        assert not _loud(events), _loud(events)
        assert not [e for e in events if e["event"] == "accept failed"], events
        assert [e["event"] for e in events].count("worker spawned") == 1, events
        assert [e["event"] for e in events].count("connection accepted") == 1, events


def test_once_refuses_a_connection_queued_with_its_one(export: Path, tmp_path: Path) -> None:
    """Two clients waiting in the backlog when --once accepts: the first is served, the
    second refused at once (the reference closes its listening socket after one
    accept), with a `connection refused` warning, and no error line."""
    sock_path = tmp_path / "once.sock"
    proc = _once_daemon(export, sock_path)
    try:
        os.kill(proc.pid, signal.SIGSTOP)  # both connections wait in the backlog
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first, second = _connect(sock_path), _connect(sock_path)
        os.kill(proc.pid, signal.SIGCONT)
        assert first.lstat("/").ok
        second.sock.settimeout(10)
        assert second.sock.recv(1) == b""  # closed by the daemon, never served
        first.close()
        second.close()
        assert proc.wait(15) == 0
    finally:
        proc.kill()
    events = _events(proc.stderr.read())
    refused = [e for e in events if e["event"] == "connection refused"]
    assert [e["reason"] for e in refused] == ["--once: one connection only"], events
    assert not _loud(events), _loud(events)
    assert [e["event"] for e in events].count("worker spawned") == 1, events


def test_fd_mode_logs_no_error(export: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [*PROXYD, "-n", "-p", str(export), "-f", str(theirs.fileno())],
        cwd=CHECKOUT,
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    try:
        client = ProxyClient(ours)
        assert client.lstat("/").ok and client.mkdir(0, 0, "/from-fd", 0o755).ok
        client.close()
        assert proc.wait(15) == 0
    finally:
        proc.kill()
    events = _events(proc.stderr.read())
    assert not _loud(events), _loud(events)
    assert [e["event"] for e in events].count("worker spawned") == 1, events


def test_normal_operation_logs_no_error(tmp_path: Path) -> None:
    """A daemon taken through every normal path while a client is connected: reload
    (command and SIGHUP), SIGUSR1 (the log file reopened), SIGTTIN and SIGTTOU, an
    upgrade in place, and a stop by command. Nothing it writes is an error."""
    from tests.daemon import Daemon

    control = str(tmp_path / "control.sock")
    log_file = tmp_path / "proxyd.json"
    d = Daemon(tmp_path, [{"name": "e"}], control_socket=control, log_file=str(log_file))
    try:
        client = d.connect("e")
        assert client.mkdir(0, 0, "/one", 0o755).ok

        def command(*args: str) -> str:
            done = run(*args, "--socket", control)
            assert done.returncode == 0, done
            return done.stdout

        assert "reload applied (generation 1)" in command("reload")
        d.signal(signal.SIGHUP)
        d.wait_event("reload applied", count=2)
        os.rename(log_file, tmp_path / "proxyd.json.1")  # logrotate's part
        d.signal(signal.SIGUSR1)
        d.wait_event("log reopened")
        assert client.mkdir(0, 0, "/two", 0o755).ok
        d.signal(signal.SIGTTIN)
        d.wait_event("spare workers", min_idle={"e": 2})
        d.signal(signal.SIGTTOU)
        d.wait_event("spare workers", min_idle={"e": 1})
        assert "upgraded from" in command("upgrade")
        d.wait_event("upgrade done")
        assert client.lstat("/two").ok and client.mkdir(0, 0, "/three", 0o755).ok
        assert "stopping" in command("stop")
        assert d.proc.wait(30) == 0
    finally:
        d.stop()
    events = _events((tmp_path / "proxyd.json.1").read_text() + log_file.read_text())
    events += _events(d.stderr_path.read_text())
    assert {"log reopened", "upgrade done", "stop"} <= {e["event"] for e in events}
    assert not _loud(events), _loud(events)


def test_a_second_proxyd_probing_a_live_socket_is_no_connection(
    export: Path, tmp_path: Path
) -> None:
    """A second proxyd started on a socket a running one serves finds it live and exits
    with code 4; the running one sees no connection: no `connection accepted`, no
    count, and under --once its one connection is still the guest's. The same for the
    control socket: no `bad control request` from the probe."""
    from tests.daemon import Daemon, write_config

    sock_path = tmp_path / "once.sock"
    once = _once_daemon(export, sock_path)
    try:
        second = run("-n", "-p", str(export), "-s", str(sock_path), "-u", "0", "-g", "0")
        one_line_error(second, 4, "in use by a live listener")
        client = _connect(sock_path)
        assert client.lstat("/").ok
        client.close()
        assert once.wait(15) == 0
    finally:
        once.kill()
    events = _events(once.stderr.read())
    assert [e["event"] for e in events].count("connection accepted") == 1, events

    control = str(tmp_path / "control.sock")
    with Daemon(tmp_path, [{"name": "e"}], control_socket=control) as d:
        other = tmp_path / "other"
        other.mkdir()
        clash = write_config(
            tmp_path / "clash.toml",
            {"control_socket": control},
            [{"name": "o", "path": str(other), "socket": str(tmp_path / "o.sock")}],
        )
        one_line_error(run("-n", "--config", str(clash)), 4, "in use by a live listener")
        clash = write_config(tmp_path / "clash.toml", {}, [{"name": "o", **d.exports["e"]}])
        one_line_error(run("-n", "--config", str(clash)), 4, "in use by a live listener")
        status = run("status", "--json", "--socket", control)
        assert status.returncode == 0, status
        import json

        assert "connections" not in json.loads(status.stdout)["counters"]
        assert not d.events("connection accepted") and not d.events("bad control request")
        assert not (tmp_path / "o.sock").exists()  # the refused one left nothing behind


def test_the_pidfile_exists_when_the_detaching_command_returns(
    export: Path, tmp_path: Path
) -> None:
    """Five detached starts: each time the command returns 0 with the pidfile already
    naming the live master (the launching process waits for the daemon's word). A
    pidfile that cannot be written is one error line on the terminal, exit code 2, and
    nothing left listening."""
    pidfile = tmp_path / "proxyd.pid"
    args = ("-p", str(export), "-s", str(tmp_path / "p.sock"), "-u", "0", "-g", "0")
    log = ("--log-file", str(tmp_path / "proxyd.log"))
    for _ in range(5):
        assert run(*args, *log, "--pidfile", str(pidfile)).returncode == 0
        pid = int(pidfile.read_text())  # no wait: it must be there already
        assert _alive(pid)
        assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"proxyd: master")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(pid) or pidfile.exists():
            assert time.monotonic() < deadline, "daemon did not stop"
            time.sleep(0.05)
    for detach in ((), ("-n",)):
        failed = run(*args, *log, *detach, "--pidfile", str(tmp_path / "missing" / "pid"))
        one_line_error(failed, 2, "pidfile '")
        assert "No such file or directory" in failed.stderr
        assert not (tmp_path / "p.sock").exists()


def test_reload_with_a_broken_file_reports_the_daemons_verdict(tmp_path: Path) -> None:
    """`proxyd reload -c FILE` reads only the control socket from FILE: a FILE the
    loader refuses (a bad value, or not TOML at all) still reaches the daemon, which
    refuses it, logs it, and its reason is what the command prints (exit code 1). A
    FILE naming no control socket leaves the default one, and the command says so."""
    from tests.daemon import Daemon

    control = str(tmp_path / "control.sock")
    with Daemon(tmp_path, [{"name": "e"}], control_socket=control) as d:
        good = d.config.read_text()
        for n, broken in enumerate(
            [
                good.replace("[[export]]", "[[export]]\nmin_idle = 5\nmax_workers = 2"),
                good + "\nthis is = not [ toml\n",
            ],
            start=1,
        ):
            d.config.write_text(broken)
            result = run("reload", "-c", str(d.config))
            assert result.returncode == 1, result
            assert result.stderr.startswith("proxyd reload: error: reload refused: "), result
            d.wait_event("reload refused", count=n)
            assert d.events("reload refused")[-1]["error"] in result.stderr
        d.config.write_text(good)
        applied = run("reload", "-c", str(d.config))
        assert applied.returncode == 0 and applied.stdout == "reload applied (generation 1)\n"
    bare = tmp_path / "bare.toml"
    bare.write_text("[[export]]\nname = 'x'\n")
    for config, why in ((bare, "names no daemon.control_socket"), (tmp_path / "nope", "No such")):
        said = run("status", "-c", str(config)).stderr.splitlines()[0]
        assert said.startswith(f"proxyd status: {config}") and why in said, said
        assert said.endswith(": using /run/proxyd/control.sock"), said


def test_status_counts_agree_when_a_reload_moves_a_connection(tmp_path: Path) -> None:
    """A connection served by one worker, moved by a reload to a fresh one: its
    REQUESTS count both, BY_WORKER the fresh worker's, which is that worker's own
    REQUESTS, and the WORKER column names it as the worker table does."""
    import json
    import re

    from tests.daemon import Daemon, write_config

    control = str(tmp_path / "control.sock")

    def status() -> dict:
        done = run("status", "--json", "--socket", control)
        assert done.returncode == 0, done
        return json.loads(done.stdout)

    with Daemon(tmp_path, [{"name": "e"}], control_socket=control) as d:
        client = d.connect("e")
        assert client.lstat("/").ok
        (first,) = status()["connections"]
        write_config(d.config, {**d.daemon_settings, "audit": "all"}, list(d.exports.values()))
        assert run("reload", "--socket", control).returncode == 0
        assert client.lstat("/").ok  # the old worker hands the connection on at this boundary
        d.wait_event("worker exited", worker_pid=first["worker_pid"])
        assert client.lstat("/").ok
        doc = status()
        (conn,) = doc["connections"]
        workers = {f"{w['export']}#{w['index']}": w for w in doc["workers"]}
        serving = workers[conn["worker"]]
        assert conn["worker"] != first["worker"] and serving["pid"] == conn["worker_pid"]
        assert conn["requests"] == 3
        assert serving["connections"] == 1
        assert 1 <= conn["worker_requests"] == serving["requests"] < 3
        table = run("status", "--socket", control).stdout
        row = re.search(rf"^{conn['id']}\s+e\s.*$", table, re.M)
        assert row and row[0].split()[-3:] == ["0", conn["worker"], str(serving["requests"])]
        client.close()
