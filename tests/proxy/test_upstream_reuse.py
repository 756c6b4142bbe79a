"""Keep-alive requests reuse the pinned upstream connection instead of piling up sockets.

The guard connects to the address it checked, not to the name. Before the name was
given back after connecting, mitmproxy never matched the connection again: every
keep-alive request opened a new upstream socket and the old ones stayed open until the
client left.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from support.policies import inspect_policy, make_policy
from support.proxy import ProxyFactory, inspect_client
from support.upstream import Upstream


def test_plain_http_keep_alive_reuses_one_upstream_connection(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(make_policy(http_upstream.port))
    with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
        codes = [c.get(f"http://api.test:{http_upstream.port}/r{i}").status_code for i in range(5)]
    assert codes == [200] * 5
    assert len(http_upstream.seen.requests) == 5
    assert http_upstream.seen.connections == 1
    # still one decision per request, and the bytes of all five on one close record
    recs = p.wait_audit(lambda r: True)
    assert [r["decision"] for r in recs] == ["allow"] * 5
    closes = p.wait_audit(lambda r: True, event="close")
    assert len(closes) == 1 and closes[0]["bytes_down"] > 0


def test_inspected_tunnel_reuses_one_upstream_connection(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    with inspect_client(p) as c:
        codes = [
            c.post(
                f"https://api.test:{tls_upstream.port}/v1/chat/completions",
                json={"model": "good-model"},
            ).status_code
            for _ in range(4)
        ]
    assert codes == [200] * 4
    assert tls_upstream.seen.connections == 1


def test_keep_alive_after_reload_gets_the_new_rules(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """Rules added by a reload apply to the next request on an open client connection."""
    p = proxy(make_policy(http_upstream.port))
    base = f"http://api.test:{http_upstream.port}"
    with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
        assert c.get(f"{base}/v1/x").status_code == 200
        p.replace_policy(inspect_policy(http_upstream.port))
        admin = c.get(f"{base}/admin")
        evil = c.post(f"{base}/v1/chat/completions", json={"model": "gpt-evil"})
        good = c.post(f"{base}/v1/chat/completions", json={"model": "good-model"})
    assert admin.status_code == 403 and admin.headers["x-egress-guard-reason"] == "path_not_allowed"
    assert evil.status_code == 403 and evil.headers["x-egress-guard-reason"] == "model_not_allowed"
    assert good.status_code == 200
    assert [q[1] for q in http_upstream.seen.requests] == ["/v1/x", "/v1/chat/completions"]
    closes = p.wait_audit(lambda r: True, event="close")
    deadline = time.monotonic() + 10
    while len(closes) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        closes = p.audit("close")
    assert len(closes) == 2, closes  # the connection of the old policy is still accounted for
