"""The compiled request path: built from the .py files by `pip install`, loaded instead
of them, and a clear install error where no C compiler is found (setup.py)."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import proxyd.ops
import proxyd.protocol
import proxyd.server
from proxyd import log, privileges, sink
from proxyd.recovery import SIOCOUTQ, queued
from tests.daemon import wait_until
from tests.proxyclient import (
    CHECKOUT,
    HEADER,
    LGETXATTR,
    LSTAT,
    OPEN,
    READLINK,
    pack_d,
    pack_s,
)

COMPILED = [proxyd.protocol, proxyd.ops, proxyd.server, log]


@pytest.mark.parametrize("module", COMPILED, ids=lambda m: m.__name__)
def test_request_path_runs_compiled_and_up_to_date(module) -> None:
    path = Path(module.__file__)
    assert path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), path
    source = path.with_name(module.__name__.rsplit(".", 1)[1] + ".py")
    # A compiled module older than its source would run code nobody reads (an editable
    # install runs the .so until `pip install -e .` builds it again).
    assert path.stat().st_mtime >= source.stat().st_mtime, f"{path} is older than {source}"


def source_copy(dest: Path) -> Path:
    """The files a build reads, without any built module."""
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, dest / name)
    (dest / "proxyd").mkdir()
    for path in (CHECKOUT / "proxyd").iterdir():
        if path.suffix in (".py", ".pxd"):
            shutil.copy2(path, dest / "proxyd" / path.name)
    return dest


def test_a_build_in_place_replaces_modules_without_writing_into_them(tmp_path: Path) -> None:
    """`pip install -e .` again while a proxyd of the checkout runs: the running one
    keeps the module it mapped (writing into it would crash it with SIGBUS)."""
    source = source_copy(tmp_path / "src")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    running = source / "proxyd" / f"ops{suffix}"
    running.write_bytes(b"the module a running daemon has mapped")
    with running.open("rb") as held:
        result = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert held.read() == b"the module a running daemon has mapped"
        assert os.fstat(held.fileno()).st_ino != running.stat().st_ino
    code = "import proxyd.ops, proxyd.protocol, proxyd.server; print(proxyd.server.__file__)"
    built = subprocess.run(
        [sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == str(source / "proxyd" / f"server{suffix}")
    assert not list(source.glob("proxyd/*.tmp"))


def test_install_without_a_compiler_fails_saying_what_to_install(tmp_path: Path) -> None:
    source = source_copy(tmp_path / "src")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(tmp_path / "wheels"),
            str(source),
        ],
        env={**os.environ, "CC": str(tmp_path / "no-such-cc")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "proxyd: cannot compile its request path" in output, output[-3000:]
    assert "apt-get install build-essential python3-dev" in output
    assert not list(tmp_path.glob("wheels/*.whl"))


def interpreted(module: ModuleType) -> ModuleType:
    """`module` loaded again from its .py file, run by the interpreter."""
    source = Path(module.__file__).with_name(module.__name__.rsplit(".", 1)[1] + ".py")
    spec = importlib.util.spec_from_file_location(f"interpreted_{source.stem}", source)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # a dataclass looks its module up there
    spec.loader.exec_module(loaded)
    assert loaded.cython.compiled is False
    return loaded


def outcome(function: Callable[..., Any], *args: Any) -> Any:
    """What a call answers: its value (an opened descriptor as its inode), or the class
    and errno of what it raises."""
    try:
        value = function(*args)
    except Exception as e:
        return type(e).__name__, getattr(e, "errno", None)
    if function.__name__ == "open":
        try:
            return "fd", os.fstat(value).st_ino
        finally:
            os.close(value)
    return value


def test_interpreted_ops_answer_as_the_compiled_ones(tmp_path: Path) -> None:
    """One source, two runs: ops.py interpreted (where the C calls are os calls)
    answers every case exactly as the compiled module does."""
    (tmp_path / "file").write_bytes(b"x" * 10)
    os.utime(tmp_path / "file", ns=(1_500_000_000_123_456_789, -1))  # before 1970
    os.setxattr(tmp_path / "file", "user.tag", b"value")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("file")
    os.mkfifo(tmp_path / "fifo")
    paths = [bytes(tmp_path / name) for name in ("file", "dir", "link", "fifo", "missing")]
    flag_sets = (
        os.O_RDONLY,
        os.O_WRONLY | os.O_NONBLOCK,
        os.O_DIRECTORY,
        os.O_PATH,
        os.O_RDONLY | os.O_NOFOLLOW,
        os.O_CREAT | os.O_WRONLY,
    )
    cases: list[tuple[str, tuple]] = []
    for path in paths:
        cases.append(("lstat", (path,)))
        cases += [("readlink", (path, bufsize)) for bufsize in (1, 2, 4, 4096)]
        for size in (-1, 0, 3, 5, 256, 1 << 20):
            cases.append(("lgetxattr", (size, path, b"user.tag")))
        cases.append(("lgetxattr", (256, path, b"user.none")))
        cases += [("open", (path, flags)) for flags in flag_sets]
    both = (proxyd.ops.ExportOps(None, False), interpreted(proxyd.ops).ExportOps(None, False))
    for name, args in cases:
        compiled, source = (outcome(getattr(ops, name), *args) for ops in both)
        assert compiled == source, (name, args)
    assert outcome(both[0].lstat, paths[0])[12:14] == (-1, 999_999_999)


def twin_tree(root: Path) -> list[bytes]:
    """A file (with an xattr), a directory (with a file), a symlink, a FIFO under `root`;
    the paths the cases below use, "missing" and a long name included."""
    root.mkdir()
    (root / "file").write_bytes(b"x" * 10)
    os.setxattr(root / "file", "user.tag", b"value")
    (root / "dir").mkdir()
    (root / "dir" / "inner").touch()
    (root / "link").symlink_to("file")
    os.mkfifo(root / "fifo")
    names = ("file", "dir", "link", "fifo", "missing", "dir/inner", "x" * 300)
    return [bytes(root / name) for name in names]


def state(root: Path) -> list[tuple]:
    """What the tree holds: each name's type, mode, owner, size, link count, xattrs, and
    the modification time of the names twin_tree made that are not directories (the
    cases set those; the others', and a directory's, are when the twin ran)."""
    out = []
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        made = path.name in ("file", "inner", "link", "fifo")
        mtime = st.st_mtime_ns if made and not stat.S_ISDIR(st.st_mode) else None
        xattrs = tuple(sorted(os.listxattr(path, follow_symlinks=False)))
        out.append((path.relative_to(root), st.st_mode, st.st_uid, st.st_gid, st.st_size))
        out.append((st.st_nlink, mtime, xattrs))
    return out


def test_interpreted_changes_answer_as_the_compiled_ones(tmp_path: Path) -> None:
    """Every request that changes the export, ops.py compiled (libc) and interpreted
    (os, ctypes) on two identical trees: the same answers, the same trees after."""
    roots = (tmp_path / "compiled", tmp_path / "interpreted")
    trees = [twin_tree(root) for root in roots]
    creds = privileges.Credentials()  # creations as uid 0, gid 0: this process's own
    both = (proxyd.ops.ExportOps(creds, False), interpreted(proxyd.ops).ExportOps(creds, False))

    def cases(p: list[bytes], root: bytes) -> list[tuple[str, tuple]]:
        file, dir_, link, fifo, missing, inner, long = p
        out: list[tuple[str, tuple]] = []
        for path in p:
            out += [("chmod", (path, mode)) for mode in (0o640, 0o4755, -1)]
            out += [("chown", (path, uid, gid)) for uid, gid in ((1000, -1), (-1, 7), (5, 5))]
            out += [("truncate", (path, n)) for n in (3, 0, -1, 2**40)]
            out.append(("utime", (path, 0, (1 << 30) - 2, 0, (1 << 30) - 1)))  # OMIT, NOW
            out.append(("utime", (path, 1, 2, -5, 999_999_999)))
            out.append(("utime", (path, 0, 10**9, 0, 0)))  # nanoseconds out of range
            out += [("lsetxattr", (path, b"user.k", b"v\0w", 3, flags)) for flags in (0, 1, 2)]
            out.append(("llistxattr", (0, path)))
            out.append(("llistxattr", (4, path)))
            out.append(("llistxattr", (256, path)))
            out.append(("lremovexattr", (path, b"user.tag")))
            out.append(("lremovexattr", (path, b"user.none")))
        out += [
            ("mkdir", (0, 0, root + b"/new", 0o750)),
            ("mkdir", (0, 0, dir_, 0o750)),
            ("mkdir", (0, 0, missing + b"/below", 0o750)),
            ("mknod", (0, 0, root + b"/node", 0o100600, 0)),
            ("mknod", (0, 0, root + b"/fifo2", 0o010644, 2**64 - 1)),
            ("mknod", (0, 0, file, 0o100600, 0)),
            ("symlink", (0, 0, b"file", root + b"/l2")),
            ("symlink", (0, 0, b"file", link)),
            ("link", (link, root + b"/hard")),
            ("link", (missing, root + b"/hard2")),
            ("link", (dir_, root + b"/hard3")),
            ("rename", (file, root + b"/moved")),
            ("rename", (missing, root + b"/moved2")),
            ("rename", (dir_, inner)),
            ("remove", (root + b"/moved",)),
            ("remove", (inner,)),
            ("remove", (dir_,)),
            ("remove", (missing,)),
            ("remove", (long,)),
        ]
        return out

    steady = (0, 1, 2, 5, 7, 8, 9, 10)  # statfs but its free counts, which move meanwhile
    for path in trees[0]:
        compiled, source = (outcome(ops.statfs, path) for ops in both)
        if isinstance(compiled, tuple) and len(compiled) == 11:
            compiled, source = ([fields[i] for i in steady] for fields in (compiled, source))
        assert compiled == source, path
    answers = []
    for ops, paths, root in zip(both, trees, roots, strict=True):
        answers.append(
            [(name, outcome(getattr(ops, name), *args)) for name, args in cases(paths, bytes(root))]
        )
        time.sleep(0.05)  # the twins' own times always differ: the comparison skips them
    for case, (compiled, source) in enumerate(zip(*answers, strict=True)):
        assert compiled == source, (case, cases(trees[0], bytes(roots[0]))[case])
    assert state(roots[0]) == state(roots[1])
    assert sum(answer[1] is None for answer in answers[0]) > 60  # most changes were made


def test_interpreted_decoders_answer_as_the_compiled_ones() -> None:
    source = interpreted(proxyd.protocol)
    payload = bytes(range(40)) + b"\x02\x00/a\x05\x00//b\0c" + bytes(40)
    for code in proxyd.protocol.DECODERS:
        for cut in range(len(payload) + 1):
            compiled, interpreted_ = (
                outcome(module.DECODERS[code], payload[:cut])
                for module in (proxyd.protocol, source)
            )
            assert compiled == interpreted_, (code, cut)
    for values in (
        (1, 2, 3, 0o100644, 4294967294, 6, 7, 8, 9, 10, 11, 12, -1, 999_999_999, 15, 16),
        (2**64 - 1,) * 3 + (2**32 - 1,) * 3 + (2**64 - 1,) + (2**63 - 1,) * 3 + (-(2**63),) * 6,
    ):
        assert proxyd.protocol.encode_stat(values) == source.encode_stat(values)
    for value in (0, 1, 2**31 - 1, -1, -(2**31)):  # a `d`
        assert proxyd.protocol.encode_status(value) == source.encode_status(value), value
    for err in (1, 2, 133, 2**31 - 1):
        assert proxyd.protocol.encode_error(err) == source.encode_error(err), err
    for n in (0, 1, 300, proxyd.protocol.MAX_PAYLOAD - 2, proxyd.protocol.MAX_PAYLOAD - 1):
        value = bytes(range(256)) * (n // 256) + bytes(n % 256)
        encoded = proxyd.protocol.encode_string_data(value)
        assert encoded == source.encode_string_data(value), n
        assert len(encoded) == (10 + n if n <= proxyd.protocol.MAX_PAYLOAD - 2 else 12), n


def serve_in_child(
    server_class: type, export: Path, *args: Any, **kwargs: Any
) -> tuple[socket.socket, int]:
    """A child chrooted into `export` serving one connection with
    `server_class(ops, logger, *args, **kwargs)`: the client's end of the connection
    and the child's pid."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            ours.close()
            null = sink.for_file(os.open("/dev/null", os.O_WRONLY))
            log.configure("json", "warning", destination=null)
            os.chroot(export)
            os.chdir("/")
            ops = proxyd.ops.ExportOps(privileges.Credentials(), False)
            server_class(ops, log.get(role="worker"), *args, **kwargs).serve(theirs)
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    return ours, pid


def test_interpreted_server_answers_as_the_compiled_one(tmp_path: Path) -> None:
    """The serving loop run from server.py by the interpreter (memoryviews, the socket's
    methods) gives byte for byte the replies of the compiled one (C stores, libc)."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "file").write_bytes(b"data")
    (export / "link").symlink_to("file")
    os.setxattr(export / "file", "user.tag", b"value")
    os.mkfifo(export / "fifo")

    def request(code: int, payload: bytes) -> bytes:
        return HEADER.pack(code, len(payload)) + payload

    lstat = request(LSTAT, pack_s("/file"))
    before_split = [
        lstat,
        request(LSTAT, pack_s("/missing")),
        request(READLINK, pack_s("/link") + pack_d(3)),
        request(LGETXATTR, pack_d(0) + pack_s("/file") + pack_s("user.tag")),
        request(OPEN, pack_s("/fifo") + pack_d(os.O_RDONLY)),
        request(LSTAT, b"\0"),  # too short: ENOBUFS, the connection goes on
        lstat + lstat,  # pipelined: two requests in one write
        lstat[:5],  # then a request in two pieces
    ]
    after_split = [lstat[5:], HEADER.pack(99, 0)]  # an unknown code closes the connection
    replies = []
    for server_class in (proxyd.server.Server, interpreted(proxyd.server).Server):
        sock, pid = serve_in_child(server_class, export, audit="all")
        sock.settimeout(10)
        sock.sendall(b"".join(before_split))
        # The first piece is taken before the second is sent.
        wait_until(lambda sock=sock: queued(sock, SIOCOUTQ) == 0, timeout=10)
        sock.sendall(b"".join(after_split))
        stream = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                stream += chunk
        sock.close()
        assert os.waitpid(pid, 0)[1] == 0
        replies.append(stream)
    assert replies[0] == replies[1]
    assert replies[0].startswith(HEADER.pack(0, 116)) and replies[0].count(HEADER.pack(0, 116)) == 4
