"""An allowed tunnel relays every byte in both directions, in order, and counts them
exactly. (Past its first chunk a tunnel's data takes the short cut in
egress_guard/splice.py; this is what that short cut must keep.)

A client's half-close (FIN while still reading) ends the whole tunnel, as in mitmproxy
itself and in Squid's default (``half_closed_clients off``); TLS clients close with
close_notify, so nothing that goes through this proxy relies on it."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator

import pytest
from support.clients import connect
from support.policies import make_policy
from support.proxy import ProxyFactory


class DigestServer:
    """Reads a length-prefixed upload, answers its SHA-256 and ``reply_size`` bytes, and
    closes."""

    def __init__(self, reply_size: int) -> None:
        self.reply_size = reply_size
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                h = hashlib.sha256()
                head = b""
                while len(head) < 8 and (chunk := conn.recv(8 - len(head))):
                    head += chunk
                left = int.from_bytes(head, "big")
                while left > 0 and (chunk := conn.recv(min(left, 1 << 16))):
                    h.update(chunk)
                    left -= len(chunk)
                conn.sendall(h.hexdigest().encode() + b"\n" + b"d" * self.reply_size)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def digest_server() -> Iterator[DigestServer]:
    s = DigestServer(reply_size=3_000_000)
    yield s
    s.close()


def test_tunnel_relays_every_byte_and_counts_them(
    proxy: ProxyFactory, digest_server: DigestServer
) -> None:
    p = proxy(make_policy(digest_server.port))
    upload = bytes(range(256)) * 8192  # 2 MiB
    sock, resp = connect(p.port, f"api.test:{digest_server.port}")
    assert resp.status == 200
    sock.settimeout(20)
    sent = b"not TLS: relayed as bytes\n" + upload
    sock.sendall(len(sent).to_bytes(8, "big"))
    for i in range(0, len(sent), 100_000):  # many chunks, most of them past the first
        sock.sendall(sent[i : i + 100_000])
    got = b""
    while chunk := sock.recv(1 << 16):
        got += chunk
    sock.close()
    digest, _, reply = got.partition(b"\n")
    assert digest.decode() == hashlib.sha256(sent).hexdigest()
    assert len(reply) == 3_000_000 and reply == b"d" * 3_000_000
    close = p.wait_audit(lambda r: True, event="close")
    assert len(close) == 1
    assert close[0]["bytes_up"] == 8 + len(sent)
    assert close[0]["bytes_down"] == len(got)


def test_tunnel_through_a_tls_connection_to_the_proxy(
    proxy: ProxyFactory, digest_server: DigestServer
) -> None:
    """A client may speak TLS to the proxy itself (an https:// proxy URL); its tunnel lives
    inside that TLS session and must be relayed as such, not as raw socket bytes."""
    import ssl

    from proxy.test_inspect import guard_ca
    from support.clients import read_response

    p = proxy(make_policy(digest_server.port))
    ctx: ssl.SSLContext = guard_ca(p)
    ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", p.port), timeout=20)
    tls = ctx.wrap_socket(raw, server_hostname="egress-guard.test")
    tls.sendall(f"CONNECT api.test:{digest_server.port} HTTP/1.1\r\n\r\n".encode())
    assert read_response(tls).status == 200  # type: ignore[arg-type]
    sent = b"x" * 300_000
    tls.sendall(len(sent).to_bytes(8, "big"))
    for i in range(0, len(sent), 50_000):
        tls.sendall(sent[i : i + 50_000])
    got = b""
    while len(got) < 65 + 3_000_000:
        chunk = tls.recv(1 << 16)
        if not chunk:
            break
        got += chunk
    tls.close()
    digest, _, reply = got.partition(b"\n")
    assert digest.decode() == hashlib.sha256(sent).hexdigest()
    assert len(reply) == 3_000_000
