"""Back-pressure while the proxy cannot forward: a client's bytes stay in the client's
own socket, not in the proxy's memory.

mitmproxy queues every chunk a client sends while its layer waits for the upstream
connection (TCP connect, then TLS in inspect mode) or for a hook (the guard's DNS
lookup), and keeps reading: a client could make the proxy hold gigabytes while a connect
or a lookup hangs. The guard stops reading such a client until what it waits for is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from support.adv_lab import wait_for
from support.adv_wire import client_hello
from support.clients import connect, read_response
from support.loops import LOOPS
from support.policies import make_policy
from support.procfs import proc_stats, tcp_ports
from support.proxy import ProxyFactory, guard_ca
from support.servers import LoopbackServer
from support.upstream import Upstream

MiB = 1 << 20


class StalledListener:
    """A loopback port whose accept queue is full: a new connection's SYN is dropped, so
    connecting to it hangs (the kernel retries for minutes) without any packet leaving
    loopback."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        while True:
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", self.port))
            self.fillers.append(s)
            if not self._connects(s):
                return  # the queue is full: this one (and every later one) hangs
            if len(self.fillers) > 16:
                raise RuntimeError("the accept queue never filled")

    @staticmethod
    def _connects(s: socket.socket) -> bool:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                try:
                    s.getpeername()
                    return True
                except OSError:
                    pass
            time.sleep(0.01)
        return False

    def release(self, serve: Callable[[socket.socket], None]) -> None:
        """Start accepting: the fillers are dropped, any other connection is served."""
        fillers = {s.getsockname()[1] for s in self.fillers}

        def accept() -> None:
            while True:
                try:
                    conn, peer = self.sock.accept()
                except OSError:
                    return
                if peer[1] in fillers:
                    conn.close()
                else:
                    threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


@pytest.fixture
def stalled() -> Iterator[StalledListener]:
    listener = StalledListener()
    yield listener
    listener.close()


def flood(sock: socket.socket, seconds: float, limit: int, chunk: bytes = b"\0" * MiB) -> int:
    """Send as much as the proxy accepts in ``seconds`` (at most ``limit`` bytes): copies
    of ``chunk`` back to back, a partly sent copy finished before the next begins (so a
    chunk that frames itself, like an HTTP/1 body chunk, stays well-formed)."""
    sock.setblocking(False)
    view = memoryview(chunk)
    sent = pos = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sent < limit:
        try:
            n = sock.send(view[pos:])
        except BlockingIOError:
            time.sleep(0.005)
            continue
        sent += n
        pos = (pos + n) % len(chunk)
    return sent


@LOOPS
def test_client_bytes_wait_in_the_socket_while_the_upstream_connect_hangs(
    proxy: ProxyFactory, stalled: StalledListener, loop: str
) -> None:
    p = proxy(make_policy(stalled.port), "--event-loop", loop)
    assert p.proc is not None
    pid = p.proc.pid
    sock, resp = connect(p.port, f"api.test:{stalled.port}")
    assert resp.status == 200
    sock.sendall(client_hello("api.test"))  # allowed: the guard opens the upstream
    # the proxy's connect to the stalled port is under way (a SYN_SENT socket)
    assert wait_for(lambda: any(r == stalled.port for _, r in tcp_ports(pid)), 5)
    rss_before = proc_stats(pid)["rss_kb"]
    sent = flood(sock, seconds=3, limit=512 * MiB)
    grown = proc_stats(pid)["rss_kb"] - rss_before
    sock.close()
    # socket buffers on both sides plus one read: a few MiB, not everything offered
    assert sent < 32 * MiB, f"the proxy took {sent / MiB:.0f} MiB while it could not forward"
    assert grown < 32 * 1024, f"the proxy grew by {grown / 1024:.0f} MiB"


def _digest_reply(conn: socket.socket) -> None:
    """Skip the ClientHello record, read a length-prefixed payload, answer its SHA-256."""
    with conn:
        f = conn.makefile("rb")
        header = f.read(5)
        f.read(int.from_bytes(header[3:5], "big"))
        left = int.from_bytes(f.read(8), "big")
        h = hashlib.sha256()
        while left and (chunk := f.read(min(left, MiB))):
            h.update(chunk)
            left -= len(chunk)
        conn.sendall(h.hexdigest().encode() + b"\n")


@LOOPS
def test_bytes_held_back_during_a_slow_connect_arrive_whole_and_in_order(
    proxy: ProxyFactory, stalled: StalledListener, loop: str
) -> None:
    """Holding the client back loses nothing: once the connect succeeds (the kernel's
    SYN retry after the listener starts accepting), every byte sent meanwhile arrives."""
    p = proxy(make_policy(stalled.port), "--event-loop", loop)
    sock, resp = connect(p.port, f"api.test:{stalled.port}")
    assert resp.status == 200
    payload = hashlib.sha256(b"seed").digest() * (24 * MiB // 32)
    sock.sendall(client_hello("api.test") + len(payload).to_bytes(8, "big"))
    sock.settimeout(1.5)
    sent = 0
    with contextlib.suppress(TimeoutError):  # the proxy holds back: the send blocks
        while sent < len(payload):
            sent += sock.send(payload[sent : sent + MiB])
    assert sent < len(payload)
    stalled.release(_digest_reply)
    sock.settimeout(20)
    sock.sendall(payload[sent:])
    answer = sock.makefile("rb").readline()
    sock.close()
    assert answer.decode().strip() == hashlib.sha256(payload).hexdigest()
    close = p.wait_audit(lambda r: True, event="close")
    assert close[0]["bytes_up"] == len(client_hello("api.test")) + 8 + len(payload)


class ResettingServer(LoopbackServer):
    """Accepts and resets at once: the proxy's connect succeeds, then the connection is
    gone, sometimes before mitmproxy reads the upstream's peername."""

    def handle(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


@LOOPS
def test_an_upstream_reset_during_connect_never_leaves_the_client_waiting(
    proxy: ProxyFactory, loop: str
) -> None:
    """mitmproxy asserts the upstream's peername; a reset between connect and
    getpeername left the client's tunnel waiting for good (1 to 15 of 200 tunnels, by
    event loop and run, before the fix). Every client now hears the tunnel end."""
    server = ResettingServer()
    try:
        p = proxy(make_policy(server.port), "--event-loop", loop)
        waiting, tunnels = 0, 200
        for _ in range(tunnels):
            sock, resp = connect(p.port, f"api.test:{server.port}")
            assert resp.status == 200
            sock.sendall(client_hello("api.test"))
            sock.settimeout(3)
            try:
                assert sock.recv(100) == b""  # nothing to relay: the tunnel just ends
            except TimeoutError:
                waiting += 1
            except ConnectionResetError:
                pass
            sock.close()
        assert waiting == 0, f"{waiting} of {tunnels} clients were left waiting"
        closes = p.wait_audit(lambda r: True, event="close", count=tunnels)
        assert len(closes) == tunnels  # and every tunnel is on the record
    finally:
        server.close()


SLOW_DNS = [sys.executable, str(Path(__file__).parent.parent / "support" / "slow_dns_run.py")]


def slow_name_policy(port: int) -> str:
    return f"""\
version: 1
mode: enforce
destinations:
  - name: slow-api
    purpose: a name whose DNS answer takes seconds
    hosts: [api.slow.test]
    ports: [{port}]
network:
  allow_cidrs: [127.0.0.1/32]
"""


def test_client_bytes_wait_while_the_guard_resolves_the_name(proxy: ProxyFactory) -> None:
    """The guard resolves a CONNECT's name in its http_connect hook; the layer waits for
    the hook, and so does the client (it sends on without waiting for the 200)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        p = proxy(slow_name_policy(port), launcher=SLOW_DNS, env={"EG_DNS_DELAY": "4"})
        sock = socket.create_connection(("127.0.0.1", p.port))
        sock.sendall(f"CONNECT api.slow.test:{port} HTTP/1.1\r\n\r\n".encode())
        sent = flood(sock, seconds=3, limit=512 * MiB)
        sock.close()
        assert sent < 32 * MiB, f"the proxy took {sent / MiB:.0f} MiB during a DNS lookup"
    finally:
        listener.close()


def paths_policy(port: int) -> str:
    """api.test with request rules (so inspect mode intercepts it) but no model list
    (so bodies stream rather than wait whole for a model check)."""
    rules = '    methods: [POST]\n    paths: ["/v1/*"]\n'
    return make_policy(port).replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n{rules}  - name: private-api",
        1,
    )


def test_client_bytes_wait_during_the_upstream_tls_handshake(
    proxy: ProxyFactory, ca_file: Path
) -> None:
    """Inspect mode: the upstream accepts TCP but never answers the proxy's ClientHello.
    The request's body waits in the client's socket, not in the proxy."""
    mute = socket.create_server(("127.0.0.1", 0))
    port = mute.getsockname()[1]
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(mute.accept()[0]), daemon=True).start()
    try:
        p = proxy(paths_policy(port), "--inspect", "--upstream-ca", str(ca_file))
        sock, resp = connect(p.port, f"api.test:{port}")
        assert resp.status == 200
        tls = guard_ca(p).wrap_socket(sock, server_hostname="api.test")
        size = 512 * MiB
        tls.sendall(
            f"POST /v1/upload HTTP/1.1\r\nHost: api.test:{port}\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        assert wait_for(lambda: held, 5)  # the proxy's upstream connection is open
        tls.settimeout(0.2)
        chunk, sent = b"\0" * MiB, 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError, ssl.SSLWantWriteError):
                sent += tls.send(chunk)
        tls.close()
        assert sent < 32 * MiB, f"the proxy took {sent / MiB:.0f} MiB during a TLS handshake"
    finally:
        for s in held:
            s.close()
        mute.close()


def test_http2_client_with_more_streams_than_connection_slots_is_not_held_back(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """An HTTP/2 client's streams each get an upstream HTTP/1 connection, five at most
    per address; the sixth stream's connect waits for a slot that only the others'
    finishing frees, and they need the client's next frames (their bodies) to finish.
    Holding a multiplexing client back while a connect is pending deadlocked this (the
    first version of the back-pressure did); every stream must complete."""
    p = proxy(paths_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    ctx = guard_ca(p)
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(sock, server_hostname="api.test")
    assert tls.selected_alpn_protocol() == "h2"
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    body = 256 * 1024
    left: dict[int, int] = {}
    for i in range(6):
        sid = c.get_next_available_stream_id()
        left[sid] = body
        c.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", f"api.test:{tls_upstream.port}"),
                (":path", f"/v1/s{i}"),
                ("content-length", str(body)),
            ],
        )
    tls.sendall(c.data_to_send())
    time.sleep(1)  # every stream's connect has started; the sixth waits for a slot
    status: dict[int, bytes] = {}
    done: set[int] = set()
    tls.settimeout(0.2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(done) < len(left):
        for sid, n in left.items():
            step = min(n, c.local_flow_control_window(sid), c.max_outbound_frame_size)
            if step > 0:
                left[sid] -= step
                c.send_data(sid, b"x" * step, end_stream=not left[sid])
        tls.sendall(c.data_to_send())
        try:
            data = tls.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        assert data, "the proxy closed the connection"
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status[ev.stream_id] = dict(ev.headers)[b":status"]
            elif isinstance(ev, h2.events.StreamEnded):
                done.add(ev.stream_id)
            elif isinstance(ev, h2.events.DataReceived):
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        tls.sendall(c.data_to_send())
    tls.close()
    assert len(done) == 6, f"{len(done)} of 6 streams completed; body bytes unsent: {left}"
    assert set(status.values()) == {b"200"}
    assert len(tls_upstream.seen.requests) == 6


@pytest.mark.parametrize("length", ["Content-Length: 100000000000", "Transfer-Encoding: chunked"])
def test_refused_request_is_answered_before_its_body_and_the_body_is_not_kept(
    proxy: ProxyFactory, length: str
) -> None:
    """mitmproxy reads a refused request's whole body into memory before it sends the
    answer. The guard answers at the headers, then drops what follows of the body."""
    p = proxy(make_policy(9))
    assert p.proc is not None
    sock = socket.create_connection(("127.0.0.1", p.port))
    sock.sendall(
        f"POST http://other.test:9/upload HTTP/1.1\r\nHost: other.test:9\r\n{length}\r\n\r\n".encode()
    )
    resp = read_response(sock, timeout=10)  # before: no answer until the body ended
    assert resp.status == 403
    assert resp.headers["x-egress-guard-reason"] == "not_allowlisted"
    assert resp.headers["connection"] == "close"
    rss_before = proc_stats(p.proc.pid)["rss_kb"]
    body = b"\0" * MiB
    if "chunked" in length:  # well-formed chunks: the body's own framing
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n"
    with contextlib.suppress(OSError):  # the proxy may stop reading: that is fine too
        flood(sock, seconds=2, limit=256 * MiB, chunk=body)
    grown = proc_stats(p.proc.pid)["rss_kb"] - rss_before
    sock.close()
    assert grown < 32 * 1024, f"the proxy grew by {grown / 1024:.0f} MiB"
    assert len(p.wait_audit(lambda r: True)) == 1


def test_after_a_refused_body_the_connection_closes_once_the_body_is_read(
    proxy: ProxyFactory,
) -> None:
    """The early answer ends the exchange: the body is read and dropped, then the
    connection closes (Connection: close), so bytes sent after it are never parsed."""
    p = proxy(make_policy(9))
    sock = socket.create_connection(("127.0.0.1", p.port))
    sock.sendall(
        b"POST http://other.test:9/ HTTP/1.1\r\nHost: other.test:9\r\nContent-Length: 5\r\n\r\n"
    )
    resp = read_response(sock, timeout=10)
    assert resp.status == 403
    sock.sendall(b"hello" + b"GET http://other.test:9/ HTTP/1.1\r\nHost: other.test:9\r\n\r\n")
    sock.settimeout(10)
    rest = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            rest += chunk
    sock.close()
    assert rest == b""  # closed, and the second request was not answered
    assert len(p.wait_audit(lambda r: True)) == 1


def test_refused_request_in_an_inspected_tunnel_is_answered_before_its_body(
    proxy: ProxyFactory, ca_file: Path
) -> None:
    p = proxy(paths_policy(9), "--inspect", "--upstream-ca", str(ca_file))
    sock, resp = connect(p.port, "api.test:9")
    assert resp.status == 200
    tls = guard_ca(p).wrap_socket(sock, server_hostname="api.test")
    tls.sendall(
        b"POST /admin/upload HTTP/1.1\r\nHost: api.test:9\r\nContent-Length: 100000000000\r\n\r\n"
    )
    tls.sendall(b"\0" * MiB)
    answer = read_response(tls, timeout=10)  # type: ignore[arg-type]
    tls.close()
    assert answer.status == 403
    assert answer.headers["x-egress-guard-reason"] == "path_not_allowed"
