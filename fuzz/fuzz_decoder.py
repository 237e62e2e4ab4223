"""Coverage-guided fuzzing of proxyd.protocol's request decoders and check_header.

The first input byte picks the target (a DECODERS entry, or check_header); the rest is
the payload. A decoder may only answer with a tuple of fields or raise MalformedRequest
(NulInPath is one); what it returns must decode to itself again once re-encoded and
hold no NUL in a path. check_header may only raise FatalProtocolError, and exactly for an unknown
code or a size past 64 KiB.

Run it longer (not part of the test suite; tests/test_robustness.py runs TestOneInput
on a few hundred inputs without atheris so that it cannot rot):

    .venv/bin/pip install atheris && .venv/bin/python fuzz/fuzz_decoder.py -max_total_time=600
"""

from __future__ import annotations

import struct
import sys

from proxyd import protocol as p

# Wire layout of each request, written here from docs/protocol.md, not taken from
# proxyd: s = path or name (no NUL), v = raw string (an xattr value), d = i32, q = i64.
LAYOUTS = {
    p.T_OPEN: "sd",
    p.T_CREATE: "sdddd",
    p.T_MKNOD: "ddsdq",
    p.T_MKDIR: "ddsd",
    p.T_SYMLINK: "ddss",
    p.T_LINK: "ss",
    p.T_LSTAT: "s",
    p.T_READLINK: "sd",
    p.T_STATFS: "s",
    p.T_CHMOD: "sd",
    p.T_CHOWN: "sdd",
    p.T_TRUNCATE: "sq",
    p.T_UTIME: "sqqqq",
    p.T_RENAME: "ss",
    p.T_REMOVE: "s",
    p.T_LGETXATTR: "dss",
    p.T_LLISTXATTR: "ds",
    p.T_LSETXATTR: "ssvdd",
    p.T_LREMOVEXATTR: "ss",
    p.T_GETVERSION: "s",
}
assert set(LAYOUTS) == set(p.DECODERS) == set(p.REQUESTS), "a request type without a layout"
CODES = sorted(p.DECODERS)
RANGES = {"d": (-(2**31), 2**31), "q": (-(2**63), 2**63)}
INTS = {"d": struct.Struct("=i"), "q": struct.Struct("=q")}


def encode(layout: str, fields: tuple) -> bytes:
    out = b""
    for kind, value in zip(layout, fields, strict=True):
        if kind in "sv":
            out += struct.pack("=H", len(value)) + value
        else:
            out += INTS[kind].pack(value)
    return out


def check_fields(code: int, fields: tuple) -> None:
    layout = LAYOUTS[code]
    assert len(fields) == len(layout), (code, fields)
    for kind, value in zip(layout, fields, strict=True):
        if kind in "sv":
            assert type(value) is bytes, (code, fields)
            assert kind == "v" or b"\0" not in value, (code, fields)
        else:
            low, high = RANGES[kind]
            assert type(value) is int and low <= value < high, (code, fields)


def decoded(code: int, payload: bytes) -> tuple | type:
    """The fields, or the MalformedRequest class refusing them (anything else escapes)."""
    try:
        return p.DECODERS[code](payload)
    except p.MalformedRequest as e:  # NulInPath is one
        return type(e)


def fuzz_decoder(code: int, payload: bytes) -> None:
    fields = decoded(code, payload)
    if isinstance(fields, type):
        return
    check_fields(code, fields)
    again = decoded(code, encode(LAYOUTS[code], fields))
    assert again == fields, f"re-encoded fields decode differently: {again}"


def fuzz_header(data: bytes) -> None:
    type_, size = p.HEADER.unpack(data[:8].ljust(8, b"\0"))
    fatal = size > p.MAX_PAYLOAD or type_ not in p.REQUESTS
    try:
        p.check_header(type_, size)
    except p.FatalProtocolError:
        assert fatal, (type_, size)
    else:
        assert not fatal, (type_, size)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    target = data[0] % (len(CODES) + 1)
    if target == len(CODES):
        fuzz_header(data[1:])
    else:
        fuzz_decoder(CODES[target], data[1:])


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
