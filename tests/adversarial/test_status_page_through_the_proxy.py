"""The agent reading the status page (or ``/metrics``) through the guard itself.

The metrics listener serves, since issue 19, the most recent decisions of every client
and user, and the policy file's path, which a refusal is careful never to tell a client.
A policy that admits the guard's own address (``network.allow_cidrs: [127.0.0.1/32]``
for local services, as on a developer's machine) let the agent fetch
``http://localhost:METRICS/status.json`` through the proxy: only the proxy's own
listening address was refused as a self-connection. The metrics listener is the guard's
own address too: refused (``self_connection``) whatever the policy allows, by plain HTTP
and by CONNECT; nothing is read.
"""

from __future__ import annotations

from support.hygiene import plain_exchange
from support.policies import make_policy
from support.ports import free_port
from support.proxy import ProxyFactory
from support.upstream import Upstream


def test_agent_cannot_read_the_status_page_through_the_guard(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    mport = free_port()
    p = proxy(
        make_policy(http_upstream.port, mport, allow="127.0.0.1/32"),
        "--metrics",
        f"127.0.0.1:{mport}",
    )
    # localhost is a destination of make_policy's on these ports, and 127.0.0.1/32 allowed
    target = f"localhost:{mport}"
    for req in (
        f"GET http://{target}/status.json HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"GET http://{target}/metrics HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
    ):
        resp = plain_exchange(p, req.encode())
        assert resp.status == 403, resp
        assert resp.headers.get("x-egress-guard-reason") == "self_connection", resp
        assert b"recent_blocks" not in resp.body and b"egress_guard_" not in resp.body
    # the same policy still reaches an ordinary local service
    target = f"localhost:{http_upstream.port}"
    ok = plain_exchange(p, f"GET http://{target}/x HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert ok.status != 403, ok
