"""The export a guest gets is exactly the export the host sees: its mounts.

A worker serves from a mount namespace of its own, where the export is bound on itself
with nodev, nosuid and noexec added. These tests check, against real mounts made with
mount(8) and always removed again:

* restrictions of the host's mounts survive in the worker, on the export's mount and
  on every mount below it: a read-only or nosymfollow export answers every request the
  way the reference helper (which serves from the host's own namespace) does, and the
  host tree does not change; the worker's mount options are the host's plus the three
  added ones; a real guest cannot remove or empty a file of a read-only export;
* on a host whose mounts are shared (systemd makes / shared; this machine's mounts are
  private, so the tests build a shared tmpfs holding the export), mounts and unmounts
  the host makes inside the export after the workers started reach every worker;
* nothing a worker mounts (its bind mount of the export) shows on the host.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, wait_until
from tests.guest import ensure_guest_built, run_guest
from tests.proxyclient import ProxyClient, Reply, errno_of, start_server

ADDED = {"nodev", "nosuid", "noexec"}  # what a worker adds to every mount of its export
RO, NOSYMFOLLOW = "ro", "nosymfollow"
WR, RW, TRUNC, APPEND, CREAT = os.O_WRONLY, os.O_RDWR, os.O_TRUNC, os.O_APPEND, os.O_CREAT


# --- mounts and what the host sees -------------------------------------------------------


def mount(*args: str) -> None:
    """mount(8), as an administrator would type it; raises on failure."""
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def unmount_all(path: Path) -> None:
    """Everything mounted at or below `path`, deepest first and lazily (a test that
    failed half way must not leave mounts behind, nor fail its clean-up on a busy one)."""
    for place in sorted(mounts_below(path), key=len, reverse=True):
        target = str(path) + place.rstrip("/")
        subprocess.run(["umount", "--lazy", target], check=True, capture_output=True)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/PID/mountinfo (proc(5))."""

    mount_id: int
    mount_point: str
    options: frozenset[str]  # per-mount options: ro/rw, nosuid, nodev, noatime, ...
    tags: frozenset[str]  # propagation: shared:N, master:N, propagate_from:N, unbindable
    fstype: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def mountinfo(pid: int | str = "self") -> list[Mount]:
    """The mounts `pid` sees, mount points relative to its root (its chroot)."""
    mounts = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        mounts.append(
            Mount(
                int(fields[0]),
                _unescape(fields[4]),
                frozenset(fields[5].split(",")),
                frozenset(fields[6:]),
                right.split()[0],
            )
        )
    return mounts


def mounts_below(path: Path, pid: int | str = "self") -> dict[str, Mount]:
    """The mounts at or below `path`, by their place relative to it ("/", "/sub", ...)."""
    found = {}
    for m in mountinfo(pid):
        if m.mount_point == str(path) or m.mount_point.startswith(f"{path}/"):
            found["/" + os.path.relpath(m.mount_point, path).removeprefix(".")] = m
    return found


def mounts_changed(before: list[Mount], own: Path) -> list[str]:
    """How this process's mount table differs from `before`, as far as it is this test's
    business on a machine shared with other tests: a mount there before and after
    (same id, same place) whose options, propagation or type changed, or a mount that
    came or went at or below `own` (the test's directory, where a worker's bind mount
    of the export would show). Others come and go with other processes' work."""

    def key(m: Mount) -> tuple[int, str]:  # ids are reused: with the place, one mount
        return m.mount_id, m.mount_point

    def ours(m: Mount) -> bool:
        return m.mount_point == str(own) or m.mount_point.startswith(f"{own}/")

    was, now = {key(m): m for m in before}, {key(m): m for m in mountinfo()}
    changed = [f"{was[k]} -> {now[k]}" for k in was.keys() & now.keys() if was[k] != now[k]]
    changed += [f"new {now[k]}" for k in now.keys() - was.keys() if ours(now[k])]
    changed += [f"gone {was[k]}" for k in was.keys() - now.keys() if ours(was[k])]
    return changed


def settled(d: Daemon, count: int) -> list[int]:
    """The daemon's workers, once there are `count` and each is sandboxed (serving or
    idle, not starting): their /proc/PID/mountinfo is the worker's view then."""

    def ready() -> list[int] | None:
        titles = d.worker_titles()
        done = [pid for pid, t in titles.items() if " conn=" in t or t.endswith(" idle")]
        return done if len(titles) == count and len(done) == count else None

    return wait_until(ready, what=f"{count} sandboxed workers")


def worker_view(pid: int) -> dict[str, Mount]:
    """The mounts a (chrooted) worker sees, by mount point: "/" is its export."""
    return {m.mount_point: m for m in mountinfo(pid)}


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Everything a change could show in a host tree: names, types, modes, owners, sizes,
    contents, link targets, xattrs, mtimes, read without following symlinks."""
    tree: dict[str, dict[str, Any]] = {}
    for top, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            path = os.path.join(top, name)
            if name == "" and top != str(root):
                continue  # each directory once: as an entry of its parent
            st = os.lstat(path)
            entry: dict[str, Any] = {
                "mode": oct(st.st_mode),
                "owner": (st.st_uid, st.st_gid),
                "size": st.st_size,
                "nlink": st.st_nlink,
                "mtime_ns": st.st_mtime_ns,
                "xattrs": sorted(
                    (n, os.getxattr(path, n, follow_symlinks=False))
                    for n in os.listxattr(path, follow_symlinks=False)
                ),
            }
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                entry["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            tree[os.path.relpath(path, root)] = entry
    return tree


def populate(src: Path) -> None:
    """The tree every restricted mount holds."""
    (src / "precious").write_text("precious host data\n")
    os.setxattr(src / "precious", "user.keep", b"1")
    (src / "dir").mkdir()
    (src / "dir" / "inner").write_text("inner\n")
    os.setxattr(src / "dir" / "inner", "user.keep", b"1")
    (src / "empty").mkdir()
    os.symlink("precious", src / "link")
    os.symlink("dir", src / "dl")


def restricted_export(tmp: Path, options: str, layout: str) -> tuple[Path, str]:
    """A host tree served as an export, where a bind mount with `options` (ro,
    nosymfollow) is the export itself ("export") or a directory in it ("below").
    Returns the export and the guest's path to the restricted mount."""
    src, export = tmp / "src", tmp / "export"
    src.mkdir()
    export.mkdir()
    populate(src)
    target, prefix = export, ""
    if layout == "below":
        target, prefix = export / "m", "/m"
        target.mkdir()
    mount("--bind", str(src), str(target))
    mount("-o", f"remount,bind,{options}", str(target))
    return export, prefix


# --- 10.1: restrictions of the host's mounts are never loosened ---------------------------

Request = Callable[[ProxyClient, str], Reply]
# Every request type that can change the export, on plain paths.
CHANGES: dict[str, Request] = {
    "mkdir": lambda c, p: c.mkdir(0, 0, f"{p}/newdir", 0o755),
    "create": lambda c, p: c.create(f"{p}/newfile", CREAT | WR, 0o644, 0, 0),
    "create O_TRUNC existing": lambda c, p: c.create(
        f"{p}/precious", CREAT | WR | TRUNC, 0o644, 0, 0
    ),
    "mknod": lambda c, p: c.mknod(0, 0, f"{p}/fifo", stat.S_IFIFO | 0o644, 0),
    "symlink": lambda c, p: c.symlink(0, 0, "precious", f"{p}/newlink"),
    "link": lambda c, p: c.link(f"{p}/precious", f"{p}/hard"),
    "chmod": lambda c, p: c.chmod(f"{p}/precious", 0o600),
    "chown": lambda c, p: c.chown(f"{p}/precious", 1000, 1000),
    "truncate": lambda c, p: c.truncate(f"{p}/precious", 0),
    "utime": lambda c, p: c.utime(f"{p}/precious", 1, 0, 1, 0),
    "rename": lambda c, p: c.rename(f"{p}/precious", f"{p}/moved"),
    "remove file": lambda c, p: c.remove(f"{p}/precious"),
    "remove directory": lambda c, p: c.remove(f"{p}/empty"),
    "lsetxattr": lambda c, p: c.lsetxattr(f"{p}/precious", "user.new", b"1"),
    "lremovexattr": lambda c, p: c.lremovexattr(f"{p}/precious", "user.keep"),
    "open O_WRONLY|O_TRUNC": lambda c, p: c.open(f"{p}/precious", WR | TRUNC),
    "open O_RDWR": lambda c, p: c.open(f"{p}/precious", RW),
    "open O_WRONLY|O_APPEND": lambda c, p: c.open(f"{p}/precious", WR | APPEND),
}
# The same, each through a symlink: a directory link in the path, or a final link
# where the request follows it.
THROUGH_LINKS: dict[str, Request] = {
    "mkdir in dl/": lambda c, p: c.mkdir(0, 0, f"{p}/dl/newdir", 0o755),
    "create in dl/": lambda c, p: c.create(f"{p}/dl/newfile", CREAT | WR, 0o644, 0, 0),
    "mknod in dl/": lambda c, p: c.mknod(0, 0, f"{p}/dl/fifo", stat.S_IFIFO | 0o644, 0),
    "symlink in dl/": lambda c, p: c.symlink(0, 0, "inner", f"{p}/dl/newlink"),
    "link in dl/": lambda c, p: c.link(f"{p}/dl/inner", f"{p}/dl/hard"),
    "chmod dl/inner": lambda c, p: c.chmod(f"{p}/dl/inner", 0o600),
    "chmod link": lambda c, p: c.chmod(f"{p}/link", 0o600),
    "chown dl/inner": lambda c, p: c.chown(f"{p}/dl/inner", 1000, 1000),
    "truncate dl/inner": lambda c, p: c.truncate(f"{p}/dl/inner", 0),
    "truncate link": lambda c, p: c.truncate(f"{p}/link", 0),
    "utime dl/inner": lambda c, p: c.utime(f"{p}/dl/inner", 1, 0, 1, 0),
    "rename in dl/": lambda c, p: c.rename(f"{p}/dl/inner", f"{p}/dl/moved"),
    "remove dl/inner": lambda c, p: c.remove(f"{p}/dl/inner"),
    "lsetxattr dl/inner": lambda c, p: c.lsetxattr(f"{p}/dl/inner", "user.new", b"1"),
    "lremovexattr dl/inner": lambda c, p: c.lremovexattr(f"{p}/dl/inner", "user.keep"),
    "open dl/inner O_WRONLY|O_TRUNC": lambda c, p: c.open(f"{p}/dl/inner", WR | TRUNC),
    "create O_TRUNC through link": lambda c, p: c.create(
        f"{p}/link", CREAT | WR | TRUNC, 0o644, 0, 0
    ),
}
# Reading through a symlink: only nosymfollow refuses it.
READS: dict[str, Request] = {
    "open through link": lambda c, p: c.open(f"{p}/link", os.O_RDONLY),
    "open dl/inner": lambda c, p: c.open(f"{p}/dl/inner", os.O_RDONLY),
    "lstat dl/inner": lambda c, p: c.lstat(f"{p}/dl/inner"),
    "readlink link": lambda c, p: c.readlink(f"{p}/link", 64),  # no following: allowed
}


def requests_for(options: str) -> dict[str, Request]:
    """What can be sent without changing the tree: on a writable nosymfollow mount the
    plain changes would succeed (on both servers), so only the ones through links."""
    chosen = dict(THROUGH_LINKS) | READS
    if RO in options.split(","):
        chosen |= CHANGES
    return chosen


def outcome(reply: Reply) -> str:
    """A reply as a guest sees it: an errno name, or success (and whether an fd came)."""
    if reply.fd is not None:
        os.close(reply.fd)
    err = errno_of(reply)
    if err:
        return errno.errorcode.get(err, str(err))
    return "ok, a descriptor" if reply.kind == "fd" else "ok"


def serve_and_record(kind: str, tmp: Path, options: str, layout: str) -> dict[str, Any]:
    """Build the tree under `tmp`, serve it with `kind`, send every request; the replies
    and the host tree before and after."""
    tmp.mkdir()
    export, prefix = restricted_export(tmp, options, layout)
    try:
        before = snapshot(export)
        mounts_before = mountinfo()
        with start_server(kind, export) as server:
            replies = {
                name: outcome(request(server.client, prefix))
                for name, request in requests_for(options).items()
            }
            assert server.proc.poll() is None, f"{kind} died:\n{server.stderr}"
        return {
            "replies": replies,
            "before": before,
            "after": snapshot(export),
            "host mounts changed": mounts_changed(mounts_before, tmp),
        }
    finally:
        unmount_all(export)


@pytest.mark.parametrize("layout", ["export", "below"])
@pytest.mark.parametrize("options", [RO, NOSYMFOLLOW, f"{RO},{NOSYMFOLLOW}"])
def test_a_restricted_mount_answers_as_the_reference(
    tmp_path: Path, options: str, layout: str
) -> None:
    """`mount --bind SRC EXP; mount -o remount,bind,OPTIONS EXP` (or the same on a
    directory of the export): every request that could change the export, and every
    read through a symlink, gets the reference's answer, and the host tree stays."""
    ref = serve_and_record("reference", tmp_path / "reference", options, layout)
    ours = serve_and_record("proxyd", tmp_path / "proxyd", options, layout)
    # The reference shows that the restriction is real: nothing changes, and with
    # nosymfollow no symlink is followed.
    for name in THROUGH_LINKS.keys() | (CHANGES.keys() if RO in options else set()):
        assert not ref["replies"][name].startswith("ok"), f"reference: {name} succeeded"
    if NOSYMFOLLOW in options:
        assert ref["replies"]["open through link"] == "ELOOP"
    for name, reply in ref["replies"].items():
        print(f"{name:32} reference {reply:16} proxyd {ours['replies'][name]}")
    mismatches = {
        name: f"reference {ref['replies'][name]}, proxyd {ours['replies'][name]}"
        for name in ref["replies"]
        if ref["replies"][name] != ours["replies"][name]
    }
    assert not mismatches, mismatches
    for who, run in (("reference", ref), ("proxyd", ours)):
        changed = {
            path: (run["before"].get(path), run["after"].get(path))
            for path in run["before"].keys() | run["after"].keys()
            if run["before"].get(path) != run["after"].get(path)
        }
        assert not changed, f"{who} changed the host tree: {changed}"
        assert not run["host mounts changed"], f"{who}: {run['host mounts changed']}"


def test_worker_mounts_keep_every_host_flag(tmp_path: Path) -> None:
    """Every mount of the export, as its workers (idle and serving) see it, has exactly
    the host's per-mount options plus nodev, nosuid and noexec, and no mount is
    missing or extra. The host's mounts are not changed by the workers' set-up."""
    export, other = tmp_path / "export", tmp_path / "other"
    export.mkdir()
    other.mkdir()
    (other / "f").write_text("f")
    try:
        mount("-t", "tmpfs", "-o", "noatime,nodiratime,size=4m", "proxyd-test", str(export))
        for sub in ("ro", "nsf", "strict", "nested"):
            (export / sub).mkdir()
        mount("--bind", "-o", "ro", str(other), str(export / "ro"))
        mount("--bind", "-o", "nosymfollow", str(other), str(export / "nsf"))
        mount("-t", "tmpfs", "-o", "strictatime,size=4m", "proxyd-test", str(export / "strict"))
        mount("-t", "tmpfs", "-o", "relatime,nosuid,size=4m", "proxyd-test", str(export / "nested"))
        (export / "nested" / "deep").mkdir()
        mount("--bind", "-o", "ro,nosymfollow", str(other), str(export / "nested" / "deep"))
        host = mounts_below(export)
        assert set(host) == {"/", "/ro", "/nsf", "/strict", "/nested", "/nested/deep"}
        host_before = mountinfo()
        d = Daemon(tmp_path, [{"name": "flags", "path": str(export), "min_idle": 2}])
        with d:
            client = d.connect("flags")
            assert client.lstat("/nested/deep/f").ok
            settled(d, 3)
            for pid in d.workers():
                seen = worker_view(pid)
                assert set(seen) == set(host), f"worker {pid} sees {sorted(seen)}"
                for place, m in host.items():
                    want = m.options | ADDED
                    assert seen[place].options == want, (
                        f"worker {pid}, {place}: {sorted(seen[place].options)}, "
                        f"host {sorted(m.options)}"
                    )
            assert not mounts_changed(host_before, tmp_path), "the workers' mounts showed"
    finally:
        unmount_all(export)


GUEST_ON_READ_ONLY = """
cat precious && echo READ-OK
rm -f precious; echo "RM=$?"
echo >precious; echo "EMPTY=$?"
echo more >>precious; echo "APPEND=$?"
echo new >new; echo "NEW=$?"
mkdir d; echo "MKDIR=$?"
mv precious moved; echo "MV=$?"
chmod 600 precious; echo "CHMOD=$?"
exit 0
"""


def test_a_guest_cannot_change_a_read_only_export(tmp_path: Path) -> None:
    """A real guest on a read-only bind mount: rm -f, emptying, appending, creating,
    renaming and chmod all fail in the guest, and the host tree is as it was."""
    ensure_guest_built()
    export, _ = restricted_export(tmp_path, RO, "export")
    try:
        before = snapshot(export)
        with Daemon(tmp_path, [{"name": "ro", "path": str(export)}]) as d:
            result = run_guest(GUEST_ON_READ_ONLY, socket_path=d.exports["ro"]["socket"])
        print(result.output)
        assert result.mounted and result.exit_status == 0, result.output
        assert "READ-OK" in result.output, "the guest could not read the export"
        for step in ("RM", "EMPTY", "APPEND", "NEW", "MKDIR", "MV", "CHMOD"):
            status = [line for line in result.output.splitlines() if line.startswith(f"{step}=")]
            assert status and status[0] != f"{step}=0", f"{step} succeeded in the guest"
        assert "Read-only file system" in result.output
        assert snapshot(export) == before, "the guest changed the host tree"
    finally:
        unmount_all(export)


# --- 10.2: the host's later mounts reach the workers ------------------------------------


@pytest.fixture
def shared_host(tmp_path: Path) -> Iterator[Path]:
    """What a systemd host has: a shared mount (here a tmpfs) holding the exports."""
    top = tmp_path / "top"
    top.mkdir()
    try:
        mount("-t", "tmpfs", "-o", "size=8m", "proxyd-shared", str(top))
        mount("--make-shared", str(top))
        yield top
    finally:
        unmount_all(top)


def export_in(top: Path, layout: str) -> Path:
    """The export: the shared mount's root itself, or a directory in it."""
    export = top if layout == "root" else top / "srv" / "vm"
    export.mkdir(parents=True, exist_ok=True)
    (export / "sub").mkdir()
    return export


def peer_group(path: Path) -> str:
    """The host's shared:N tag of the mount at `path`."""
    (tag,) = [t for t in mounts_below(path)["/"].tags if t.startswith("shared:")]
    return tag.removeprefix("shared:")


@pytest.mark.parametrize("layout", ["root", "below"])
def test_worker_namespace_is_a_slave_of_a_shared_host(
    tmp_path: Path, shared_host: Path, layout: str
) -> None:
    """The worker's bind mount of the export receives the host's events (master:N of
    the host's peer group) and sends none back (no shared:N): its bind mount never
    shows on the host."""
    export = export_in(shared_host, layout)
    group = peer_group(shared_host)
    before = mountinfo()
    with Daemon(tmp_path, [{"name": "s", "path": str(export), "min_idle": 2}]) as d:
        client = d.connect("s")
        assert client.lstat("/sub").ok
        settled(d, 3)
        for pid in d.workers():
            root = worker_view(pid)["/"]
            assert f"master:{group}" in root.tags, f"worker {pid}: {sorted(root.tags)}"
            assert not [t for t in root.tags if t.startswith("shared:")], sorted(root.tags)
        assert not mounts_changed(before, tmp_path), "a worker's mount showed on the host"


@pytest.mark.parametrize("layout", ["root", "below"])
def test_host_mount_in_a_shared_export_reaches_every_worker(
    tmp_path: Path, shared_host: Path, layout: str
) -> None:
    """Reproduction A: a guest connected, then the host mounts a tmpfs on EXP/sub and
    writes a file there. The serving worker and a spare started before the mount see
    the file, and a CREATE lands in the tmpfs, not in the directory under it."""
    export = export_in(shared_host, layout)
    before = mountinfo()
    with Daemon(tmp_path, [{"name": "a", "path": str(export), "min_idle": 2}]) as d:
        busy = d.connect("a")
        assert busy.lstat("/").ok
        forked_before = settled(d, 3)
        assert not mounts_changed(before, tmp_path), "a worker's mount showed on the host"
        try:
            # Stopped, the workers forked before the mount cannot be replaced by the
            # master (which also reacts to the mount): what they see then came to them
            # by propagation alone.
            for pid in forked_before:
                os.kill(pid, signal.SIGSTOP)
            try:
                mount("-t", "tmpfs", "-o", "size=1m", "proxyd-late", str(export / "sub"))
                (export / "sub" / "f").write_text("on the host's mount")
                for pid in forked_before:
                    assert worker_view(pid)["/sub"].fstype == "tmpfs", f"worker {pid}"
            finally:
                for pid in forked_before:
                    os.kill(pid, signal.SIGCONT)
            idle = d.connect("a")
            for client in (busy, idle):
                reply = client.lstat("/sub/f")
                assert reply.ok, f"LSTAT /sub/f: {errno.errorcode.get(errno_of(reply))}"
            reply = busy.create("/sub/g", CREAT | WR, 0o644, 0, 0)
            assert reply.ok and reply.fd is not None
            os.close(reply.fd)
            assert (export / "sub" / "g").exists()
        finally:
            unmount_all(export / "sub")
        assert not (export / "sub" / "g").exists(), "CREATE landed under the host's mount"
        assert errno_of(busy.lstat("/sub/f")) == errno.ENOENT  # the unmount reached it too
    assert not mounts_changed(before, tmp_path)


@pytest.mark.parametrize("layout", ["root", "below"])
def test_host_unmount_in_a_shared_export_reaches_every_worker(
    tmp_path: Path, shared_host: Path, layout: str
) -> None:
    """Reproduction B: a tmpfs on EXP/sub before proxyd starts, unmounted by the host
    while a guest is connected. No worker keeps it alive: its files are gone for the
    guest, a CREATE lands in the directory the host sees, the host's (non-lazy)
    umount is not refused as busy."""
    export = export_in(shared_host, layout)
    mount("-t", "tmpfs", "-o", "size=1m", "proxyd-early", str(export / "sub"))
    (export / "sub" / "old").write_text("on the early mount")
    with Daemon(tmp_path, [{"name": "b", "path": str(export), "min_idle": 2}]) as d:
        client = d.connect("b")
        assert client.lstat("/sub/old").ok
        settled(d, 3)
        subprocess.run(["umount", str(export / "sub")], check=True)
        assert errno_of(client.lstat("/sub/old")) == errno.ENOENT
        reply = client.create("/sub/new", CREAT | WR, 0o644, 0, 0)
        assert reply.ok and reply.fd is not None
        os.close(reply.fd)
        assert (export / "sub" / "new").exists(), "CREATE did not land where the host sees"
        for pid in d.workers():
            assert not holds_tmpfs(pid, "/sub"), f"worker {pid} keeps the unmounted tmpfs"


# --- the same on a private host: the master replaces the workers -------------------------


def private_export(tmp_path: Path) -> Path:
    """An export on this machine's own mounts, which are private (as in containers)."""
    export = tmp_path / "private"
    (export / "sub").mkdir(parents=True)
    top = mounts_below(Path("/"))
    assert not [t for t in top["/"].tags if t.startswith("shared:")], "/ is shared here"
    return export


def holds_tmpfs(pid: int, place: str) -> bool:
    try:
        return worker_view(pid).get(place) is not None and worker_view(pid)[place].fstype == "tmpfs"
    except OSError:  # the worker left (ENOENT), or is leaving (EINVAL: no mounts any more)
        return False


def test_host_mount_and_unmount_on_a_private_host_reach_the_workers(tmp_path: Path) -> None:
    """Reproductions A and B where nothing propagates: once the master has seen the
    change (`export mounts changed`), every request is served from the host's current
    mounts, by the serving worker's successor and by new spares alike; no worker keeps
    an unmounted filesystem alive."""
    export = private_export(tmp_path)
    with Daemon(tmp_path, [{"name": "p", "path": str(export), "min_idle": 2}]) as d:
        busy = d.connect("p")
        assert busy.lstat("/").ok
        settled(d, 3)
        try:
            mount("-t", "tmpfs", "-o", "size=1m", "proxyd-late", str(export / "sub"))
            (export / "sub" / "f").write_text("on the host's mount")
            d.wait_event("export mounts changed", export="p", mounted=[str(export / "sub")])
            idle = d.connect("p")
            for client in (busy, idle):
                reply = client.lstat("/sub/f")
                assert reply.ok, f"LSTAT /sub/f: {errno.errorcode.get(errno_of(reply))}"
            reply = busy.create("/sub/g", CREAT | WR, 0o644, 0, 0)
            assert reply.ok and reply.fd is not None
            os.close(reply.fd)
            assert (export / "sub" / "g").exists()
        finally:
            subprocess.run(["umount", str(export / "sub")], check=True)  # not lazy
        d.wait_event("export mounts changed", export="p", unmounted=[str(export / "sub")])
        assert not (export / "sub" / "g").exists(), "CREATE landed under the host's mount"
        for client in (busy, idle):
            assert errno_of(client.lstat("/sub/f")) == errno.ENOENT
        wait_until(
            lambda: not any(holds_tmpfs(pid, "/sub") for pid in d.workers()),
            what="no worker holding the unmounted tmpfs",
        )


def test_host_remount_read_only_reaches_the_workers(tmp_path: Path) -> None:
    """A remount never propagates, on any host: the master replaces the workers, and a
    guest's change below the remounted directory gets EROFS as from the reference."""
    export = private_export(tmp_path)
    (export / "sub" / "f").write_text("keep me")
    with Daemon(tmp_path, [{"name": "r", "path": str(export), "min_idle": 1}]) as d:
        client = d.connect("r")
        assert client.mkdir(0, 0, "/sub/before", 0o755).ok
        try:
            mount("--bind", str(export / "sub"), str(export / "sub"))
            mount("-o", "remount,bind,ro", str(export / "sub"))

            # One change or two (bind, then remount), as the master happens to read its
            # mount table between them or not: wait for the state itself, a write open
            # refused (one that is not refused changes nothing and is closed).
            def read_only() -> bool:
                reply = client.open("/sub/f", WR)
                if reply.fd is not None:
                    os.close(reply.fd)
                return errno_of(reply) == errno.EROFS

            wait_until(read_only, what="the worker serving the guest to see the remount")
            assert d.events("export mounts changed", export="r")
            assert errno_of(client.mkdir(0, 0, "/sub/after", 0o755)) == errno.EROFS
            reply = client.open("/sub/f", WR | TRUNC)
            assert reply.fd is None and errno_of(reply) == errno.EROFS
            assert (export / "sub" / "f").read_text() == "keep me"
            assert client.mkdir(0, 0, "/elsewhere", 0o755).ok  # the rest stays writable
        finally:
            unmount_all(export / "sub")
