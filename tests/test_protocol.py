"""Wire format: every request decodes what an independent encoder wrote, and every
malformed payload class is refused as MalformedRequest (an errno reply), not a crash."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd import protocol as p

D = st.integers(-(2**31), 2**31 - 1)
Q = st.integers(-(2**63), 2**63 - 1)
PATH = st.binary(max_size=300).filter(lambda b: b"\0" not in b)
VALUE = st.binary(max_size=300)


def s(value: bytes) -> bytes:
    return struct.pack("=H", len(value)) + value


def d(value: int) -> bytes:
    return struct.pack("=i", value)


def q(value: int) -> bytes:
    return struct.pack("=q", value)


# (code, field strategies, wire encoder of those fields)
LAYOUTS = {
    p.T_OPEN: ((PATH, D), lambda a, b: s(a) + d(b)),
    p.T_CREATE: ((PATH, D, D, D, D), lambda a, b, c, e, f: s(a) + d(b) + d(c) + d(e) + d(f)),
    p.T_MKNOD: ((D, D, PATH, D, Q), lambda a, b, c, e, f: d(a) + d(b) + s(c) + d(e) + q(f)),
    p.T_MKDIR: ((D, D, PATH, D), lambda a, b, c, e: d(a) + d(b) + s(c) + d(e)),
    p.T_SYMLINK: ((D, D, PATH, PATH), lambda a, b, c, e: d(a) + d(b) + s(c) + s(e)),
    p.T_LINK: ((PATH, PATH), lambda a, b: s(a) + s(b)),
    p.T_LSTAT: ((PATH,), s),
    p.T_READLINK: ((PATH, D), lambda a, b: s(a) + d(b)),
    p.T_STATFS: ((PATH,), s),
    p.T_CHMOD: ((PATH, D), lambda a, b: s(a) + d(b)),
    p.T_CHOWN: ((PATH, D, D), lambda a, b, c: s(a) + d(b) + d(c)),
    p.T_TRUNCATE: ((PATH, Q), lambda a, b: s(a) + q(b)),
    p.T_UTIME: ((PATH, Q, Q, Q, Q), lambda a, b, c, e, f: s(a) + q(b) + q(c) + q(e) + q(f)),
    p.T_RENAME: ((PATH, PATH), lambda a, b: s(a) + s(b)),
    p.T_REMOVE: ((PATH,), s),
    p.T_LGETXATTR: ((D, PATH, PATH), lambda a, b, c: d(a) + s(b) + s(c)),
    p.T_LLISTXATTR: ((D, PATH), lambda a, b: d(a) + s(b)),
    p.T_LSETXATTR: (
        (PATH, PATH, VALUE, D, D),
        lambda a, b, c, e, f: s(a) + s(b) + s(c) + d(e) + d(f),
    ),
    p.T_LREMOVEXATTR: ((PATH, PATH), lambda a, b: s(a) + s(b)),
    p.T_GETVERSION: ((PATH,), s),
}


def test_every_request_code_has_a_layout_and_a_decoder() -> None:
    assert set(LAYOUTS) == set(p.REQUESTS) == set(p.DECODERS) == set(range(2, 22))


@pytest.mark.parametrize("code", sorted(LAYOUTS), ids=lambda c: p.REQUESTS[c].name)
@given(data=st.data())
def test_decode_round_trip(code: int, data: st.DataObject) -> None:
    strategies, encode = LAYOUTS[code]
    fields = tuple(data.draw(strategy) for strategy in strategies)
    payload = encode(*fields)
    assert p.DECODERS[code](payload) == fields
    # Trailing bytes are ignored, as the reference ignores them.
    assert p.DECODERS[code](payload + b"junk") == fields
    # Every strict prefix is too short for the type: refused, never mis-decoded.
    for cut in range(len(payload)):
        with pytest.raises(p.MalformedRequest):
            p.DECODERS[code](payload[:cut])


@pytest.mark.parametrize("code", sorted(LAYOUTS), ids=lambda c: p.REQUESTS[c].name)
def test_nul_in_a_path_is_refused(code: int) -> None:
    strategies, encode = LAYOUTS[code]
    fields = [b"a\0b" if s is PATH else 0 if s is not VALUE else b"v" for s in strategies]
    with pytest.raises(p.MalformedRequest) as exc:
        p.DECODERS[code](encode(*fields))
    assert exc.value.errno == errno.EINVAL  # the other malformed cases get ENOBUFS


def test_terminating_nul_ends_a_path() -> None:
    # QEMU sends the paths it looks up with their C terminator counted in the length.
    assert p.decode_path(s(b"//d\0")) == (b"//d",)
    assert p.decode_two_paths(s(b"/a\0") + s(b"/b")) == (b"/a", b"/b")
    with pytest.raises(p.NulInPath):
        p.decode_path(s(b"/a\0b\0"))


def test_xattr_value_may_hold_nul_bytes() -> None:
    payload = s(b"/f") + s(b"user.x") + s(b"\0\1\0") + d(3) + d(0)
    assert p.decode_setxattr(payload) == (b"/f", b"user.x", b"\0\1\0", 3, 0)


def test_string_running_past_the_payload() -> None:
    with pytest.raises(p.MalformedRequest, match="runs past"):
        p.decode_path(struct.pack("=H", 10) + b"abc")


def test_header_checks() -> None:
    p.check_header(p.T_LSTAT, p.MAX_PAYLOAD)
    with pytest.raises(p.FatalProtocolError, match="exceeds"):
        p.check_header(p.T_LSTAT, p.MAX_PAYLOAD + 1)
    for code in (0, 1, 22, 0xFFFFFFFF):
        with pytest.raises(p.FatalProtocolError, match="unknown request code"):
            p.check_header(code, 0)


@given(D)
def test_status_reply(value: int) -> None:
    type_, size, got = struct.unpack("=IIi", p.encode_status(value))
    assert (type_, size, got) == (p.T_ERROR if value < 0 else p.T_SUCCESS, 4, value)


@given(st.binary(max_size=70000))
def test_string_data_reply_and_enobufs(value: bytes) -> None:
    reply = p.encode_string_data(value)
    if len(value) + 2 > p.MAX_PAYLOAD:
        assert reply == struct.pack("=IIi", p.T_ERROR, 4, -errno.ENOBUFS)
    else:
        assert reply == struct.pack("=IIH", p.T_SUCCESS, len(value) + 2, len(value)) + value


def test_fd_reply_bodies() -> None:
    assert struct.pack("=i", 0x7FFFFFFF) == p.FD_REPLY_VALID
    assert p.encode_fd_reply(-errno.ENXIO) == struct.pack("=i", -errno.ENXIO)


def test_stat_record_is_116_bytes_in_wire_order() -> None:
    # ops.ExportOps.lstat's values: a time before 1970 is (-1 s, 999999999 ns).
    values = (1, 2, 3, 0o100644, 4294967294, 6, 7, 8, 9, 10, 11, 12, -1, 999999999, 15, 16)
    reply = p.encode_stat(values)
    # 13 q + 3 d = 116 bytes; protocol.md says 112, which is wrong.
    assert struct.unpack_from("=II", reply) == (p.T_SUCCESS, 116)
    fields = struct.unpack_from("=qqqiIiqqqqqqqqqq", reply, 8)
    assert fields == (1, 2, 3, 0o100644, 4294967294, 6, 7, 8, 9, 10, 11, 12, -1, 999999999, 15, 16)


def test_statfs_record_sign_extends_fsid() -> None:
    reply = p.encode_statfs((0xEF53, 4096, 1, 2, 3, 4, 5, -5, 7, 255, 4096))
    assert struct.unpack_from("=II11q", reply) == (
        p.T_SUCCESS,
        88,
        0xEF53,
        4096,
        1,
        2,
        3,
        4,
        5,
        -5,
        7,
        255,
        4096,
    )
