"""SNI fronting: a tunnel to an allowed name whose TLS ClientHello names another host.

The guard reads the ClientHello before the upstream is contacted and refuses a name that
disagrees with the CONNECT target, however the hello is cut into packets; a hello it
cannot read is refused too. Each refusal is in the audit log, and the upstream sees nothing.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from support.adv_lab import Lab, wait_for
from support.adv_wire import TLSTunnel, exchange
from support.clients import connect, openssl_s_client
from support.policies import make_policy
from support.proxy import ProxyFactory, ProxyProcess
from support.upstream import Upstream


def test_sni_mismatch_is_refused_before_upstream(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    out = openssl_s_client(p.port, f"api.test:{tls_upstream.port}", "other.test", ca_file, send=b"")
    assert b"BEGIN CERTIFICATE" not in out.stdout and b"no peer certificate" in out.stdout
    assert tls_upstream.seen.connections == 0
    recs = p.wait_audit(lambda r: r["reason"] == "sni_mismatch")
    assert recs and recs[0]["decision"] == "block" and recs[0]["sni"] == "other.test"


def test_unreadable_client_hello_is_refused(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    """A TLS record that is not a ClientHello cannot have its SNI checked: refused."""
    p = proxy(make_policy(tls_upstream.port))
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    sock.sendall(
        b"\x16\x03\x01\x00\x08\x02\x00\x00\x04\x03\x03\x00\x00"
    )  # a ServerHello, not a ClientHello
    sock.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(100) == b""
    sock.close()
    assert tls_upstream.seen.connections == 0
    recs = p.wait_audit(lambda r: r["reason"] == "sni_mismatch")
    assert recs and "ClientHello" in recs[0]["detail"]


def test_domain_fronting_with_a_one_byte_first_chunk(lab: Lab, bypass_guard: ProxyProcess) -> None:
    """A real TLS client: CONNECT front.test, SNI other.test, first byte sent alone. The
    upstream must never see the other name (it does: full handshake, then a GET)."""
    pa = lab.ports["PA"]
    before = list(lab.front_tls.seen.snis)
    sock, out = exchange(
        bypass_guard.port, f"CONNECT front.test:{pa} HTTP/1.1\r\n\r\n".encode(), src="127.67.0.1"
    )
    assert sock is not None and out.status == 200
    try:
        t = TLSTunnel(sock, "other.test")
        t.handshake(first_chunks=(1,), pause=0.3)
        t.request(b"GET /fronted HTTP/1.1\r\nHost: other.test\r\n\r\n")
    except OSError:
        pass  # refused: what should happen
    finally:
        sock.close()
    time.sleep(0.3)
    assert "other.test" not in lab.front_tls.seen.snis[len(before) :]


def test_matching_sni_split_across_packets_still_works(
    lab: Lab, bypass_guard: ProxyProcess
) -> None:
    """The control for the split cases: a ClientHello cut into pieces with the right SNI
    is allowed, so the refusals of split hellos (here and in the bypass corpus) are about
    the name, not the cutting."""
    aa = lab.ports["AA"]
    sock, out = exchange(
        bypass_guard.port, f"CONNECT api.test:{aa} HTTP/1.1\r\n\r\n".encode(), src="127.67.0.2"
    )
    assert sock is not None and out.status == 200
    try:
        t = TLSTunnel(sock, "api.test", str(lab.ca_file))
        t.handshake(first_chunks=(5, 40), pause=0.2)
        r = t.request(b"GET /split-ok HTTP/1.1\r\nHost: api.test\r\n\r\n")
    finally:
        sock.close()
    assert r.status == 200


def test_split_hello_tunnel_bytes_are_counted(lab: Lab, bypass_guard: ProxyProcess) -> None:
    """A tunnel whose ClientHello arrives in pieces is still counted: the close record
    carries the bytes relayed each way (an audit trail with 0 bytes hides exfiltration)."""
    aa = lab.ports["AA"]
    src = "127.67.0.5"
    sock, out = exchange(
        bypass_guard.port, f"CONNECT api.test:{aa} HTTP/1.1\r\n\r\n".encode(), src=src
    )
    assert sock is not None and out.status == 200
    try:
        t = TLSTunnel(sock, "api.test", str(lab.ca_file))
        t.handshake(first_chunks=(5,), pause=0.2)
        r = t.request(b"GET /bytes/20000 HTTP/1.1\r\nHost: api.test\r\n\r\n")
    finally:
        sock.close()
    assert r.status == 200 and len(r.body) == 20000
    closes = wait_for(
        lambda: [c for c in bypass_guard.audit("close") if c.get("client") == src], timeout=5
    )
    assert closes, "no close record"
    assert closes[0]["bytes_down"] >= 20000 and closes[0]["bytes_up"] > 0, closes[0]
