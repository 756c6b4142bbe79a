"""Audit mode must record what it lets through, and a refused tunnel must not be
recorded or counted as allowed (issue 17, item 6).

Before: a Host-header mismatch audit mode let through was recorded as a plain ``allow``
(the would_block was worked out and dropped); a tunnel refused at its SNI left a close
record saying ``decision: allow``, and the metrics counted that one connection both
allowed (its CONNECT) and blocked (its SNI).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.clients import connect, read_response, send_raw, tls_through
from support.policies import make_policy
from support.ports import free_port
from support.proxy import ProxyFactory, guard_ca
from support.upstream import Upstream


def _decisions(mport: int) -> dict[tuple[str, str], float]:
    text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "egress_guard_decisions_total":
                out[(s.labels["destination"], s.labels["decision"])] = s.value
    return out


def test_plain_http_host_mismatch_in_audit_mode_is_recorded_would_block(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(make_policy(http_upstream.port, mode="audit"))
    port = http_upstream.port
    _, resp = send_raw(
        p.port,
        f"GET http://api.test:{port}/mismatch HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n".encode(),
    )
    assert resp.status == 200  # audit mode lets it through ...
    recs = p.wait_audit(lambda r: r.get("path") == "/mismatch")
    # ... and says so: not a plain allow
    assert [(r["decision"], r["reason"]) for r in recs] == [("would_block", "host_header_mismatch")]
    assert recs[0]["destination"] == "test-api"


@pytest.mark.parametrize("absolute", [False, True], ids=["host-header", "absolute-uri"])
def test_inspected_tunnel_host_mismatch_in_audit_mode_is_recorded_would_block(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, absolute: bool
) -> None:
    port = tls_upstream.port
    policy = make_policy(port, mode="audit").replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n    methods: [GET]\n  - name: private-api",
        1,
    )
    p = proxy(policy, "--inspect", "--upstream-ca", str(ca_file))
    sock, resp = connect(p.port, f"api.test:{port}")
    assert resp.status == 200
    tls = guard_ca(p).wrap_socket(sock, server_hostname="api.test")
    if absolute:
        head = f"GET https://other.test:{port}/mismatch HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n"
    else:
        head = f"GET /mismatch HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n"
    tls.sendall(head.encode())
    r = read_response(tls)  # type: ignore[arg-type]
    tls.close()
    assert r.status == 200
    recs = p.wait_audit(lambda r: r.get("path") == "/mismatch")
    assert [(r["decision"], r["reason"]) for r in recs] == [("would_block", "host_header_mismatch")]


def test_sni_refusal_close_record_and_metrics_say_block_only(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    mport = free_port()
    p = proxy(make_policy(tls_upstream.port), "--metrics", f"127.0.0.1:{mport}")
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    assert not tls_through(sock, "other.test", "/x")  # SNI names another host: refused
    closes = p.wait_audit(lambda r: True, event="close")
    assert [c["decision"] for c in closes] == ["block"]
    assert tls_upstream.seen.snis == []
    counts = _decisions(mport)
    assert counts.get(("test-api", "allow"), 0) == 0, counts
    assert counts.get(("test-api", "block"), 0) == 1, counts


def test_sni_mismatch_audit_mode_lets_through_is_recorded_and_counted_would_block(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    mport = free_port()
    p = proxy(make_policy(tls_upstream.port, mode="audit"), "--metrics", f"127.0.0.1:{mport}")
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    assert tls_through(sock, "other.test", "/x")  # audit mode: through
    closes = p.wait_audit(lambda r: True, event="close")
    assert [c["decision"] for c in closes] == ["would_block"]
    counts = _decisions(mport)
    assert counts.get(("test-api", "allow"), 0) == 0, counts
    assert counts.get(("test-api", "would_block"), 0) == 1, counts


def test_allowed_tunnel_is_counted_once_its_sni_passed_before_it_closes(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    """The CONNECT's allow is counted when the tunnel's first bytes pass, not at close."""
    mport = free_port()
    p = proxy(make_policy(tls_upstream.port), "--metrics", f"127.0.0.1:{mport}")
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tls = ctx.wrap_socket(sock, server_hostname="api.test")
    try:
        assert _decisions(mport).get(("test-api", "allow"), 0) == 1  # still open
    finally:
        tls.close()
    closes = p.wait_audit(lambda r: True, event="close")
    assert [c["decision"] for c in closes] == ["allow"]
    assert _decisions(mport).get(("test-api", "allow"), 0) == 1
