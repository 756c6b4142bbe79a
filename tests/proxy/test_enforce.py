"""The enforcing proxy end to end: real egress-guard process, real clients, real upstreams.

Every block asserts three things: the client got the documented answer, the reason is
the right one, and the upstream saw nothing (not even a TCP connection). The attacks
(SNI fronting, private addresses, smuggling, self-connection) are in ``tests/adversarial/``,
one module per threat.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ssl
import time
from pathlib import Path

import httpx
from support.clients import (
    connect,
    curl,
    openssl_s_client,
    refused_connect,
    send_raw,
    tls_get,
)
from support.policies import make_policy
from support.proxy import ProxyFactory
from support.upstream import Upstream

# --- allowed traffic, three real clients ---------------------------------------------------


def test_allowed_host_reaches_upstream_with_curl(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    r = curl(p.url, f"https://api.test:{tls_upstream.port}/hello", ca_file=ca_file)
    assert r.code == 200, r.stderr
    assert "upstream-ok GET /hello" in r.stdout
    assert tls_upstream.seen.snis == ["api.test"]
    assert tls_upstream.seen.requests[0][:2] == ("GET", "/hello")


def test_allowed_host_with_openssl_s_client(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    out = openssl_s_client(
        p.port,
        f"api.test:{tls_upstream.port}",
        "api.test",
        ca_file,
        send=b"GET /s_client HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
    )
    text = out.stdout.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in text
    assert "upstream-ok GET /s_client" in text
    assert tls_upstream.seen.requests[0][1] == "/s_client"


def test_allowed_host_with_httpx(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    # httpx resolves nothing itself through a proxy: the name goes in the CONNECT line.
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with httpx.Client(proxy=p.url, verify=ctx, trust_env=False) as client:
        r = client.get(f"https://api.test:{tls_upstream.port}/via-httpx")
    assert r.status_code == 200
    assert r.text.startswith("upstream-ok GET /via-httpx")


def test_plain_http_absolute_uri_allowed(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    p = proxy(make_policy(http_upstream.port))
    r = curl(p.url, f"http://api.test:{http_upstream.port}/api/tags")
    assert r.code == 200
    assert http_upstream.seen.requests == [("GET", "/api/tags", f"api.test:{http_upstream.port}")]


# --- blocked, one test per reason --------------------------------------------------------------


def test_unlisted_host_gets_403_and_upstream_sees_nothing(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    resp, body = refused_connect(p.port, f"other.test:{tls_upstream.port}", "not_allowlisted")
    assert resp.status == 403
    assert body["host"] == "other.test" and body["port"] == tls_upstream.port
    assert "hosts: [other.test]" in str(body["hint"])
    r = curl(p.url, f"https://other.test:{tls_upstream.port}/", ca_file=ca_file)
    assert r.exit != 0 and "403" in r.stderr
    assert tls_upstream.seen.connections == 0


def test_catalog_hint_names_the_entry(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    p = proxy(make_policy(tls_upstream.port))
    sock, resp = connect(p.port, "models.opencode.ai:443")
    sock.close()
    assert resp.status == 403
    assert "use: models-catalog" in resp.json()["hint"]


def test_wrong_port(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    p = proxy(make_policy(tls_upstream.port))
    resp, _ = refused_connect(p.port, f"api.test:{tls_upstream.port + 1}", "port_not_allowed")
    assert resp.status == 403
    assert tls_upstream.seen.connections == 0


def test_denylisted(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    policy = make_policy(tls_upstream.port).replace(
        "hosts: [api.test]", "hosts: [api.test, x.denied.test]"
    )
    p = proxy(policy)
    refused_connect(p.port, f"X.Denied.Test.:{tls_upstream.port}", "denylisted")
    assert tls_upstream.seen.connections == 0


def test_client_outside_acl(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    p = proxy(make_policy(tls_upstream.port, extra="clients:\n  allow_cidrs: [10.0.0.0/8]\n"))
    refused_connect(p.port, f"api.test:{tls_upstream.port}", "client_not_allowed")
    assert tls_upstream.seen.connections == 0


def test_proxy_auth_required(
    proxy: ProxyFactory, tls_upstream: Upstream, tmp_path: Path, ca_file: Path
) -> None:
    users = tmp_path / "users"
    users.write_text(
        "# test users\nalice:sha256:" + hashlib.sha256(b"s3cret").hexdigest() + "\nbob:plain\n"
    )
    extra = f"clients:\n  auth:\n    users_file: {users}\n"
    p = proxy(make_policy(tls_upstream.port, extra=extra))
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    sock.close()
    assert resp.status == 407
    assert resp.headers["proxy-authenticate"].startswith("Basic")
    assert resp.headers["x-egress-guard-reason"] == "proxy_auth_required"
    bad = base64.b64encode(b"alice:wrong").decode()
    sock, resp = connect(
        p.port, f"api.test:{tls_upstream.port}", {"Proxy-Authorization": f"Basic {bad}"}
    )
    sock.close()
    assert resp.status == 407
    assert tls_upstream.seen.connections == 0
    good = base64.b64encode(b"alice:s3cret").decode()
    sock, resp = connect(
        p.port, f"api.test:{tls_upstream.port}", {"Proxy-Authorization": f"Basic {good}"}
    )
    assert resp.status == 200
    assert tls_get(sock, ca_file, "api.test").status == 200
    sock.close()


def test_malformed_request_gets_4xx_and_proxy_survives(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    for junk in (
        b"GARBAGE\r\n\r\n",
        b"CONNECT\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"CONNECT a:b:c HTTP/1.1\r\n\r\n",
    ):
        try:
            sock, resp = send_raw(p.port, junk)
            sock.close()
            assert 400 <= resp.status < 500, (junk, resp.status)
        except ConnectionError:
            pass  # closing the connection is an acceptable answer to garbage
    r = curl(p.url, f"https://api.test:{tls_upstream.port}/after", ca_file=ca_file)
    assert r.code == 200
    assert tls_upstream.seen.requests[-1][1] == "/after"


# --- audit mode --------------------------------------------------------------------------------


def test_audit_mode_lets_through_and_records_would_block(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port, mode="audit"))
    r = curl(p.url, f"https://other.test:{tls_upstream.port}/unlisted", ca_file=ca_file)
    assert r.code == 200
    r = curl(p.url, f"https://api.test:{tls_upstream.port}/listed", ca_file=ca_file)
    assert r.code == 200
    assert [q[1] for q in tls_upstream.seen.requests] == ["/unlisted", "/listed"]
    recs = p.wait_audit(lambda r: r["host"] == "other.test")
    assert recs[0]["decision"] == "would_block" and recs[0]["reason"] == "not_allowlisted"
    assert recs[0]["mode"] == "audit"
    allowed = p.wait_audit(lambda r: r["host"] == "api.test")
    assert allowed[0]["decision"] == "allow"


def test_audit_mode_still_refuses_client_acl(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    p = proxy(
        make_policy(
            tls_upstream.port, mode="audit", extra="clients:\n  allow_cidrs: [10.0.0.0/8]\n"
        )
    )
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    sock.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "client_not_allowed"


def test_mode_flag_overrides_policy(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port), "--mode", "audit")
    r = curl(p.url, f"https://other.test:{tls_upstream.port}/", ca_file=ca_file)
    assert r.code == 200


def test_idle_timeout_closes_stalled_tunnels(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """--idle-timeout is enforced: an idle tunnel is closed, and its close record written."""
    p = proxy(make_policy(tls_upstream.port), "--idle-timeout", "2")
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    ctx = ssl.create_default_context(cafile=str(ca_file))
    tls = ctx.wrap_socket(sock, server_hostname="api.test")
    tls.settimeout(15)
    start = time.monotonic()
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        assert tls.recv(100) == b""  # the proxy closes the idle tunnel
    assert time.monotonic() - start < 12
    tls.close()
    closes = p.wait_audit(lambda r: r["host"] == "api.test", event="close")
    assert closes and closes[0]["bytes_up"] > 0
