"""Audit mode must not reach a denied address through an unlisted name that resolves to it.

The attack (issue 17, item 2, "or to any unlisted alias resolving to it"): with ``mode:
audit`` and a deny rule by address, a CONNECT (or plain HTTP request) to a name the policy
does not list is let through as ``would_block not_allowlisted``; the guard resolves the
name and, before this fix, checked only that the address was not its own listener, so an
alias of the denied address (a DNS name, or a ``network.resolve`` entry) reached it. The
resolved addresses of an unlisted target are checked against the deny rules in every
mode: ``denylisted``, refused, nothing reaches the upstream.

Real ``egress-guard run`` processes and real loopback upstreams that record what reached
them.
"""

from __future__ import annotations

import pytest
from support.clients import connect, send_raw
from support.proxy import ProxyFactory, ProxyProcess
from support.upstream import Upstream


def _policy(port: int, denied_port: int | None = None) -> str:
    return f"""\
version: 1
mode: audit
destinations:
  - name: listed
    hosts: [api.test]
    ports: [{port}]
deny:
  - hosts: [127.0.0.1]
    ports: [{denied_port or port}]
    comment: the denied service
network:
  block_private: false
  resolve:
    api.test: 127.0.0.9
    alias.test: 127.0.0.1
    mixed.test: [127.0.0.9, 127.0.0.1]
"""


def _denied(p: ProxyProcess, host: str) -> dict[str, object]:
    recs = p.wait_audit(lambda r: r["reason"] == "denylisted" and r["host"] == host)
    assert recs, p.audit("decision")
    return recs[0]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("alias.test", id="static-alias"),
        pytest.param("mixed.test", id="one-of-two-addresses"),
        pytest.param("localhost", id="system-resolver"),
    ],
)
def test_connect_to_an_unlisted_alias_of_a_denied_address_is_refused(
    proxy: ProxyFactory, http_upstream: Upstream, name: str
) -> None:
    p = proxy(_policy(http_upstream.port))
    sock, resp = connect(p.port, f"{name}:{http_upstream.port}")
    sock.close()
    assert resp.status == 403, resp
    rec = _denied(p, name)
    assert rec["decision"] == "block"
    assert http_upstream.seen.requests == []


def test_plain_http_to_an_unlisted_alias_of_a_denied_address_is_refused(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(_policy(http_upstream.port))
    port = http_upstream.port
    sock, resp = send_raw(
        p.port,
        f"GET http://alias.test:{port}/x HTTP/1.1\r\nHost: alias.test:{port}\r\n\r\n".encode(),
    )
    sock.close()
    assert resp.status == 403, resp
    assert _denied(p, "alias.test")["decision"] == "block"
    assert http_upstream.seen.requests == []


def test_unlisted_name_elsewhere_is_still_let_through_in_audit_mode(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """The control: audit mode still lets an unlisted name through when no deny rule
    covers its addresses (the fix must not turn audit mode into enforce)."""
    p = proxy(_policy(http_upstream.port, denied_port=1))
    sock, resp = connect(p.port, f"alias.test:{http_upstream.port}")
    sock.close()
    assert resp.status == 200, resp
    recs = p.wait_audit(lambda r: r["host"] == "alias.test")
    assert recs[0]["decision"] == "would_block"
