"""Self-connection: a policy that allows the guard's own address never loops into itself."""

from __future__ import annotations

from support.clients import connect
from support.policies import make_policy
from support.proxy import ProxyFactory
from support.upstream import Upstream


def test_self_connection_refused(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    """A policy that allows the guard's own address still never loops into itself."""

    def policy(own_port: int) -> str:
        return make_policy(tls_upstream.port, own_port)

    p = proxy(policy)
    sock, resp = connect(p.port, f"api.test:{p.port}")
    sock.close()
    assert resp.status == 403
    assert resp.headers["x-egress-guard-reason"] == "self_connection"
