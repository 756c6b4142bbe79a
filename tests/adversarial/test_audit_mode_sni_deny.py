"""Audit mode must not lift deny rules through the other names a client gives.

The attack (issue 17, item 2): with ``mode: audit`` and ``deny: ["**.denied.test"]``, a
CONNECT to the denied host's address, or to an unlisted alias of it, is let through as
``would_block``; the TLS SNI (or the Host header) then names ``x.denied.test`` and the
server routes the connection to the denied site. Every name the client supplies (SNI,
Host, an absolute-form URI, in plain HTTP, in a plain-bytes tunnel and inside inspected
tunnels) is checked against the deny rules: ``denylisted``, refused in every mode.

Real ``egress-guard run`` processes, real loopback upstreams that record what reached
them (a denied name must never reach one), real clients.
"""

from __future__ import annotations

import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from support.adv_wire import client_hello
from support.clients import connect, read_response, send_raw, tls_through
from support.policies import make_policy
from support.proxy import ProxyFactory, ProxyProcess, guard_ca
from support.upstream import Upstream

P = pytest.param

#: SNI / Host spellings that name a host ``**.denied.test`` denies
DENIED_NAMES = [
    P("x.denied.test", id="subdomain"),
    P("denied.test", id="apex"),
    P("X.DENIED.TEST", id="upper"),
    P("x.denied.test.", id="trailing-dot"),
    P("deep.x.denied.test", id="deeper"),
]


def _deny_records(p: ProxyProcess, count: int = 1) -> list[dict[str, object]]:
    return p.wait_audit(lambda r: r["reason"] == "denylisted", count=count)


@pytest.fixture
def audit_guard(
    proxy: ProxyFactory, tls_upstream: Upstream, http_upstream: Upstream
) -> ProxyProcess:
    return proxy(make_policy(tls_upstream.port, http_upstream.port, mode="audit"))


@pytest.mark.parametrize("target", ["127.0.0.1", "other.test"], ids=["by-address", "by-alias"])
@pytest.mark.parametrize("sni", DENIED_NAMES)
def test_sni_naming_a_denied_host_is_refused_in_audit_mode(
    audit_guard: ProxyProcess, tls_upstream: Upstream, target: str, sni: str
) -> None:
    sock, resp = connect(audit_guard.port, f"{target}:{tls_upstream.port}")
    assert resp.status == 200  # audit mode lets the unlisted target through ...
    assert not tls_through(sock, sni)  # ... but not to a denied name
    recs = _deny_records(audit_guard)
    assert (
        recs
        and recs[0]["decision"] == "block"
        and str(recs[0]["sni"]).lower().rstrip(".") == sni.lower().rstrip(".")
    )
    assert tls_upstream.seen.snis == [] and tls_upstream.seen.requests == []


def test_sni_denied_in_enforce_mode_is_denylisted_not_only_a_mismatch(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    assert not tls_through(sock, "x.denied.test")
    assert _deny_records(p)
    assert tls_upstream.seen.snis == []


@pytest.mark.parametrize(
    "sni",
    [
        P(b"x.denied.test..", id="double-trailing-dot"),
        P(b"x.denied.test\x00.other.test", id="nul"),
        P(b"x..denied.test", id="empty-label"),
    ],
)
def test_unreadable_sni_is_refused_in_audit_mode(
    audit_guard: ProxyProcess, tls_upstream: Upstream, sni: bytes
) -> None:
    """A name the guard cannot read cannot be shown not to be denied (a lenient server
    may read it as the denied name): audit mode does not lift that refusal."""
    sock, resp = connect(audit_guard.port, f"other.test:{tls_upstream.port}")
    assert resp.status == 200
    sock.sendall(client_hello(sni))
    sock.settimeout(5)
    try:
        got = sock.recv(100)
    except OSError:
        got = b""
    sock.close()
    assert got == b""  # closed, no ServerHello
    recs = audit_guard.wait_audit(lambda r: r["method"] is None and r["decision"] == "block")
    assert recs and recs[0]["reason"] in ("denylisted", "sni_mismatch")
    assert tls_upstream.seen.snis == []


def test_two_sni_names_are_refused_in_audit_mode(
    audit_guard: ProxyProcess, tls_upstream: Upstream
) -> None:
    sock, resp = connect(audit_guard.port, f"other.test:{tls_upstream.port}")
    assert resp.status == 200
    sock.sendall(client_hello("other.test", extra_sni=b"x.denied.test"))
    sock.settimeout(5)
    try:
        got = sock.recv(100)
    except OSError:
        got = b""
    sock.close()
    assert got == b""
    assert audit_guard.wait_audit(lambda r: r["method"] is None and r["decision"] == "block")
    assert tls_upstream.seen.snis == []


# -- plain HTTP through the proxy ------------------------------------------------------------


@pytest.mark.parametrize("target", ["127.0.0.1", "other.test"], ids=["by-address", "by-alias"])
@pytest.mark.parametrize(
    "host",
    [
        P("x.denied.test", id="name"),
        P("x.denied.test:{port}", id="name-port"),
        P("X.Denied.Test.", id="spelling"),
        P("x.denied.test..", id="unreadable-double-dot"),
    ],
)
def test_plain_http_host_header_naming_a_denied_host_is_refused_in_audit_mode(
    audit_guard: ProxyProcess, http_upstream: Upstream, target: str, host: str
) -> None:
    port = http_upstream.port
    _, resp = send_raw(
        audit_guard.port,
        f"GET http://{target}:{port}/reached HTTP/1.1\r\nHost: {host.format(port=port)}\r\n\r\n".encode(),
    )
    assert resp.status == 403
    assert resp.headers["x-egress-guard-reason"] in ("denylisted", "host_header_mismatch")
    assert http_upstream.seen.requests == []


def test_second_host_header_naming_a_denied_host_is_refused_in_audit_mode(
    audit_guard: ProxyProcess, http_upstream: Upstream
) -> None:
    port = http_upstream.port
    _, resp = send_raw(
        audit_guard.port,
        f"GET http://other.test:{port}/reached HTTP/1.1\r\nHost: other.test:{port}\r\n".encode()
        + b"Host: x.denied.test\r\n\r\n",
    )
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "denylisted"
    assert http_upstream.seen.requests == []


# -- plain HTTP inside a tunnel (no --inspect) ------------------------------------------------


def _tunnel_requests(
    p: ProxyProcess, target: str, *requests: bytes, timeout: float = 10.0
) -> list[int]:
    sock, resp = connect(p.port, target)
    assert resp.status == 200
    statuses = []
    for req in requests:
        try:
            sock.sendall(req)
            statuses.append(read_response(sock, timeout).status)
        except (OSError, ValueError):
            statuses.append(0)
            break
    sock.close()
    return statuses


@pytest.mark.parametrize("target", ["127.0.0.1", "other.test"], ids=["by-address", "by-alias"])
@pytest.mark.parametrize("lead", [P(b"", id="plain"), P(b"\r\n", id="leading-empty-line")])
def test_plain_http_in_an_audited_tunnel_naming_a_denied_host_is_refused(
    audit_guard: ProxyProcess, http_upstream: Upstream, target: str, lead: bytes
) -> None:
    # After a leading empty line mitmproxy's HTTP/1 reader takes the line as an empty
    # head and waits for more bytes before it reads the request: no answer (0), and
    # nothing forwarded. A forward would reach the upstream well within 3 s on loopback.
    statuses = _tunnel_requests(
        audit_guard,
        f"{target}:{http_upstream.port}",
        lead + b"GET /reached HTTP/1.1\r\nHost: x.denied.test\r\n\r\n",
        timeout=3.0 if lead else 10.0,
    )
    assert statuses == ([0] if lead else [403])
    assert http_upstream.seen.requests == []
    if not lead:
        assert _deny_records(audit_guard)


def test_keep_alive_request_naming_a_denied_host_in_an_audited_tunnel_is_refused(
    audit_guard: ProxyProcess, http_upstream: Upstream
) -> None:
    """Not only the tunnel's first request: every one is read and checked."""
    port = http_upstream.port
    statuses = _tunnel_requests(
        audit_guard,
        f"other.test:{port}",
        f"GET /first HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n".encode(),
        b"GET /reached HTTP/1.1\r\nHost: x.denied.test\r\n\r\n",
    )
    assert statuses == [200, 403]
    assert [q[1] for q in http_upstream.seen.requests] == ["/first"]


def test_split_request_line_in_an_audited_tunnel_is_still_read(
    audit_guard: ProxyProcess, http_upstream: Upstream
) -> None:
    """The first bytes may stop inside the method: the guard waits for the rest."""
    sock, resp = connect(audit_guard.port, f"other.test:{http_upstream.port}")
    assert resp.status == 200
    sock.sendall(b"GE")
    time.sleep(0.3)
    sock.sendall(b"T /reached HTTP/1.1\r\nHost: x.denied.test\r\n\r\n")
    try:
        status = read_response(sock).status
    except (OSError, ValueError):
        status = 0
    sock.close()
    assert status in (403, 0)
    assert http_upstream.seen.requests == []


def test_non_http_bytes_in_an_audited_tunnel_are_still_relayed(
    audit_guard: ProxyProcess, http_upstream: Upstream
) -> None:
    """Reading plain HTTP does not stop other plain protocols in audit mode."""
    sock, resp = connect(audit_guard.port, f"other.test:{http_upstream.port}")
    assert resp.status == 200
    sock.sendall(b"\x00\x01binary protocol\r\n\r\n")
    sock.settimeout(5)
    try:
        got = sock.recv(100)
    except OSError:
        got = b""
    sock.close()
    assert got  # the upstream's answer to the garbage: it was reached


# -- inside inspected tunnels ------------------------------------------------------------------

RULES = "    methods: [GET, POST]\n    paths: ['/*']\n"


def _inspect_policy(port: int, mode: str) -> str:
    return make_policy(port, mode=mode).replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n{RULES}  - name: private-api",
        1,
    )


@pytest.mark.parametrize("mode", ["audit", "enforce"])
@pytest.mark.parametrize("host", ["x.denied.test", "x.denied.test:443"], ids=["name", "port"])
def test_host_naming_a_denied_host_inside_an_inspected_tunnel_is_refused(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, mode: str, host: str
) -> None:
    p = proxy(_inspect_policy(tls_upstream.port, mode), "--inspect", "--upstream-ca", str(ca_file))
    with httpx.Client(proxy=p.url, verify=guard_ca(p), trust_env=False, timeout=20) as c:
        r = c.get(f"https://api.test:{tls_upstream.port}/reached", headers={"host": host})
    assert r.status_code == 403 and r.headers["x-egress-guard-reason"] == "denylisted"
    assert tls_upstream.seen.requests == []


def _h2_get(p: ProxyProcess, port: int, headers: list[tuple[str, str]]) -> dict[bytes, bytes]:
    """One HTTP/2 request through an inspected tunnel; the response headers ({} when the
    stream or connection was refused without one)."""
    sock, resp = connect(p.port, f"api.test:{port}")
    assert resp.status == 200
    ctx = guard_ca(p)
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(sock, server_hostname="api.test")
    assert tls.selected_alpn_protocol() == "h2"
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    c.initiate_connection()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "GET"), (":scheme", "https"), *headers], end_stream=True)
    tls.sendall(c.data_to_send())
    tls.settimeout(5)
    got: dict[bytes, bytes] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            data = tls.recv(65536)
        except (TimeoutError, OSError):
            break
        if not data:
            break
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                got = dict(ev.headers)  # type: ignore[arg-type]
            if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                deadline = 0
    tls.close()
    return got


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_h2_authority_naming_a_denied_host_inside_an_inspected_tunnel_is_refused(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, mode: str
) -> None:
    p = proxy(_inspect_policy(tls_upstream.port, mode), "--inspect", "--upstream-ca", str(ca_file))
    got = _h2_get(p, tls_upstream.port, [(":authority", "x.denied.test"), (":path", "/reached")])
    assert got[b":status"] == b"403" and got[b"x-egress-guard-reason"] == b"denylisted"
    assert tls_upstream.seen.requests == []


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_h2_host_header_beside_authority_naming_a_denied_host_is_refused(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, mode: str
) -> None:
    """HTTP/2 with both :authority (the tunnel's) and a Host header naming a denied host:
    a server may route by either."""
    p = proxy(_inspect_policy(tls_upstream.port, mode), "--inspect", "--upstream-ca", str(ca_file))
    authority = f"api.test:{tls_upstream.port}"
    got = _h2_get(
        p,
        tls_upstream.port,
        [(":authority", authority), (":path", "/reached"), ("host", "x.denied.test")],
    )
    assert got.get(b":status") in (b"403", None)
    assert tls_upstream.seen.requests == []


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_absolute_uri_naming_a_denied_host_inside_an_inspected_tunnel_is_refused(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, mode: str
) -> None:
    p = proxy(_inspect_policy(tls_upstream.port, mode), "--inspect", "--upstream-ca", str(ca_file))
    target = f"api.test:{tls_upstream.port}"
    sock, resp = connect(p.port, target)
    assert resp.status == 200
    tls = guard_ca(p).wrap_socket(sock, server_hostname="api.test")
    tls.sendall(f"GET https://x.denied.test/reached HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    r = read_response(tls)  # type: ignore[arg-type]
    tls.close()
    assert r.status == 403 and r.headers["x-egress-guard-reason"] == "denylisted"
    assert tls_upstream.seen.requests == []
