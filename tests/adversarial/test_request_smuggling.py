"""Request smuggling: one connection carrying a request the guard did not decide.

Pipelined and split requests are each decided on their own; the Host header and an
absolute-form URI must name the same target (inside a tunnel, the CONNECT target);
duplicate Host headers and hop-by-hop tricks on framing headers are refused; a reused
upstream connection carries the socket, never the decision.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from support.adv_lab import Lab
from support.adv_wire import exchange, read_outcome
from support.clients import (
    connect_plain,
    curl,
    read_response,
    send_raw,
)
from support.hygiene import plain_exchange
from support.policies import inspect_policy, make_policy
from support.proxy import ProxyFactory, ProxyProcess, guard_ca
from support.upstream import Upstream


def test_host_header_must_match_absolute_uri(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    p = proxy(make_policy(http_upstream.port))
    r = curl(p.url, f"http://api.test:{http_upstream.port}/", "-H", "Host: other.test", "-i")
    assert r.code == 403
    assert "X-Egress-Guard-Reason: host_header_mismatch" in r.stdout
    assert http_upstream.seen.connections == 0


def test_duplicate_host_headers_blocked(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    p = proxy(make_policy(http_upstream.port))
    req = (
        f"GET http://api.test:{http_upstream.port}/ HTTP/1.1\r\n"
        f"Host: api.test:{http_upstream.port}\r\nHost: other.test\r\n\r\n"
    ).encode()
    sock, resp = send_raw(p.port, req)
    sock.close()
    assert resp.status in (400, 403)
    if resp.status == 403:
        assert resp.headers["x-egress-guard-reason"] == "host_header_mismatch"
    assert http_upstream.seen.connections == 0


def test_request_split_inside_intercepted_tunnel_is_still_checked(
    inspect_guard: ProxyProcess, tls_upstream: Upstream
) -> None:
    """Bytes that do not (yet) look like HTTP are parsed as HTTP, never relayed raw."""

    from support.clients import read_response

    sock = socket.create_connection(("127.0.0.1", inspect_guard.port), timeout=10)
    sock.sendall(f"CONNECT api.test:{tls_upstream.port} HTTP/1.1\r\n\r\n".encode())
    assert read_response(sock).status == 200
    tls = guard_ca(inspect_guard).wrap_socket(sock, server_hostname="api.test")
    body = b'{"model": "gpt-evil"}'
    tls.sendall(b"PO")
    time.sleep(0.5)
    tls.sendall(
        b"ST /v1/chat/completions HTTP/1.1\r\n"
        + f"Host: api.test:{tls_upstream.port}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    resp = read_response(tls)  # type: ignore[arg-type]
    tls.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "model_not_allowed"
    assert tls_upstream.seen.requests == []


def test_absolute_form_request_in_a_tunnel_must_name_the_tunnel_target(
    proxy: ProxyFactory, http_upstream: Upstream, ca_file: Path
) -> None:
    """A server routes an absolute-form request by its URI, not by Host: inside a tunnel,
    the URI must name the CONNECT target as the Host header must."""
    p = proxy(inspect_policy(http_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    target = f"api.test:{http_upstream.port}"
    sock = connect_plain(p.port, target)
    sock.sendall(
        f"GET http://other.test:{http_upstream.port}/v1/models HTTP/1.1\r\n".encode()
        + f"Host: {target}\r\n\r\n".encode()
    )
    resp = read_response(sock)
    sock.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "host_header_mismatch"
    assert http_upstream.seen.requests == []


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


@pytest.mark.parametrize("listed", ["Content-Length", "Host", "Transfer-Encoding", "Connection"])
def test_connection_cannot_remove_target_or_framing(
    proxy: ProxyFactory, http_upstream: Upstream, listed: str
) -> None:
    p = proxy(make_policy(http_upstream.port))
    up = http_upstream.port
    req = (
        f"POST http://api.test:{up}/x HTTP/1.1\r\nHost: api.test:{up}\r\n"
        f"Connection: {listed}\r\nContent-Length: 5\r\n\r\nhello"
        f"GET http://api.test:{up}/next HTTP/1.1\r\nHost: api.test:{up}\r\n\r\n"
    )
    resp = plain_exchange(p, req.encode())
    assert resp.status == 200
    assert http_upstream.seen.bodies[0] == b"hello"
    assert http_upstream.seen.requests[0][2] == f"api.test:{up}"
    # the bytes after the body were not read as part of it, nor smuggled into it
    assert [r[1] for r in http_upstream.seen.requests] in (["/x"], ["/x", "/next"])


def test_pipelined_forbidden_request_after_an_allowed_one(
    lab: Lab, bypass_guard: ProxyProcess
) -> None:
    """Two requests in one packet: the second names a forbidden host and must be decided
    (and refused) on its own, not ride on the first one's decision."""
    ph, pf = lab.ports["PH"], lab.ports["PF"]
    before = lab.never_contact()
    data = (
        f"GET http://front.test:{ph}/first HTTP/1.1\r\nHost: front.test:{ph}\r\n\r\n"
        f"GET http://other.test:{pf}/second HTTP/1.1\r\nHost: other.test:{pf}\r\n\r\n"
        f"GET http://127.0.0.1:{ph}/third HTTP/1.1\r\nHost: 127.0.0.1:{ph}\r\n\r\n"
    ).encode()
    sock, first = exchange(bypass_guard.port, data, src="127.67.0.3")
    assert sock is not None and first.status == 200
    second = read_outcome(sock, 5, pending=first.extra)  # responses may share a segment
    third = read_outcome(sock, 5, pending=second.extra)
    sock.close()
    after = lab.never_contact()
    assert second.status == 403 and second.guard_reason == "not_allowlisted", second.short()
    # after a 403 with Connection: close the third may never be read; if it was, refused
    assert third.status in (None, 403), third.short()
    assert after["trap"] == before["trap"]
    paths = [r[1] for r in lab.front_http.seen.requests]
    assert "/second" not in paths and "/third" not in paths
