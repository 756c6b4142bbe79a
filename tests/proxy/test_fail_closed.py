"""Fail closed: an exception anywhere in a hook blocks that connection, and only that one."""

from __future__ import annotations

import sys
from pathlib import Path

from support.clients import connect, curl, openssl_s_client
from support.policies import make_policy
from support.proxy import ProxyFactory
from support.upstream import Upstream

FAULTY = [sys.executable, str(Path(__file__).parent.parent / "support" / "faulty_run.py")]


def _policy(port: int) -> str:
    return (
        make_policy(port)
        .replace("hosts: [api.test]", "hosts: [api.test, fault.test]")
        .replace("    api.test: 127.0.0.1", "    api.test: 127.0.0.1\n    fault.test: 127.0.0.1")
    )


def test_engine_fault_in_target_decision_blocks(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(_policy(tls_upstream.port), launcher=FAULTY, env={"EG_FAULT": "decide_name"})
    sock, resp = connect(p.port, f"fault.test:{tls_upstream.port}")
    sock.close()
    assert resp.status == 403
    assert resp.headers["x-egress-guard-reason"] == "internal_error"
    assert tls_upstream.seen.connections == 0
    # the proxy keeps serving the next connection
    r = curl(p.url, f"https://api.test:{tls_upstream.port}/next", ca_file=ca_file)
    assert r.code == 200
    recs = p.wait_audit(lambda r: r["reason"] == "internal_error")
    assert recs and recs[0]["decision"] == "block"


def test_engine_fault_in_address_check_blocks(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    p = proxy(_policy(tls_upstream.port), launcher=FAULTY, env={"EG_FAULT": "decide_addresses"})
    sock, resp = connect(p.port, f"fault.test:{tls_upstream.port}")
    sock.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "internal_error"
    assert tls_upstream.seen.connections == 0


def test_fault_in_audit_mode_still_blocks(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    p = proxy(
        _policy(tls_upstream.port),
        "--mode",
        "audit",
        launcher=FAULTY,
        env={"EG_FAULT": "decide_name"},
    )
    sock, resp = connect(p.port, f"fault.test:{tls_upstream.port}")
    sock.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "internal_error"


def test_fault_after_connect_in_tls_hook_refuses_upstream(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """The CONNECT was allowed; the SNI check then raises: nothing may reach the upstream."""
    p = proxy(_policy(tls_upstream.port), launcher=FAULTY, env={"EG_FAULT": "check_sni"})
    out = openssl_s_client(p.port, f"api.test:{tls_upstream.port}", "api.test", ca_file)
    assert b"BEGIN CERTIFICATE" not in out.stdout and b"no peer certificate" in out.stdout
    assert tls_upstream.seen.connections == 0
    recs = p.wait_audit(lambda r: r["reason"] == "internal_error")
    assert recs
