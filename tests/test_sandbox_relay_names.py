"""What the sandbox's relay reads from a caught connection's first bytes: the name it
hands the guard (proxy/sandbox_relay.py). Anything that is not a clean host name is no
name at all (the connection is then decided on its address)."""

from __future__ import annotations

import contextlib
import ssl

from egress_guard.proxy.sandbox_relay import name_in


def client_hello(sni: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_sni_of_a_client_hello() -> None:
    assert name_in(client_hello("API.Example.com")) == "api.example.com"


def test_the_host_of_a_plain_http_request() -> None:
    assert name_in(b"GET / HTTP/1.1\r\nHost: api.example.com:8080\r\n\r\n") == "api.example.com"
    assert name_in(b"POST /x HTTP/1.1\r\nhost: [::1]:80\r\n\r\n") == "::1"


def test_no_name_from_anything_else() -> None:
    assert name_in(b"hello, is anybody there?\n") is None
    assert name_in(b"SSH-2.0-OpenSSH_9.6\r\n") is None
    assert name_in(b"GET / HTTP/1.1\r\nX: y\r\n\r\n") is None
    # a name that could smuggle anything into the CONNECT line is no name
    assert name_in(b"GET / HTTP/1.1\r\nHost: a.test x\r\n\r\n") is None
    assert name_in(b"GET / HTTP/1.1\r\nHost: a.test/\r\n\r\n") is None
    assert name_in(client_hello("api.example.com")[:40]) is None
