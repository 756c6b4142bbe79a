"""Audit mode: plain HTTP in a tunnel is read as HTTP however a lenient server reads it.

The attack: with ``mode: audit`` and ``deny: ["**.denied.test"]``, CONNECT to an unlisted
alias of an address (let through as ``would_block``), then send a request line a strict
reader does not take for HTTP but a lenient server does: blanks before the method, a tab
(or ``\\x0b``, ``\\x0c``, ``\\x1c``-``\\x1f``, ``\\xa0``) between its words. Python's
``http.server`` splits the line with ``str.split()``. The guard used to relay such bytes
raw (only a method followed by a space was read as HTTP), so the ``Host`` naming the
denied site reached the server, unchecked and unrecorded. Now such bytes are read as
HTTP: the guard's strict reading refuses them, and nothing reaches the upstream.

Real ``egress-guard run``, a real loopback ``http.server`` upstream (the lenient reader),
raw sockets.
"""

from __future__ import annotations

import time

import pytest
from support.clients import connect, read_response
from support.policies import make_policy
from support.proxy import ProxyFactory, ProxyProcess
from support.upstream import Upstream

P = pytest.param
REST = b"/reached HTTP/1.1\r\nHost: x.denied.test\r\n\r\n"

LENIENT_LINES = [
    P(b" GET " + REST, id="leading-space"),
    P(b"\tGET " + REST, id="leading-tab"),
    P(b"\x0cGET " + REST, id="leading-formfeed"),
    P(b"GET\t" + REST, id="tab-after-method"),
    P(b"GET\t/reached\tHTTP/1.1\r\nHost: x.denied.test\r\n\r\n", id="tabs-only"),
    P(b"GET\x0b" + REST, id="vtab"),
    P(b"GET\x1f" + REST, id="unit-separator"),
    P(b"GET\xa0" + REST, id="nbsp"),
    P(b"GET\x85" + REST, id="nel"),
]


@pytest.fixture
def audit_guard(proxy: ProxyFactory, http_upstream: Upstream) -> ProxyProcess:
    return proxy(make_policy(http_upstream.port, mode="audit"))


def _send(p: ProxyProcess, port: int, *parts: bytes) -> int:
    sock, resp = connect(p.port, f"other.test:{port}")
    assert resp.status == 200  # audit mode lets the unlisted alias through
    try:
        for i, part in enumerate(parts):
            if i:
                time.sleep(0.3)
            sock.sendall(part)
        return read_response(sock, timeout=5).status
    except (OSError, ValueError):
        return 0
    finally:
        sock.close()


@pytest.mark.parametrize("request_bytes", LENIENT_LINES)
def test_lenient_request_line_in_an_audited_tunnel_does_not_reach_a_denied_host(
    audit_guard: ProxyProcess, http_upstream: Upstream, request_bytes: bytes
) -> None:
    status = _send(audit_guard, http_upstream.port, request_bytes)
    time.sleep(0.3)
    assert http_upstream.seen.requests == []
    assert status in (0, 400, 403)


@pytest.mark.parametrize(
    "parts",
    [
        P((b" G", b"ET " + REST), id="leading-space-split"),
        P((b"GET\t/reached", b"\tHTTP/1.1\r\nHost: x.denied.test\r\n\r\n"), id="tab-split"),
        P((b"GET\t/" + b"a" * 3000, b" HTTP/1.1\r\nHost: x.denied.test\r\n\r\n"), id="long-line"),
    ],
)
def test_lenient_request_line_sent_in_pieces_is_still_read(
    audit_guard: ProxyProcess, http_upstream: Upstream, parts: tuple[bytes, bytes]
) -> None:
    """The first bytes may end before the line does: the guard waits for the line."""
    status = _send(audit_guard, http_upstream.port, *parts)
    time.sleep(0.3)
    assert http_upstream.seen.requests == []
    assert status in (0, 400, 403)


def test_strict_request_still_reaches_an_unlisted_host_in_audit_mode(
    audit_guard: ProxyProcess, http_upstream: Upstream
) -> None:
    """The control: a well-formed request naming no denied host still goes through."""
    port = http_upstream.port
    status = _send(
        audit_guard, port, f"GET /fine HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n".encode()
    )
    assert status == 200
    assert [r[1] for r in http_upstream.seen.requests] == ["/fine"]
