"""The proxy holds a bounded number of a peer's unparsed HTTP/1 bytes (http1limit.py).

mitmproxy kept appending to a connection's receive buffer whatever never parsed: one
header line without end took the proxy from 88 to 383 MiB in a few seconds, and so did
a chunk-size line without end. Bytes pipelined behind a request still being answered
were kept the same way. Now an overlong head or chunk line ends the connection, and
pipelined bytes past a small bound stay in the client's socket until the answer is out.

The overlong heads and chunk lines (the flood itself) are in
``adversarial/test_header_floods.py``; here: trailers and pipelining under the bound.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
from proxy.test_backpressure import MiB, flood
from support.clients import (
    read_response,
    read_responses,
    send_all_then_read,
)
from support.policies import make_policy
from support.procfs import pid_of, proc_stats
from support.proxy import ProxyFactory
from support.servers import ThreadedLoopbackServer
from support.upstream import Upstream


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
        answer = send_all_then_read(s, request.encode())
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
        pid = pid_of(p)
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
