"""Differential tests: drive the reference helper and proxyd with the same requests.

Each server gets its own fresh export (siblings under one tmp dir, so the same
filesystem), both get the identical byte sequence, and every reply must match exactly
after normalising the fields that legitimately differ between two exports (inode
numbers, timestamps the test did not set, free-space counters, GETVERSION's value).
Afterwards the two host trees must match too.

Set PROXYD_DIFF_OTHER=reference to run reference-vs-reference, which checks that the
normalisation is neither too strict (flaky) nor the sequence wrong (every step also
asserts the reference's own result).

The tests at the end check where proxyd is deliberately stronger than the reference
(the reference hangs, returns garbage, or silently truncates), so they run on proxyd
only, or on both where the reference already behaves.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.proxyclient import (
    CHMOD,
    CREATE,
    ERROR,
    GETVERSION,
    LGETXATTR,
    LSETXATTR,
    LSTAT,
    MKDIR,
    MKNOD,
    OP_NAMES,
    OPEN,
    READLINK,
    STAT_FIELDS,
    STAT_REC,
    STATFS_FIELDS,
    STATFS_REC,
    SUCCESS,
    SYMLINK,
    UTIME,
    ConnectionClosed,
    ProtocolError,
    ProxyClient,
    Reply,
    ServerHandle,
    decode_stat,
    decode_statfs,
    errno_of,
    marshal,
    pack_d,
    pack_s,
    start_server,
)

OTHER = os.environ.get("PROXYD_DIFF_OTHER", "proxyd")

RD, WR, RW = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
CR, EXCL, TRUNC, APPEND = os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND
DIRECTORY, NOFOLLOW, O_PATH = os.O_DIRECTORY, os.O_NOFOLLOW, os.O_PATH
XC, XR = os.XATTR_CREATE, os.XATTR_REPLACE
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
REG, FIFO, CHR, SOCK = stat.S_IFREG, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFSOCK
E = errno
OK = 0
CONTENT = b"hello world\n" * 100
BLOB = bytes(range(256)) * 4
LONG = "n" * 256  # one byte over NAME_MAX

# A step is (name, method, args, expect[, opts]). `method` is a ProxyClient method,
# `expect` the errno the *reference* gives (0 = success): it documents the case and
# catches a sequence that no longer tests what its name says.
# opts: "write": bytes written to a received fd before it is inspected;
#       "times": keep atime/mtime in an LSTAT reply (set by UTIME and untouched since).
Step = tuple
STEPS: list[Step] = [
    # --- whole-export queries
    ("statfs root", "statfs", ("/",), OK),
    ("lstat root", "lstat", ("/",), OK),
    # QEMU counts the C terminator in the length of the paths it looks up, from "//".
    ("lstat root as QEMU sends it", "lstat", (b"/\0",), OK),
    ("statfs as QEMU sends it", "statfs", (b"//\0",), OK),
    ("lstat empty path", "lstat", ("",), E.ENOENT),
    ("getversion root", "getversion", ("/",), OK),
    ("lstat dotdot stays in export", "lstat", ("../../..",), OK),
    ("lstat path too long", "lstat", ("a/" * 3000,), E.ENAMETOOLONG),
    # --- MKDIR
    ("mkdir d", "mkdir", (0, 0, "/d", 0o755), OK),
    ("mkdir d again", "mkdir", (0, 0, "d", 0o700), E.EEXIST),
    ("mkdir missing parent", "mkdir", (0, 0, "nope/x", 0o755), E.ENOENT),
    ("mkdir uid 1000", "mkdir", (1000, 1000, "/u", 0o750), OK),
    ("lstat u", "lstat", ("u",), OK),
    ("lstat u as QEMU sends it", "lstat", (b"//u\0",), OK),
    ("mkdir name too long", "mkdir", (0, 0, LONG, 0o755), E.ENAMETOOLONG),
    ("mkdir non-utf8", "mkdir", (0, 0, b"\xff\xfe-dir", 0o755), OK),
    ("lstat non-utf8", "lstat", (b"\xff\xfe-dir",), OK),
    ("mkdir dotdot escape", "mkdir", (0, 0, "../../../esc", 0o700), OK),
    ("lstat escaped dir", "lstat", ("/esc",), OK),
    ("mkdir sticky", "mkdir", (0, 0, "sticky", 0o1777), OK),
    # --- CREATE
    ("create d/f", "create", ("/d/f", CR | RW, 0o644, 0, 0), OK),
    ("create d/f excl", "create", ("d/f", CR | EXCL | WR, 0o600, 0, 0), E.EEXIST),
    ("create d/g", "create", ("d/g", CR | WR, 0o644, 0, 0), OK, {"write": CONTENT}),
    ("create uid 1000 setuid", "create", ("u/owned", CR | WR, 0o4755, 1000, 1000), OK),
    ("lstat u/owned", "lstat", ("u/owned",), OK),
    ("create under file", "create", ("d/f/x", CR | WR, 0o644, 0, 0), E.ENOTDIR),
    ("create missing parent", "create", ("nope/x", CR | WR, 0o644, 0, 0), E.ENOENT),
    ("create O_DIRECTORY", "create", ("cd", CR | DIRECTORY, 0o755, 0, 0), E.EINVAL),
    ("create existing dir", "create", ("d", CR | RW, 0o644, 0, 0), E.EISDIR),
    ("create latin-1 name", "create", (b"\xe9t\xe9", CR | WR, 0o600, 0, 0), OK),
    ("create name too long", "create", (LONG, CR | WR, 0o644, 0, 0), E.ENAMETOOLONG),
    ("create existing no excl", "create", ("d/g", CR | RD, 0o600, 1000, 1000), OK),
    # --- OPEN
    ("open d/g", "open", ("d/g", RD), OK),
    ("open d O_DIRECTORY", "open", ("d", RD | DIRECTORY), OK),
    ("open file O_DIRECTORY", "open", ("d/g", RD | DIRECTORY), E.ENOTDIR),
    ("open dir O_WRONLY", "open", ("d", WR), E.EISDIR),
    ("open missing", "open", ("d/missing", RD), E.ENOENT),
    ("open through file", "open", ("d/g/x", RD), E.ENOTDIR),
    ("open d/f wronly trunc", "open", ("d/f", WR | TRUNC), OK, {"write": b"first\n"}),
    ("open d/f append", "open", ("d/f", WR | APPEND), OK, {"write": b"second\n"}),
    ("open d/f rdwr", "open", ("d/f", RW), OK),
    ("open d/f O_PATH", "open", ("d/f", O_PATH), OK),
    ("open dotdot path", "open", ("d/../../../d/g", RD), OK),
    ("lstat d/f", "lstat", ("d/f",), OK),
    # --- SYMLINK, READLINK and symlink resolution (must stay inside the export)
    ("symlink abs", "symlink", (0, 0, "/d/g", "abs"), OK),
    ("symlink uid 1000", "symlink", (1000, 1000, "d", "dl"), OK),
    ("lstat dl", "lstat", ("dl",), OK),
    ("symlink exists", "symlink", (0, 0, "x", "abs"), E.EEXIST),
    ("symlink empty target", "symlink", (0, 0, "", "empty"), E.ENOENT),
    ("symlink loop", "symlink", (0, 0, "loop", "loop"), OK),
    ("symlink escaping", "symlink", (0, 0, "../../../../d/g", "esc_link"), OK),
    ("symlink to root", "symlink", (0, 0, "/", "rootl"), OK),
    ("symlink dangling", "symlink", (0, 0, "nowhere", "dangle"), OK),
    ("symlink non-utf8 target", "symlink", (0, 0, b"\xff/\x80", "bin_link"), OK),
    ("symlink long target", "symlink", (0, 0, "t/" * 1000, "long_link"), OK),
    ("symlink missing parent", "symlink", (0, 0, "x", "nope/l"), E.ENOENT),
    ("open via abs symlink", "open", ("abs", RD), OK),
    ("open via escaping symlink", "open", ("esc_link", RD), OK),
    ("open via root symlink", "open", ("rootl/d/g", RD), OK),
    ("open via symlinked dir", "open", ("dl/f", RD), OK),
    ("open symlink loop", "open", ("loop", RD), E.ELOOP),
    ("lstat through loop", "lstat", ("loop/x",), E.ELOOP),
    ("open abs O_NOFOLLOW", "open", ("abs", RD | NOFOLLOW), E.ELOOP),
    ("open abs O_PATH|O_NOFOLLOW", "open", ("abs", O_PATH | NOFOLLOW), E.ENXIO),
    ("open dangling", "open", ("dangle", RD), E.ENOENT),
    ("readlink abs", "readlink", ("abs", 100), OK),
    ("readlink truncated", "readlink", ("abs", 3), OK),
    ("readlink bufsize 2", "readlink", ("abs", 2), OK),
    ("readlink bufsize 1", "readlink", ("abs", 1), E.EINVAL),
    ("readlink bufsize 0", "readlink", ("abs", 0), E.EINVAL),
    ("readlink not a link", "readlink", ("d", 100), E.EINVAL),
    ("readlink missing", "readlink", ("missing", 100), E.ENOENT),
    ("readlink escaping", "readlink", ("esc_link", 4096), OK),
    ("readlink non-utf8", "readlink", ("bin_link", 4096), OK),
    ("readlink long", "readlink", ("long_link", 4096), OK),
    ("readlink long truncated", "readlink", ("long_link", 1000), OK),
    ("lstat abs", "lstat", ("abs",), OK),
    ("lstat dangle", "lstat", ("dangle",), OK),
    # --- MKNOD (never OPEN or GETVERSION the FIFO: it hangs the reference)
    ("mknod regular uid 1000", "mknod", (1000, 1000, "reg", REG | 0o640, 0), OK),
    ("mknod fifo uid 1000", "mknod", (1000, 1000, "fifo", FIFO | 0o600, 0), OK),
    ("mknod char dev", "mknod", (0, 0, "chr", CHR | 0o666, os.makedev(1, 3)), OK),
    ("mknod socket", "mknod", (0, 0, "sock", SOCK | 0o644, 0), OK),
    ("mknod exists", "mknod", (0, 0, "reg", REG | 0o644, 0), E.EEXIST),
    ("mknod bad type", "mknod", (0, 0, "bad", 0o170000 | 0o644, 0), E.EINVAL),
    ("mknod missing parent", "mknod", (0, 0, "nope/n", REG | 0o644, 0), E.ENOENT),
    ("lstat reg", "lstat", ("reg",), OK),
    ("lstat fifo", "lstat", ("fifo",), OK),
    ("lstat chr", "lstat", ("chr",), OK),
    ("lstat sock", "lstat", ("sock",), OK),
    ("open char dev", "open", ("chr", RW), E.ENXIO),
    ("open socket", "open", ("sock", RD), E.ENXIO),
    ("open mknod regular", "open", ("reg", RD), OK),
    # --- setgid inheritance and stripping: supplementary groups stay the server's
    ("mkdir sg", "mkdir", (1000, 1000, "sg", 0o775), OK),
    ("chmod sg setgid", "chmod", ("sg", 0o2775), OK),
    ("create sg/a foreign gid", "create", ("sg/a", CR | WR, 0o2755, 1000, 0), OK),
    ("create sg/b own gid", "create", ("sg/b", CR | WR, 0o2755, 1000, 1000), OK),
    ("mkdir sg/sub as root", "mkdir", (0, 0, "sg/sub", 0o755), OK),
    ("mknod sg/n foreign gid", "mknod", (1000, 0, "sg/n", REG | 0o2755, 0), OK),
    ("lstat sg/a", "lstat", ("sg/a",), OK),
    ("lstat sg/b", "lstat", ("sg/b",), OK),
    ("lstat sg/sub", "lstat", ("sg/sub",), OK),
    ("lstat sg/n", "lstat", ("sg/n",), OK),
    # --- CHMOD
    ("chmod setuid+setgid", "chmod", ("d/g", 0o6755), OK),
    ("chmod dir sticky", "chmod", ("d", 0o1777), OK),
    ("chmod missing", "chmod", ("missing", 0o644), E.ENOENT),
    ("chmod via symlink follows", "chmod", ("dl/f", 0o640), OK),
    ("chmod loop", "chmod", ("loop", 0o644), E.ELOOP),
    ("chmod type bits ignored", "chmod", ("reg", REG | 0o604), OK),
    ("lstat d/g after chmod", "lstat", ("d/g",), OK),
    # --- CHOWN (lchown: a symlink itself changes owner)
    ("chown d/g", "chown", ("d/g", 1000, 1000), OK),
    ("lstat d/g after chown", "lstat", ("d/g",), OK),
    ("chown gid only", "chown", ("d/f", -1, 1000), OK),
    ("chown symlink itself", "chown", ("abs", 1000, 1001), OK),
    ("chown missing", "chown", ("missing", 0, 0), E.ENOENT),
    ("lstat abs after chown", "lstat", ("abs",), OK),
    ("lstat d/f after chown", "lstat", ("d/f",), OK),
    # --- TRUNCATE
    ("truncate d/g", "truncate", ("d/g", 5), OK),
    ("truncate grow sparse", "truncate", ("d/f", 100000), OK),
    ("truncate dir", "truncate", ("d", 0), E.EISDIR),
    ("truncate negative", "truncate", ("d/g", -1), E.EINVAL),
    ("truncate missing", "truncate", ("missing", 0), E.ENOENT),
    ("truncate via symlink", "truncate", ("abs", 3), OK),
    ("lstat d/g after truncate", "lstat", ("d/g",), OK),
    ("lstat d/f after truncate", "lstat", ("d/f",), OK),
    # --- UTIME (atime_sec, atime_nsec, mtime_sec, mtime_nsec on the wire)
    ("utime d/g", "utime", ("d/g", 1000000000, 123, 1500000000, 456), OK),
    ("lstat d/g times", "lstat", ("d/g",), OK, {"times": True}),
    ("utime omit atime", "utime", ("d/g", 0, UTIME_OMIT, 1600000000, 789), OK),
    ("lstat d/g after omit", "lstat", ("d/g",), OK, {"times": True}),
    ("utime symlink itself", "utime", ("abs", 1100000000, 1, 1200000000, 2), OK),
    ("lstat abs times", "lstat", ("abs",), OK, {"times": True}),
    ("utime now", "utime", ("reg", 0, UTIME_NOW, 0, UTIME_NOW), OK),
    ("utime bad nsec", "utime", ("d/g", 0, 2000000000, 0, 0), E.EINVAL),
    ("utime missing", "utime", ("missing", 0, 0, 0, 0), E.ENOENT),
    # --- LINK
    ("link d/g hard", "link", ("d/g", "hard"), OK),
    ("lstat hard", "lstat", ("hard",), OK),
    ("link dir", "link", ("d", "dhard"), E.EPERM),
    ("link exists", "link", ("d/g", "reg"), E.EEXIST),
    ("link missing", "link", ("missing", "x"), E.ENOENT),
    ("link into missing dir", "link", ("d/g", "nope/x"), E.ENOENT),
    ("link symlink itself", "link", ("abs", "abs_hard"), OK),
    ("lstat abs_hard", "lstat", ("abs_hard",), OK),
    # --- RENAME
    ("rename over file", "rename", ("hard", "reg"), OK),
    ("rename file over dir", "rename", ("reg", "d"), E.EISDIR),
    ("rename dir over file", "rename", ("u", "reg"), E.ENOTDIR),
    ("rename dir into itself", "rename", ("d", "d/sub"), E.EINVAL),
    ("mkdir e", "mkdir", (0, 0, "e", 0o755), OK),
    ("mkdir e/inner", "mkdir", (0, 0, "e/inner", 0o755), OK),
    ("mkdir e2", "mkdir", (0, 0, "e2", 0o755), OK),
    ("rename dir over non-empty", "rename", ("e2", "e"), E.ENOTEMPTY),
    ("rename dir over empty", "rename", ("e", "e2"), OK),
    ("rename missing", "rename", ("missing", "x"), E.ENOENT),
    ("rename root", "rename", ("/", "x"), E.EBUSY),
    ("rename escaping", "rename", ("../../../sock", "../sock2"), OK),
    ("lstat reg after rename", "lstat", ("reg",), OK),
    # --- REMOVE (unlink or rmdir)
    ("remove file", "remove", ("reg",), OK),
    ("remove non-empty dir", "remove", ("e2",), E.ENOTEMPTY),
    ("remove empty dir", "remove", ("e2/inner",), OK),
    ("remove missing", "remove", ("missing",), E.ENOENT),
    ("remove root", "remove", ("/",), E.EBUSY),
    ("remove dot", "remove", (".",), E.EINVAL),
    ("remove dotdot", "remove", ("..",), E.ENOTEMPTY),
    ("remove dangling symlink", "remove", ("dangle",), OK),
    ("remove fifo", "remove", ("fifo",), OK),
    ("remove dir trailing slash", "remove", ("e2/",), OK),
    ("lstat removed", "lstat", ("reg",), E.ENOENT),
    # --- LSETXATTR / LGETXATTR / LLISTXATTR / LREMOVEXATTR
    ("lsetxattr user.a", "lsetxattr", ("d/g", "user.a", b"alpha"), OK),
    ("lsetxattr create exists", "lsetxattr", ("d/g", "user.a", b"x", None, XC), E.EEXIST),
    ("lsetxattr replace missing", "lsetxattr", ("d/g", "user.b", b"x", None, XR), E.ENODATA),
    ("lsetxattr replace", "lsetxattr", ("d/g", "user.a", b"beta!", None, XR), OK),
    ("lsetxattr create new", "lsetxattr", ("d/g", "user.c", b"gamma", None, XC), OK),
    ("lsetxattr binary", "lsetxattr", ("d/g", "user.bin", BLOB), OK),
    ("lsetxattr empty value", "lsetxattr", ("d/g", "user.empty", b""), OK),
    ("lsetxattr non-utf8 name", "lsetxattr", ("d/g", b"user.\xff", b"v"), OK),
    ("lsetxattr bad flags", "lsetxattr", ("d/g", "user.d", b"x", None, 4), E.EINVAL),
    ("lsetxattr trusted (no CAP_SYS_ADMIN)", "lsetxattr", ("d/g", "trusted.t", b"x"), E.EPERM),
    ("lsetxattr user on symlink", "lsetxattr", ("abs", "user.a", b"x"), E.EPERM),
    ("lsetxattr missing file", "lsetxattr", ("missing", "user.a", b"x"), E.ENOENT),
    ("lsetxattr bad namespace", "lsetxattr", ("d/g", "foo.a", b"x"), E.EOPNOTSUPP),
    ("lsetxattr empty name", "lsetxattr", ("d/g", "", b"x"), E.ERANGE),
    ("lsetxattr on dir", "lsetxattr", ("d", "user.dir", b"on a dir"), OK),
    ("lgetxattr size 0", "lgetxattr", (0, "d/g", "user.a"), OK),
    ("lgetxattr", "lgetxattr", (100, "d/g", "user.a"), OK),
    ("lgetxattr exact size", "lgetxattr", (5, "d/g", "user.a"), OK),
    ("lgetxattr too small", "lgetxattr", (2, "d/g", "user.a"), E.ERANGE),
    ("lgetxattr binary", "lgetxattr", (4096, "d/g", "user.bin"), OK),
    ("lgetxattr empty size 0", "lgetxattr", (0, "d/g", "user.empty"), OK),
    ("lgetxattr empty", "lgetxattr", (10, "d/g", "user.empty"), OK),
    ("lgetxattr missing size 0", "lgetxattr", (0, "d/g", "user.zz"), E.ENODATA),
    ("lgetxattr missing", "lgetxattr", (10, "d/g", "user.zz"), E.ENODATA),
    ("lgetxattr missing file", "lgetxattr", (10, "missing", "user.a"), E.ENOENT),
    ("lgetxattr does not follow", "lgetxattr", (10, "abs", "user.a"), E.ENODATA),
    ("lgetxattr via symlinked dir", "lgetxattr", (10, "dl/g", "user.a"), OK),
    ("llistxattr size 0", "llistxattr", (0, "d/g"), OK),
    ("llistxattr", "llistxattr", (1000, "d/g"), OK),
    ("llistxattr too small", "llistxattr", (3, "d/g"), E.ERANGE),
    ("llistxattr none size 0", "llistxattr", (0, "u"), OK),
    ("llistxattr none", "llistxattr", (100, "u"), OK),
    ("llistxattr missing file", "llistxattr", (100, "missing"), E.ENOENT),
    ("lremovexattr", "lremovexattr", ("d/g", "user.a"), OK),
    ("lremovexattr again", "lremovexattr", ("d/g", "user.a"), E.ENODATA),
    ("lremovexattr missing file", "lremovexattr", ("missing", "user.a"), E.ENOENT),
    ("lgetxattr removed", "lgetxattr", (0, "d/g", "user.a"), E.ENODATA),
    ("llistxattr after remove", "llistxattr", (1000, "d/g"), OK),
    # --- GETVERSION (value differs per inode: only success/errno are compared)
    ("getversion file", "getversion", ("d/g",), OK),
    ("getversion dir", "getversion", ("d",), OK),
    ("getversion via symlink", "getversion", ("abs",), OK),
    ("getversion missing", "getversion", ("missing",), E.ENOENT),
    ("getversion loop", "getversion", ("loop",), E.ELOOP),
    ("getversion through file", "getversion", ("d/g/x",), E.ENOTDIR),
    # --- STATFS
    ("statfs file", "statfs", ("d/g",), OK),
    ("statfs missing", "statfs", ("missing",), E.ENOENT),
    ("statfs loop", "statfs", ("loop/x",), E.ELOOP),
]

# Times set last, so that the tree comparison can check them too.
FINAL_UTIMES = [
    ("d/g", 1000000001, 5, 1300000000, 999999999),
    ("u/owned", 1000000002, 6, 1400000000, 0),
    ("abs", 1000000003, 7, 1100000000, 1),
    ("d", 1000000004, 8, 1234567890, 123456789),
    ("sg", 1000000005, 9, 987654321, 42),
]
for _p, *_t in FINAL_UTIMES:
    STEPS.append((f"final utime {_p}", "utime", (_p, *_t), OK))
    STEPS.append((f"final lstat {_p}", "lstat", (_p,), OK, {"times": True}))
TREE_MTIME_PATHS = {p.encode() for p, *_ in FINAL_UTIMES}

# --- normalisation ----------------------------------------------------------------

STAT_VOLATILE = {
    "ino",
    "atime_sec",
    "atime_nsec",
    "mtime_sec",
    "mtime_nsec",
    "ctime_sec",
    "ctime_nsec",
}
STATFS_VOLATILE = {"bfree", "bavail", "ffree"}  # other writers change them between calls


def short(v: Any, limit: int = 160) -> str:
    r = repr(v)
    return r if len(r) <= limit else f"{r[:limit]}...({len(r)} chars)"


def errname(value: int) -> str:
    return errno.errorcode.get(-value, str(value))


def norm_record(data: bytes, rec: Any, fields: tuple[str, ...], volatile: set[str]) -> bytes:
    vals = rec.unpack(data)
    return rec.pack(*(0 if f in volatile else v for f, v in zip(fields, vals, strict=True)))


def normalise(method: str, reply: Reply, opts: dict[str, Any]) -> tuple[Any, ...]:
    """Comparable form of a header reply: exact bytes except the normalised fields."""
    if reply.type == ERROR:
        return (reply.type, reply.data)
    data = reply.data or b""
    if method == "lstat":
        volatile = STAT_VOLATILE - (
            {"atime_sec", "atime_nsec", "mtime_sec", "mtime_nsec"} if opts.get("times") else set()
        )
        data = norm_record(data, STAT_REC, STAT_FIELDS, volatile)
    elif method == "statfs":
        data = norm_record(data, STATFS_REC, STATFS_FIELDS, STATFS_VOLATILE)
    elif method == "getversion":
        # The reference leaves the upper 32 bits uninitialised and generations are
        # per inode: only the length of a successful reply is comparable.
        data = bytes(len(data))
    return (reply.type, data)


def readable(method: str, reply: Reply, norm: tuple[Any, ...]) -> str:
    if reply.kind == "fd":
        return short(norm, 400)
    if reply.type == ERROR:
        return f"ERROR {errname(reply.value)}"
    data = norm[1]
    if method == "lstat" and len(data) == STAT_REC.size:
        return f"OK {decode_stat(data)}"
    if method == "statfs" and len(data) == STATFS_REC.size:
        return f"OK {decode_statfs(data)}"
    if reply.kind == "status":
        return f"OK value={reply.value}"
    return f"OK {short(data)}"


def describe_fd(fd: int) -> dict[str, Any]:
    """What a guest could observe through a received descriptor."""
    st = os.fstat(fd)
    d: dict[str, Any] = {
        "mode": oct(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
        "nlink": st.st_nlink,
        "flags": oct(fcntl.fcntl(fd, fcntl.F_GETFL)),
    }
    proc = f"/proc/self/fd/{fd}"  # reopen: the fd may be O_WRONLY or O_PATH
    if stat.S_ISREG(st.st_mode):
        with open(proc, "rb") as f:
            d["sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
    elif stat.S_ISDIR(st.st_mode):
        d["entries"] = sorted(os.listdir(os.fsencode(proc)))
    return d


def run_step(client: ProxyClient, step: Step) -> tuple[Reply, tuple[Any, ...]]:
    _name, method, args, _expect, *rest = step
    opts: dict[str, Any] = rest[0] if rest else {}
    reply: Reply = getattr(client, method)(*args)
    if reply.kind != "fd":
        return reply, normalise(method, reply, opts)
    try:
        desc = None
        if reply.fd is not None:
            if "write" in opts:
                os.write(reply.fd, opts["write"])
            desc = describe_fd(reply.fd)
        return reply, (reply.value, reply.fd is not None, desc)
    finally:
        if reply.fd is not None:
            os.close(reply.fd)


# --- host tree comparison ---------------------------------------------------------


def snapshot(root: Path, mtime_paths: set[bytes]) -> dict[bytes, dict[str, Any]]:
    out: dict[bytes, dict[str, Any]] = {}
    base = os.fsencode(root)

    def walk(rel: bytes) -> None:
        p = os.path.join(base, rel) if rel else base
        st = os.lstat(p)
        e: dict[str, Any] = {
            "mode": oct(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "nlink": st.st_nlink,
            "size": st.st_size,
            "rdev": st.st_rdev,
        }
        names = os.listxattr(p, follow_symlinks=False)
        e["xattrs"] = sorted((n, os.getxattr(p, n, follow_symlinks=False)) for n in names)
        if rel in mtime_paths:
            e["mtime_ns"] = st.st_mtime_ns
        if stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                e["sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
        out[rel or b"."] = e
        if stat.S_ISDIR(st.st_mode):
            for n in sorted(os.listdir(p)):
                walk(os.path.join(rel, n) if rel else n)

    walk(b"")
    return out


def tree_diff(a: dict[bytes, dict[str, Any]], b: dict[bytes, dict[str, Any]]) -> list[str]:
    lines = []
    for k in sorted(a.keys() | b.keys()):
        ea, eb = a.get(k), b.get(k)
        if ea is None or eb is None:
            lines.append(f"  {k!r}: only in {'reference' if eb is None else OTHER}")
            continue
        for field in sorted(ea.keys() | eb.keys()):
            if ea.get(field) != eb.get(field):
                lines.append(
                    f"  {k!r} {field}: reference={short(ea.get(field))} "
                    f"{OTHER}={short(eb.get(field))}"
                )
    return lines


# --- the differential test --------------------------------------------------------


def start_pair(tmp_path: Path) -> tuple[Path, Path, ServerHandle, ServerHandle]:
    ref_root, other_root = tmp_path / "ref", tmp_path / OTHER.replace("reference", "ref2")
    ref_root.mkdir()
    other_root.mkdir()
    ref, other = start_server("reference", ref_root), start_server(OTHER, other_root)
    return ref_root, other_root, ref, other


def test_step_names_unique() -> None:
    names = [s[0] for s in STEPS]
    assert len(names) == len(set(names))
    assert len(STEPS) >= 80


def test_sequence_covers_every_request_type() -> None:
    methods = {s[1] for s in STEPS}
    assert methods == set(OP_NAMES)


def packed(method: str, opts: dict[str, Any] | None = None, **change: int) -> tuple[Any, ...]:
    """normalise() of a synthetic LSTAT/STATFS reply whose fields are all 7 except `change`."""
    rec, fields = (STAT_REC, STAT_FIELDS) if method == "lstat" else (STATFS_REC, STATFS_FIELDS)
    values = {**dict.fromkeys(fields, 7), **change}
    return normalise(method, Reply("data", SUCCESS, 0, rec.pack(*values.values())), opts or {})


def test_normalisation_is_not_too_lax() -> None:
    """Only the listed volatile fields may be ignored; any other change must show."""
    for method, fields, volatile in (
        ("lstat", STAT_FIELDS, STAT_VOLATILE),
        ("statfs", STATFS_FIELDS, STATFS_VOLATILE),
    ):
        for field in fields:
            changed = packed(method, **{field: 8}) != packed(method)
            assert changed == (field not in volatile), (method, field)
    times = {"times": True}
    for field in ("atime_sec", "atime_nsec", "mtime_sec", "mtime_nsec"):
        assert packed("lstat", times, **{field: 8}) != packed("lstat", times), field
    assert packed("lstat", times, ctime_sec=8) == packed("lstat", times)


def test_differential_sequence(tmp_path: Path) -> None:
    ref_root, other_root, ref, other = start_pair(tmp_path)
    transcript: list[str] = []
    problems: list[str] = []
    completed = False
    with ref, other:
        for step in STEPS:
            name, method, args, expect = step[:4]
            r_reply, r_norm = run_step(ref.client, step)
            got = errno_of(r_reply)
            if got != expect:
                problems.append(
                    f"[{name}] reference gave {errno.errorcode.get(got, got)}, "
                    f"the sequence expects {errno.errorcode.get(expect, expect)}"
                )
            try:
                o_reply, o_norm = run_step(other.client, step)
            except (ConnectionClosed, ProtocolError, TimeoutError, OSError) as exc:
                problems.append(f"[{name}] {method}{short(args)}: {OTHER} failed: {exc!r}")
                break
            line = f"[{name}] {method}{short(args)}\n  reference: "
            line += readable(method, r_reply, r_norm)
            if o_norm != r_norm:
                line += f"\n  {OTHER}: {readable(method, o_reply, o_norm)}"
                problems.append("MISMATCH " + line)
            transcript.append(line)
        else:
            completed = True
    (tmp_path / "transcript.txt").write_text("\n".join(transcript) + "\n")
    if completed:  # the trees are only comparable if every step ran
        diff = tree_diff(
            snapshot(ref_root, TREE_MTIME_PATHS), snapshot(other_root, TREE_MTIME_PATHS)
        )
        if diff:
            problems.append("host trees differ:\n" + "\n".join(diff))
    assert not problems, (
        "\n".join(problems)
        + f"\n\nreference stderr:\n{ref.stderr}\n{OTHER} stderr:\n{other.stderr}"
    )


# --- where proxyd is deliberately stronger than the reference -----------------------


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    return root


def assert_usable(client: ProxyClient) -> None:
    r = client.lstat("/")
    assert r.ok and len(r.data or b"") == STAT_REC.size


def test_open_fifo_is_enxio_without_hanging(export: Path) -> None:
    os.mkfifo(export / "fifo", 0o666)  # the reference blocks in open() here forever
    with start_server("proxyd", export, timeout=5) as srv:
        for flags in (RD, WR, RW, RD | os.O_NONBLOCK):
            r = srv.client.open("fifo", flags)
            assert (r.value, r.fd) == (-errno.ENXIO, None), flags
        assert_usable(srv.client)


@pytest.mark.parametrize("kind", ["fifo", "chr", "sock"])
def test_getversion_of_special_file_is_an_errno(export: Path, kind: str) -> None:
    p = export / "special"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "chr":
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:
        os.mknod(p, stat.S_IFSOCK | 0o666)
    with start_server("proxyd", export, timeout=5) as srv:
        r = srv.client.getversion("special")
        assert r.type == ERROR and r.value < 0, r
        assert_usable(srv.client)


FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long) on x86-64


def host_generation(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8))
    finally:
        os.close(fd)
    return struct.unpack("=I", buf[:4])[0]  # ext4 writes only 32 bits


def test_getversion_returns_the_real_generation(export: Path) -> None:
    (export / "f").write_bytes(b"x")
    (export / "dir").mkdir()
    with start_server("proxyd", export) as srv:
        # An OPEN leaves a pointer on the reference's stack whose upper half then shows
        # in the 32 bits it forgets to initialise; proxyd must zero-extend regardless.
        r = srv.client.open("f", RD)
        if r.fd is not None:
            os.close(r.fd)
        for name in ("f", "dir", ""):
            r = srv.client.getversion(name or "/")
            assert r.ok, r
            assert r.data == struct.pack("=Q", host_generation(export / name)), name


@pytest.mark.parametrize(("value", "size"), [(b"abcdef", 3), (b"abc", 10), (b"", 1), (b"abc", -1)])
def test_lsetxattr_size_mismatch_is_einval(export: Path, value: bytes, size: int) -> None:
    (export / "f").write_bytes(b"")
    with start_server("proxyd", export) as srv:
        r = srv.client.lsetxattr("f", "user.x", value, size)
        assert (r.type, errno_of(r)) == (ERROR, errno.EINVAL)
        assert os.listxattr(export / "f") == []
        assert_usable(srv.client)


# Malformed payloads: (code, payload, reply kind). The reference answers every one of
# these with -ENOBUFS (its unmarshaller ran out of bytes) and keeps serving; proxyd
# answers the same. Both must keep the connection usable.
MALFORMED = {
    "string past end": (LSTAT, struct.pack("=H", 10) + b"abc", "data"),
    "empty payload": (LSTAT, b"", "data"),
    "half a length": (LSTAT, b"\x01", "data"),
    "chmod without mode": (CHMOD, pack_s("/"), "status"),
    "chmod half a mode": (CHMOD, pack_s("/") + b"\0\0", "status"),
    "open without flags": (OPEN, pack_s("/"), "fd"),
    "create without gid": (CREATE, marshal("sddd", "x", CR | WR, 0o644, 0), "fd"),
    "mkdir without path": (MKDIR, pack_d(0) + pack_d(0), "status"),
    "mknod without rdev": (MKNOD, marshal("ddsd", 0, 0, "n", REG | 0o644), "status"),
    "symlink one string": (SYMLINK, marshal("dds", 0, 0, "t"), "status"),
    "readlink without size": (READLINK, pack_s("/"), "data"),
    "utime short": (UTIME, marshal("sqq", "/", 0, 0), "status"),
    "lgetxattr without name": (LGETXATTR, marshal("ds", 5, "/"), "data"),
    "lsetxattr without flags": (LSETXATTR, marshal("sssd", "/", "user.a", "v", 1), "status"),
    "getversion string past end": (GETVERSION, b"\x05\x00ab", "data"),
}
MALFORMED_ERRNO = {"reference": errno.ENOBUFS, "proxyd": errno.ENOBUFS}


@pytest.mark.parametrize("server", ["reference", "proxyd"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_errno_and_connection_survives(
    export: Path, server: str, case: str
) -> None:
    code, payload, kind = MALFORMED[case]
    with start_server(server, export, timeout=5) as srv:
        r = srv.client.call(code, payload, kind)
        assert r.fd is None
        assert errno_of(r) == MALFORMED_ERRNO[server], r
        if kind != "fd":
            assert (r.type, len(r.data or b"")) == (ERROR, 4)
        assert_usable(srv.client)
    assert sorted(os.listdir(export)) == []  # nothing was created from a partial request


# An embedded NUL makes the reference act on the prefix (mkdir "nul\0tail" creates
# "nul"); proxyd refuses the request instead.
EMBEDDED_NUL = {
    "lstat": (LSTAT, pack_s(b"f\0x"), "data"),
    "mkdir": (MKDIR, marshal("ddsd", 0, 0, b"nul\0tail", 0o755), "status"),
    "open": (OPEN, marshal("sd", b"f\0x", RD), "fd"),
    "create": (CREATE, marshal("sdddd", b"new\0x", CR | WR, 0o644, 0, 0), "fd"),
    "symlink target": (SYMLINK, marshal("ddss", 0, 0, b"t\0x", "l"), "status"),
    "xattr name": (LSETXATTR, marshal("sssdd", "f", b"user.a\0b", "v", 1, 0), "status"),
}


@pytest.mark.parametrize("case", sorted(EMBEDDED_NUL))
def test_embedded_nul_is_einval(export: Path, case: str) -> None:
    (export / "f").write_bytes(b"")
    code, payload, kind = EMBEDDED_NUL[case]
    with start_server("proxyd", export, timeout=5) as srv:
        r = srv.client.call(code, payload, kind)
        assert (r.fd, errno_of(r)) == (None, errno.EINVAL), r
        assert_usable(srv.client)
    assert sorted(os.listdir(export)) == ["f"]
    assert os.listxattr(export / "f") == []


@pytest.mark.parametrize("server", ["reference", "proxyd"])
@pytest.mark.parametrize(
    ("code", "size"),
    [(22, 0), (0, 4), (1, 4), (1000, 0), (0xFFFFFFFF, 0), (LSTAT, 65537), (LSTAT, 0xFFFFFFFF)],
)
def test_protocol_error_closes_connection(export: Path, server: str, code: int, size: int) -> None:
    with start_server(server, export, timeout=5) as srv:
        # Only the header: a server must not wait for a payload it will not read.
        srv.client.send_raw(struct.pack("=II", code, size) + bytes(min(size, 4)))
        with pytest.raises(ConnectionClosed):
            srv.client.recv_header_reply("data")
        # It ends by itself, as the reference does: its loop stops, exit status 0 (the
        # reference's "Done"; proxyd -f ends with its one connection).
        assert srv.proc.wait(5) == 0, srv.stderr
