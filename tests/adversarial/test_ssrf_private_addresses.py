"""SSRF: an allowed name, or an IP literal, that leads to a private or loopback address.

Addresses are checked after resolution (static ``network.resolve`` or real DNS) against
``network.allow_cidrs``; every spelling of an IP literal is refused as one. The upstream
behind the address never sees a connection.
"""

from __future__ import annotations

import pytest
from support.clients import refused_connect
from support.policies import make_policy
from support.proxy import ProxyFactory
from support.upstream import Upstream


def test_private_address_from_static_resolve(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    p = proxy(make_policy(tls_upstream.port))
    _, body = refused_connect(p.port, f"private.test:{tls_upstream.port}", "private_address")
    # the client is not told what the name resolved to (an internal-DNS oracle:
    # test_refusal_internal_dns_oracle.py); the audit log says it
    assert "127.0.0.2" not in body["hint"] and "<address>" in body["hint"]
    records = p.wait_audit(lambda r: r.get("reason") == "private_address")
    assert any("127.0.0.2" in (r.get("hint") or "") for r in records)
    assert tls_upstream.seen.connections == 0


def test_private_address_after_real_dns(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    """``localhost`` is allowed by name but the system resolver says 127.0.0.1 / ::1."""
    p = proxy(make_policy(tls_upstream.port, allow="10.255.255.0/24"))
    refused_connect(p.port, f"localhost:{tls_upstream.port}", "private_address")
    assert tls_upstream.seen.connections == 0


@pytest.mark.parametrize(
    "spelling", ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "[::ffff:127.0.0.1]"]
)
def test_ip_literal_not_allowed(proxy: ProxyFactory, tls_upstream: Upstream, spelling: str) -> None:
    p = proxy(make_policy(tls_upstream.port))
    _, body = refused_connect(p.port, f"{spelling}:{tls_upstream.port}", "ip_literal_not_allowed")
    assert body["host"] == "127.0.0.1"
    assert tls_upstream.seen.connections == 0
