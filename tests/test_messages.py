"""Nothing a worker or a control client sends can kill the master (issue class 11.8).

The worker -> master path is fuzzed twice: channel.receive against its schema on a real
SEQPACKET pair, and a real daemon fed through a copy of a live worker's channel
(pidfd_getfd, as a compromised worker holds it). The control socket of a real daemon is
fuzzed with arbitrary request lines.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyd import channel, control
from tests.daemon import Daemon, wait_until

SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438
_libc = ctypes.CDLL(None, use_errno=True)

EXAMPLES = [  # seen to end the master before these checks existed
    b'{"op":"done","conn":1,"requests":"x"}',
    b"[" * 2000 + b"]" * 2000,
    b"[" * 3000,
    b'{"op":"done","conn":1,"requests":1,"errors":0,"reason":"eof","protocol_error":null,"x":1}',
    b'{"op":"ready","extra":true}',
    b'{"op":"released","conn":true,"requests":0,"errors":0,"reason":"","protocol_error":null}',
    b'{"op":"done","conn":-1,"requests":0,"errors":0,"reason":"","protocol_error":null}',
    b'{"op":"serve","conn":1,"peer_pid":1,"peer_uid":0,"peer_gid":0}',
    b"\xff\xfe not json",
    b"null",
    b'{"op":["done"]}',
]


PASSED = "proxyd-test-passed-fd"  # the memfd sent along: unique, so its copies are known


def copies_of_the_passed_fd() -> int:
    """Descriptors of this process that are the memfd sent with a message (the pytest
    process opens and closes others meanwhile: only these are ours to count)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}") == f"/memfd:{PASSED} (deleted)"
    return count


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
near_valid = st.fixed_dictionaries(
    {"op": st.sampled_from(["ready", "done", "released", "serve", "log", "x"])},
    optional={
        "conn": json_values,
        "requests": json_values,
        "errors": json_values,
        "reason": json_values,
        "protocol_error": json_values,
        "other": json_values,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packet=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        near_valid.map(lambda v: json.dumps(v).encode()),
        st.sampled_from(EXAMPLES),
    ),
    with_fd=st.booleans(),
)
def test_receive_accepts_only_schema_messages(packet: bytes, with_fd: bool) -> None:
    master_end, worker_end = channel.pair()
    try:
        if with_fd:
            fd = os.memfd_create(PASSED)
            worker_end.sendmsg(
                [packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            )
            os.close(fd)
        else:
            worker_end.send(packet)
        try:
            message, got = channel.receive(master_end, channel.FROM_WORKER, socket.MSG_DONTWAIT)
        except channel.ChannelError:
            pass
        else:
            assert got is None  # no worker message carries a descriptor
            if message is not None:
                fields, _ = channel.FROM_WORKER[message["op"]]
                assert set(message) == {"op", *fields}
                for name, kinds in fields.items():
                    assert isinstance(message[name], kinds)
                    assert not isinstance(message[name], bool)
    finally:
        master_end.close()
        worker_end.close()
    assert copies_of_the_passed_fd() == 0  # every received descriptor was closed


def steal_fd(pid: int, fd: int) -> int:
    """A copy of descriptor `fd` of process `pid` (pidfd_getfd(2), as root)."""
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    try:
        copy = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        assert copy >= 0, os.strerror(ctypes.get_errno())
        return copy
    finally:
        os.close(pidfd)


def worker_channel(pid: int) -> socket.socket:
    """A copy of a worker's end of its channel to the master (its SEQPACKET socket)."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
            continue
        sock = socket.socket(fileno=steal_fd(pid, int(name)))
        if sock.type == socket.SOCK_SEQPACKET:
            return sock
        sock.close()
    raise AssertionError(f"worker {pid} holds no SEQPACKET socket")


def test_a_compromised_worker_costs_only_itself(tmp_path: Path) -> None:
    with Daemon(tmp_path, [{"name": "a", "min_idle": 1}, {"name": "b"}]) as d:
        client = d.connect("a")
        assert client.lstat("/").ok
        other = d.connect("b")
        conn = d.wait_event("connection accepted", export="a")[-1]["conn"]
        for packet in EXAMPLES:
            victim = d.serving_worker(conn)
            stolen = worker_channel(victim)
            stolen.send(packet)
            stolen.close()
            d.wait_event("bad message from worker", worker_pid=victim)
            wait_until(lambda v=victim: not Path(f"/proc/{v}").exists(), what="the worker killed")
            assert client.lstat("/").ok  # the guest keeps its mount, served by a new worker
            assert d.serving_worker(conn) != victim
        assert other.lstat("/").ok
        assert d.proc.poll() is None
        client.close()
        other.close()
    assert d.proc.returncode == 0


@pytest.fixture(scope="module")
def controlled(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("control")
    d = Daemon(tmp, [{"name": "a"}], control_socket=str(tmp / "control.sock"))
    yield d, str(tmp / "control.sock")
    d.stop()


def is_stop(line: bytes) -> bool:
    try:
        return control.parse_request(line) == "stop"
    except ValueError:
        return False


def send_line(path: str, data: bytes) -> bytes:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    line=st.one_of(
        st.binary(max_size=600),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"[" * 3000, b'{"cmd":"status","x":1}', b'{"cmd":["stop"]}', b'"stop"']),
    ).filter(lambda line: not is_stop(line))  # a valid stop would end the daemon under test
)
def test_control_socket_survives_any_request_line(controlled, line: bytes) -> None:
    d, path = controlled
    answer = send_line(path, line + b"\n")
    if answer:  # an answer is one JSON document; a refusal says why
        document = json.loads(answer)
        assert isinstance(document, dict) and "ok" in document
    assert d.proc.poll() is None
    assert control.call(path, "status")["ok"]
