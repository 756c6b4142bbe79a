"""``--upstream-proxy``: the guard decides, then hands allowed traffic to a parent proxy.

The parent here is a second egress-guard (a real HTTP proxy on loopback), so the test
also shows what the parent saw: only what the child allowed.
"""

from __future__ import annotations

from pathlib import Path

from support.clients import connect, curl
from support.policies import make_policy
from support.proxy import ProxyFactory
from support.upstream import Upstream


def test_allowed_traffic_goes_through_the_parent_and_blocks_stay_local(
    proxy: ProxyFactory, tls_upstream: Upstream, http_upstream: Upstream, ca_file: Path
) -> None:
    # The parent allows everything the test uses (other.test too): the child must block it.
    parent_policy = make_policy(tls_upstream.port, http_upstream.port).replace(
        "hosts: [api.test]", "hosts: [api.test, other.test]"
    )
    parent = proxy(parent_policy)
    child = proxy(
        make_policy(tls_upstream.port, http_upstream.port), "--upstream-proxy", parent.url
    )

    r = curl(child.url, f"https://api.test:{tls_upstream.port}/via-parent", ca_file=ca_file)
    assert r.code == 200, r.stderr
    r = curl(child.url, f"http://api.test:{http_upstream.port}/plain-via-parent")
    assert r.code == 200
    sock, resp = connect(child.port, f"other.test:{tls_upstream.port}")
    sock.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "not_allowlisted"

    assert [q[1] for q in tls_upstream.seen.requests] == ["/via-parent"]
    assert [q[1] for q in http_upstream.seen.requests] == ["/plain-via-parent"]
    parent_hosts = {r["host"] for r in parent.wait_audit(lambda r: True)}
    assert parent_hosts == {"api.test"}  # other.test never reached the parent
