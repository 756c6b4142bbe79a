"""A refusal must not answer internal DNS for the agent (issue 19 put the hint in the
403's reason phrase too; its body had it before).

Threat: the agent has no resolver for the internal zone (or none at all: the guard is
its only way out). It sends ``CONNECT db.corp.internal:443`` and the guard, which does
resolve, refuses it as ``private_address`` with "db.corp.internal resolved to 10.2.3.4
(private)" in the reason phrase, the body's hint and its detail: one refused CONNECT per
name maps the internal network. The same for a deny rule by address ("(resolved to
...)"). The operator keeps the address in the audit log; the client is told the class
of address (private, loopback) but not which one. An address the client wrote itself
is not hidden from it.

Real proxy on loopback; names resolved by the policy's ``network.resolve``.
"""

from __future__ import annotations

import pytest
from adversarial.test_block_body_no_paths import _policy
from support.hygiene import plain_exchange
from support.proxy import ProxyFactory
from support.upstream import Upstream


@pytest.mark.parametrize(
    ("name", "address", "reason"),
    [("private.test", "127.0.0.2", "private_address"), ("deny-ip.test", "127.0.0.3", "denylisted")],
)
def test_refusal_does_not_say_what_a_name_resolves_to(
    proxy: ProxyFactory, http_upstream: Upstream, name: str, address: str, reason: str
) -> None:
    p = proxy(_policy(http_upstream.port))
    target = f"{name}:{http_upstream.port}"
    for req in (
        f"GET http://{target}/x HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
    ):
        resp = plain_exchange(p, req.encode())
        assert resp.status == 403, resp
        assert resp.headers["x-egress-guard-reason"] == reason
        seen = resp.reason + repr(resp.headers) + resp.body.decode("utf-8", "replace")
        assert address not in seen, seen
        assert name in resp.reason  # still says which target and why
    # the operator keeps it
    recs = p.wait_audit(lambda r: r.get("reason") == reason, count=2)
    assert any(address in (r.get("hint") or "") + (r.get("detail") or "") for r in recs), recs


def test_an_address_the_client_wrote_is_still_named(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(_policy(http_upstream.port))
    target = f"127.0.0.3:{http_upstream.port}"
    resp = plain_exchange(p, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert resp.status == 403, resp
    assert "127.0.0.3" in resp.reason
