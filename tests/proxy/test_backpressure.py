"""Back-pressure while the proxy cannot forward: a client's bytes stay in the client's
own socket, not in the proxy's memory.

mitmproxy queues every chunk a client sends while its layer waits for the upstream
connection to open (or a hook to answer), and keeps reading: a client could make the
proxy hold gigabytes while a connect hangs. The guard stops reading such a client until
the upstream connection is open or has failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from support.adv_lab import wait_for
from support.adv_wire import client_hello
from support.clients import connect
from support.loops import LOOPS
from support.policies import make_policy
from support.procfs import proc_stats, tcp_ports
from support.proxy import ProxyFactory

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


def flood(sock: socket.socket, seconds: float, limit: int) -> int:
    """Send as much as the proxy accepts in ``seconds`` (at most ``limit`` bytes)."""
    sock.setblocking(False)
    chunk = b"\0" * MiB
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sent < limit:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.005)
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


class ResettingServer:
    """Accepts and resets at once: the proxy's connect succeeds, then the connection is
    gone, sometimes before mitmproxy reads the upstream's peername."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.sock.close()


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
