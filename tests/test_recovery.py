"""Crash-recovery verdicts (proxyd/recovery.py) from a real journal and real socket queues:
one test per row of README's "When a worker dies" table, as the master sees it."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest

from proxyd import protocol as p
from proxyd import recovery, slot
from proxyd.pool import Connection
from proxyd.slot import Slot
from tests.proxyclient import LSTAT, MKDIR, OPEN, marshal

HEADER = struct.Struct("=II")


@pytest.fixture
def journal():
    j = Slot()
    yield j
    j.close()


@pytest.fixture
def pair():
    """(guest end, server end) of a connection, as QEMU and proxyd hold it."""
    guest, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield guest, server
    guest.close()
    server.close()


def request(code: int, fmt: str, *args: object) -> bytes:
    payload = marshal(fmt, *args)
    return HEADER.pack(code, len(payload)) + payload


def lstat_request(path: str = "/f") -> bytes:
    return request(LSTAT, "s", path)


def put(journal: Slot, phase: int, data: bytes = b"", have: int | None = None) -> None:
    journal.reset()
    journal.request[: len(data)] = data
    journal.fields[slot.PHASE] = phase
    journal.fields[slot.HAVE] = len(data) if have is None else have


def test_idle_or_waiting_for_a_request_is_nothing_in_flight(journal, pair) -> None:
    _, server = pair
    for phase in (slot.IDLE, slot.RECEIVING):
        put(journal, phase)
        verdict = recovery.judge(journal, server)
        assert (verdict.action, verdict.executed, verdict.prefix) == (recovery.HAND_ON, None, b"")
        assert verdict.outcome == "nothing was in flight"


def test_partly_received_request_goes_on_with_its_bytes(journal, pair) -> None:
    _, server = pair
    request = lstat_request()
    put(journal, slot.RECEIVING, request[:5])
    verdict = recovery.judge(journal, server)
    assert verdict.action == recovery.HAND_ON and verdict.executed is None  # never ran
    assert verdict.prefix == request[:5]
    assert verdict.outcome == "partly received request handed on"


def test_received_but_unrecorded_request_goes_on_whole_when_the_buffer_proves_it(
    journal, pair
) -> None:
    """A recv returned and its worker died before recording it (HAVE still says what it
    had before): the bytes it overwrote tell how far the recv came."""
    guest, server = pair
    whole = lstat_request("/victim")
    for had in (0, 3, 8, 12):  # nothing yet, part of the header, the header, more
        put(journal, slot.RECEIVING, whole, have=had)
        verdict = recovery.judge(journal, server)
        assert verdict.action == recovery.HAND_ON, had
        assert verdict.prefix == whole and verdict.op == "lstat"
        assert verdict.outcome == "received request handed on"
    guest.send(b"more")  # the guest's next bytes, still in the socket, change nothing
    assert recovery.judge(journal, server).prefix == whole
    # Unrecorded bytes that start with what they overwrote are seen by those after them:
    # a path of 247 bytes, whose length field starts with the fill byte.
    long_path = lstat_request("/" + "p" * (slot.FILL - 1))
    assert long_path[p.HEADER_SIZE] == slot.FILL
    put(journal, slot.RECEIVING, long_path, have=p.HEADER_SIZE)
    verdict = recovery.judge(journal, server)
    assert (verdict.outcome, verdict.prefix) == ("received request handed on", long_path)
    assert recovery.stuck(journal, server) == recovery.UNRESPONSIVE  # for the watchdog too


def test_received_but_unrecorded_part_of_a_request_closes_the_connection(journal, pair) -> None:
    """How much of the request the recv took cannot be told: running the header with
    the bytes an earlier request left after it (REMOVE of a path the guest never sent),
    or handing on too little, is never a verdict."""
    _, server = pair
    remove = request(p.T_REMOVE, "s", "/other")
    cases = {
        "header alone": remove[: p.HEADER_SIZE],
        "header and part of the payload": remove[:-1],
        "part of the header": remove[:5],
        "a request and part of the next": remove + lstat_request()[:3],
        "a request whose last byte is the fill": request(
            p.T_CHMOD, "sd", "/f", (slot.FILL << 24) - (1 << 32)
        ),
    }
    for what, received in cases.items():
        put(journal, slot.RECEIVING, received, have=0)
        verdict = recovery.judge(journal, server)
        assert (verdict.action, verdict.outcome) == (recovery.CLOSE, "died while receiving"), what


def test_executing_a_request_that_changes_nothing_runs_it_again(journal, pair) -> None:
    _, server = pair
    for read_only in (
        lstat_request(),
        request(OPEN, "sd", "/f", os.O_RDONLY),
        request(OPEN, "sd", "/f", os.O_WRONLY | os.O_APPEND),  # opening changes nothing
        request(OPEN, "sd", "/d", os.O_RDONLY | os.O_DIRECTORY),  # a directory to list
    ):
        put(journal, slot.EXECUTING, read_only)
        verdict = recovery.judge(journal, server)
        assert (verdict.action, verdict.again) == (recovery.HAND_ON, True)
        assert verdict.prefix == read_only
        assert verdict.outcome == "request executed again" and verdict.executed
        # Killed by the master for running too long: not run again (it would hang again).
        assert recovery.judge(journal, server, retry=False).action == recovery.ANSWER_EIO


def test_executing_a_request_that_may_change_the_export_is_answered_eio(journal, pair) -> None:
    _, server = pair
    for mutation in (
        request(MKDIR, "ddsd", 0, 0, "/d", 0o755),
        request(OPEN, "sd", "/f", os.O_WRONLY | os.O_TRUNC),
        request(OPEN, "sd", "/f", os.O_RDWR | os.O_CREAT),
        request(OPEN, "sd", "/", os.O_RDWR | os.O_TMPFILE),
        HEADER.pack(OPEN, 1) + b"x",  # malformed: what it would do is unknown
    ):
        put(journal, slot.EXECUTING, mutation)
        verdict = recovery.judge(journal, server)
        assert (verdict.action, verdict.again, verdict.prefix) == (recovery.ANSWER_EIO, False, b"")
        assert verdict.executed
    assert recovery.eio_reply(LSTAT) == p.encode_error(errno.EIO)
    assert recovery.eio_reply(OPEN) == struct.pack("=i", -errno.EIO)
    assert recovery.eio_reply(999) is None


def test_bytes_of_a_next_request_already_consumed_go_on_with_the_connection(journal, pair) -> None:
    _, server = pair
    mkdir, nxt = request(MKDIR, "ddsd", 0, 0, "/d", 0o755), lstat_request("/next")
    put(journal, slot.EXECUTING, mkdir + nxt[:7])  # a client that did not wait
    assert recovery.judge(journal, server).prefix == nxt[:7]
    put(journal, slot.EXECUTING, lstat_request() + nxt)
    assert recovery.judge(journal, server).prefix == lstat_request() + nxt


def test_reply_still_queued_or_next_request_waiting_means_it_was_sent(journal, pair) -> None:
    guest, server = pair
    put(journal, slot.REPLY_READY, lstat_request())
    server.send(b"reply")  # unread by the guest: SIOCOUTQ > 0
    assert recovery.judge(journal, server).action == recovery.HAND_ON
    guest.recv(16)
    guest.send(lstat_request())  # the guest read the reply and sent its next request
    verdict = recovery.judge(journal, server)
    assert verdict.action == recovery.HAND_ON and verdict.outcome == "reply had been sent"


def test_reply_state_unknown_when_nothing_is_queued(journal, pair) -> None:
    _, server = pair
    put(journal, slot.REPLY_READY, lstat_request())
    assert recovery.judge(journal, server).action == recovery.AWAIT_NEXT


def test_only_the_same_request_dying_again_and_again_is_poison(pair) -> None:
    _, server = pair
    conn = Connection(1, server, "e", 1, 0, 0)
    same, other = (7, "aa"), (8, "bb")
    assert not recovery.count_death(conn, same, now=100.0)
    assert not recovery.count_death(conn, same, now=110.0)
    assert not recovery.count_death(conn, other, now=111.0)  # bad luck: the count restarts
    assert not recovery.count_death(conn, same, now=112.0)
    assert not recovery.count_death(conn, same, now=113.0)
    assert recovery.count_death(conn, same, now=114.0)
    conn.poison_suspect, conn.deaths = None, []
    assert not recovery.count_death(conn, same, now=100.0)
    assert not recovery.count_death(conn, same, now=110.0)
    # The first death left the window: still two.
    assert not recovery.count_death(conn, same, now=100.0 + recovery.POISON_WINDOW + 1)
    assert recovery.count_death(conn, same, now=100.0 + recovery.POISON_WINDOW + 2)
