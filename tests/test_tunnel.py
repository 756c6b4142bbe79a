"""The tunnel fast path's ClientHello reader agrees with mitmproxy's parser wherever it
answers (egress_guard/proxy/tunnel.py: read_plain_client_hello).

The guard decides a tunnel from the SNI and the extension types it reads. The fast
reader answers only for the plain shape and defers (None) otherwise; the invariant is
that when it answers, mitmproxy's parser reads the same name and the same extension
types, so the SNI check cannot come out differently. Checked on ClientHellos made by
OpenSSL, on hand-built odd ones, and on random mutations of both.
"""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.proxy.layers.tls import parse_client_hello

from egress_guard.proxy.tunnel import read_plain_client_hello, sni_problem


def openssl_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = sni is not None
    if sni is None:
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def sni_ext(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + u16(len(n)) + n for n in names)
    return 0, u16(len(entries)) + entries


def built_hello(exts: list[tuple[int, bytes]], *, suites: bytes = b"\x13\x01") -> bytes:
    block = b"".join(u16(t) + u16(len(body)) + body for t, body in exts)
    body = (
        b"\x03\x03"
        + bytes(32)
        + b"\x00"  # session id
        + u16(len(suites))
        + suites
        + b"\x01\x00"  # compression: null
        + u16(len(block))
        + block
    )
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + u16(len(hs)) + hs


def agree(data: bytes) -> None:
    """If the fast reader answers, mitmproxy's parser must read the same facts."""
    fast = read_plain_client_hello(data)
    if fast is None:
        return
    slow = parse_client_hello(data)
    assert slow is not None, "fast reader answered where mitmproxy sees no ClientHello"
    assert fast.sni == slow.sni
    assert [t for t, _ in fast.extensions] == [t for t, _ in slow.extensions]
    assert sni_problem(fast) == sni_problem(slow)


REAL = [
    openssl_hello("api.test"),
    openssl_hello("api.anthropic.com", ["h2", "http/1.1"]),
    openssl_hello(None),
    openssl_hello("xn--bcher-kva.example", ["http/1.1"]),
]


@pytest.mark.parametrize("data", REAL)
def test_real_client_hellos_take_the_fast_path(data: bytes) -> None:
    fast = read_plain_client_hello(data)
    assert fast is not None
    slow = parse_client_hello(data)
    assert slow is not None
    assert (fast.sni, [t for t, _ in fast.extensions]) == (
        slow.sni,
        [t for t, _ in slow.extensions],
    )


@pytest.mark.parametrize(
    ("exts", "answers", "sni"),
    [
        ([sni_ext(b"api.test")], True, "api.test"),
        ([(16, u16(3) + b"\x02h2")], True, None),  # no SNI at all
        ([sni_ext(b"api.test"), sni_ext(b"evil.test")], False, None),  # two SNI extensions
        ([sni_ext(b"api.test", b"evil.test")], False, None),  # two names in one
        ([sni_ext(b"api.test", name_type=1)], False, None),  # not a host_name
        ([sni_ext(b"bad host")], False, None),  # not a valid host
        ([(0, u16(99) + b"\x00" + u16(8) + b"api.test")], False, None),  # list length lies
        ([sni_ext(b"api.test"), (16, u16(9) + b"\x02h2")], False, None),  # ALPN length lies
        ([sni_ext(b"api.test"), (16, u16(2) + b"\x05h2")], False, None),  # protocol overruns
        ([sni_ext(b"api.test"), (0xFE0D, b"\x00" * 8)], True, "api.test"),  # ECH: flagged
    ],
)
def test_odd_shapes_are_left_to_mitmproxy(
    exts: list[tuple[int, bytes]], answers: bool, sni: str | None
) -> None:
    data = built_hello(exts)
    fast = read_plain_client_hello(data)
    assert (fast is not None) == answers
    if fast is not None:
        assert fast.sni == sni
    agree(data)


def test_ech_is_flagged_on_the_fast_path() -> None:
    fast = read_plain_client_hello(built_hello([sni_ext(b"api.test"), (0xFE0D, b"\x00")]))
    assert fast is not None and sni_problem(fast) is not None


def test_split_records_and_odd_suites_are_left_to_mitmproxy() -> None:
    whole = REAL[0]
    body = whole[5:]
    split = b"\x16\x03\x01" + u16(100) + body[:100] + b"\x16\x03\x01" + u16(len(body) - 100)
    split += body[100:]
    assert read_plain_client_hello(split) is None
    assert parse_client_hello(split) is not None  # mitmproxy reassembles it
    assert read_plain_client_hello(whole[:-1]) is None  # incomplete
    assert read_plain_client_hello(built_hello([sni_ext(b"a.test")], suites=b"\x13")) is None


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from(
        [
            *REAL,
            built_hello([sni_ext(b"api.test"), (16, u16(3) + b"\x02h2")]),
            built_hello([sni_ext(b"api.test"), (0xFE0D, b"\x01\x02")]),
        ]
    ),
    edits=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 600)),
)
def test_fast_reader_never_disagrees_with_mitmproxy(
    base: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(base)
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    if cut is not None:
        del data[cut:]
    try:
        agree(bytes(data))
    except ValueError:
        # mitmproxy's parser refused bytes the fast reader answered for: a disagreement
        assert read_plain_client_hello(bytes(data)) is None
