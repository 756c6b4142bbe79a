"""Memory exhaustion through model-endpoint bodies of unknown length over HTTP/2.

A destination with ``models`` holds a model call's whole body to read its model; the
held-body budget and ``--max-model-body`` both count the declared ``Content-Length``.
Over HTTP/2 a request may carry DATA frames without declaring any length, whatever its
method. A ``GET`` (or any method other than POST, PUT, PATCH) to a model endpoint
without ``content-length`` was held with nothing reserved, and its body grew without a
bound: the budget and the per-body limit counted 0 bytes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from adversarial.test_memory_exhaustion_held_bodies import (
    MiB,
    h2_client,
    model_body,
    model_policy,
    start_guard,
)
from support.proxy import ProxyFactory
from support.upstream import Upstream


@pytest.mark.parametrize("method", ["GET", "DELETE", "QUERY"])
def test_http2_body_without_length_is_not_held_past_the_limits(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, method: str
) -> None:
    """A stream with no ``content-length`` sends 48 MiB to ``/v1/chat/completions``
    under a 4 MiB ``--max-model-body`` and an 8 MiB budget: it must be refused at its
    headers (a body whose length is unknown cannot be bounded), never held."""
    g = start_guard(
        proxy,
        model_policy(tls_upstream.port).replace(
            "methods: [GET, POST]", f"methods: [GET, POST, DELETE, {method}]"
        ),
        "--inspect",
        "--upstream-ca",
        str(ca_file),
        held=8 * MiB,
        max_body=4 * MiB,
    )
    base = g.settled_rss()
    size = 48 * MiB
    with h2_client(g, tls_upstream.port) as c:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(
            sid,
            [
                (":method", method),
                (":scheme", "https"),
                (":authority", c.authority),
                (":path", "/v1/chat/completions"),
                ("content-type", "application/json"),
            ],
        )
        c.flush()
        with contextlib.suppress(OSError):
            c.send(sid, model_body(size), end=False)
        c.wait(lambda: sid in c.ended, timeout=5)
        grown = g.settled_rss() - base
        status = c.responses.get(sid, {}).get(":status")
    print(f"\n{method} without length: status {status}, proxy grew {grown / MiB:.0f} MiB")
    assert grown < 16 * MiB, (
        f"the proxy grew by {grown / MiB:.0f} MiB holding a body of unknown length"
    )
    assert status in ("403", "503")
    assert tls_upstream.seen.bodies == []
