"""conf/proxyd.service, checked with systemd's own tools and its confinement rebuilt
around a real proxyd.

systemd does not run as PID 1 here, so nothing starts the unit itself (and no test
pretends to). Instead:

* `systemd-analyze verify` has no complaint; `systemd-analyze security` rates the unit's
  exposure at most 4.0; every directive has its reason in a comment;
* the paths of conf/proxyd.toml lie outside what the unit makes read-only, hidden or
  private, and the directives that would break guests are absent;
* a real proxyd runs under what the unit imposes on its processes, rebuilt from the
  unit's text with the kernel interfaces systemd uses: the bounding set and
  no_new_privs (setpriv), the seccomp filters of SystemCallFilter=,
  MemoryDenyWriteExecute=, RestrictAddressFamilies= and RestrictNamespaces= (the rules
  systemd loads, with pyseccomp), and the device policy (the cgroup v1 devices
  controller, written as systemd writes it on that hierarchy). It serves a client:
  device nodes, setuid files, CHOWN, xattrs; and under the same rules a process can
  re-exec itself keeping its capabilities (what `proxyd upgrade` will do).

The rebuilt rules may be stricter than systemd's (pseudo terminals and the implied
read access to the RTC are left out), never looser: what serves here serves there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pyseccomp
import pytest

from tests.daemon import children, title, wait_until
from tests.proxyclient import CHECKOUT, ProxyClient

UNIT = CHECKOUT / "conf" / "proxyd.service"
BIN = Path(sys.executable).parent  # the environment running the tests has proxyd
EXPOSURE_TARGET = 4.0
DEVICES_CGROUP = Path("/sys/fs/cgroup/devices")

# Capability numbers from linux/capability.h, by the names systemd uses.
CAPS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_ADMIN": 21,
    "CAP_MKNOD": 27,
}
WORKER_CAPS = 0x80000DB  # README, "What the serving process is"

# Namespace flags from linux/sched.h, by RestrictNamespaces= names.
NAMESPACES = {
    "cgroup": 0x02000000,
    "ipc": 0x08000000,
    "net": 0x40000000,
    "mnt": 0x00020000,
    "pid": 0x20000000,
    "user": 0x10000000,
    "uts": 0x04000000,
}
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
# DevicePolicy=closed: the pseudo devices every service may use (systemd.resource-control(5)).
PSEUDO_DEVICES = ("null", "zero", "full", "random", "urandom", "tty", "ptmx")


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order; keys may repeat (systemd
    merges DeviceAllow=, SystemCallFilter=, ...)."""
    found, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(key: str, section: str = "Service") -> list[str]:
    """Every value assigned to `key` in the shipped unit."""
    return [v for s, k, v in directives(UNIT.read_text()) if (s, k) == (section, key)]


def value(key: str) -> str:
    """The one value of `key` in [Service]; fails if it is missing or repeated."""
    (found,) = values(key)
    return found


def installable_copy(tmp: Path) -> Path:
    """The shipped unit, its ExecStart binary pointing at this environment's proxyd
    (systemd-analyze checks that it exists); nothing else changes."""
    unit = tmp / "proxyd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/proxyd", str(BIN / "proxyd")))
    return unit


# --- the unit as systemd reads it ----------------------------------------------------------


def test_verify_has_no_complaint(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", installable_copy(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values too: every complaint is on stderr.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_exposure_at_most_target(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", installable_copy(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for proxyd\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= EXPOSURE_TARGET, result.stdout


def test_restart_and_stop_semantics_kept() -> None:
    assert value("Type") == "notify"  # READY=1 from the master (tests/test_notify.py)
    assert value("NotifyAccess") == "main"  # the master alone, never a worker
    assert value("ExecStart") == "/usr/local/bin/proxyd -n --config /etc/proxyd/proxyd.toml"
    assert value("ExecReload").startswith("/usr/local/bin/proxyd reload ")  # waits, reports
    # TERM to the master alone, SIGKILL to the whole cgroup after TimeoutStopSec, and at
    # once when the master died unasked (the fd store keeps the guests' connections).
    assert (value("KillMode"), value("KillSignal")) == ("mixed", "SIGTERM")
    assert int(value("FileDescriptorStoreMax")) > 0
    assert value("Restart") == "on-failure"
    assert value("RestartPreventExitStatus").split() == ["2", "3", "4"]
    assert value("RuntimeDirectory") == "proxyd"


def test_every_directive_has_its_reason() -> None:
    """Each paragraph of directives opens with a comment (a paragraph ends at a blank
    line or a section header)."""
    unexplained, explained = [], False
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("["):
            explained = False
        elif line.startswith("#"):
            explained = True
        elif not explained:
            unexplained.append(line)
    assert unexplained == []


def test_directives_that_would_break_guests_are_absent() -> None:
    text = UNIT.read_text()
    breaks = {
        "RestrictSUIDSGID": "guests create setuid and setgid files",
        "PrivateDevices": "it drops CAP_MKNOD: guests create device nodes",
        "PrivateUsers": "files must belong to the guests' uids on the host",
        "ProcSubset": "workers read /proc/sys/kernel/cap_last_cap",
        "User": "workers chown to any uid and create device nodes as root",
        "DynamicUser": "workers chown to any uid and create device nodes as root",
        "RootDirectory": "exports live anywhere on the host",
    }
    for key, why in breaks.items():
        assert not re.search(rf"^{key}=", text, re.M), f"{key}=: {why}"


def protected_trees() -> list[str]:
    """The trees the unit makes read-only, hidden or private to the service."""
    trees = []
    system = value("ProtectSystem")
    assert system in ("yes", "full"), "strict: exports need ReadWritePaths=, check them here"
    trees += ["/usr/", "/boot/", "/efi/"] + (["/etc/"] if system == "full" else [])
    if value("ProtectHome") != "no":
        trees += ["/home/", "/root/", "/run/user/"]
    if value("PrivateTmp") == "yes":
        trees += ["/tmp/", "/var/tmp/"]
    return trees


def test_shipped_configuration_outside_protected_trees() -> None:
    """Exports, sockets, the log file and the metrics file must be writable and, for
    sockets, shared with QEMU: none may lie where the unit makes the file system
    read-only or private."""
    text = (CHECKOUT / "conf" / "proxyd.toml").read_text()
    config = tomllib.loads(text)
    paths = [config["daemon"]["control_socket"]]
    for export in config["export"]:
        paths += [export["path"], export["socket"]]
    log_file = re.search(r'^# log_file = "(.*)"$', text, re.M)
    assert log_file
    paths.append(log_file[1])
    metrics_file = re.search(r'^# metrics_file = "(.*)"$', text, re.M)
    assert metrics_file
    paths.append(metrics_file[1])
    trees = protected_trees()
    assert [p for p in paths if any(f"{p}/".startswith(t) for t in trees)] == []


# --- the unit's confinement around a real proxyd --------------------------------------------


def bounding_mask() -> int:
    """CapabilityBoundingSet= as the 64-bit mask /proc/PID/status shows."""
    return sum(1 << CAPS[name] for name in value("CapabilityBoundingSet").split())


def setpriv_argv() -> list[str]:
    """setpriv doing what CapabilityBoundingSet= and NoNewPrivileges= do."""
    caps = value("CapabilityBoundingSet").split()
    keep = ",".join("+" + name.removeprefix("CAP_").lower() for name in caps)
    argv = ["setpriv", f"--bounding-set=-all,{keep}"]
    if value("NoNewPrivileges") == "yes":
        argv.append("--no-new-privs")
    return argv + ["--"]


def syscall_sets() -> dict[str, list[str]]:
    """systemd's named system call sets, as `systemd-analyze syscall-filter` lists them."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    sets: dict[str, list[str]] = {}
    members: list[str] = []
    for line in listing.splitlines():
        word = line.strip()
        if line.startswith("@"):
            members = sets.setdefault(word, [])
        elif word and not word.startswith("#"):
            members.append(word)
    return sets


def expand(name: str, sets: dict[str, list[str]]) -> set[str]:
    """A system call name, or a set's members, nested sets included."""
    if not name.startswith("@"):
        return {name}
    return set().union(*(expand(member, sets) for member in sets[name]))


def allowed_syscalls() -> set[str]:
    """SystemCallFilter=: the allow-list lines, less the `~` lines."""
    sets = syscall_sets()
    allowed: set[str] = set()
    for line in values("SystemCallFilter"):
        names = set().union(*(expand(n, sets) for n in line.removeprefix("~").split()))
        allowed = allowed - names if line.startswith("~") else allowed | names
    return allowed


def seccomp_filters() -> list[pyseccomp.SyscallFilter]:
    """The filters systemd loads for the unit's system call directives (systemd's
    seccomp-util.c: one filter per directive, stacked; the kernel applies the strictest
    answer)."""
    filters = []
    if value("MemoryDenyWriteExecute") == "yes":
        mdwe = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        wx = PROT_WRITE | PROT_EXEC
        refuse = pyseccomp.ERRNO(errno.EPERM)
        mdwe.add_rule(refuse, "mmap", pyseccomp.Arg(2, pyseccomp.MASKED_EQ, wx, wx))
        for call in ("mprotect", "pkey_mprotect"):
            mdwe.add_rule(refuse, call, pyseccomp.Arg(2, pyseccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        mdwe.add_rule(refuse, "shmat", pyseccomp.Arg(2, pyseccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
        filters.append(mdwe)

    families = [getattr(socket, f) for f in value("RestrictAddressFamilies").split()]
    assert families == [socket.AF_UNIX], "rebuild the rule below for more than one family"
    af = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    af.add_rule(
        pyseccomp.ERRNO(errno.EAFNOSUPPORT),
        "socket",
        pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX),
    )
    filters.append(af)

    kept = {NAMESPACES[n] for n in value("RestrictNamespaces").split()}
    ns = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    ns.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")  # flags out of reach: glibc falls back
    ns.add_rule(pyseccomp.ERRNO(errno.EPERM), "setns", pyseccomp.Arg(1, pyseccomp.EQ, 0))
    for flag in set(NAMESPACES.values()) - kept:
        for call, arg in (("unshare", 0), ("clone", 0), ("setns", 1)):
            ns.add_rule(
                pyseccomp.ERRNO(errno.EPERM),
                call,
                pyseccomp.Arg(arg, pyseccomp.MASKED_EQ, flag, flag),
            )
    filters.append(ns)

    # The allow-list last, as systemd loads it: it may not allow seccomp(2) itself.
    deny = pyseccomp.ERRNO(getattr(errno, value("SystemCallErrorNumber")))
    allow_list = pyseccomp.SyscallFilter(deny)
    for name in sorted(allowed_syscalls()):
        with contextlib.suppress(OSError):  # unknown to libseccomp: systemd skips it too
            allow_list.add_rule(pyseccomp.ALLOW, name)
    filters.append(allow_list)

    for f in filters:
        f.set_attr(pyseccomp.Attr.CTL_NNP, 0)  # no_new_privs is NoNewPrivileges='s (setpriv)
    return filters


def device_rules() -> list[str]:
    """DevicePolicy= and DeviceAllow= as cgroup v1 devices.allow lines."""
    assert value("DevicePolicy") == "closed"
    rules = []
    for name in PSEUDO_DEVICES:
        rdev = os.stat(f"/dev/{name}").st_rdev
        rules.append(f"c {os.major(rdev)}:{os.minor(rdev)} rwm")
    for entry in values("DeviceAllow"):
        spec, access = entry.split()
        kinds = {"char-*": "c", "block-*": "b"}
        assert spec in kinds, f"DeviceAllow={entry}: teach device_rules() this specifier"
        rules.append(f"{kinds[spec]} *:* {access}")
    return rules


class Confinement:
    """The unit's rules for one process tree: a devices cgroup of its own, the seccomp
    filters (loaded in the child before it executes anything), setpriv in front."""

    def __init__(self, tmp: Path) -> None:
        self.filters = seccomp_filters()
        rules = device_rules()
        self.cgroup = DEVICES_CGROUP / f"proxyd-unit-{os.getpid()}-{tmp.name}"
        self.cgroup.mkdir()
        try:
            (self.cgroup / "devices.deny").write_text("a")
            for rule in rules:
                (self.cgroup / "devices.allow").write_text(rule)
        except BaseException:
            self.cgroup.rmdir()
            raise

    def _enter(self) -> None:
        (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))
        for f in self.filters:
            f.load()

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen:
        return subprocess.Popen(setpriv_argv() + argv, preexec_fn=self._enter, **kwargs)  # noqa: PLW1509

    def close(self) -> None:
        """Remove the cgroup once every process in it is gone (idle workers leave when
        their master's channel closes, a moment after it)."""
        wait_until(
            lambda: not (self.cgroup / "cgroup.procs").read_text().split(), 15, "empty cgroup"
        )
        self.cgroup.rmdir()


@pytest.fixture
def confinement(tmp_path: Path) -> Iterator[Confinement]:
    c = Confinement(tmp_path)
    try:
        yield c
    finally:
        c.close()


def fields(status: str) -> dict[str, str]:
    """The `Name:\tvalue` lines of a /proc/PID/status text."""
    return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)


def status(pid: int) -> dict[str, str]:
    return fields(Path(f"/proc/{pid}/status").read_text())


def test_proxyd_serves_under_the_units_confinement(
    tmp_path: Path, confinement: Confinement
) -> None:
    export = tmp_path / "export"
    export.mkdir()
    sock_path = tmp_path / "s.sock"
    log = tmp_path / "proxyd.log"
    with open(log, "wb") as out:
        proc = confinement.popen(
            [sys.executable, "-m", "proxyd", "-n", "-p", str(export)]
            + ["-s", str(sock_path), "-u", "0", "-g", "0"],
            cwd=CHECKOUT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        wait_until(
            lambda: b'"worker spawned"' in log.read_bytes() or proc.poll() is not None,
            15,
            "a worker",
        )
        assert proc.poll() is None, log.read_text()
        master = status(proc.pid)
        assert int(master["CapBnd"], 16) == int(master["CapEff"], 16) == bounding_mask()
        assert master["NoNewPrivs"] == "1"
        assert int(master["Seccomp_filters"]) == len(confinement.filters)
        assert f":/{confinement.cgroup.name}" in Path(f"/proc/{proc.pid}/cgroup").read_text()

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(sock_path))
        os.unlink(sock_path)
        client = ProxyClient(sock)
        # Device nodes of any number, char and block: DeviceAllow= "m" lets them be made.
        tty = os.makedev(4, 64)
        disk = os.makedev(8, 0)
        assert client.mknod(0, 0, "/tty", stat.S_IFCHR | 0o620, tty).ok
        assert client.mknod(0, 0, "/disk", stat.S_IFBLK | 0o660, disk).ok
        # A setuid file of the guest's, then given away and made setuid-setgid.
        created = client.create("/suid", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o4755, 1000, 1000)
        assert created.ok
        os.close(created.fd)
        assert client.chown("/suid", 4242, 4343).ok
        assert client.chmod("/suid", 0o6755).ok
        assert client.lsetxattr("/suid", "user.origin", b"guest").ok
        # trusted.* needs CAP_SYS_ADMIN, which workers never keep (unit or not).
        assert not client.lsetxattr("/suid", "trusted.origin", b"guest").ok
        client.close()
        # Every worker idle before the stop: a spare still starting then would log its
        # own error (its master gone), which is no matter of the unit's.
        workers = wait_until(
            lambda: (w := children(proc.pid)) and all(title(p).endswith(" idle") for p in w) and w,
            15,
            "idle workers",
        )

        st = os.lstat(export / "tty")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == tty
        st = os.lstat(export / "disk")
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == disk
        st = os.lstat(export / "suid")
        assert stat.S_IMODE(st.st_mode) == 0o6755 and (st.st_uid, st.st_gid) == (4242, 4343)
        assert os.getxattr(export / "suid", "user.origin") == b"guest"
        assert os.listxattr(export / "suid") == ["user.origin"]
        # Workers sandboxed as usual, inside the unit's rules: their filter stacks on ours.
        w = status(workers[0])
        assert int(w["CapBnd"], 16) == int(w["CapEff"], 16) == WORKER_CAPS
        assert int(w["Seccomp_filters"]) == len(confinement.filters) + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()
    levels = re.findall(r'"level":"(\w+)"', log.read_text())
    assert levels and not {"error", "critical"} & set(levels), log.read_text()


def test_reexec_keeps_capabilities_under_the_units_confinement(confinement: Confinement) -> None:
    """`proxyd upgrade` will execve the proxyd program again: no_new_privs and the
    filters let it, and the new program holds the same capabilities."""
    show = "print(open('/proc/self/status').read())"
    reexec = f"import os, sys; os.execv(sys.executable, [sys.executable, '-c', {show!r}])"
    proc = confinement.popen([sys.executable, "-c", reexec], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    after = fields(out)
    mask = bounding_mask()
    assert int(after["CapBnd"], 16) == int(after["CapPrm"], 16) == int(after["CapEff"], 16) == mask
    assert after["NoNewPrivs"] == "1"
