"""egress-guard as an addon of an existing mitmproxy: ``mitmdump -s egress_guard/addon.py``."""

from __future__ import annotations

import contextlib
import ssl
import time
from pathlib import Path

from support.clients import connect, tls_get
from support.policies import make_policy
from support.proxy import BIN_DIR, ProxyFactory, free_port
from support.upstream import Upstream

import egress_guard.addon


def start_mitmdump(proxy: ProxyFactory, policy_text: str, tmp_path: Path) -> int:
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    argv = [
        str(BIN_DIR / "mitmdump"),
        "-q",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={tmp_path / 'conf'}",
        "-s",
        egress_guard.addon.__file__,
        "--set",
        f"egress_guard_policy={policy}",
    ]
    proxy(None, argv=argv, port=port)
    return port


def test_mitmdump_with_addon_blocks_and_allows(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, tmp_path: Path
) -> None:
    port = start_mitmdump(proxy, make_policy(tls_upstream.port), tmp_path)
    sock, resp = connect(port, f"other.test:{tls_upstream.port}")
    sock.close()
    assert resp.status == 403
    assert resp.headers["x-egress-guard-reason"] == "not_allowlisted"
    sock, resp = connect(port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    assert tls_get(sock, ca_file, "api.test", "/through-mitmdump").status == 200
    sock.close()
    assert tls_upstream.seen.connections == 1
    assert tls_upstream.seen.requests[0][1] == "/through-mitmdump"


def test_mitmdump_tunnel_whose_client_hello_comes_in_two_reads(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, tmp_path: Path
) -> None:
    """A ClientHello split over two reads (a post-quantum one is two segments on a real
    network): mitmproxy builds its TLS layers on the first part, the guard lets the
    tunnel through raw. The upstream connection then has no TLS of the proxy's own, and
    nothing may wait for such a handshake (the back-pressure once did, for good)."""
    port = start_mitmdump(proxy, make_policy(tls_upstream.port), tmp_path)
    sock, resp = connect(port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    sock.settimeout(10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=str(ca_file)).wrap_bio(
        incoming, outgoing, server_hostname="api.test"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    sock.sendall(hello[:64])
    time.sleep(0.3)
    sock.sendall(hello[64:])
    while True:
        incoming.write(sock.recv(65536))
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
    tls.write(b"GET /split-hello HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
    sock.sendall(outgoing.read())
    answer = b""
    while not answer.startswith(b"HTTP/1.1 200") and (data := sock.recv(65536)):
        incoming.write(data)
        with contextlib.suppress(ssl.SSLWantReadError):
            answer += tls.read(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    assert tls_upstream.seen.requests[0][1] == "/split-hello"
