"""The held-body budget held by bodies that do not come: heads alone, trickles.

The budget (``--max-held-bodies``) reserves a model call's declared length when its head
is decided. A client that then sends nothing, or a few bytes a second, keeps that
reservation for as long as its connection stays open, and from several addresses it
kept the whole budget from everyone (test_held_body_budget_taken_by_headers_alone.py).
The guard now counts the bytes each held body actually receives, and when a body does
not fit, the held bodies older than the grace period (2 s) that arrived slower than
``--held-body-min-rate`` (64 KiB/s) are evicted: their connection is closed, their
reservation released and a ``buffer_budget`` record written. These tests attack a real
``egress-guard run``: trickles over HTTP/1 from four addresses (enforce and audit mode),
heads alone over HTTP/2; an honest upload that is slow but above the floor must never
be evicted, and ``--held-body-min-rate 0`` turns eviction off.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from adversarial.test_memory_exhaustion_held_bodies import (
    Guard,
    Holder,
    MiB,
    h2_client,
    model_body,
    model_policy,
    small_call,
    start_guard,
)
from support.clients import read_response
from support.proxy import ProxyFactory
from support.upstream import Upstream

STALLED = "held body stalled"


def head(upstream_port: int, declared: int) -> bytes:
    return (
        f"POST http://api.test:{upstream_port}/v1/chat/completions HTTP/1.1\r\n"
        f"Host: api.test:{upstream_port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()


class Sender:
    """A model call from ``source`` declaring ``len(body)`` bytes, sent ``chunk`` bytes
    every ``every`` seconds by a thread (until the body is out or the proxy closes)."""

    def __init__(
        self,
        g: Guard,
        upstream_port: int,
        source: str,
        body: bytes,
        chunk: int,
        every: float,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((source, 0))
        self.sock.connect((g.p.host, g.p.port))
        self.sock.sendall(head(upstream_port, len(body)))
        self.body, self.chunk, self.every = body, chunk, every
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while self.sent < len(self.body) and not self.stop.wait(self.every):
                self.sock.sendall(self.body[self.sent : self.sent + self.chunk])
                self.sent += self.chunk
        except OSError:
            pass

    def closed_by_proxy(self, timeout: float = 5.0) -> bool:
        """The proxy closed the connection (EOF or reset), sending no answer."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_trickling_holders_are_evicted_for_an_honest_call(
    proxy: ProxyFactory, http_upstream: Upstream, mode: str
) -> None:
    """Four addresses each declare 16 MiB (the whole 64 MiB budget) and trickle 4 KiB/s
    of it. Past the grace period an honest call evicts them: it passes, each trickler's
    connection is closed, each eviction is recorded, and the budget goes back to 0."""
    g = start_guard(proxy, model_policy(http_upstream.port, mode), held=64 * MiB, max_body=16 * MiB)
    body = model_body(16 * MiB)
    tricklers = [
        Sender(g, http_upstream.port, f"127.0.0.{40 + i}", body, 1024, 0.25) for i in range(4)
    ]
    try:
        assert g.wait_held(lambda v: v == 64 * MiB, timeout=5) == 64 * MiB
        time.sleep(2.5)  # the grace period
        assert small_call(g, http_upstream.port) == 200
        assert all(t.closed_by_proxy() for t in tricklers)
        recs = g.p.wait_audit(lambda r: STALLED in (r.get("detail") or ""), count=4)
        assert len(recs) == 4
        for r in recs:
            assert (r["decision"], r["reason"]) == ("block", "buffer_budget")
            assert r["client"] in {f"127.0.0.{40 + i}" for i in range(4)}
            assert r["method"] == "POST" and r["path"] == "/v1/chat/completions"
            assert "of 16777216 bytes after" in r["detail"]
            assert "evicted for another request" in r["detail"]
        assert g.wait_held(lambda v: v == 0) == 0
        assert g.series("egress_guard_held_body_evictions_total") == 4
        assert g.series("egress_guard_held_body_refusals_total") == 0
        assert not [b for b in http_upstream.seen.bodies if len(b) == 16 * MiB]
    finally:
        for t in tricklers:
            t.close()
    assert small_call(g, http_upstream.port) == 200


def test_a_slow_but_real_upload_is_not_evicted(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """A 2 MiB body arriving at 256 KiB/s (four times the floor) and one held whole
    fill a 4 MiB budget. A third call does not fit and is refused: neither holder is
    stalled, so neither is evicted, and the slow upload completes."""
    g = start_guard(proxy, model_policy(http_upstream.port), held=4 * MiB, max_body=2 * MiB)
    body = model_body(2 * MiB)
    slow = Sender(g, http_upstream.port, "127.0.0.50", body, 32 * 1024, 0.125)
    full = Holder(g, http_upstream.port, "127.0.0.51", 2 * MiB)
    try:
        assert g.wait_held(lambda v: v == 4 * MiB, timeout=5) == 4 * MiB
        time.sleep(3)  # past the grace period, the slow body well under way
        assert slow.sent < len(body), "the slow upload finished too early to be tested"
        assert small_call(g, http_upstream.port) == 503
        rec = g.p.wait_audit(lambda r: r["reason"] == "buffer_budget")[0]
        assert "--max-held-bodies" in rec["detail"]
        slow.thread.join(timeout=30)
        assert read_response(slow.sock, timeout=30).status == 200
        assert full.finish() == 200
        assert not [r for r in g.p.audit("decision") if STALLED in (r.get("detail") or "")]
        assert g.series("egress_guard_held_body_evictions_total") == 0
        assert g.wait_held(lambda v: v == 0) == 0
    finally:
        slow.close()
        full.close()


def test_eviction_off_keeps_the_old_refusal(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    """``--held-body-min-rate 0``: heads alone hold the budget, as before (an operator's
    choice), and the honest call is refused."""
    g = start_guard(
        proxy,
        model_policy(http_upstream.port),
        "--held-body-min-rate",
        "0",
        held=16 * MiB,
        max_body=16 * MiB,
    )
    s = Sender(g, http_upstream.port, "127.0.0.60", model_body(16 * MiB), 0, 60.0)
    try:
        assert g.wait_held(lambda v: v == 16 * MiB, timeout=5) == 16 * MiB
        time.sleep(2.5)
        assert small_call(g, http_upstream.port) == 503
        assert not s.closed_by_proxy(timeout=0.5)
    finally:
        s.close()
    assert g.wait_held(lambda v: v == 0) == 0


def test_a_fresh_head_is_not_evicted(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    """Within the grace period a head alone keeps its reservation: its body may not have
    started yet. Only once it is older than the grace period does it give way."""
    g = start_guard(proxy, model_policy(http_upstream.port), held=16 * MiB, max_body=16 * MiB)
    s = Sender(g, http_upstream.port, "127.0.0.61", model_body(16 * MiB), 0, 60.0)
    try:
        assert g.wait_held(lambda v: v == 16 * MiB, timeout=5) == 16 * MiB
        assert small_call(g, http_upstream.port) == 503
        assert not s.closed_by_proxy(timeout=0.1)
        time.sleep(2.5)
        assert small_call(g, http_upstream.port) == 200
        assert s.closed_by_proxy()
    finally:
        s.close()
    assert g.wait_held(lambda v: v == 0) == 0


def test_http2_streams_of_heads_alone_are_evicted(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """An HTTP/2 connection opens a stream declaring its client's whole share (16 MiB)
    and sends no DATA. Past the grace period a call of the same address on another
    connection evicts it: the stalled connection is closed, the call passes."""
    g = start_guard(
        proxy,
        model_policy(tls_upstream.port),
        "--inspect",
        "--upstream-ca",
        str(ca_file),
        held=32 * MiB,
        max_body=16 * MiB,
    )
    with h2_client(g, tls_upstream.port) as attacker, h2_client(g, tls_upstream.port) as honest:
        sid = attacker.post(model_body(16 * MiB), send=0, end=False)
        assert g.wait_held(lambda v: v == 16 * MiB, timeout=5) == 16 * MiB
        time.sleep(2.5)
        call = honest.post(model_body(1000))
        honest.wait(lambda: call in honest.ended)
        assert honest.responses[call][":status"] == "200"
        with pytest.raises(ConnectionError):
            attacker.wait(lambda: False, timeout=5)
        assert sid not in attacker.responses
        rec = g.p.wait_audit(lambda r: STALLED in (r.get("detail") or ""))[0]
        assert rec["reason"] == "buffer_budget" and "0 of 16777216 bytes" in rec["detail"]
        assert g.wait_held(lambda v: v == 0) == 0
