"""Header floods: heads and chunk-size lines without end, from the client or the upstream.

mitmproxy kept appending to a connection's receive buffer whatever never parsed: one
header line without end took the proxy from 88 to 383 MiB in a few seconds. The guard
bounds a peer's unparsed HTTP/1 bytes (``proxy.patches.http1limit``): an overlong head
or chunk line ends the request with a 4xx (5xx toward an upstream), and is recorded.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from proxy.test_backpressure import MiB, flood
from support.clients import (
    send_all_then_read,
)
from support.policies import make_policy
from support.procfs import pid_of, proc_stats
from support.proxy import ProxyFactory
from support.servers import ThreadedLoopbackServer
from support.upstream import Upstream


def test_a_request_head_without_end_is_refused_with_431(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(make_policy(http_upstream.port))
    start = f"GET http://api.test:{http_upstream.port}/ HTTP/1.1\r\nX-Long: ".encode()
    with socket.create_connection((p.host, p.port)) as s:
        answer = send_all_then_read(s, start + b"a" * (70 * 1024))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"request head longer than 64 KiB" in answer
    assert http_upstream.seen.connections == 0
    assert "request head longer than 64 KiB" in p.log()
    (rec,) = p.wait_audit(lambda r: r["reason"] == "malformed_request")
    assert (rec["decision"], rec["host"]) == ("block", "")
    assert rec["detail"] == "request head longer than 64 KiB"


def test_a_complete_head_over_the_limit_is_refused_too(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """The limit is the head's size, not how it is split into reads: 70 KiB that end
    in the second read are refused like 70 KiB that do not end."""
    p = proxy(make_policy(http_upstream.port))
    head = (
        f"GET http://api.test:{http_upstream.port}/ HTTP/1.1\r\n"
        f"Host: api.test:{http_upstream.port}\r\nX-Long: {'a' * 70 * 1024}\r\n\r\n"
    )
    with socket.create_connection((p.host, p.port)) as s:
        answer = send_all_then_read(s, head.encode())
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert http_upstream.seen.connections == 0


def test_an_endless_header_does_not_fill_the_proxy(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(make_policy(http_upstream.port))
    pid = pid_of(p)
    rss_before = proc_stats(pid)["rss_kb"]
    with socket.create_connection((p.host, p.port)) as s:
        s.sendall(f"GET http://api.test:{http_upstream.port}/ HTTP/1.1\r\nX: ".encode())
        try:
            sent = flood(s, seconds=3, limit=256 * MiB, chunk=b"a" * MiB)
        except ConnectionError:
            sent = 0  # the proxy closed the connection: it took no more
    grown = proc_stats(pid)["rss_kb"] - rss_before
    assert sent < 32 * MiB, f"the proxy took {sent / MiB:.0f} MiB of one header"
    assert grown < 32 * 1024, f"the proxy grew by {grown / 1024:.0f} MiB"


def test_a_large_but_bounded_header_still_passes(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """32 KiB of cookies (a real thing) is well inside the bound."""
    p = proxy(make_policy(http_upstream.port))
    with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
        r = c.get(f"http://api.test:{http_upstream.port}/big", headers={"Cookie": "c" * 32768})
    assert r.status_code == 200
    assert http_upstream.seen.headers[-1]["cookie"] == "c" * 32768


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
def test_a_chunk_size_line_without_end_ends_the_request(
    proxy: ProxyFactory, http_upstream: Upstream, expect: bool
) -> None:
    """After an interim 100 Continue the client still has no answer: it gets the 400."""
    p = proxy(make_policy(http_upstream.port))
    head = (
        f"POST http://api.test:{http_upstream.port}/upload HTTP/1.1\r\n"
        f"Host: api.test:{http_upstream.port}\r\nTransfer-Encoding: chunked\r\n"
        + ("Expect: 100-continue\r\n" if expect else "")
        + "\r\n"
    ).encode()
    with socket.create_connection((p.host, p.port)) as s:
        answer = send_all_then_read(s, head + b"1" * (70 * 1024))
    if expect:
        interim, _, answer = answer.partition(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue"
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"chunk line longer than 64 KiB" in answer
    assert "request chunk line longer than 64 KiB" in p.log()
    (rec,) = p.wait_audit(lambda r: r["reason"] == "malformed_request")
    assert (rec["host"], rec["port"], rec["method"], rec["path"]) == (
        "api.test",
        http_upstream.port,
        "POST",
        "/upload",
    )
    assert rec["detail"] == "request chunk line longer than 64 KiB"


class EndlessHead(ThreadedLoopbackServer):
    """Answers with a response head that never ends."""

    def serve(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Long: ")
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    conn.sendall(b"b" * 65536)
            except OSError:
                return


def test_an_upstream_head_without_end_gives_the_client_502(proxy: ProxyFactory) -> None:
    server = EndlessHead()
    try:
        p = proxy(make_policy(server.port))
        pid = pid_of(p)
        rss_before = proc_stats(pid)["rss_kb"]
        with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
            r = c.get(f"http://api.test:{server.port}/")
        grown = proc_stats(pid)["rss_kb"] - rss_before
        assert r.status_code == 502
        assert "response head longer than 64 KiB" in r.text
        assert grown < 32 * 1024, f"the proxy grew by {grown / 1024:.0f} MiB"
    finally:
        server.close()
