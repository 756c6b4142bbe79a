"""What a redirected connection's first bytes name (``run --transparent``): the SNI of a
real ClientHello, the Host of a plain HTTP head, nothing for other bytes, and "wait"
while the name may still come."""

from __future__ import annotations

import ssl

import pytest

from egress_guard.proxy.transparent import WAIT, first_name


def client_hello(sni: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = sni is not None
    if sni is None:
        ctx.verify_mode = ssl.CERT_NONE
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def test_a_client_hello_names_its_sni() -> None:
    assert first_name(client_hello("api.example.com")) == ("api.example.com", "sni")


def test_a_client_hello_not_whole_yet_waits() -> None:
    hello = client_hello("api.example.com")
    assert first_name(hello[:20]) == WAIT


def test_a_client_hello_without_sni_names_nothing() -> None:
    assert first_name(client_hello(None)) == ("", "none")


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n", "api.example.com"),
        (b"GET / HTTP/1.1\r\nhost:  api.example.com:8080\r\n\r\n", "api.example.com"),
        (b"POST /x HTTP/1.1\r\nA: b\r\nHost: [2001:db8::1]:80\r\n\r\n", "[2001:db8::1]"),
        (b"GET / HTTP/1.1\nHost: lf.example.com\n\n", "lf.example.com"),
    ],
)
def test_a_plain_http_head_names_its_host(head: bytes, name: str) -> None:
    assert first_name(head) == (name, "host")


def test_a_plain_http_head_not_whole_yet_waits() -> None:
    assert first_name(b"GET / HTTP/1.1\r\nHost: api.exa") == WAIT
    assert first_name(b"GE") == WAIT
    assert first_name(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 20_000) == ("", "none")


def test_a_head_without_host_or_other_bytes_name_nothing() -> None:
    assert first_name(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n") == ("", "none")
    assert first_name(b"\x00\x01\x02 binary") == ("", "none")
    assert first_name(b"SSH-2.0-OpenSSH_9.6\r\n") == ("", "none")
