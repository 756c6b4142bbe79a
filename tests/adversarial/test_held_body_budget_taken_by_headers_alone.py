"""Denial of service on the held-body budget with request heads alone.

The budget (``--max-held-bodies``) reserves a model call's *declared* length when its
head arrives and keeps it until the body ends; nothing bounds how long a body may take.
A client that sends only a head declaring ``Content-Length: <its share>`` and then
nothing holds that share for as long as it keeps the connection open, at the cost of a
few hundred bytes; four such clients (four loopback source addresses, 127.0.0.0/8 has
millions) hold the whole budget, and from then on every model call of every client is
refused ``503 buffer_budget``, while the proxy holds no body bytes at all.

A head alone must not take the budget from others: reserve what has arrived (or bound
how long a declared body may stall), so an honest call still passes.
"""

from __future__ import annotations

import socket
import time

from adversarial.test_memory_exhaustion_held_bodies import (
    MiB,
    model_policy,
    small_call,
    start_guard,
)
from support.proxy import ProxyFactory
from support.upstream import Upstream


def stall(
    g_host: str, g_port: int, upstream_port: int, source: str, declared: int
) -> socket.socket:
    """A model call's head declaring ``declared`` body bytes, and not one of them."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect((g_host, g_port))
    s.sendall(
        (
            f"POST http://api.test:{upstream_port}/v1/chat/completions HTTP/1.1\r\n"
            f"Host: api.test:{upstream_port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
    )
    return s


def test_heads_alone_cannot_take_the_budget_from_an_honest_call(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    g = start_guard(proxy, model_policy(http_upstream.port), held=64 * MiB, max_body=16 * MiB)
    base = g.settled_rss()
    socks = [
        stall(g.p.host, g.p.port, http_upstream.port, f"127.0.0.{20 + i}", 16 * MiB)
        for i in range(4)
    ]
    try:
        held = g.wait_held(lambda v: v == 64 * MiB, timeout=5)
        time.sleep(2)
        grown = g.settled_rss() - base
        status = small_call(g, http_upstream.port)
        print(f"\n4 heads reserve {held / MiB:.0f} MiB, the proxy holds {grown / MiB:.0f} MiB")
        assert status == 200, (
            f"an honest 1000-byte call got {status}: {held / MiB:.0f} MiB of budget is "
            f"reserved by four request heads, while the proxy grew by {grown / MiB:.0f} MiB"
        )
    finally:
        for s in socks:
            s.close()
