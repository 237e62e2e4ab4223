"""scripts/run from a clean copy of the checkout: proxyd under supervisord, then the guest.

The copy holds the files git tracks or would track (var/ and .venv/ are ignored, so it
starts with no state). Creating a venv and installing proxyd would download every
dependency again (minutes), so PROXYD_VENV hands the script the environment running
these tests, which scripts/run uses as it is; everything else it does for real. var/guest
is linked to this checkout's, which scripts/test has built.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.daemon import wait_until
from tests.proxyclient import CHECKOUT
from tests.test_supervisor import connect, mentioning

VENV = Path(sys.executable).parent.parent  # not resolved: the venv, not its base Python


def clean_copy(dest: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=CHECKOUT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = CHECKOUT / name
        if source.is_file():  # a tracked file deleted in the work tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / "var").mkdir()
    (dest / "var" / "guest").symlink_to(CHECKOUT / "var" / "guest")
    return dest


def run(copy: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [copy / "scripts" / "run", *args],
        cwd="/",  # the script finds its checkout itself
        env={**os.environ, "PROXYD_VENV": str(VENV)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def printed(output: str, label: str) -> list[str]:
    """The command printed after `label:` (the output's commands are copy-and-paste)."""
    match = re.search(rf"^{label}:\s+(.*?)(\s{{2,}}\(.*)?$", output, re.M)
    assert match, output
    return shlex.split(match[1])


def test_run_script_from_a_clean_copy(tmp_path: Path) -> None:
    copy = clean_copy(tmp_path / "co")
    pidfile = copy / "var" / "run" / "supervisord.pid"
    try:
        first = run(copy)
        assert first.returncode == 0, first
        assert "starting supervisord" in first.stderr
        sock = copy / "var" / "run" / "share.sock"
        assert f"-fsdev proxy,id=fs0,socket={sock} \\\n" in first.stdout
        assert "-device virtio-9p-pci,fsdev=fs0,mount_tag=share" in first.stdout
        assert "mount -t 9p -o trans=virtio,version=9p2000.L share /mnt" in first.stdout

        status_command = printed(first.stdout, "Status")
        status = subprocess.run(status_command, capture_output=True, text=True)
        assert re.match(r"proxyd\s+RUNNING\s+pid (\d+)", status.stdout), status
        master = int(re.findall(r"pid (\d+)", status.stdout)[0])
        client = connect(sock)
        try:
            assert client.lstat("/README").ok
        finally:
            client.close()
        assert (copy / "var" / "export" / "README").is_file()
        table = subprocess.run(printed(first.stdout, "Workers"), capture_output=True, text=True)
        assert table.returncode == 0 and re.search(r"^share\s", table.stdout, re.M), table

        # Again, with the guest: the same daemon serves it, and its audit lines follow.
        second = run(copy, "--guest", timeout=400)
        assert second.returncode == 0, second
        assert "already running" in second.stderr
        assert second.stdout.startswith(first.stdout)
        guest = second.stdout[len(first.stdout) :]
        assert "$ cat /mnt/from-guest.txt\nwritten by the guest at " in guest
        assert "(workload exit status 0;" in guest
        assert re.search(r"\screate\s+//from-guest\.txt\s+ok\s", guest), guest
        assert (copy / "var" / "export" / "from-guest.txt").read_text().startswith("written by")
        again = subprocess.run(status_command, capture_output=True, text=True)
        assert f"pid {master}," in again.stdout  # the same proxyd all along

        supervisord = int(pidfile.read_text())
        stop = subprocess.run(printed(first.stdout, "Stop"), capture_output=True, text=True)
        assert stop.returncode == 0, stop
        wait_until(lambda: not os.path.exists(f"/proc/{supervisord}"), 30, "supervisord gone")
        assert not sock.exists() and not os.path.exists(f"/proc/{master}")
    finally:
        if pidfile.exists():  # supervisord detached: stop it by its pid file
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not mentioning(f"{copy}/var/run/"), 30, "daemons gone")
        for pid in mentioning(str(copy)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
