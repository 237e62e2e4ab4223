"""The reference's command line: same flags, same meanings, one-line errors with
distinct exit codes, named sockets claimed safely, daemon mode."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import wait_until
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
    """Each of the reference's flags, short and long, as one option taking what the
    reference's takes (argparse lists the two spellings of one option on one line)."""
    result = run("--help")
    assert result.returncode == 0
    options = [line.strip().split("  ")[0] for line in result.stdout.splitlines()]
    for pair in (
        "-p PATH, --path PATH",
        "-f FD, --fd FD",
        "-s SOCKET, --socket SOCKET",
        "-u UID, --uid UID",
        "-g GID, --gid GID",
        "-n, --nodaemon",
    ):
        assert pair in options, result.stdout


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
        wait_until(  # the stale socket is replaced by ours
            lambda: (os.lstat(sock_path).st_uid, os.lstat(sock_path).st_gid) == (1234, 5678),
            what="the socket owned by 1234:5678",
        )
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o770
        client = _connect(sock_path)
        # As QEMU does after connecting; --once has stopped listening on its first
        # connection and may have removed the path already (whoever is first).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
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
    wait_until(sock_path.exists, what="the socket")
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
    wait_until(sock_path.exists, what="the socket bound again")
    second = _connect(sock_path)
    assert second.lstat("/seen").ok
    second.close()
    assert _alive(pid)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not _alive(pid), what="the daemon stopping on SIGTERM")
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
    wait_until(pidfile.exists, what="the pidfile")
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
    wait_until(lambda: not _alive(pid), what="the daemon stopping on SIGTERM")
    assert not pidfile.exists()


def test_check_validates_and_exits(export: Path, tmp_path: Path) -> None:
    ok = run("-p", str(export), "-s", str(tmp_path / "s.sock"), "-u", "0", "-g", "0", "--check")
    assert ok.returncode == 0 and "valid (1 exports: export)" in ok.stdout
    assert not (tmp_path / "s.sock").exists()  # nothing was bound
    one_line_error(run("-p", str(export / "missing"), "-f", "0", "--check"), 3, "missing")
