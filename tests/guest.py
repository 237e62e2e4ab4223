"""Boot a throw-away Linux guest under QEMU whose 9p share is served over the proxy protocol.

The guest (built by scripts/guest-build) mounts the share at /mnt, runs a shell workload there
with busybox, prints ``GUEST-EXIT=<status>`` and powers off. The server on the other end of the
proxy socket is up to the caller: the reference virtfs-proxy-helper or proxyd.

Real programs ride along when asked: ``Guest(workload, ..., programs=["stress-ng"])`` carries
the host's Debian binary, every shared library ``ldd`` lists for it and the dynamic loader, at
their host paths, plus the data files in ``PROGRAM_DATA`` (dbench's client.txt), and links
each program into /bin so the workload calls it by name. Nothing is rebuilt for it: the
programs go in one more cpio archive appended to the image (the kernel unpacks them in turn).
The programs must be installed on the host (scripts/test installs stress-ng, dbench, fsmark).

``run_command(cmdline, socket_path=... | sock_fd=..., programs=[...])`` runs one command line in
a guest on the share (cwd /mnt) and returns its output, exit status and duration: what a
benchmark needs, e.g. ``run_command("dbench -c /usr/share/dbench/client.txt -t 30 2",
sock_fd=fd, programs=["dbench"])``.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = ROOT / "var" / "guest"
BUILD_SCRIPT = ROOT / "scripts" / "guest-build"
QEMU = "qemu-system-x86_64"
KERNEL_ARGS = "console=ttyS0 quiet panic=-1"

# Files a program needs besides its libraries, carried with it at the same path. dbench's
# "client.txt" is the NetBench load its man page describes (Debian: package dbench).
PROGRAM_DATA: dict[str, tuple[str, ...]] = {"dbench": ("/usr/share/dbench/client.txt",)}


class GuestError(RuntimeError):
    """The guest could not be built or did not finish in time."""


@dataclass(frozen=True)
class GuestImages:
    vmlinux: Path  # what we boot: uncompressed, PVH entry, no slow decompression under TCG
    vmlinuz: Path
    initramfs: Path


@dataclass(frozen=True)
class GuestResult:
    output: str  # the serial console, "\r\n" folded to "\n"
    exit_status: int | None  # the workload's, None when it never ran to the end
    mounted: bool
    duration: float  # seconds, QEMU start to exit
    mount_time: float | None  # seconds, QEMU start to GUEST-MOUNTED
    qemu_returncode: int | None


@functools.cache
def ensure_guest_built() -> GuestImages:
    """Run scripts/guest-build (cheap when up to date; once per process) and return its output."""
    proc = subprocess.run(
        [str(BUILD_SCRIPT)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise GuestError(
            f"{BUILD_SCRIPT} failed with status {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    images = GuestImages(
        vmlinux=GUEST_DIR / "vmlinux",
        vmlinuz=GUEST_DIR / "vmlinuz",
        initramfs=GUEST_DIR / "initramfs.cpio.gz",
    )
    missing = [str(p) for p in vars(images).values() if not p.is_file()]
    if missing:
        raise GuestError(f"{BUILD_SCRIPT} succeeded but did not produce {', '.join(missing)}")
    return images


def _cpio_newc(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A "newc" cpio archive of {name: (st_mode, data)}, as the kernel unpacks it: regular
    files, directories (data empty) and symlinks (data is the target). Parents must come
    before what they hold: the kernel creates no missing directory."""
    out = bytearray()

    def entry(ino: int, name: str, mode: int, data: bytes) -> None:
        name_z = name.encode() + b"\0"
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_z), 0)
        out.extend(b"070701" + b"".join(b"%08x" % f for f in fields) + name_z)
        out.extend(b"\0" * (-len(out) % 4))  # name and data are each padded to 4 bytes
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, (mode, data)) in enumerate(files.items(), start=1):
        entry(ino, name, mode, data)
    entry(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def _shared_objects(binary: str) -> list[str]:
    """The shared libraries and the dynamic loader `ldd` lists for `binary`: host paths, as
    the loader looks them up (carried at those paths, the guest's loader finds them too).
    Raises GuestError when a library is missing or ldd fails."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    if "not a dynamic executable" in proc.stdout + proc.stderr:
        return []  # static: nothing else to carry
    if proc.returncode != 0 or "not found" in proc.stdout:
        raise GuestError(f"ldd {binary} failed:\n{proc.stdout}{proc.stderr}")
    paths = []
    for line in proc.stdout.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", the loader as
        # "/lib64/ld-linux-x86-64.so.2 (0x...)", and "linux-vdso.so.1 (0x...)": the kernel's.
        words = line.split()
        path = words[words.index("=>") + 1] if "=>" in words else words[0] if words else ""
        if path.startswith("/"):
            paths.append(path)
    return paths


@functools.cache
def program_archive(programs: tuple[str, ...]) -> bytes:
    """A gzip'd newc cpio archive carrying each program of `programs` (a name looked up on
    the host's PATH, or an absolute path) into the guest: the binary at its host path with
    a link to it in /bin, its shared libraries and loader (``ldd``), and its
    ``PROGRAM_DATA``. Compressed (level 1: 0.6 s for stress-ng, dbench and fs_mark, 60 MB
    to 14 MB), because a large -initrd is slow to load under TCG: measured, the guest
    mounted after 8.7-10 s with the archive uncompressed, 3.9-5.2 s with it compressed.
    Raises GuestError naming a program that is not installed."""
    carried: list[str] = []  # host paths, carried to the same path in the guest
    links: dict[str, str] = {}  # /bin/NAME -> the program
    for name in programs:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path is None or not os.path.isfile(path):
            raise GuestError(
                f"{name}: not installed on the host (scripts/test installs the Debian "
                "packages of the programs the guest tests carry)"
            )
        carried += [path, *_shared_objects(path), *PROGRAM_DATA.get(os.path.basename(path), ())]
        if os.path.dirname(path) != "/bin":
            links[f"/bin/{os.path.basename(path)}"] = path
    files: dict[str, tuple[int, bytes]] = {}
    for path in sorted(set(carried)):
        for parent in reversed(Path(path).parents[:-1]):  # /usr before /usr/bin; not "/"
            files.setdefault(str(parent).lstrip("/"), (stat.S_IFDIR | 0o755, b""))
        host = Path(path)
        # The file itself (libz.so.1 is a link to libz.so.1.2.13 on the host: its content).
        mode = stat.S_IMODE(host.stat().st_mode)
        files[path.lstrip("/")] = (stat.S_IFREG | mode, host.read_bytes())
    for link, target in links.items():
        files[link.lstrip("/")] = (stat.S_IFLNK | 0o777, target.encode())
    return gzip.compress(_cpio_newc(files), compresslevel=1, mtime=0)


def _qemu_opt(value: str) -> str:
    return value.replace(",", ",,")  # a comma inside a QEMU option value is written twice


class Guest:
    """One running guest: QEMU started, its console read line by line in a thread.

    Give exactly one of ``socket_path`` (a listening server's socket, QEMU connects and unlinks
    it) or ``sock_fd`` (our end of a connected socketpair, inherited by QEMU). ``programs``:
    host programs the workload may call by name (see ``program_archive``). ``on_line`` is
    called from the reader thread with each console line (``\r\n`` folded) as it arrives, so a
    test can act while the workload runs; ``wait()`` gives the result.
    """

    def __init__(
        self,
        workload: str,
        *,
        socket_path: str | None = None,
        sock_fd: int | None = None,
        on_line: Callable[[str], None] | None = None,
        programs: Sequence[str] = (),
    ) -> None:
        if socket_path is not None and sock_fd is None:
            fsdev = f"proxy,id=fs0,socket={_qemu_opt(socket_path)}"
            pass_fds: tuple[int, ...] = ()
        elif sock_fd is not None and socket_path is None:
            fsdev = f"proxy,id=fs0,sock_fd={sock_fd}"
            pass_fds = (sock_fd,)
        else:
            raise ValueError("give exactly one of socket_path and sock_fd")
        images = ensure_guest_built()
        carried = program_archive(tuple(programs)) if programs else b""
        self._on_line = on_line
        self._lines: list[str] = []
        self._times: list[float] = []  # time.monotonic() at which each line arrived
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._eof = False
        self.mounted_at: float | None = None  # time.monotonic() of GUEST-MOUNTED
        self.ended = 0.0  # time.monotonic() of the console's end

        # The kernel unpacks concatenated archives in turn, gzip members included, so the
        # programs and the per-boot workload ride along as more archives and the base image
        # is never rebuilt for them.
        script = {"workload.sh": (stat.S_IFREG | 0o755, workload.encode())}
        extra = gzip.compress(_cpio_newc(script), mtime=0)
        # Closed (deleted) by wait() or kill(), once QEMU is gone.
        self._initrd = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="guest-initrd-", suffix=".cpio.gz"
        )
        self._initrd.write(images.initramfs.read_bytes() + carried + extra)
        self._initrd.flush()
        cmd = [
            QEMU,
            "-accel",
            "tcg",  # no KVM here; -cpu max measured no faster than the default
            "-m",
            "512",
            "-nographic",  # serial console on stdout
            "-nic",
            "none",  # no NIC: spares SeaBIOS the iPXE option ROM
            "-no-reboot",  # the guest's poweroff (or a panic, panic=-1) ends QEMU
            "-kernel",
            str(images.vmlinux),
            "-initrd",
            self._initrd.name,
            "-append",
            KERNEL_ARGS,
            "-fsdev",
            fsdev,
            "-device",
            "virtio-9p-pci,fsdev=fs0,mount_tag=share",
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )
        self._reader = threading.Thread(target=self._read, name=f"guest-{self.proc.pid}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                now = time.monotonic()
                with self._changed:
                    if self.mounted_at is None and line.endswith("GUEST-MOUNTED"):
                        self.mounted_at = now
                    self._lines.append(line)
                    self._times.append(now)
                    self._changed.notify_all()
                if self._on_line is not None:
                    self._on_line(line)
        finally:
            with self._changed:
                self.ended = time.monotonic()
                self._eof = True
                self._changed.notify_all()

    def output(self) -> str:
        """The console so far."""
        with self._lock:
            return self._joined()

    def _joined(self) -> str:
        return "\n".join(self._lines) + "\n"

    def timeline(self) -> list[tuple[float, str]]:
        """(seconds since QEMU started, line) for every console line so far."""
        with self._lock:
            return [
                (t - self.started, line) for t, line in zip(self._times, self._lines, strict=True)
            ]

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first console line matching the regex ``pattern`` (searched, not anchored)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self._lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "the guest stopped" if self._eof else f"not within {timeout} s"
                    raise GuestError(
                        f"no console line matches {pattern!r}: {why}\n{self._joined()}"
                    )
                self._changed.wait(left)

    def wait(self, timeout: float = 180) -> GuestResult:
        """Wait for QEMU to exit (kill it after ``timeout`` s from its start) and report."""
        try:
            self.proc.wait(timeout=max(0.0, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestError(
                f"guest did not finish within {timeout} s; QEMU killed. Output:\n{self.output()}"
            ) from None
        finally:
            self._reader.join(10)
            self._initrd.close()
        duration = self.ended - self.started  # console EOF: QEMU is gone
        output = self.output()
        # Not anchored at the line start: firmware escape codes may precede the first marker.
        exit_match = re.search(r"GUEST-EXIT=(\d+)$", output, re.MULTILINE)
        return GuestResult(
            output=output,
            exit_status=int(exit_match.group(1)) if exit_match else None,
            mounted=self.mounted_at is not None,
            duration=duration,
            mount_time=None if self.mounted_at is None else self.mounted_at - self.started,
            qemu_returncode=self.proc.returncode,
        )

    def kill(self) -> None:
        """Stop QEMU now (if it still runs) and release everything; idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(10)
        self._initrd.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def run_guest(
    workload: str,
    *,
    socket_path: str | None = None,
    sock_fd: int | None = None,
    timeout: float = 180,
    on_line: Callable[[str], None] | None = None,
    programs: Sequence[str] = (),
) -> GuestResult:
    """Boot the guest with ``workload`` as /workload.sh, wait for it to power off, report."""
    guest = Guest(
        workload, socket_path=socket_path, sock_fd=sock_fd, on_line=on_line, programs=programs
    )
    return guest.wait(timeout)


@dataclass(frozen=True)
class CommandResult:
    status: int  # the command's exit status (sh -c)
    output: str  # what it printed, stdout and stderr, between the markers ("\n" lines)
    duration: float  # seconds from its start to its end (host times of the console markers)
    guest: GuestResult  # the whole boot: console, mount time, QEMU's exit status


def run_command(
    command: str,
    *,
    socket_path: str | None = None,
    sock_fd: int | None = None,
    programs: Sequence[str] = (),
    timeout: float = 600,
) -> CommandResult:
    """Boot a guest on the server at ``socket_path`` or ``sock_fd`` (as ``Guest``), run the
    shell command line ``command`` once in the share (cwd /mnt) with ``programs`` carried,
    and report. ``duration`` covers the command alone, not the boot (6-30 s under TCG).

    Raises GuestError when the guest cannot mount the share or the command does not end
    within ``timeout`` seconds of QEMU's start; a failing command is a result (``status``).
    """
    workload = f"echo GUEST-RUN-BEGIN\nsh -c {shlex.quote(command)} 2>&1\necho GUEST-RUN-END=$?\n"
    guest = Guest(workload, socket_path=socket_path, sock_fd=sock_fd, programs=programs)
    result = guest.wait(timeout)
    begin = end = None
    lines: list[str] = []
    for at, line in guest.timeline():
        if end is None and begin is not None:
            if match := re.search(r"GUEST-RUN-END=(\d+)$", line):
                end, status = at, int(match.group(1))
            else:
                lines.append(line)
        elif line.endswith("GUEST-RUN-BEGIN"):
            begin = at
    if begin is None or end is None:
        what = "could not mount the share" if not result.mounted else "did not run to its end"
        raise GuestError(f"{command!r}: the guest {what}. Output:\n{result.output}")
    return CommandResult(status, "\n".join(lines) + "\n", end - begin, result)
