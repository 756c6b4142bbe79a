"""Hop-by-hop headers are not forwarded upstream (RFC 9110 section 7.6.1).

Threat: headers meant for the proxy or for one connection reach the origin. The
client's proxy credentials (Proxy-Authorization) would be handed to a third party, inside
an inspected tunnel as on plain HTTP; ``Proxy-Connection``, ``Keep-Alive``, ``TE`` and
whatever the client lists in ``Connection`` change how the upstream treats the
connection (the classic abuse lists a header the upstream relies on, e.g.
``Connection: X-Forwarded-For``, or asks for an ``Upgrade: h2c`` the proxy did not
announce). A header named in Connection is never allowed to remove the message's own
target or framing (Host, Content-Length, Transfer-Encoding): that would desynchronise the
upstream.

The loopback upstream records every header it received.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import httpx
import pytest
from support.hygiene import guard_ca, inspect_policy, plain_exchange, tunnel_exchange
from support.policies import make_policy
from support.proxy import ProxyFactory
from support.upstream import Upstream

#: what a client sends that must not reach the origin
HOP_HEADERS = (
    "Proxy-Connection: keep-alive\r\n"
    "Connection: keep-alive, X-Secret-Hop, x-other-hop , Keep-Alive, TE\r\n"
    "X-Secret-Hop: for-the-proxy-only\r\n"
    "X-Other-Hop: also\r\n"
    "Keep-Alive: timeout=5, max=100\r\n"
    "TE: trailers, deflate\r\n"
    "Upgrade: h2c\r\n"
    "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    "Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=\r\n"
    "X-End-To-End: kept\r\n"
)
NOT_FORWARDED = {
    "proxy-connection",
    "x-secret-hop",
    "x-other-hop",
    "keep-alive",
    "te",
    "upgrade",
    "proxy-authorization",
}


def _check(seen: dict[str, str]) -> None:
    assert not NOT_FORWARDED & set(seen), seen
    assert seen.get("x-end-to-end") == "kept"
    # the connection option mitmproxy acts on stays; the listed names do not
    assert seen.get("connection", "keep-alive").lower() == "keep-alive", seen


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_plain_http_hop_by_hop_headers_not_forwarded(
    proxy: ProxyFactory, http_upstream: Upstream, mode: str
) -> None:
    p = proxy(make_policy(http_upstream.port, mode=mode))
    up = http_upstream.port
    req = f"GET http://api.test:{up}/x HTTP/1.1\r\nHost: api.test:{up}\r\n{HOP_HEADERS}\r\n"
    resp = plain_exchange(p, req.encode())
    assert resp.status == 200
    _check(http_upstream.seen.headers[-1])


def test_plain_http_proxy_authorization_checked_then_not_forwarded(
    proxy: ProxyFactory, http_upstream: Upstream, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text(f"agent:sha256:{hashlib.sha256(b'pw').hexdigest()}\n")
    extra = f"clients:\n  auth:\n    users_file: {users}\n"
    p = proxy(make_policy(http_upstream.port, extra=extra))
    up = http_upstream.port
    token = base64.b64encode(b"agent:pw").decode()
    req = (
        f"GET http://api.test:{up}/x HTTP/1.1\r\nHost: api.test:{up}\r\n"
        f"Proxy-Authorization: Basic {token}\r\nProxy-Connection: keep-alive\r\n\r\n"
    )
    assert plain_exchange(p, req.encode()).status == 200
    seen = http_upstream.seen.headers[-1]
    assert "proxy-authorization" not in seen and "proxy-connection" not in seen


def test_websocket_upgrade_pair_is_kept(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    """An announced upgrade is end-to-end business: Upgrade and its Connection option go
    through (this upstream answers 200, so no upgrade happens)."""
    p = proxy(make_policy(http_upstream.port))
    up = http_upstream.port
    req = (
        f"GET http://api.test:{up}/ws HTTP/1.1\r\nHost: api.test:{up}\r\n"
        "Connection: Upgrade, X-Hop\r\nUpgrade: websocket\r\nX-Hop: 1\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    plain_exchange(p, req.encode())
    seen = http_upstream.seen.headers[-1]
    assert seen.get("upgrade") == "websocket"
    assert seen.get("connection", "").lower() == "upgrade"
    assert "x-hop" not in seen


def test_inspected_tunnel_hop_by_hop_headers_not_forwarded(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    up = tls_upstream.port
    req = f"GET /v1/x HTTP/1.1\r\nHost: api.test:{up}\r\n{HOP_HEADERS}\r\n"
    resp = tunnel_exchange(p, "api.test", up, req.encode())
    assert resp.status == 200
    _check(tls_upstream.seen.headers[-1])


def test_inspected_tunnel_client_offering_http2_proxy_authorization_not_forwarded(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """A client offering HTTP/2 (negotiated when the upstream speaks it; this loopback
    upstream does not): Proxy-Authorization is an ordinary field in HTTP/2 and must not
    go through either."""
    p = proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    with httpx.Client(
        proxy=p.url, verify=guard_ca(p), trust_env=False, timeout=20, http2=True
    ) as c:
        r = c.get(
            f"https://api.test:{tls_upstream.port}/v1/x",
            headers={"proxy-authorization": "Basic dXNlcjpzZWNyZXQ=", "proxy-connection": "x"},
        )
    assert r.status_code == 200
    seen = tls_upstream.seen.headers[-1]
    assert "proxy-authorization" not in seen and "proxy-connection" not in seen
