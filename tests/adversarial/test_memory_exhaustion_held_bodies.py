"""Memory exhaustion through held model-call bodies (issue 17, item 5).

A destination with ``models`` makes the guard hold a model call's whole body to read its
model. ``--max-model-body`` bounds one body; before ``--max-held-bodies`` nothing bounded
many: an outside review grew the proxy by ~470 MB with eight connections holding 48 MiB
bodies open, and by ~290 MB with six streams on one HTTP/2 connection. These tests attack
a real ``egress-guard run`` the same way (declared bodies sent all but their last byte,
then held), from several client addresses (127.0.0.x) and over one HTTP/2 connection,
and check that

* the proxy's resident memory grows by no more than the budget and a margin,
* what does not fit is answered ``503`` with an ``buffer_budget`` record, in audit mode
  too (a refusal for capacity is no policy verdict to lift),
* every way a held body ends (forwarded, refused, client gone, HTTP/2 stream reset) gives
  its bytes back: the held-body gauge returns to 0 and a normal call passes again.
"""

from __future__ import annotations

import json
import re
import select
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from support.clients import read_response
from support.policies import make_policy
from support.ports import free_port
from support.proxy import ProxyFactory, ProxyProcess, guard_ca
from support.upstream import Upstream

MiB = 1024 * 1024
#: what the proxy may grow by beyond the bodies the budget admits: mitmproxy's per
#: connection state, socket buffers, the allocator's slack, one body's copy
MARGIN = 48 * MiB
#: what may stay resident once every held body is gone
RETURNED = 16 * MiB

RULES = """\
    methods: [GET, POST]
    paths: ["/v1/*"]
    models: [good-model]
"""


def model_policy(port: int, mode: str = "enforce") -> str:
    text = make_policy(port, mode=mode)
    return text.replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n{RULES}  - name: private-api",
        1,
    )


def model_body(size: int, model: str = "good-model") -> bytes:
    """A JSON model call of exactly ``size`` bytes."""
    head, tail = b'{"model": "' + model.encode() + b'", "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


class Guard:
    """A running guard with its metrics endpoint."""

    def __init__(self, p: ProxyProcess, metrics_port: int) -> None:
        self.p = p
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def series(self, name: str) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            text = r.read().decode()
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        assert m is not None, f"{name} not exported"
        return float(m.group(1))

    def held(self) -> float:
        return self.series("egress_guard_held_body_bytes")

    def wait_held(self, pred: Callable[[float], bool], timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.held()
            if pred(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (the peak), in bytes."""
        assert self.p.proc is not None
        out = {}
        for line in Path(f"/proc/{self.p.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def wait_rss(self, pred: Callable[[int], bool], timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            rss = self.memory()["VmRSS"]
            if pred(rss) or time.monotonic() > deadline:
                return rss
            time.sleep(0.2)

    def settled_rss(self, timeout: float = 15.0) -> int:
        """RSS once it has stopped growing (the proxy has read what clients sent)."""
        deadline = time.monotonic() + timeout
        last = self.memory()["VmRSS"]
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.memory()["VmRSS"]
            if abs(now - last) < MiB:
                return now
            last = now
        return last


def start_guard(proxy: ProxyFactory, policy: str, *args: str, held: int, max_body: int) -> Guard:
    metrics_port = free_port()
    p = proxy(
        policy,
        "--max-held-bodies",
        str(held),
        "--max-model-body",
        str(max_body),
        "--metrics",
        f"127.0.0.1:{metrics_port}",
        *args,
    )
    return Guard(p, metrics_port)


# -- HTTP/1 (plain HTTP to a destination with models) -------------------------------------


class Holder:
    """A client that sends a model call's head and all of its body but the last byte."""

    def __init__(
        self, g: Guard, upstream_port: int, source: str, size: int, model: str = "good-model"
    ) -> None:
        self.body = model_body(size, model)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((source, 0))
        self.sock.connect((g.p.host, g.p.port))
        head = (
            f"POST http://api.test:{upstream_port}/v1/chat/completions HTTP/1.1\r\n"
            f"Host: api.test:{upstream_port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + self.body[:-1])

    def answered(self, wait: float = 0.0) -> bool:
        return bool(select.select([self.sock], [], [], wait)[0])

    def finish(self) -> int:
        self.sock.sendall(self.body[-1:])
        return read_response(self.sock, timeout=30).status

    def close(self) -> None:
        self.sock.close()


def small_call(g: Guard, upstream_port: int) -> int:
    h = Holder(g, upstream_port, "127.0.0.1", 1000)
    try:
        return h.finish()
    finally:
        h.close()


def test_many_clients_holding_bodies_get_503_and_memory_stays_bounded(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """Twelve client addresses each hold a 15 MiB body; the budget (64 MiB) admits four.
    Before the budget all twelve were held (180 MiB and more) and nobody got an answer."""
    budget, size = 64 * MiB, 15 * MiB
    g = start_guard(proxy, model_policy(http_upstream.port), held=budget, max_body=16 * MiB)
    assert small_call(g, http_upstream.port) == 200  # warm: code paths, upstream connection
    base = g.settled_rss()
    holders = [Holder(g, http_upstream.port, f"127.0.0.{10 + i}", size) for i in range(12)]
    try:
        assert g.wait_held(lambda v: v == 4 * size) == 4 * size
        g.p.wait_audit(lambda r: r["reason"] == "buffer_budget", count=8)
        refused = [h for h in holders if h.answered(wait=0.5)]
        held = [h for h in holders if h not in refused]
        assert len(held) == 4, f"{len(held)} of 12 bodies held"
        g.settled_rss()
        peak = g.memory()["VmHWM"] - base
        assert peak < budget + MARGIN, f"the proxy grew by {peak / MiB:.0f} MiB"
        for h in refused:
            resp = read_response(h.sock, timeout=10, more=True)
            assert resp.status == 503
            assert resp.headers["x-egress-guard-reason"] == "buffer_budget"
            assert resp.headers["retry-after"].isdigit()
        recs = g.p.wait_audit(lambda r: r["reason"] == "buffer_budget", count=8)
        assert len(recs) == 8 and {r["decision"] for r in recs} == {"block"}
        assert all("--max-held-bodies" in r["detail"] for r in recs)
        # the held ones complete: checked, forwarded, and their bytes given back
        assert [h.finish() for h in held] == [200] * 4
        assert len([b for b in http_upstream.seen.bodies if len(b) == size]) == 4
        assert g.wait_held(lambda v: v == 0) == 0
        assert g.series("egress_guard_held_body_refusals_total") == 8
    finally:
        for h in holders:
            h.close()
    assert small_call(g, http_upstream.port) == 200
    # and the memory goes back to the system (glibc kept freed bodies resident)
    after = g.wait_rss(lambda rss: rss - base < RETURNED) - base
    print(f"\nheld-body attack: peak growth {peak / MiB:.0f} MiB, after {after / MiB:.0f} MiB")
    assert after < RETURNED, f"{after / MiB:.0f} MiB still resident after the bodies left"


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_one_client_gets_a_quarter_and_every_ending_gives_it_back(
    proxy: ProxyFactory, http_upstream: Upstream, mode: str
) -> None:
    """One address, many connections: its share (a quarter of 64 MiB) holds one 10 MiB
    body, not two; audit mode refuses too. A body whose client leaves mid-way, one
    refused for its model, and one forwarded each give their bytes back."""
    size = 10 * MiB
    g = start_guard(proxy, model_policy(http_upstream.port, mode), held=64 * MiB, max_body=10 * MiB)
    first = Holder(g, http_upstream.port, "127.0.0.5", size)
    assert g.wait_held(lambda v: v == size) == size
    others = [Holder(g, http_upstream.port, "127.0.0.5", size) for _ in range(3)]
    try:
        for h in others:
            assert h.answered(wait=5.0)
            resp = read_response(h.sock, more=True)
            assert (resp.status, resp.headers["x-egress-guard-reason"]) == (503, "buffer_budget")
        recs = g.p.wait_audit(lambda r: r["reason"] == "buffer_budget", count=3)
        assert {r["decision"] for r in recs} == {"block"}  # never lifted by audit mode
        assert all("share of 16777216" in r["detail"] for r in recs)
        assert not first.answered()
        first.close()  # the client leaves mid-body
        assert g.wait_held(lambda v: v == 0) == 0
        # the share is free again: a body refused for its model gives it back too
        bad = Holder(g, http_upstream.port, "127.0.0.5", size, model="evil-model")
        assert g.wait_held(lambda v: v == size) == size
        assert bad.finish() == (403 if mode == "enforce" else 200)
        bad.close()
        assert g.wait_held(lambda v: v == 0) == 0
        again = Holder(g, http_upstream.port, "127.0.0.5", size)
        assert again.finish() == 200
        again.close()
        assert g.wait_held(lambda v: v == 0) == 0
    finally:
        first.close()
        for h in others:
            h.close()


# -- HTTP/2 (inspected tunnel, several streams on one connection) -------------------------


class H2Client:
    """One HTTP/2 connection through a CONNECT tunnel, driven frame by frame."""

    def __init__(self, g: Guard, port: int) -> None:
        self.authority = f"api.test:{port}"
        raw = socket.create_connection((g.p.host, g.p.port), timeout=30)
        raw.sendall(f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode())
        assert read_response(raw).status == 200
        self.sock = guard_ca(g.p, ["h2"]).wrap_socket(raw, server_hostname="api.test")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()
        self.responses: dict[int, dict[str, str]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self, timeout: float) -> None:
        """Read what the proxy sent within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            raise ConnectionError("proxy closed the HTTP/2 connection")
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                self.responses[ev.stream_id] = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h2.events.DataReceived):
                self.bodies[ev.stream_id] = self.bodies.get(ev.stream_id, b"") + ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended.add(ev.stream_id)
        self.flush()

    def post(self, body: bytes, *, send: int | None = None, end: bool = True) -> int:
        """Open a model call declaring ``len(body)`` and send ``send`` bytes of it."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", self.authority),
                (":path", "/v1/chat/completions"),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ],
        )
        self.flush()
        self.send(sid, body[: len(body) if send is None else send], end=end)
        return sid

    def send(self, sid: int, data: bytes, *, end: bool = False) -> None:
        view = memoryview(data)
        while view:
            if sid in self.ended and self.conn.streams[sid].closed:
                return
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self.pump(1.0)
                continue
            self.conn.send_data(sid, view[:window].tobytes())
            view = view[window:]
            self.flush()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    def wait(self, pred: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred() and time.monotonic() < deadline:
            self.pump(0.2)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def h2_client(g: Guard, port: int) -> Iterator[H2Client]:
    c = H2Client(g, port)
    try:
        yield c
    finally:
        c.close()


def test_http2_streams_on_one_connection_cannot_hold_more_than_the_budget(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """Six streams, each declaring a 30 MiB body sent but for its last byte, held open on
    one HTTP/2 connection: one is held (the client's share), five are answered 503 at
    their headers and their bodies are dropped, not held (mitmproxy opens HTTP/2 windows
    to 2 GiB, so nothing else holds the client back). A reset stream gives its bytes back
    while the connection stays open."""
    budget, size = 32 * MiB, 30 * MiB
    g = start_guard(
        proxy,
        model_policy(tls_upstream.port),
        "--inspect",
        "--upstream-ca",
        str(ca_file),
        held=budget,
        max_body=30 * MiB,
    )
    with h2_client(g, tls_upstream.port) as c:
        warm = c.post(model_body(1000))
        c.wait(lambda: warm in c.ended)
        assert c.responses[warm][":status"] == "200"
        base = g.settled_rss()
        body = model_body(size)
        sids = [c.post(body, send=size - 1, end=False) for _ in range(6)]
        c.wait(lambda: sum(s in c.ended for s in sids) >= 5)
        answered = [s for s in sids if s in c.responses]
        assert len(answered) == 5, f"{len(answered)} of 6 streams answered"
        for s in answered:
            assert c.responses[s][":status"] == "503"
            assert c.responses[s]["x-egress-guard-reason"] == "buffer_budget"
            assert json.loads(c.bodies[s])["error"]["code"] == "buffer_budget"
        (kept,) = [s for s in sids if s not in answered]
        assert g.wait_held(lambda v: v == size) == size
        g.settled_rss()
        peak = g.memory()["VmHWM"] - base
        assert peak < budget + MARGIN, f"the proxy grew by {peak / MiB:.0f} MiB"
        recs = g.p.wait_audit(lambda r: r["reason"] == "buffer_budget", count=5)
        assert len(recs) == 5
        # RST_STREAM on the held stream: its bytes come back, the connection stays
        c.conn.reset_stream(kept)
        c.flush()
        assert g.wait_held(lambda v: v == 0) == 0
        after = c.post(model_body(5 * MiB))
        c.wait(lambda: after in c.ended)
        assert c.responses[after][":status"] == "200"
        assert g.wait_held(lambda v: v == 0) == 0
        after = g.wait_rss(lambda rss: rss - base < RETURNED) - base
    assert len([b for b in tls_upstream.seen.bodies if len(b) == 5 * MiB]) == 1
    print(f"\nHTTP/2 held-body attack: peak growth {peak / MiB:.0f} MiB, after {after / MiB:.0f}")
    assert after < RETURNED, f"{after / MiB:.0f} MiB still resident after the bodies left"


@pytest.mark.parametrize("declared", ["1000", "00001000", "\u0661\u0660\u0660\u0660"])
def test_http2_body_longer_than_declared_is_not_held(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, declared: str
) -> None:
    """The budget reserves the declared length: a stream that sends more than it declared
    (or declares it in digits other than ASCII ones) must not be held past it. HTTP/2
    ends such a connection; nothing stays reserved."""
    g = start_guard(
        proxy,
        model_policy(tls_upstream.port),
        "--inspect",
        "--upstream-ca",
        str(ca_file),
        held=32 * MiB,
        max_body=30 * MiB,
    )
    base = g.settled_rss()
    with h2_client(g, tls_upstream.port) as c:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", c.authority),
                (":path", "/v1/chat/completions"),
                ("content-length", declared),
            ],
        )
        c.flush()
        c.conn.streams[sid]._expected_content_length = None  # lie past our own h2's check
        with pytest.raises((OSError, h2.exceptions.H2Error)):
            for _ in range(640):  # 10 MiB
                c.conn.send_data(sid, b"x" * 16384)
                c.flush()
            c.wait(lambda: False, timeout=5)
    assert g.wait_held(lambda v: v == 0) == 0
    assert g.settled_rss() - base < 8 * MiB
    assert tls_upstream.seen.bodies == []
