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
from proxy.test_inspect import client, inspect_policy
from support.policies import make_policy
from support.proxy import ProxyFactory
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


def test_denied_request_on_a_reused_connection_is_still_refused(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """Reuse carries the socket, never the decision: the next request is decided anew."""
    p = proxy(make_policy(http_upstream.port))
    with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
        ok = c.get(f"http://api.test:{http_upstream.port}/ok")
        bad = c.get(f"http://other.test:{http_upstream.port}/no")
        again = c.get(f"http://api.test:{http_upstream.port}/ok2")
    assert (ok.status_code, bad.status_code, again.status_code) == (200, 403, 200)
    assert [q[1] for q in http_upstream.seen.requests] == ["/ok", "/ok2"]
    assert http_upstream.seen.connections == 1


def test_inspected_tunnel_reuses_one_upstream_connection(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    with client(p) as c:
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


def test_keep_alive_after_reload_goes_to_the_newly_pinned_address(proxy: ProxyFactory) -> None:
    """A reload that pins the name elsewhere (and no longer allows the old address) moves
    the next request on an open client connection; the old upstream socket is not reused."""
    with (
        Upstream(None, host="127.0.0.2") as new,
        Upstream(None, host="127.0.0.1", port=new.port) as old,
    ):
        p = proxy(make_policy(old.port))
        moved = make_policy(old.port, allow="127.0.0.2/32").replace(
            "api.test: 127.0.0.1", "api.test: 127.0.0.2"
        )
        with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
            assert c.get(f"http://api.test:{old.port}/one").status_code == 200
            p.replace_policy(moved)
            assert c.get(f"http://api.test:{old.port}/two").status_code == 200
        assert [q[1] for q in old.seen.requests] == ["/one"]
        assert [q[1] for q in new.seen.requests] == ["/two"]
        assert old.seen.connections == 1 and new.seen.connections == 1
