"""The proxy holds a bounded number of a peer's unparsed HTTP/1 bytes (http1limit.py).

mitmproxy kept appending to a connection's receive buffer whatever never parsed: one
header line without end took the proxy from 88 to 383 MiB in a few seconds, and so did
a chunk-size line without end. Bytes pipelined behind a request still being answered
were kept the same way. Now an overlong head or chunk line ends the connection, and
pipelined bytes past a small bound stay in the client's socket until the answer is out.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from proxy.test_backpressure import MiB, flood
from support.clients import read_response, read_responses
from support.policies import make_policy
from support.procfs import proc_stats
from support.proxy import ProxyFactory
from support.servers import ThreadedLoopbackServer
from support.upstream import Upstream


def _pid(p: object) -> int:
    proc = getattr(p, "proc", None)
    assert proc is not None
    return int(proc.pid)


def _send_all_then_read(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    sock.settimeout(10)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_a_request_head_without_end_is_refused_with_431(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(make_policy(http_upstream.port))
    start = f"GET http://api.test:{http_upstream.port}/ HTTP/1.1\r\nX-Long: ".encode()
    with socket.create_connection((p.host, p.port)) as s:
        answer = _send_all_then_read(s, start + b"a" * (70 * 1024))
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
        answer = _send_all_then_read(s, head.encode())
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert http_upstream.seen.connections == 0


def test_an_endless_header_does_not_fill_the_proxy(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(make_policy(http_upstream.port))
    pid = _pid(p)
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
        answer = _send_all_then_read(s, head + b"1" * (70 * 1024))
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


def test_a_request_with_trailers_is_answered_and_recorded(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """mitmproxy cannot pass HTTP trailers on, and its layer died on them: the client got
    no answer and the audit log no record. Now: 400 and a malformed_request record."""
    p = proxy(make_policy(http_upstream.port))
    authority = f"api.test:{http_upstream.port}"
    request = (
        f"POST http://{authority}/t HTTP/1.1\r\nHost: {authority}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n"
    )
    with socket.create_connection((p.host, p.port)) as s:
        answer = _send_all_then_read(s, request.encode())
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"request trailers are not supported" in answer
    (rec,) = p.wait_audit(lambda r: r["reason"] == "malformed_request")
    assert (rec["host"], rec["path"]) == ("api.test", "/t")
    assert rec["detail"] == "request trailers are not supported"
    # and the proxy goes on serving
    with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
        assert c.get(f"http://{authority}/after").status_code == 200


class SlowAnswers(ThreadedLoopbackServer):
    """Answers each request on a connection after ``delay`` seconds (keep-alive)."""

    delay = 2.0

    def serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if not path.endswith(b"/fast"):
                    time.sleep(self.delay)
                body = b"slow-ok " + path
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_pipelined_bytes_wait_in_the_socket_while_the_answer_is_slow(
    proxy: ProxyFactory,
) -> None:
    server = SlowAnswers()
    try:
        p = proxy(make_policy(server.port))
        pid = _pid(p)
        authority = f"api.test:{server.port}"
        with socket.create_connection((p.host, p.port)) as s:
            s.sendall(
                f"GET http://{authority}/first HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
            )
            time.sleep(0.3)  # the first request is with the upstream now
            rss_before = proc_stats(pid)["rss_kb"]
            sent = flood(s, seconds=1.5, limit=256 * MiB, chunk=b"z" * MiB)
            grown = proc_stats(pid)["rss_kb"] - rss_before
            s.setblocking(True)
            first = read_response(s, more=True)  # the flood's 400 may follow in the segment
        assert sent < 32 * MiB, f"the proxy took {sent / MiB:.0f} MiB of pipelined bytes"
        assert grown < 32 * 1024, f"the proxy grew by {grown / 1024:.0f} MiB"
        assert (first.status, first.body) == (200, b"slow-ok /first")
    finally:
        server.close()


def test_held_pipelined_requests_are_served_once_the_answer_is_out(proxy: ProxyFactory) -> None:
    """Past the bound the client is paused, not refused: when the slow answer is out,
    the requests that waited in its socket are read and answered, in order."""
    server = SlowAnswers()
    try:
        p = proxy(make_policy(server.port))
        authority = f"api.test:{server.port}"
        pad = "p" * 16384
        later = b"".join(
            f"GET http://{authority}/{n}/fast HTTP/1.1\r\nHost: {authority}\r\nX-Pad: {pad}\r\n\r\n".encode()
            for n in range(40)
        )  # 640 KiB: ten times the bound
        with socket.create_connection((p.host, p.port)) as s:
            s.sendall(
                f"GET http://{authority}/first HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
            )
            writer = threading.Thread(target=s.sendall, args=(later,), daemon=True)
            writer.start()
            bodies = [r.body for r in read_responses(s, 41)]
            writer.join(5)
        assert bodies == [b"slow-ok /first"] + [f"slow-ok /{n}/fast".encode() for n in range(40)]
        assert "longer than" not in p.log()  # nothing was refused
    finally:
        server.close()


def test_pipelined_requests_are_still_answered_in_order(proxy: ProxyFactory) -> None:
    server = SlowAnswers()
    server.delay = 0.5
    try:
        p = proxy(make_policy(server.port))
        authority = f"api.test:{server.port}"
        reqs = b"".join(
            f"GET http://{authority}/{n} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
            for n in ("one", "two", "three")
        )
        with socket.create_connection((p.host, p.port)) as s:
            s.sendall(reqs)
            bodies = [r.body for r in read_responses(s, 3)]
        assert bodies == [b"slow-ok /one", b"slow-ok /two", b"slow-ok /three"]
    finally:
        server.close()


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
        pid = _pid(p)
        rss_before = proc_stats(pid)["rss_kb"]
        with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
            r = c.get(f"http://api.test:{server.port}/")
        grown = proc_stats(pid)["rss_kb"] - rss_before
        assert r.status_code == 502
        assert "response head longer than 64 KiB" in r.text
        assert grown < 32 * 1024, f"the proxy grew by {grown / 1024:.0f} MiB"
    finally:
        server.close()
