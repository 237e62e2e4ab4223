"""Everything proxyd does with privilege, in one place.

A worker calls enter_sandbox() once, before it reads a byte from a guest. Each step
is named after what it guarantees. Afterwards the process:

* sees only the export (chroot, cwd "/"), creates files with exactly the modes the
  guest asks for (umask 0);
* sees the export's mounts with every flag they have on the host (ro, nosymfollow,
  atime flags, ...) plus nodev, nosuid and noexec, and follows the host's later
  mounts and unmounts where the host's mounts are shared;
* holds only the seven capabilities the protocol needs, in its permitted and
  effective sets, and nothing else, even in its bounding set;
* can never gain privileges again through exec (no_new_privs).

Credentials() switches the effective uid/gid for the four requests that create
files as the guest's user, the way the reference helper does: saved ids stay 0, so
that switching back needs no capability, and CAP_DAC_OVERRIDE stays effective
because supplementary groups are not changed.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import socket
from collections.abc import Iterable

import pyseccomp

# Capability numbers from linux/capability.h.
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SYS_CHROOT = 18
CAP_SYS_ADMIN = 21
CAP_MKNOD = 27

WORKER_CAPS = (
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETGID,
    CAP_MKNOD,
    CAP_SETUID,
)
WORKER_CAP_MASK = sum(1 << c for c in WORKER_CAPS)
CREDENTIALED_CAP_MASK = 1 << CAP_DAC_OVERRIDE

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(Exception):
    """A sandbox step failed: the process must not serve."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_CapDataPair = _CapData * 2


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _set_caps(effective: int, permitted: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    data[0].effective, data[1].effective = effective & 0xFFFFFFFF, effective >> 32
    data[0].permitted, data[1].permitted = permitted & 0xFFFFFFFF, permitted >> 32
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def read_caps() -> tuple[int, int]:
    """(effective, permitted) of this process, as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    return (
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
    )


def _last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def _prctl(option: int, arg2: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0), what)


CLONE_NEWNS = 0x00020000
MS_REC, MS_SLAVE = 0x4000, 0x80000
MS_BIND = 0x1000
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x2, 0x4, 0x8
_SYS_MOUNT_SETATTR = 442  # one number on every architecture but alpha (calls added since 5.1)


class _MountAttr(ctypes.Structure):
    """struct mount_attr of mount_setattr(2), MOUNT_ATTR_SIZE_VER0 (32 bytes)."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def follow_host_mounts() -> None:
    """A mount namespace of our own that is a slave of the host's: mounts and unmounts
    the host makes in a shared mount (systemd makes / shared) reach this process, and
    nothing this process mounts reaches the host. A mount that is private on the host
    propagates nothing, so below one the process keeps the mounts present at this call
    (mount_namespaces(7), "MS_SLAVE")."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount(MS_SLAVE)")


def make_device_nodes_inert(path: str) -> None:
    """Device nodes in the export cannot be opened by this process, even as root, and
    nothing in it can be executed: the export is bound on itself (in the namespace of
    follow_host_mounts) and that mount, and every mount below it, gets nodev, nosuid
    and noexec ADDED to the flags it had on the host. mount_setattr(2) only sets the
    bits it is given, so ro, nosymfollow and the atime flags of the host's mounts stay
    (a remount with MS_BIND|MS_REMOUNT would replace them all, and only on the top
    mount). Guests still create device nodes (MKNOD is part of the protocol); proxyd
    never opens them, and now a compromised worker could not either.

    Raises OSError if a step fails (mount_setattr needs Linux 5.12).
    """
    target = os.fsencode(path)
    # A bind of a slave mount is a slave of the same peer group: it receives the host's
    # mount events below the export too.
    _check(_libc.mount(target, target, None, MS_BIND | MS_REC, None), "mount(MS_BIND)")
    attr = _MountAttr(MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, 0, 0, 0)
    ret = _libc.syscall(
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(AT_FDCWD),
        target,
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(ret, "mount_setattr(AT_RECURSIVE, nodev|nosuid|noexec)")


# --- ID-mapped exports ---------------------------------------------------------------

# One range of an export's uid_map or gid_map: (guest_first, host_first, count), the
# columns of /proc/PID/uid_map seen from the guest (user_namespaces(7)).
IdRange = tuple[int, int, int]
IdMap = tuple[IdRange, ...]

CLONE_NEWUSER = 0x10000000
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
MS_PRIVATE = 1 << 18
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429  # one number on every architecture but alpha


def map_id(ranges: IdMap, guest_id: int) -> int | None:
    """The host id the kernel stores for `guest_id` (0..2^32-2) through `ranges`, or
    None when no range holds it (the kernel then refuses with EOVERFLOW)."""
    for guest_first, host_first, count in ranges:
        if guest_first <= guest_id < guest_first + count:
            return host_first + guest_id - guest_first
    return None


MAP_TEXT_MAX = 4095  # bytes the kernel takes in one write of /proc/PID/uid_map (< a page)
MAP_RANGES_MAX = 340  # ranges a user namespace's map may hold (user_namespaces(7), 4.15+)


def namespace_map_text(ranges: IdMap) -> bytes:
    """What _mapping_namespace writes to /proc/PID/uid_map (or gid_map) for `ranges`:
    one "host_first guest_first count" line per range (the columns swapped, see there).
    At most MAP_TEXT_MAX bytes are accepted by the kernel."""
    return "".join(f"{host} {guest} {count}\n" for guest, host, count in ranges).encode()


def _mapping_namespace(uid_map: IdMap, gid_map: IdMap) -> int:
    """A descriptor of a new user namespace that holds no process and exists only to
    carry the export's mapping (mount_setattr(2), MOUNT_ATTR_IDMAP).

    An ID-mapped mount shows an inode owned by k as the id that the namespace maps k
    (inside) to (outside), and stores a caller's id through the inverse: so the maps
    written are the configured ranges with their columns swapped, host inside and
    guest outside. A short-lived child unshares CLONE_NEWUSER; we, root in the initial
    namespace, write its maps and open /proc/CHILD/ns/user (user_namespaces(7)); this
    process never enters it. Raises OSError naming the step.
    """
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    # Signals stay blocked in the child: a handler of the master's (its wake-up pipe)
    # must not run there. The child only unshares, answers, and waits for EOF.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_r)
                os.close(done_w)
                failed = ctypes.get_errno() if _libc.unshare(CLONE_NEWUSER) != 0 else 0
                os.write(ready_w, bytes([min(failed, 255)]))
                os.read(done_r, 1)
            finally:
                os._exit(0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(ready_w)
    os.close(done_r)
    try:
        answer = os.read(ready_r, 1)
        if answer != b"\0":
            err = answer[0] if answer else errno.ECHILD
            raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
        for name, ranges in (("uid_map", uid_map), ("gid_map", gid_map)):
            try:
                fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
                try:  # one write(2): the kernel takes the map whole, once, or refuses it
                    os.write(fd, namespace_map_text(ranges))
                finally:
                    os.close(fd)
            except OSError as e:
                raise OSError(e.errno, f"writing {name}: {e.strerror}") from None
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(done_w)  # the child reads EOF and leaves
        os.close(ready_r)
        os.waitpid(pid, 0)


def idmapped_tree(path: str, userns_fd: int, recursive: bool = True) -> int:
    """A detached copy of the mounts at `path` (and below it, when `recursive`), each
    ID-mapped through the user namespace `userns_fd`, with nodev, nosuid and noexec
    added to its host flags and private propagation. Returns its descriptor (closing
    it drops the copy; move_mount(2) attaches it).

    Private, not a slave like the plain bind: a host mount propagated into the copy
    would arrive without the mapping. The master replaces the workers instead (as on a
    host whose mounts are private). mount_setattr(2): the mounts must not be attached
    yet (open_tree(OPEN_TREE_CLONE)) nor ID-mapped already (EPERM), and every
    filesystem must support ID-mapped mounts (EINVAL otherwise; on Linux 6.18 ext4,
    xfs, btrfs and tmpfs do, ramfs, overlayfs and proc do not). Raises OSError.
    """
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = _libc.syscall(
        _SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD), os.fsencode(path), ctypes.c_uint(flags)
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree(OPEN_TREE_CLONE): {os.strerror(err)}")
    attr = _MountAttr(
        MOUNT_ATTR_IDMAP | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
        0,
        MS_PRIVATE,
        userns_fd,
    )
    try:
        ret = _libc.syscall(
            _SYS_MOUNT_SETATTR,
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        _check(ret, "mount_setattr(MOUNT_ATTR_IDMAP)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_export_ids(path: str, uid_map: IdMap, gid_map: IdMap) -> None:
    """In this process's own mount namespace (follow_host_mounts), the export becomes
    an ID-mapped copy of itself: guest id g is stored as the host id its range gives,
    a host owner outside every range shows as the overflow id (65534), a guest id
    outside every range cannot own a file (EOVERFLOW). The copy also gets nodev,
    nosuid and noexec, as make_device_nodes_inert gives an unmapped export.

    Raises OSError naming the step.
    """
    userns = _mapping_namespace(uid_map, gid_map)
    try:
        tree = idmapped_tree(path, userns)
    finally:
        os.close(userns)
    try:
        ret = _libc.syscall(
            _SYS_MOVE_MOUNT,
            ctypes.c_int(tree),
            b"",
            ctypes.c_int(AT_FDCWD),
            os.fsencode(path),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        )
        _check(ret, "move_mount")
    finally:
        os.close(tree)


def check_idmappable(path: str, uid_map: IdMap, gid_map: IdMap, mount_points: list[str]) -> None:
    """Try what a worker of the export will do, without mounting anything: make the
    ID-mapped detached copy of `path` and its submounts, then drop it. When that
    fails, each of `mount_points` (the mounts at and below `path`, outermost first) is
    tried alone, so that the error names the first one that cannot be mapped.

    Raises OSError whose message says what failed, and where.
    """
    userns = _mapping_namespace(uid_map, gid_map)
    try:
        try:
            os.close(idmapped_tree(path, userns))
            return
        except OSError as e:
            first = e
        for point in mount_points:
            try:
                os.close(idmapped_tree(point, userns, recursive=False))
            except OSError as e:
                raise OSError(e.errno, f"{point}: {e.strerror}") from None
        raise first
    finally:
        os.close(userns)


def keep_only_descriptors(keep: Iterable[int]) -> None:
    """Close every descriptor of this process but those in `keep`: one leaked by
    whoever started us (an open directory of the host's /, say) would outlive the
    chroot, and the seccomp filter allows openat relative to any descriptor held.

    close_range(2) over the gaps, up to the highest descriptor open (/proc/self/fd, so
    /proc must still be reachable). Raises OSError if /proc cannot be read.
    """
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    low = 0
    for fd in sorted(set(keep)) + [highest + 1]:
        if low < fd:  # never an empty range: closerange(0, 0) would close them all
            os.closerange(low, fd)
        low = fd + 1


def confine_to_export(path: str, identity: tuple[int, int] | None = None) -> None:
    """The process sees only the export: chroot into it and stand at its root.

    Through a descriptor, so that the directory checked is the directory confined
    to: if the path now names another directory than the one configured (moved, or
    replaced by a symlink), the worker refuses to serve it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if identity is not None and identity != (0, 0) and (st.st_dev, st.st_ino) != identity:
            raise SandboxError(
                f"{path} is no longer the directory configured "
                "(moved or replaced since the configuration was read)"
            )
        os.fchdir(fd)
        os.chroot(".")
    finally:
        os.close(fd)


def create_with_requested_modes() -> None:
    """Modes arrive exactly as the guest asked them: no umask in between."""
    os.umask(0)


def forbid_new_privileges() -> None:
    """No exec can ever grant privileges again (setuid bits, file capabilities)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def keep_only_worker_capabilities(last_cap: int) -> None:
    """Bounding, ambient, inheritable, permitted and effective sets cut to the seven."""
    for cap in range(last_cap + 1):
        if not WORKER_CAP_MASK & (1 << cap):
            _prctl(PR_CAPBSET_DROP, cap, f"prctl(PR_CAPBSET_DROP, {cap})")
    # Ambient capabilities may be absent on old kernels; there is nothing to clear then.
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _set_caps(WORKER_CAP_MASK, WORKER_CAP_MASK)
    effective, permitted = read_caps()
    if effective != WORKER_CAP_MASK or permitted != WORKER_CAP_MASK:
        raise SandboxError(
            f"capabilities not reduced (effective {effective:#x}, permitted {permitted:#x})"
        )


def enter_sandbox(
    export: str,
    seccomp: str = "kill",
    identity: tuple[int, int] | None = None,
    uid_map: IdMap = (),
    gid_map: IdMap = (),
) -> None:
    """Apply every sandbox step, in order; raise SandboxError if any fails. With
    `uid_map` (and `gid_map`) the export's mount is ID-mapped (map_export_ids)."""
    if os.geteuid() != 0:
        raise SandboxError("proxyd must run as root to chroot into the export")
    try:
        last_cap = _last_cap()  # /proc is out of reach once chrooted
        follow_host_mounts()
        if uid_map:
            map_export_ids(export, uid_map, gid_map)
        else:
            make_device_nodes_inert(export)
        confine_to_export(export, identity)
        create_with_requested_modes()
        forbid_new_privileges()
        keep_only_worker_capabilities(last_cap)
        restrict_syscalls(seccomp)
    except OSError as e:
        raise SandboxError(f"cannot sandbox into {export}: {e.strerror or e}") from e


SECCOMP_MODES = ("kill", "log", "off")
_PR_SET_NAME = 15  # setproctitle names the process with it
_FS_IOC_GETVERSION = 0x80087601

# What a worker does once sandboxed: serve requests (the file calls of the 20 request
# types, with both the classic and the *at spellings glibc may use), talk to its
# client and its master on descriptors it already holds, switch credentials, log, and
# run the Python runtime (memory, signals, clocks, exit).
WORKER_SYSCALLS = (
    # requests
    "openat",
    "open",
    "close",
    "newfstatat",
    "fstat",
    "lstat",
    "stat",
    "statx",
    "statfs",
    "fstatfs",
    "readlink",
    "readlinkat",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "symlink",
    "symlinkat",
    "link",
    "linkat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "rmdir",
    "chmod",
    "fchmodat",
    "lchown",
    "fchownat",
    "chown",
    "truncate",
    "utimensat",
    "lgetxattr",
    "llistxattr",
    "lsetxattr",
    "lremovexattr",
    "fcntl",
    "lseek",
    "read",
    "pread64",
    # sockets already open: the client, the master's channel, syslog
    "recvfrom",
    "recvmsg",
    "sendto",
    "sendmsg",
    "write",
    "writev",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "getpeername",
    "poll",
    "ppoll",
    "shutdown",
    # credentials, per request
    "setresuid",
    "setresgid",
    "capget",
    "capset",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getresuid",
    "getresgid",
    # the runtime
    "brk",
    "mmap",
    "munmap",
    "mremap",
    "madvise",
    "mprotect",
    "futex",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "restart_syscall",
    "clock_gettime",
    "clock_getres",
    "gettimeofday",
    "getrandom",
    "getpid",
    "gettid",
    "getppid",
    "tgkill",
    "sched_yield",
    "dup",
    "dup2",
    "dup3",
    "exit",
    "exit_group",
)


class _SockFprog(ctypes.Structure):  # linux/filter.h
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_SYS_SECCOMP = pyseccomp.resolve_syscall(pyseccomp.system_arch(), "seccomp")
_SECCOMP_SET_MODE_FILTER = 1
# Do not let the filter switch on the speculative-store-bypass mitigation for the whole
# process: it slows all of a worker's code, and a worker runs no untrusted code.
_SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2
_SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


@functools.cache
def syscall_filter(mode: str) -> bytes:
    """The worker's seccomp filter for `mode` ("kill", "log"): only the system calls
    serving needs; anything else kills the worker, or is allowed and logged by the
    kernel. A new socket is refused quietly for AF_UNIX (glibc's syslog reconnects
    after a syslogd restart) and kills otherwise.

    Returns the BPF program libseccomp builds (struct sock_filter[], 8 bytes each,
    architecture check included), once per mode: the master calls it before it forks,
    so that no worker builds it again (building it cost each worker 1.3 MB of memory
    of its own, libseccomp's and ctypes' allocations). Raises OSError from libseccomp."""
    default = pyseccomp.KILL_PROCESS if mode == "kill" else pyseccomp.LOG
    rules = pyseccomp.SyscallFilter(default)
    # A binary tree instead of a list of comparisons: the filter runs on every call.
    rules.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    for name in WORKER_SYSCALLS:
        rules.add_rule(pyseccomp.ALLOW, name)
    rules.add_rule(pyseccomp.ALLOW, "prctl", pyseccomp.Arg(0, pyseccomp.EQ, _PR_SET_NAME))
    rules.add_rule(pyseccomp.ALLOW, "ioctl", pyseccomp.Arg(1, pyseccomp.EQ, _FS_IOC_GETVERSION))
    rules.add_rule(
        pyseccomp.ERRNO(errno.EACCES), "socket", pyseccomp.Arg(0, pyseccomp.EQ, socket.AF_UNIX)
    )
    with open(os.memfd_create("proxyd-seccomp", os.MFD_CLOEXEC), "w+b") as program:
        rules.export_bpf(program)
        program.seek(0)
        return program.read()


def restrict_syscalls(mode: str = "kill") -> None:
    """Load syscall_filter(mode) into this process with seccomp(2), unless `mode` is
    "off". Needs no_new_privs set first (forbid_new_privileges). Raises OSError."""
    if mode == "off":
        return
    program = syscall_filter(mode)
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _SOCK_FILTER_SIZE, ctypes.addressof(code))
    _check(
        _libc.syscall(
            _SYS_SECCOMP,
            ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(_SECCOMP_FILTER_FLAG_SPEC_ALLOW),
            ctypes.byref(fprog),
        ),
        "seccomp",
    )


class Credentials:
    """Run a file creation as the guest's uid/gid.

    Used as `with creds.as_user(uid, gid): ...`. The reference's semantics: the
    effective ids become the request's (-1 leaves one unchanged), saved ids stay 0;
    unless both are 0, only CAP_DAC_OVERRIDE stays effective. Leaving the block
    restores root and the full effective set on every path, errors included; if
    that ever fails the process aborts rather than serve with the wrong identity.
    """

    def __init__(self) -> None:
        self._header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        self._data = _CapDataPair()
        self._data[0].effective = CREDENTIALED_CAP_MASK
        self._data[0].permitted = WORKER_CAP_MASK
        self._full = _CapDataPair()
        self._full[0].effective = WORKER_CAP_MASK
        self._full[0].permitted = WORKER_CAP_MASK
        self._uid = 0
        self._gid = 0
        self._reduced = False

    def as_user(self, uid: int, gid: int) -> Credentials:
        self._uid = uid if uid == -1 else uid & 0xFFFFFFFF
        self._gid = gid if gid == -1 else gid & 0xFFFFFFFF
        return self

    def __enter__(self) -> None:
        uid, gid = self._uid, self._gid
        os.setresgid(-1, gid, -1)
        try:
            os.setresuid(-1, uid, -1)
        except BaseException:
            self._restore()
            raise
        if uid in (0, -1) and gid in (0, -1):
            return  # still root: the kernel left the effective set alone
        # Only CAP_DAC_OVERRIDE stays effective (as in the reference), so that the
        # missing supplementary groups do not block the guest's own files.
        self._reduced = uid in (0, -1)  # euid unchanged: no automatic restore
        if _libc.capset(ctypes.byref(self._header), self._data) != 0:
            err = ctypes.get_errno()
            self._restore()
            raise OSError(err, os.strerror(err))

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        try:
            # Back to euid 0: when it was not 0, the kernel copies the permitted set
            # to the effective set; when it stayed 0 (uid 0, other gid) we must.
            os.setresuid(-1, 0, -1)
            os.setresgid(-1, 0, -1)
            if self._reduced:
                self._reduced = False
                _check(_libc.capset(ctypes.byref(self._header), self._full), "capset")
        except BaseException:
            os.abort()
