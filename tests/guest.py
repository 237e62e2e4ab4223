"""Boot a throw-away Linux guest under QEMU whose 9p share is served over the proxy protocol.

The guest (built by scripts/guest-build) mounts the share at /mnt, runs a shell workload there
with busybox, prints ``GUEST-EXIT=<status>`` and powers off. The server on the other end of the
proxy socket is up to the caller: the reference virtfs-proxy-helper or proxyd.
"""

from __future__ import annotations

import functools
import gzip
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = ROOT / "var" / "guest"
BUILD_SCRIPT = ROOT / "scripts" / "guest-build"
QEMU = "qemu-system-x86_64"
KERNEL_ARGS = "console=ttyS0 quiet panic=-1"


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
    """A "newc" cpio archive of regular files {name: (mode, data)}, as the kernel unpacks it."""
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
        entry(ino, name, 0o100000 | mode, data)
    entry(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def _qemu_opt(value: str) -> str:
    return value.replace(",", ",,")  # a comma inside a QEMU option value is written twice


def run_guest(
    workload: str,
    *,
    socket_path: str | None = None,
    sock_fd: int | None = None,
    timeout: float = 180,
) -> GuestResult:
    """Boot the guest with ``workload`` as /workload.sh and the share on a proxy connection.

    Give exactly one of ``socket_path`` (a listening server's socket, QEMU connects and unlinks
    it) or ``sock_fd`` (our end of a connected socketpair, inherited by QEMU).
    """
    if socket_path is not None and sock_fd is None:
        fsdev = f"proxy,id=fs0,socket={_qemu_opt(socket_path)}"
        pass_fds: tuple[int, ...] = ()
    elif sock_fd is not None and socket_path is None:
        fsdev = f"proxy,id=fs0,sock_fd={sock_fd}"
        pass_fds = (sock_fd,)
    else:
        raise ValueError("give exactly one of socket_path and sock_fd")
    images = ensure_guest_built()

    # The kernel unpacks concatenated archives in turn, gzip members included, so the per-boot
    # workload rides along as a second archive and the base image is never rebuilt for it.
    extra = gzip.compress(_cpio_newc({"workload.sh": (0o755, workload.encode())}), mtime=0)
    with tempfile.NamedTemporaryFile(prefix="guest-initrd-", suffix=".cpio.gz") as initrd:
        initrd.write(images.initramfs.read_bytes() + extra)
        initrd.flush()
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
            initrd.name,
            "-append",
            KERNEL_ARGS,
            "-fsdev",
            fsdev,
            "-device",
            "virtio-9p-pci,fsdev=fs0,mount_tag=share",
        ]
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )
        try:
            raw, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raw, _ = proc.communicate()
            output = raw.decode(errors="replace").replace("\r\n", "\n")
            raise GuestError(
                f"guest did not finish within {timeout} s; QEMU killed. Output:\n{output}"
            ) from None
        duration = time.monotonic() - start

    output = raw.decode(errors="replace").replace("\r\n", "\n")
    # Not anchored at the line start: firmware escape codes may precede the first marker.
    exit_match = re.search(r"GUEST-EXIT=(\d+)$", output, re.MULTILINE)
    return GuestResult(
        output=output,
        exit_status=int(exit_match.group(1)) if exit_match else None,
        mounted=re.search(r"GUEST-MOUNTED$", output, re.MULTILINE) is not None,
        duration=duration,
        qemu_returncode=proc.returncode,
    )
