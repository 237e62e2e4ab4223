"""ID-mapped exports (`uid_map`, `gid_map`): guest root is not host root.

Real daemons, real chroots, real mounts and a real guest. With
`uid_map = gid_map = [[0, 100000, 65536]]` the worker's mount of the export is ID-mapped
(mount_setattr(2), MOUNT_ATTR_IDMAP): guest id g is stored as host id 100000 + g, a host
owner outside the range shows as 65534, a guest id outside it cannot own a file. These
tests check, per request type, what the guest gets and what lands on the host (the table
README's "ID-mapped exports" gives), the worker's mounts, the configuration's refusals,
status, the start line and the audit events, and two guests on two exports with
different ranges, served by one daemon at the same time.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, wait_until, write_config
from tests.guest import Guest, GuestResult, ensure_guest_built
from tests.proxyclient import (
    CHECKOUT,
    ConnectionClosed,
    ProxyClient,
    Reply,
    decode_stat,
    errno_of,
    unpack_s,
)
from tests.test_mounts import ADDED, mount, mountinfo, mounts_below, settled, unmount_all

MAP = [[0, 100000, 65536]]  # guest 0..65535 is host 100000..165535
OTHER_MAP = [[0, 200000, 65536]]
OVERFLOW_ID = 65534  # /proc/sys/kernel/overflowuid, overflowgid
OUTSIDE = 5  # a host owner no range holds
W, C, TRUNC = os.O_WRONLY, os.O_CREAT, os.O_TRUNC
UTIME_NOW = (1 << 30) - 1


def mapped(name: str, ranges: list[list[int]] = MAP, **settings: Any) -> dict[str, Any]:
    """An [[export]] table with `ranges` as both maps."""
    return {"name": name, "uid_map": ranges, "gid_map": ranges, **settings}


def owned_directory(path: Path, uid: int, gid: int | None = None) -> Path:
    """A directory owned by `uid:gid` (an ID-mapped export's top must be owned by an id
    of its range: root's directory shows as 65534, where guest root cannot create)."""
    path.mkdir(exist_ok=True)
    os.chown(path, uid, uid if gid is None else gid)
    return path


def host_file(path: Path, uid: int = OUTSIDE, mode: int = 0o644) -> Path:
    path.write_text("host data\n")
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    os.setxattr(path, "user.keep", b"1")
    return path


def worker_mounts(pid: int) -> dict[str, Any]:
    """The mounts a sandboxed worker sees, by mount point: "/" is its export."""
    return {m.mount_point: m for m in mountinfo(pid)}


def host_owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def outcome(reply: Reply) -> str:
    """An errno name, or "ok" (a descriptor received is closed)."""
    if reply.fd is not None:
        os.close(reply.fd)
    err = errno_of(reply)
    return errno.errorcode.get(err, str(err)) if err else "ok"


def seen_owner(client: ProxyClient, path: str) -> tuple[int, int]:
    """st_uid, st_gid of LSTAT, as the guest sees them."""
    reply = client.lstat(path)
    assert reply.ok, f"LSTAT {path}: {outcome(reply)}"
    st = decode_stat(reply.data or b"")
    return st["uid"], st["gid"]


def acl(user: int) -> bytes:
    """A system.posix_acl_access value (linux/posix_acl_xattr.h, version 2) granting
    `user` rw: user::rw- user:USER:rw- group::r-- mask::rw- other::r--."""
    none = 0xFFFFFFFF  # ACL_UNDEFINED_ID
    entries = [(0x01, 6, none), (0x02, 6, user), (0x04, 4, none), (0x10, 6, none), (0x20, 4, none)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def acl_user(value: bytes) -> int:
    """The id of the ACL_USER entry of a system.posix_acl_access value."""
    for offset in range(4, len(value), 8):
        tag, _, ident = struct.unpack_from("<HHI", value, offset)
        if tag == 0x02:
            return ident
    raise AssertionError(f"no ACL_USER entry in {value.hex()}")


# --- every request type through the map ----------------------------------------------------

# A host file or directory owned by OUTSIDE (uid and gid 5, no range holds it), mode 0644,
# one per request so that no answer depends on another: what the guest gets. The kernel's
# rules (fs/namei.c, fs/attr.c, fs/xattr.c): it may read what "other" may read; root's
# DAC_OVERRIDE and FOWNER do not reach an inode whose owner the mount cannot map; a change
# of such an inode (write, truncate, times, mode, xattrs) or of a directory holding it
# (create, remove, rename) is refused with EACCES, EPERM or EOVERFLOW; CHOWN into the range
# is allowed (CAP_CHOWN in the filesystem's namespace may repair an unmapped owner).
OUTSIDE_OWNER: dict[str, tuple[Callable[[ProxyClient, str], Reply], str]] = {
    "open O_RDONLY": (lambda c, p: c.open(p, os.O_RDONLY), "ok"),
    "open O_WRONLY": (lambda c, p: c.open(p, W), "EACCES"),
    "create O_TRUNC of it": (lambda c, p: c.create(p, C | W | TRUNC, 0o644, 0, 0), "EACCES"),
    "lgetxattr": (lambda c, p: c.lgetxattr(64, p, "user.keep"), "ok"),
    "llistxattr": (lambda c, p: c.llistxattr(64, p), "ok"),
    "getversion": (lambda c, p: c.getversion(p), "ok"),
    "statfs": (lambda c, p: c.statfs(p), "ok"),
    "chmod": (lambda c, p: c.chmod(p, 0o600), "EOVERFLOW"),
    "chown -1 -1": (lambda c, p: c.chown(p, -1, -1), "EOVERFLOW"),
    "truncate": (lambda c, p: c.truncate(p, 0), "EACCES"),
    "utime to given times": (lambda c, p: c.utime(p, 1, 0, 1, 0), "EOVERFLOW"),
    "utime to now": (lambda c, p: c.utime(p, 0, UTIME_NOW, 0, UTIME_NOW), "EACCES"),
    "rename": (lambda c, p: c.rename(p, f"{p}.moved"), "EOVERFLOW"),
    "rename onto it": (lambda c, p: c.rename("/mine", p), "EOVERFLOW"),
    "remove": (lambda c, p: c.remove(p), "EOVERFLOW"),
    "link": (lambda c, p: c.link(p, f"{p}.link"), "EOVERFLOW"),
    "lsetxattr": (lambda c, p: c.lsetxattr(p, "user.new", b"1"), "EPERM"),
    "lremovexattr": (lambda c, p: c.lremovexattr(p, "user.keep"), "EPERM"),
    "chown into the range": (lambda c, p: c.chown(p, 1000, 1000), "ok"),
}
# In a directory owned by OUTSIDE: nothing can be created, even where its mode allows
# (the kernel's EACCES, for every request type).
IN_OUTSIDE_DIRECTORY: dict[str, tuple[Callable[[ProxyClient, str], Reply], str]] = {
    "mkdir": (lambda c, d: c.mkdir(0, 0, f"{d}/new", 0o755), "EACCES"),
    "create": (lambda c, d: c.create(f"{d}/new", C | W, 0o644, 0, 0), "EACCES"),
    "mknod": (lambda c, d: c.mknod(0, 0, f"{d}/new", stat.S_IFIFO | 0o644, 0), "EACCES"),
    "symlink": (lambda c, d: c.symlink(0, 0, "t", f"{d}/new"), "EACCES"),
}
# Guest ids no range holds: the kernel refuses to store them.
UNMAPPED_GUEST_ID = 70000
GUEST_ID_OUTSIDE: dict[str, tuple[Callable[[ProxyClient, int], Reply], str]] = {
    "create uid": (lambda c, i: c.create(f"/c{i}u", C | W, 0o644, i, 0), "EOVERFLOW"),
    "create gid": (lambda c, i: c.create(f"/c{i}g", C | W, 0o644, 0, i), "EOVERFLOW"),
    "mkdir": (lambda c, i: c.mkdir(i, i, f"/d{i}", 0o755), "EOVERFLOW"),
    "mknod": (lambda c, i: c.mknod(i, i, f"/n{i}", stat.S_IFIFO | 0o644, 0), "EOVERFLOW"),
    "symlink": (lambda c, i: c.symlink(i, i, "mine", f"/s{i}"), "EOVERFLOW"),
    "chown uid": (lambda c, i: c.chown("/mine", i, -1), "EOVERFLOW"),
    "chown gid": (lambda c, i: c.chown("/mine", -1, i), "EOVERFLOW"),
    "lsetxattr ACL naming it": (
        lambda c, i: c.lsetxattr("/mine", "system.posix_acl_access", acl(i)),
        "EINVAL",
    ),
}


def test_every_request_type_through_the_map(tmp_path: Path) -> None:
    """Guest ids in the range are stored mapped and read back as sent (LSTAT, ACLs); guest
    ids outside it are refused as the table says; host files whose owner is outside it
    show as 65534 and answer every request type as the table says. The host tree shows
    the mapped owners. An unmapped export of the same daemon stores the same ids as sent."""
    top = owned_directory(tmp_path / "m", 100000)
    host_file(top / "mine", uid=100000)
    for name in OUTSIDE_OWNER:
        host_file(top / name.replace(" ", "_"))
    for name in IN_OUTSIDE_DIRECTORY:
        owned_directory(top / f"dir_{name}", OUTSIDE)
        os.chmod(top / f"dir_{name}", 0o777)
    os.symlink("mine", top / "outside_link")
    os.chown(top / "outside_link", OUTSIDE, OUTSIDE, follow_symlinks=False)
    with Daemon(tmp_path, [mapped("m"), {"name": "plain"}], audit="all") as d:
        c = d.connect("m")
        # In the range: stored mapped, seen as sent.
        created = {
            "/root_file": c.create("/root_file", C | W, 0o644, 0, 0),
            "/user_file": c.create("/user_file", C | W, 0o644, 1000, 1000),
            "/dir": c.mkdir(0, 0, "/dir", 0o755),
            "/fifo": c.mknod(0, 0, "/fifo", stat.S_IFIFO | 0o644, 0),
            "/null": c.mknod(0, 0, "/null", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
            "/user_link": c.symlink(1000, 1000, "root_file", "/user_link"),
            "/hard": c.link("/root_file", "/hard"),
        }
        assert {p: outcome(r) for p, r in created.items()} == dict.fromkeys(created, "ok")
        assert outcome(c.chmod("/root_file", 0o4755)) == "ok"
        assert outcome(c.chown("/dir", 1000, 1000)) == "ok"
        assert outcome(c.lsetxattr("/mine", "system.posix_acl_access", acl(1000))) == "ok"
        want_host = {
            "root_file": (100000, 100000),
            "user_file": (101000, 101000),
            "dir": (101000, 101000),
            "fifo": (100000, 100000),
            "null": (100000, 100000),
            "user_link": (101000, 101000),
            "hard": (100000, 100000),
        }
        assert {n: host_owner(top / n) for n in want_host} == want_host
        want_guest = {n: (h[0] - 100000, h[1] - 100000) for n, h in want_host.items()}
        assert {n: seen_owner(c, f"/{n}") for n in want_guest} == want_guest
        assert os.lstat(top / "root_file").st_mode & 0o7777 == 0o4755  # setuid to 100000
        assert acl_user(os.getxattr(top / "mine", "system.posix_acl_access")) == 101000
        reply = c.lgetxattr(256, "/mine", "system.posix_acl_access")
        assert reply.ok and acl_user(unpack_s(reply.data or b"")) == 1000

        # Guest ids outside the range.
        outside_ids = (UNMAPPED_GUEST_ID, 0xFFFFFFFE)
        refused = {
            f"{name} {guest_id}": outcome(request(c, guest_id))
            for guest_id in outside_ids
            for name, (request, _) in GUEST_ID_OUTSIDE.items()
        }
        print(json.dumps(refused, indent=1))
        assert refused == {
            f"{name} {guest_id}": want
            for guest_id in outside_ids
            for name, (_, want) in GUEST_ID_OUTSIDE.items()
        }
        assert host_owner(top / "mine") == (100000, 100000)

        # Host files whose owner is outside the range.
        assert seen_owner(c, "/chmod") == (OVERFLOW_ID, OVERFLOW_ID)
        assert seen_owner(c, "/outside_link") == (OVERFLOW_ID, OVERFLOW_ID)
        assert outcome(c.readlink("/outside_link", 64)) == "ok"
        before = {n: host_owner(top / n.replace(" ", "_")) for n in OUTSIDE_OWNER}
        got = {n: outcome(r(c, "/" + n.replace(" ", "_"))) for n, (r, _) in OUTSIDE_OWNER.items()}
        got |= {
            f"{n} in its directory": outcome(r(c, f"/dir_{n}"))
            for n, (r, _) in IN_OUTSIDE_DIRECTORY.items()
        }
        print(json.dumps(got, indent=1))
        assert got == {n: want for n, (_, want) in OUTSIDE_OWNER.items()} | {
            f"{n} in its directory": want for n, (_, want) in IN_OUTSIDE_DIRECTORY.items()
        }
        after = {n: host_owner(top / n.replace(" ", "_")) for n in OUTSIDE_OWNER}
        changed = {n for n in OUTSIDE_OWNER if before[n] != after[n]}
        assert changed == {"chown into the range"}
        assert after["chown into the range"] == (101000, 101000)
        assert (top / "truncate").read_text() == "host data\n"
        assert sorted(os.listdir(top / "dir_mkdir")) == []

        # The same daemon's unmapped export stores ids as sent.
        plain = d.connect("plain")
        assert outcome(plain.create("/f", C | W, 0o644, UNMAPPED_GUEST_ID, 1000)) == "ok"
        assert host_owner(tmp_path / "plain" / "f") == (UNMAPPED_GUEST_ID, 1000)

        # Audit: the guest's ids as sent, and the host's where they differ. (A reply
        # means the line of the request before it is written: it goes out after a reply.)
        assert c.lstat("/").ok
        d.wait_event("op", export="plain", path="/f")

        def ids(path: str, op: str, **match: Any) -> list[tuple[Any, ...]]:
            return [
                (e["uid"], e["gid"], e.get("host_uid", "-"), e.get("host_gid", "-"))
                for e in d.events("op", path=path, op=op, **match)
            ]

        assert ids("/user_file", "create") == [(1000, 1000, 101000, 101000)]
        assert ids("/dir", "chown") == [(1000, 1000, 101000, 101000)]
        assert ids("/c70000u", "create") == [(UNMAPPED_GUEST_ID, 0, None, 100000)]
        assert ids("/mine", "chown") == [
            (UNMAPPED_GUEST_ID, -1, None, "-"),
            (-1, UNMAPPED_GUEST_ID, "-", None),
            (-2, -1, None, "-"),  # 0xFFFFFFFE, sent as a signed field
            (-1, -2, "-", None),
        ]
        assert ids("/f", "create", export="plain") == [(UNMAPPED_GUEST_ID, 1000, "-", "-")]


# --- the workers' mounts --------------------------------------------------------------------


def test_worker_mounts_are_idmapped_and_keep_every_host_flag(tmp_path: Path) -> None:
    """Every mount at and below a mapped export, as its workers see it: the host's options
    plus nodev, nosuid, noexec and idmapped; private (no master:N, no shared:N: no host
    mount can arrive unmapped by propagation); no mount missing or extra; the host's
    mounts unchanged. A ro submount stays read-only."""
    export, other = tmp_path / "export", tmp_path / "other"
    export.mkdir()
    owned_directory(other, 100000)
    host_file(other / "f", uid=100000)
    try:
        mount("-t", "tmpfs", "-o", "noatime,size=4m,uid=100000,gid=100000", "idmap-t", str(export))
        mount("--make-shared", str(export))
        for sub in ("ro", "nested"):
            owned_directory(export / sub, 100000)
        mount("--bind", "-o", "ro", str(other), str(export / "ro"))
        mount(
            "-t",
            "tmpfs",
            "-o",
            "strictatime,size=4m,uid=100000,gid=100000",
            "idmap-t",
            str(export / "nested"),
        )
        host = mounts_below(export)
        assert set(host) == {"/", "/ro", "/nested"}
        host_before = mountinfo()
        with Daemon(tmp_path, [mapped("flags", path=str(export), min_idle=2)]) as d:
            client = d.connect("flags")
            assert seen_owner(client, "/ro/f") == (0, 0)
            assert outcome(client.mkdir(0, 0, "/ro/new", 0o755)) == "EROFS"
            assert outcome(client.mkdir(0, 0, "/nested/new", 0o755)) == "ok"
            assert host_owner(export / "nested" / "new") == (100000, 100000)
            for pid in settled(d, 3):
                seen = {m.mount_point: m for m in mountinfo(pid)}
                assert set(seen) == set(host), f"worker {pid} sees {sorted(seen)}"
                for place, m in host.items():
                    assert seen[place].options == m.options | ADDED | {"idmapped"}, (
                        f"worker {pid}, {place}: {sorted(seen[place].options)}, "
                        f"host {sorted(m.options)}"
                    )
                    assert not seen[place].tags, f"worker {pid}, {place}: {seen[place].tags}"
            assert mountinfo() == host_before, "the workers' mounts showed on the host"
    finally:
        unmount_all(export)


def test_a_host_mount_below_a_mapped_export_never_arrives_unmapped(tmp_path: Path) -> None:
    """On a shared host mount (systemd's), a tmpfs the host mounts in a mapped export does
    not propagate into the running workers (it would arrive without the mapping): the
    master replaces them (`export mounts changed`), and the new ones see it ID-mapped."""
    top = tmp_path / "top"
    top.mkdir()
    try:
        mount("-t", "tmpfs", "-o", "size=8m,uid=100000,gid=100000", "idmap-shared", str(top))
        mount("--make-shared", str(top))
        owned_directory(top / "sub", 100000)
        with Daemon(tmp_path, [mapped("s", path=str(top), min_idle=2)]) as d:
            busy = d.connect("s")
            assert seen_owner(busy, "/sub") == (0, 0)
            before = settled(d, 3)
            for pid in before:  # stopped, they cannot be replaced: they show propagation
                os.kill(pid, signal.SIGSTOP)
            try:
                mount(
                    "-t",
                    "tmpfs",
                    "-o",
                    "size=1m,uid=101000,gid=101000",
                    "idmap-late",
                    str(top / "sub"),
                )
                host_file(top / "sub" / "f", uid=100000)
                for pid in before:
                    assert "/sub" not in worker_mounts(pid), f"worker {pid}"
            finally:
                for pid in before:
                    os.kill(pid, signal.SIGCONT)
            d.wait_event("export mounts changed", export="s", mounted=[str(top / "sub")])
            fresh = d.connect("s")
            for client in (busy, fresh):  # the busy one's next request: its successor
                assert seen_owner(client, "/sub") == (1000, 1000)
                assert seen_owner(client, "/sub/f") == (0, 0)
            assert outcome(fresh.mkdir(0, 0, "/sub/d", 0o755)) == "ok"
            assert host_owner(top / "sub" / "d") == (100000, 100000)
            for pid, title in d.worker_titles().items():
                if pid not in before and (" conn=" in title or title.endswith(" idle")):
                    assert "idmapped" in worker_mounts(pid)["/sub"].options, pid
    finally:
        unmount_all(top)


def test_a_mount_that_cannot_be_mapped_makes_the_export_unavailable(tmp_path: Path) -> None:
    """A ramfs (no ID-mapped mounts) mounted in a served mapped export: the replacement
    workers cannot map it and say so; the export becomes unavailable rather than serve
    anything unmapped, and serves again once the host unmounts it."""
    export = owned_directory(tmp_path / "e", 100000)
    owned_directory(export / "sub", 100000)
    with Daemon(tmp_path, [mapped("e")]) as d:
        assert seen_owner(d.connect("e"), "/sub") == (0, 0)
        try:
            mount("-t", "ramfs", "idmap-ramfs", str(export / "sub"))
            failed = d.wait_event("export cannot be served", export="e")[0]
            assert "mount_setattr(MOUNT_ATTR_IDMAP): Invalid argument" in failed["error"]
            d.wait_event("export unavailable", export="e", timeout=30)
            refused = d.connect("e")
            with pytest.raises((ConnectionClosed, OSError)):  # closed at once
                refused.lstat("/")
        finally:
            unmount_all(export / "sub")
        d.wait_event("export available again", export="e", timeout=30)
        assert seen_owner(d.connect("e"), "/sub") == (0, 0)


# --- configuration -----------------------------------------------------------------------------


def check(tmp_path: Path, export: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`proxyd --check --config FILE` on a configuration holding `export`."""
    export.setdefault("name", "e")
    export.setdefault("path", str(owned_directory(tmp_path / "e", 100000)))
    export.setdefault("socket", str(tmp_path / "e.sock"))
    config = write_config(tmp_path / "check.toml", {}, [export])
    return subprocess.run(
        [sys.executable, "-m", "proxyd", "--check", "--config", str(config)],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ranges(n: int, first: int, step: int, count: int) -> list[list[int]]:
    return [[first + i * step, first + 10**9 + i * step, count] for i in range(n)]


BAD_MAPS: dict[str, tuple[dict[str, Any], str]] = {
    "not a list": ({"uid_map": "0 100000 65536"}, "uid_map: expected a list, got str"),
    "two fields": (
        {"uid_map": [[0, 100000]]},
        "uid_map[0]: expected [guest_first, host_first, count]",
    ),
    "not a range": ({"gid_map": [0, 100000, 65536]}, "gid_map[0]: expected [guest_first"),
    "a boolean": ({"uid_map": [[0, 100000, True]]}, "uid_map[0]: expected [guest_first"),
    "a string": ({"gid_map": [[0, "100000", 1]]}, "gid_map[0]: expected [guest_first"),
    "negative": ({"uid_map": [[-1, 100000, 10]]}, "uid_map[0]: guest_first -1 is negative"),
    "count 0": ({"gid_map": [[0, 100000, 0]]}, "gid_map[0]: count 0 is less than 1"),
    "count past 2^32": ({"uid_map": [[0, 0, 2**32]]}, "count 4294967296 is more than 2^32 - 1"),
    "guest ids wrap": (
        {"uid_map": [[4294967000, 100000, 1000]]},
        "uid_map[0]: guest ids 4294967000..4294967999 wrap past 4294967294",
    ),
    "host ids wrap": (
        {"gid_map": [[0, 4294967290, 10]]},
        "gid_map[0]: host ids 4294967290..4294967299 wrap past 4294967294",
    ),
    "guest ids overlap": (
        {"uid_map": [[0, 100000, 1000], [500, 300000, 10]]},
        "uid_map[1]: guest ids 500..509 overlap uid_map[0] (0..999)",
    ),
    "host ids overlap": (
        {"gid_map": [[0, 100000, 1000], [5000, 100500, 10]]},
        "gid_map[1]: host ids 100500..100509 overlap gid_map[0] (100000..100999)",
    ),
    "empty": ({"uid_map": []}, "uid_map: empty"),
    "gid_map missing": ({"gid_map": None}, "gid_map: missing (give uid_map and gid_map"),
    "uid_map missing": ({"uid_map": None}, "uid_map: missing (give uid_map and gid_map"),
    "341 ranges": ({"uid_map": ranges(341, 0, 10, 1)}, "uid_map: 341 ranges, the kernel takes"),
    "more than a page": (
        {"gid_map": ranges(140, 10**9, 10**6, 10**6)},
        "gid_map: its ranges take 4200 bytes as a user namespace map, the kernel takes at "
        "most 4095",
    ),
}


@pytest.mark.parametrize("case", BAD_MAPS)
def test_each_bad_map_gets_its_line(tmp_path: Path, case: str) -> None:
    """Malformed, overlapping, wrapping or too large maps: exit 2, one line naming the
    export, the key and the range."""
    change, text = BAD_MAPS[case]
    export: dict[str, Any] = {"uid_map": MAP, "gid_map": MAP}
    export.update(change)
    export = {k: v for k, v in export.items() if v is not None}
    result = check(tmp_path, export)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("proxyd: error: export 'e'."), lines
    assert text in lines[0], lines[0]


def test_good_maps_pass_the_check(tmp_path: Path) -> None:
    """The largest maps the kernel takes, and several ranges, are accepted: the check
    really builds the mapping (a typo in what it writes would be refused here)."""
    whole = [[0, 0, 4294967295]]  # every id but (uid_t)-1, as the initial namespace has
    several = [[0, 100000, 1000], [1000, 300000, 64000], [65534, 400000, 1]]
    for uid_map, gid_map in ((whole, whole), (several, MAP), (ranges(100, 0, 100, 50), MAP)):
        result = check(tmp_path, {"uid_map": uid_map, "gid_map": gid_map})
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("where", ["export", "below"])
def test_a_filesystem_that_cannot_be_mapped_is_refused(tmp_path: Path, where: str) -> None:
    """By trying, not by name: a ramfs as the export, or mounted below it, gets exit 3 and
    one line naming the key, the mount and why."""
    top = owned_directory(tmp_path / "e", 100000)
    target = top if where == "export" else owned_directory(top / "sub", 100000)
    try:
        mount("-t", "ramfs", "idmap-ramfs", str(target))
        result = check(tmp_path, {"path": str(top), "uid_map": MAP, "gid_map": MAP})
    finally:
        unmount_all(top)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3, result.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"proxyd: error: export 'e'.uid_map: '{top}' cannot be ID-mapped: ")
    assert f"{target}: mount_setattr(MOUNT_ATTR_IDMAP): Invalid argument" in lines[0]
    assert lines[0].endswith("(the filesystem does not support ID-mapped mounts)")
    # Unmapped, the same tree is served as always.
    plain = check(tmp_path, {"path": str(top)})
    assert plain.returncode == 0, plain.stderr


def test_reload_refuses_a_bad_map_and_replaces_workers_for_a_new_one(tmp_path: Path) -> None:
    """A reload with an overlapping map is refused (the key named) and the old mapping
    keeps serving; one with another range replaces the export's workers (not the other
    export's), whose files then land in the new range."""
    owned_directory(tmp_path / "m", 100000, 100000)
    exports = [mapped("m"), {"name": "plain"}]
    with Daemon(tmp_path, exports) as d:
        client = d.connect("m")
        assert outcome(client.mkdir(0, 0, "/a", 0o755)) == "ok"
        plain_workers = {p for p, t in d.worker_titles().items() if " plain#" in t}

        def configure(ranges: list[list[int]]) -> None:
            m = {**d.exports["m"], "uid_map": ranges, "gid_map": ranges}
            write_config(d.config, d.daemon_settings, [m, d.exports["plain"]])

        configure([[0, 100000, 10], [5, 200000, 10]])
        d.signal(signal.SIGHUP)
        refused = d.wait_event("reload refused")[-1]
        assert "export 'm'.uid_map[1]: guest ids 5..14 overlap" in refused["error"]
        assert outcome(client.mkdir(0, 0, "/b", 0o755)) == "ok"
        assert host_owner(tmp_path / "m" / "b") == (100000, 100000)
        os.chown(tmp_path / "m", 300000, 300000)
        configure([[0, 300000, 1000]])
        d.signal(signal.SIGHUP)
        applied = d.wait_event("reload applied")[-1]
        assert applied["replaced"] == ["m"]
        assert outcome(client.mkdir(0, 0, "/c", 0o755)) == "ok"  # a new worker takes it
        assert host_owner(tmp_path / "m" / "c") == (300000, 300000)
        assert seen_owner(client, "/a") == (OVERFLOW_ID, OVERFLOW_ID)  # 100000: not mapped now
        assert plain_workers <= set(d.workers()), "the unmapped export's workers were replaced"


def test_status_and_start_line_say_which_exports_are_mapped(tmp_path: Path) -> None:
    owned_directory(tmp_path / "m", 100000)
    control = str(tmp_path / "control.sock")
    with Daemon(tmp_path, [mapped("m"), {"name": "plain"}], control_socket=control) as d:
        start = d.wait_event("start")[0]
        assert start["exports"] == ["m", "plain"] and start["id_mapped"] == ["m"]
        status = [sys.executable, "-m", "proxyd", "status", "--socket", control]
        document = json.loads(
            subprocess.run(
                [*status, "--json"], cwd=CHECKOUT, capture_output=True, check=True
            ).stdout
        )
        maps = {e["name"]: (e["uid_map"], e["gid_map"]) for e in document["exports"]}
        assert maps == {"m": (MAP, MAP), "plain": ([], [])}
        text = subprocess.run(status, cwd=CHECKOUT, capture_output=True, text=True, check=True)
        lines = [line for line in text.stdout.splitlines() if "ID-mapped" in line]
        assert lines == [
            "export m ID-mapped [guest_first, host_first, count]: "
            "uid_map [[0, 100000, 65536]], gid_map [[0, 100000, 65536]]"
        ]


# --- a real guest -------------------------------------------------------------------------------

GUEST_WORKLOAD = """
id -u
echo data >file
mkdir dir
ln -s file link
mkfifo fifo
printf '#!/bin/sh\\necho hi\\n' >suid
chmod 4755 suid
touch user
chown 1000:1000 user
chown 70000:70000 user 2>/tmp/chown.err
echo "CHOWN-OUTSIDE=$? $(cat /tmp/chown.err)"
echo "LS-BEGIN"
ls -ln
echo "LS-END"
echo "STAT $(stat -c '%u:%g %A' suid) $(stat -c '%u:%g' host5) $(stat -c '%u:%g' other)"
"""


def listing(output: str) -> dict[str, tuple[int, int]]:
    """`ls -ln` between the markers: {name: (uid, gid)} (a symlink's name without its
    target)."""
    lines = output.split("LS-BEGIN\n", 1)[1].split("LS-END", 1)[0].splitlines()
    found = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 9 and not line.startswith("total"):
            found[fields[8]] = (int(fields[2]), int(fields[3]))
    return found


def test_guests_on_two_mapped_exports_at_once(tmp_path: Path) -> None:
    """Two guests (as root), booted side by side on two exports of one daemon mapped to
    different ranges, create files, a directory, a symlink, a FIFO and a setuid-root
    script, and chown a file to 1000:1000. On the host each export's files belong to its
    own range (the setuid file setuid to the range's root); each guest sees 0 and 1000 in
    `ls -ln`, a host file owned by 5 as 65534, a file owned by the other range as 65534,
    and `chown` to an unmapped id fails with EOVERFLOW ("Value too large")."""
    ensure_guest_built()
    plan = {"a": (MAP, 100000), "b": (OTHER_MAP, 200000)}
    for name, (_, base) in plan.items():
        top = owned_directory(tmp_path / name, base)
        host_file(top / "host5")
        other = 300000 - base  # the other export's root
        host_file(top / "other", uid=other)
    guests: dict[str, Guest] = {}
    results: dict[str, GuestResult] = {}
    daemon = Daemon(tmp_path, [mapped(n, r) for n, (r, _) in plan.items()], audit="mutations")
    try:
        for name in plan:
            guests[name] = Guest(GUEST_WORKLOAD, socket_path=daemon.exports[name]["socket"])
        conns = [daemon.wait_event("connection accepted", export=n, timeout=120)[0] for n in plan]

        def serving() -> bool:  # at the same time: a worker busy with each guest
            titles = " ".join(daemon.worker_titles().values()) + " "
            return all(f" conn={c['conn']} " in titles for c in conns)

        wait_until(serving, timeout=120, what="a worker serving each guest")
        results = {name: g.wait(300) for name, g in guests.items()}
    finally:
        for g in guests.values():
            g.kill()
        daemon.stop()
    for name, (_, base) in plan.items():
        result, top = results[name], tmp_path / name
        print(f"--- guest on {name} ---\n{result.output}")
        assert result.mounted and result.exit_status == 0, result.output
        assert "\n0\n" in result.output  # id -u: the guest works as root
        seen = listing(result.output)
        want = {
            "file": (0, 0),
            "dir": (0, 0),
            "link": (0, 0),
            "fifo": (0, 0),
            "suid": (0, 0),
            "user": (1000, 1000),
            "host5": (OVERFLOW_ID, OVERFLOW_ID),
            "other": (OVERFLOW_ID, OVERFLOW_ID),
        }
        assert seen == want, seen
        assert f"STAT 0:0 -rwsr-xr-x {OVERFLOW_ID}:{OVERFLOW_ID} {OVERFLOW_ID}:{OVERFLOW_ID}" in (
            result.output
        )
        (chown,) = [line for line in result.output.splitlines() if "CHOWN-OUTSIDE=" in line]
        assert "CHOWN-OUTSIDE=1 " in chown and "Value too large for defined data type" in chown
        on_host = {n: host_owner(top / n) for n in want}
        mine = (base, base)
        assert on_host == {
            "file": mine,
            "dir": mine,
            "link": mine,
            "fifo": mine,
            "suid": mine,
            "user": (base + 1000, base + 1000),
            "host5": (OUTSIDE, OUTSIDE),
            "other": (300000 - base, 300000 - base),
        }
        st = os.lstat(top / "suid")
        assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == base
        assert stat.S_ISFIFO(os.lstat(top / "fifo").st_mode)
        assert (top / "file").read_text() == "data\n"
    chowns = {
        (e["export"], e["uid"], e.get("host_uid", "-"), e["result"])
        for e in daemon.events("op", op="chown")
    }
    assert ("a", 1000, 101000, "ok") in chowns and ("b", 1000, 201000, "ok") in chowns
    assert ("a", 70000, None, "EOVERFLOW") in chowns and ("b", 70000, None, "EOVERFLOW") in chowns
