"""Root never follows a path another user controls (issue 10.5).

QEMU's uid may write the directory of its socket (it unlinks the socket after
connecting, and proxyd binds it again), so an unprivileged user can swap any entry
there for a symlink at any moment. These tests run a real unprivileged attacker
(uid 65534, a forked child with setresuid) that swaps entries with symlinks to
canaries (root-owned 0600 files outside every export) with renameat2(RENAME_EXCHANGE)
in a tight loop, while the master binds, re-binds and removes its sockets, writes
and removes its pidfile, and opens and reopens its log file. No canary may change
mode, owner, content or place, and the daemon must keep serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from proxyd import control, listener
from proxyd.config import ConfigError
from tests.daemon import Daemon, wait_until
from tests.proxyclient import CHECKOUT, ConnectionClosed, ProxyClient

NOBODY = 65534
RENAME_EXCHANGE = 2
PROXYD = [sys.executable, "-m", "proxyd"]
_libc = ctypes.CDLL(None, use_errno=True)


# --- canaries ------------------------------------------------------------------------


class Canaries:
    """Root-owned 0600 files outside every export, and the state they must keep."""

    def __init__(self, tmp: Path) -> None:
        self.outside = tmp / "outside"
        (self.outside / "dir").mkdir(parents=True)
        self.file = self.outside / "canary"
        self.in_dir = self.outside / "dir" / "s"  # what P/s names when P is swapped
        for path in (self.file, self.in_dir):
            path.write_bytes(b"canary\n")
            os.chmod(path, 0o600)
        self.before = self.state()

    def state(self) -> dict[str, tuple[int, int, int, bytes] | None]:
        """Every entry under `outside`: (st_mode, st_uid, st_gid, content)."""
        found: dict[str, tuple[int, int, int, bytes] | None] = {}
        for root, dirs, files in os.walk(self.outside):
            for name in dirs + files:
                path = os.path.join(root, name)
                st = os.lstat(path)
                content = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else b""
                found[path] = (st.st_mode, st.st_uid, st.st_gid, content)
        return found

    def assert_unchanged(self) -> None:
        after = self.state()
        assert after == self.before
        assert self.before[str(self.file)][:3] == (stat.S_IFREG | 0o600, 0, 0)


def attacker_directory(tmp: Path, name: str = "run") -> Path:
    """A directory the unprivileged user owns, as QEMU's uid may own its socket's."""
    directory = tmp / name
    directory.mkdir()
    os.chown(directory, NOBODY, NOBODY)
    return directory


# --- the attacker -----------------------------------------------------------------------


class Attacker:
    """A forked child running as uid/gid 65534 that, until stopped, swaps entries of
    `directory` with symlinks (renameat2 RENAME_EXCHANGE), as fast as it can.

    `links` maps a symlink name (created in `directory`, recreated when it disappears)
    to its target; `swaps` maps a name prefix to the symlink that entries starting
    with it are exchanged with. `swaps_done` counts successful exchanges.
    """

    def __init__(self, directory: Path, links: dict[str, Path], swaps: dict[str, str]) -> None:
        # [stop flag, rounds done, exchanges done], shared with the child over fork
        self._shared = mmap.mmap(-1, 24)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                self._run(dir_fd, links, swaps)
                code = 0
            finally:
                os._exit(code)
        os.close(dir_fd)
        # Running as nobody, its symlinks in place, before the test goes on.
        wait_until(lambda: self._counter(8) > 1, what="the attacker's first rounds")

    def _counter(self, offset: int) -> int:
        return struct.unpack_from("=Q", self._shared, offset)[0]

    @property
    def swaps_done(self) -> int:
        return self._counter(16)

    def _run(self, dir_fd: int, links: dict[str, Path], swaps: dict[str, str]) -> None:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        assert os.getresuid() == (NOBODY,) * 3
        done = rounds = 0
        while self._shared[0] == 0:
            rounds += 1
            struct.pack_into("=Q", self._shared, 8, rounds)
            present = set(os.listdir(dir_fd))
            for link, target in links.items():
                if link not in present:
                    with contextlib.suppress(OSError):
                        os.symlink(target, link, dir_fd=dir_fd)
            for name in present:
                for prefix, link in swaps.items():
                    if name.startswith(prefix) and name != link:
                        old, new = os.fsencode(name), os.fsencode(link)
                        if _libc.renameat2(dir_fd, old, dir_fd, new, RENAME_EXCHANGE) == 0:
                            done += 1
                            struct.pack_into("=Q", self._shared, 16, done)

    def stop(self) -> int:
        self._shared[0] = 1
        _, status = os.waitpid(self.pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        return self.swaps_done

    def __enter__(self) -> Attacker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shared[0] == 0:
            self._shared[0] = 1
            os.waitpid(self.pid, 0)


def standard_attack(directory: Path, canaries: Canaries, socket_name: str) -> Attacker:
    """The private directory swapped for a symlink to a directory holding a canary
    named like our socket, and the socket path swapped for a symlink to a canary."""
    return Attacker(
        directory,
        {"evil-dir": canaries.in_dir.parent, "evil-file": canaries.file},
        {".proxyd-": "evil-dir", socket_name: "evil-file"},
    )


# --- sockets -------------------------------------------------------------------------------


def connect(path: Path, timeout: float) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def test_rebinds_under_a_swapping_attacker_change_nothing_outside(tmp_path: Path) -> None:
    """A real daemon, its socket directory owned by the attacker: clients connect and
    unlink the path as QEMU does, hundreds of times, each forcing a re-bind, while the
    attacker swaps the private directory and the socket path for symlinks."""
    canaries = Canaries(tmp_path)
    run = attacker_directory(tmp_path)
    path = run / "vm.sock"
    export = {"name": "vm", "socket": str(path), "socket_uid": NOBODY, "socket_gid": NOBODY}
    with Daemon(tmp_path, [export]) as d:
        served = reset = 0
        deadline = time.monotonic() + 120
        with standard_attack(run, canaries, "vm.sock") as attack:
            # Until enough of both happened, however the processes get scheduled.
            while (served < 300 or attack.swaps_done < 3000) and time.monotonic() < deadline:
                sock = connect(path, timeout=5)
                if sock is None:  # a symlink or a closed socket there at this moment
                    time.sleep(0.002)  # a poll interval, not a synchronisation
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(path)  # as QEMU does: the master binds again
                client = ProxyClient(sock, timeout=10)
                try:
                    reply = client.lstat("/")
                except (ConnectionError, ConnectionClosed):
                    reset += 1  # queued on a socket closed meanwhile (a failed or old bind)
                    continue
                finally:
                    client.close()
                assert reply.ok
                served += 1
            swaps = attack.stop()
        rebinds = len(d.events("export socket re-bound"))
        print(f"served {served}, reset {reset}, {rebinds} re-binds, {swaps} exchanges")
        assert served >= 300 and swaps >= 3000
        canaries.assert_unchanged()
        assert d.proc.poll() is None
        # The daemon keeps serving once the attacker's symlinks are gone.
        for entry in run.iterdir():
            if entry.is_symlink():
                entry.unlink()
        if path.exists() and connect(path, timeout=1) is None:
            path.unlink()  # a socket left by a swap, nobody listening on it
        wait_until(lambda: path.exists(), what="the socket bound again")
        st = path.lstat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o770, NOBODY, NOBODY)
        client = ProxyClient(connect(path, timeout=5), timeout=10)
        assert client.lstat("/").ok
        client.close()
    canaries.assert_unchanged()


def test_bind_replace_and_close_under_a_swapping_attacker(tmp_path: Path) -> None:
    """listener.bind (export sockets) and control.bind (the control socket), many
    times in a row, with the previous socket left stale (replaced) or removed by
    Listener.close, while the attacker swaps the private directory and the path."""
    canaries = Canaries(tmp_path)
    run = attacker_directory(tmp_path)
    path = str(run / "s.sock")
    binders = (lambda p: listener.bind(p, NOBODY, NOBODY, 0o770), control.bind)
    bound = refused = 0
    deadline = time.monotonic() + 120
    with standard_attack(run, canaries, "s.sock") as attack:
        # Until enough of both happened, however the two processes get scheduled.
        while (bound < 300 or attack.swaps_done < 3000) and time.monotonic() < deadline:
            try:
                done = binders[bound % 2](path)
            except ConfigError:
                refused += 1  # the attacker's symlink or a swap was there: nothing done
                time.sleep(0.001)  # a poll interval: let the attacker run
                continue
            bound += 1
            done.close(unlink=bound % 3 == 0)  # otherwise a stale socket for the next bind
        swaps = attack.stop()
    print(f"{bound} binds, {refused} refused, attacker exchanged {swaps} times")
    assert bound >= 300 and swaps >= 3000
    canaries.assert_unchanged()


def test_close_removes_only_its_own_socket(tmp_path: Path) -> None:
    """Listener.close unlinks through the directory's descriptor, and only the inode
    it bound: a file (or symlink) swapped under the name stays."""
    run = attacker_directory(tmp_path)
    keep = run / "keep"
    keep.write_bytes(b"root's\n")
    bound = listener.bind(str(run / "vm.sock"), NOBODY, NOBODY, 0o770)
    os.rename(run / "vm.sock", run / "moved.sock")
    os.rename(keep, run / "vm.sock")  # what a swap leaves under the name
    bound.close(unlink=True)
    assert (run / "vm.sock").read_bytes() == b"root's\n"
    assert stat.S_ISSOCK((run / "moved.sock").lstat().st_mode)
    os.symlink(run / "moved.sock", run / "link.sock")
    again = listener.bind(str(run / "other.sock"), 0, 0, 0o770)
    os.rename(run / "link.sock", run / "other.sock")
    again.close(unlink=True)
    assert (run / "other.sock").is_symlink()


def test_a_symlink_to_a_live_socket_is_never_probed_nor_replaced(tmp_path: Path) -> None:
    """The stale-socket probe connects through an O_PATH|O_NOFOLLOW descriptor: a
    symlink at the socket path (to a live root-only socket elsewhere) is refused as
    'not a socket' and that socket sees no connection."""
    canaries = Canaries(tmp_path)
    run = attacker_directory(tmp_path)
    victim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    victim.bind(str(canaries.outside / "root.sock"))
    victim.listen(4)
    victim.setblocking(False)
    canaries.before = canaries.state()
    os.symlink(canaries.outside / "root.sock", run / "vm.sock")
    for bind in (listener.claim_path, lambda p: listener.bind(p, 0, 0)):
        try:
            bind(str(run / "vm.sock"))
        except ConfigError as e:
            assert "exists and is not a socket" in str(e)
        else:
            raise AssertionError("a symlink was taken for a socket")
    try:
        victim.accept()
        raise AssertionError("the probe connected through the symlink")
    except BlockingIOError:
        pass
    victim.close()
    assert (run / "vm.sock").is_symlink()
    canaries.assert_unchanged()


def test_socket_directory_is_never_reached_through_another_users_symlink(
    tmp_path: Path,
) -> None:
    """The socket's directory is walked (and created) component by component: a
    symlink in a directory the attacker may write is refused; one in a directory
    only root may write (like /var/run -> /run) is followed."""
    canaries = Canaries(tmp_path)
    run = attacker_directory(tmp_path)
    os.symlink(canaries.outside, run / "sub")  # placed by the attacker's uid
    os.lchown(run / "sub", NOBODY, NOBODY)
    export = tmp_path / "export"
    export.mkdir()
    for path in (run / "sub" / "vm.sock", run / "sub" / "new" / "vm.sock"):
        args = ["-n", "-p", str(export), "-s", str(path), "-u", "0", "-g", "0", "--once"]
        result = subprocess.run(
            [*PROXYD, *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2, result.stderr
        assert "'sub' is a symlink in a directory other users can write" in result.stderr
    canaries.assert_unchanged()
    # Root's own symlink in a root-only directory is followed, missing parts created.
    trusted = tmp_path / "root-only"
    trusted.mkdir(mode=0o755)
    os.symlink(tmp_path / "real", trusted / "link")
    done = listener.bind(str(trusted / "link" / "a" / "vm.sock"), 0, 0, 0o770)
    assert stat.S_ISSOCK((tmp_path / "real" / "a" / "vm.sock").lstat().st_mode)
    assert (tmp_path / "real" / "a").stat().st_mode & 0o777 == 0o755
    done.close()
    assert os.listdir(tmp_path / "real" / "a") == []


# --- pidfile ------------------------------------------------------------------------------


def _next_pids(count: int) -> range:
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    return range(last + 1, last + 1 + count)


@contextlib.contextmanager
def serving_with_pidfile(tmp: Path, pidfile: Path) -> Iterator[subprocess.Popen]:
    """proxyd -n --pidfile PIDFILE until the block ends (SIGTERM, exit code 0)."""
    export = tmp / "export"
    export.mkdir()
    args = ["-n", "-p", str(export), "-s", str(tmp / "vm.sock"), "-u", "0", "-g", "0"]
    proc = subprocess.Popen(
        [*PROXYD, *args, "--pidfile", str(pidfile)],
        cwd=CHECKOUT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: pidfile.is_file() and pidfile.read_text() == f"{proc.pid}\n",
            what="the pidfile",
        )
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        assert code == 0, proc.stderr.read() if proc.stderr else code


def test_pidfile_write_and_remove_never_follow_symlinks(tmp_path: Path) -> None:
    """In a directory the attacker may write: symlinks planted at the temporary names
    the pidfile could get from the next pids and at the pidfile itself; on stop, a
    root file swapped under the name must stay."""
    canaries = Canaries(tmp_path)
    run = attacker_directory(tmp_path)
    pidfile = run / "proxyd.pid"
    os.symlink(canaries.file, pidfile)
    for pid in _next_pids(3000):  # a pid-based temporary name: "{pidfile}.{pid}.tmp"
        os.symlink(canaries.file, run / f"proxyd.pid.{pid}.tmp")
    with serving_with_pidfile(tmp_path, pidfile) as proc:
        st = pidfile.lstat()
        assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid) == (
            stat.S_IFREG,
            0o644,
            0,
        )
        canaries.assert_unchanged()
        os.rename(pidfile, run / "moved.pid")  # what a swap under the name leaves
        (run / "other.pid").write_text(f"{proc.pid}\n")
        os.rename(run / "other.pid", pidfile)
    assert pidfile.read_text() == f"{proc.pid}\n"  # not the file proxyd wrote: left alone
    assert not list(run.glob(".proxyd.pid.*"))  # no temporary left behind
    canaries.assert_unchanged()


def test_a_fifo_at_the_pidfile_does_not_block_the_start(tmp_path: Path) -> None:
    """The running-pid check opens the pidfile O_NONBLOCK|O_NOFOLLOW and reads only a
    regular file: a FIFO there (nobody writing) is replaced, not waited on."""
    run = attacker_directory(tmp_path)
    pidfile = run / "proxyd.pid"
    os.mkfifo(pidfile)
    with serving_with_pidfile(tmp_path, pidfile):
        assert stat.S_ISREG(pidfile.lstat().st_mode)
    assert not pidfile.exists()  # removed at stop: it was the file proxyd wrote


# --- log file ----------------------------------------------------------------------------


def test_log_file_open_and_reopen_never_follow_another_users_symlink(tmp_path: Path) -> None:
    canaries = Canaries(tmp_path)
    logs = attacker_directory(tmp_path, "logs")
    log_file = logs / "proxyd.log"
    export = tmp_path / "export"
    export.mkdir()
    base = ["-n", "-p", str(export), "-s", str(tmp_path / "vm.sock"), "-u", "0", "-g", "0"]

    def start(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*PROXYD, *base, "--log-file", str(log_file), "--once", *extra],
            cwd=CHECKOUT,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )

    # At start: a symlink the attacker placed, a hard link to a root file.
    os.symlink(canaries.file, log_file)
    result = start()
    assert result.returncode == 2
    assert "log file" in result.stderr and "symlink in a directory other users" in result.stderr
    log_file.unlink()
    os.link(canaries.file, log_file)  # what an attacker could do without protected_hardlinks
    result = start()
    assert result.returncode == 2 and "not a regular file with a single name" in result.stderr
    log_file.unlink()
    canaries.assert_unchanged()

    # On SIGUSR1: logrotate moved the file and the attacker put a symlink in its place.
    with Daemon(tmp_path, [{"name": "a"}], log_file=str(log_file)) as d:
        os.rename(log_file, logs / "proxyd.log.1")
        d.log_path = logs / "proxyd.log.1"  # where the master keeps writing
        os.symlink(canaries.file, log_file)
        d.signal(signal.SIGUSR1)
        (refused,) = d.wait_event("cannot reopen log file")
        assert "symlink in a directory other users can write" in refused["error"]
        os.unlink(log_file)
        d.signal(signal.SIGUSR1)
        d.log_path = log_file
        d.wait_event("log reopened")  # a plain file there again: reopened
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o640 and log_file.stat().st_uid == 0
    canaries.assert_unchanged()


def test_log_file_symlink_in_a_root_only_directory_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real.log"
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    os.symlink(real, logs / "proxyd.log")
    with Daemon(tmp_path, [{"name": "a"}], log_file=str(logs / "proxyd.log")) as d:
        d.wait_event("worker spawned")
    assert '"event":"start"' in real.read_text()


def test_open_directory_refuses_a_symlink_loop_and_non_directories(tmp_path: Path) -> None:
    os.symlink("loop", tmp_path / "loop")
    (tmp_path / "file").write_text("")
    for name, code in (("loop", errno.ELOOP), ("file", errno.ENOTDIR), ("none", errno.ENOENT)):
        try:
            listener.open_directory(str(tmp_path / name / "x"))
        except OSError as e:
            assert e.errno == code, (name, e)
        else:
            raise AssertionError(name)
