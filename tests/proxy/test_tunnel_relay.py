"""An allowed tunnel relays every byte in both directions, in order, and counts them
exactly. (Past its first chunk a tunnel's data takes the short cut in
egress_guard/proxy/patches/splice.py; this is what that short cut must keep.)

A client's half-close (FIN while still reading) ends the whole tunnel, as in mitmproxy
itself and in Squid's default (``half_closed_clients off``); TLS clients close with
close_notify, so nothing that goes through this proxy relies on it."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from support.adv_lab import wait_for
from support.clients import connect
from support.loops import LOOPS
from support.policies import make_policy
from support.procfs import tcp_ports
from support.proxy import ProxyFactory
from support.servers import LoopbackServer, ThreadedLoopbackServer
from support.upstream import Upstream

T = TypeVar("T")


def read_upload(conn: socket.socket) -> str:
    """Read a length-prefixed upload; its SHA-256 in hex."""
    h = hashlib.sha256()
    head = b""
    while len(head) < 8 and (chunk := conn.recv(8 - len(head))):
        head += chunk
    left = int.from_bytes(head, "big")
    while left > 0 and (chunk := conn.recv(min(left, 1 << 16))):
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


class DigestServer(LoopbackServer):
    """Reads a length-prefixed upload, answers its SHA-256 and ``reply_size`` bytes, and
    closes."""

    def __init__(self, reply_size: int) -> None:
        self.reply_size = reply_size
        #: time.monotonic() when each reply had been handed to the kernel in full
        self.finished_at: list[float] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            digest = read_upload(conn)
            try:
                conn.sendall(digest.encode() + b"\n" + b"d" * self.reply_size)
            except OSError:
                return  # the client went away (test_client_gone_mid_download)
            self.finished_at.append(time.monotonic())


class RandomReplyServer(ThreadedLoopbackServer):
    """Like DigestServer, but each connection is served on its own thread and gets
    ``size`` random bytes, different for every connection, after the digest line."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent: list[bytes] = []
        self.lock = threading.Lock()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with self.lock:
            reply = random.Random(len(self.sent)).randbytes(self.size)
            self.sent.append(reply)
        with conn:
            digest = read_upload(conn)
            with contextlib.suppress(OSError):
                conn.sendall(digest.encode() + b"\n" + reply)


@pytest.fixture
def digest_server() -> Iterator[DigestServer]:
    s = DigestServer(reply_size=3_000_000)
    yield s
    s.close()


@LOOPS
def test_tunnel_relays_every_byte_and_counts_them(
    proxy: ProxyFactory, digest_server: DigestServer, loop: str
) -> None:
    p = proxy(make_policy(digest_server.port), "--event-loop", loop)
    upload = bytes(range(256)) * 8192  # 2 MiB
    sock, resp = connect(p.port, f"api.test:{digest_server.port}")
    assert resp.status == 200
    sock.settimeout(20)
    sent = b"not TLS: relayed as bytes\n" + upload
    sock.sendall(len(sent).to_bytes(8, "big"))
    for i in range(0, len(sent), 100_000):  # many chunks, most of them past the first
        sock.sendall(sent[i : i + 100_000])
    got = b""
    while chunk := sock.recv(1 << 16):
        got += chunk
    sock.close()
    digest, _, reply = got.partition(b"\n")
    assert digest.decode() == hashlib.sha256(sent).hexdigest()
    assert len(reply) == 3_000_000 and reply == b"d" * 3_000_000
    close = p.wait_audit(lambda r: True, event="close")
    assert len(close) == 1
    assert close[0]["bytes_up"] == 8 + len(sent)
    assert close[0]["bytes_down"] == len(got)


def test_tunnel_through_a_tls_connection_to_the_proxy(
    proxy: ProxyFactory, digest_server: DigestServer
) -> None:
    """A client may speak TLS to the proxy itself (an https:// proxy URL); its tunnel lives
    inside that TLS session and must be relayed as such, not as raw socket bytes."""
    from support.clients import read_response
    from support.proxy import guard_ca

    p = proxy(make_policy(digest_server.port), "--verbose")
    ctx: ssl.SSLContext = guard_ca(p)
    ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", p.port), timeout=20)
    tls = ctx.wrap_socket(raw, server_hostname="egress-guard.test")
    tls.sendall(f"CONNECT api.test:{digest_server.port} HTTP/1.1\r\n\r\n".encode())
    assert read_response(tls).status == 200  # type: ignore[arg-type]
    sent = b"x" * 300_000
    tls.sendall(len(sent).to_bytes(8, "big"))
    for i in range(0, len(sent), 50_000):
        tls.sendall(sent[i : i + 50_000])
    got = b""
    while len(got) < 65 + 3_000_000:
        chunk = tls.recv(1 << 16)
        if not chunk:
            break
        got += chunk
    tls.close()
    digest, _, reply = got.partition(b"\n")
    assert digest.decode() == hashlib.sha256(sent).hexdigest()
    assert len(reply) == 3_000_000
    assert " spliced (" not in p.log()  # its socket carries TLS to the proxy, not the tunnel


class CountingTLS:
    """A TLS client over a plain socket (ssl.MemoryBIO), counting the raw bytes it sends
    and receives: what the proxy's close record must report for the tunnel."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, sni: str) -> None:
        self.sock, self.sent, self.received = sock, 0, 0
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=sni)
        self._call(self.obj.do_handshake)

    def _flush(self) -> None:
        if data := self.out.read():
            self.sock.sendall(data)
            self.sent += len(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("tunnel closed")
        self.received += len(data)
        self.inc.write(data)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        while True:
            try:
                result = fn(*args)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
                continue
            self._flush()
            return result

    def get(self, path: str) -> bytes:
        """One keep-alive GET; the body (the test upstream always sends Content-Length)."""
        self._call(self.obj.write, f"GET {path} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._call(self.obj.read, 1 << 16)
        head, _, body = buf.partition(b"\r\n\r\n")
        length = int(next(v for k, v in _headers(head) if k == "content-length"))
        while len(body) < length:
            body += self._call(self.obj.read, 1 << 16)
        return body

    def close(self) -> None:
        self.sock.close()


def _headers(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]


@LOOPS
def test_tls_tunnel_is_spliced_and_counted_exactly(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, loop: str
) -> None:
    """The common case (TLS inside CONNECT) takes the short cut in both directions, and
    the close record counts every byte the client's socket sent and received."""
    p = proxy(make_policy(tls_upstream.port), "--verbose", "--event-loop", loop)
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    sock.settimeout(20)
    tls = CountingTLS(sock, ssl.create_default_context(cafile=str(ca_file)), "api.test")
    for n in (10, 200_000, 3, 1_000_000):
        assert tls.get(f"/bytes/{n}") == b"x" * n
    tls.close()
    close = p.wait_audit(lambda r: True, event="close")
    assert len(close) == 1
    assert (close[0]["bytes_up"], close[0]["bytes_down"]) == (tls.sent, tls.received)
    spliced = [line for line in p.log().splitlines() if " spliced (" in line]
    assert {line.rsplit("(", 1)[1] for line in spliced} == {"up)", "down)"}
    assert f"egress-guard: event loop {loop}" in p.log()


@LOOPS
def test_slow_reader_gets_every_byte(proxy: ProxyFactory, loop: str) -> None:
    """Back-pressure: while the client does not read, the proxy stops reading the
    upstream (instead of buffering all of it), then relays the rest once it drains."""
    size = 48_000_000  # more than every socket buffer on the way can hold
    server = DigestServer(reply_size=size)
    try:
        p = proxy(make_policy(server.port), "--event-loop", loop)
        sock, resp = connect(p.port, f"api.test:{server.port}")
        assert resp.status == 200
        sock.settimeout(20)
        sent = b"slow reader"
        sock.sendall(len(sent).to_bytes(8, "big") + sent)
        time.sleep(1.5)  # the upstream sends what fits; the proxy must hold back the rest
        reading_from = time.monotonic()
        got = bytearray()
        while chunk := sock.recv(1 << 20):
            got += chunk
        sock.close()
        digest, _, reply = bytes(got).partition(b"\n")
        assert digest.decode() == hashlib.sha256(sent).hexdigest()
        assert len(reply) == size and reply.count(b"d") == size
        assert server.finished_at[0] > reading_from, "the proxy read the whole reply unasked"
        close = p.wait_audit(lambda r: True, event="close")
        assert close[0]["bytes_down"] == len(got)
    finally:
        server.close()


def _read_in_fits(sock: socket.socket, seed: int) -> bytes:
    """Read to the end in uneven pieces with pauses, so the proxy's sends to this
    socket keep falling behind and are taken only in part."""
    rng = random.Random(seed)
    got = bytearray()
    reads = 0
    while chunk := sock.recv(rng.choice((1_000, 30_000, 200_000))):
        got += chunk
        reads += 1
        if reads % 50 == 0:
            time.sleep(0.02)
    return bytes(got)


@LOOPS
def test_bytes_stay_intact_when_clients_read_in_fits(proxy: ProxyFactory, loop: str) -> None:
    """Spliced relays read into one shared buffer and use it again only once the
    destination has taken the whole chunk: a transport that could send only part of it
    keeps a view of the rest. Two tunnels whose clients read in fits make such partial
    sends; random bytes (not a repeated letter) show any chunk overwritten by another
    read, of the same tunnel or the other one, lost, or sent twice."""
    size = 12_000_000
    server = RandomReplyServer(size)
    try:
        p = proxy(make_policy(server.port), "--verbose", "--event-loop", loop)
        uploads = [random.Random(100 + i).randbytes(2_000_000) for i in range(2)]
        socks = []
        for _ in uploads:
            sock, resp = connect(p.port, f"api.test:{server.port}")
            assert resp.status == 200
            sock.settimeout(20)
            socks.append(sock)
        with ThreadPoolExecutor(2) as pool:
            for sock, upload in zip(socks, uploads, strict=True):
                pool.submit(sock.sendall, len(upload).to_bytes(8, "big") + upload)
            results = list(pool.map(_read_in_fits, socks, range(2)))
        for sock in socks:
            sock.close()
        digests = set()
        for got in results:
            digest, _, body = got.partition(b"\n")
            digests.add(digest.decode())
            assert len(body) == size
            assert body in server.sent  # (equality of 12 MB: one compare, no diff shown)
        assert digests == {hashlib.sha256(u).hexdigest() for u in uploads}
        assert len({hashlib.sha256(r).digest() for r in results}) == 2
        assert p.log().count(" spliced (down)") == 2
    finally:
        server.close()


def test_client_reset_mid_download_closes_and_records_the_tunnel(proxy: ProxyFactory) -> None:
    """A client that resets its tunnel in the middle of a spliced bulk download: the
    tunnel is closed and recorded, and the proxy holds no descriptor for it any more."""
    server = DigestServer(reply_size=48_000_000)
    try:
        p = proxy(make_policy(server.port), "--verbose")
        assert p.proc is not None
        pid = p.proc.pid
        sock, resp = connect(p.port, f"api.test:{server.port}")
        client_port = sock.getsockname()[1]
        # the proxy's two sockets of this tunnel: toward the client and toward the upstream
        tunnel = {(p.port, client_port)}
        assert resp.status == 200
        sock.settimeout(20)
        sock.sendall((4).to_bytes(8, "big") + b"gone")
        time.sleep(1)  # a backlog: megabytes queued in the proxy and its sockets
        assert wait_for(lambda: any(remote == server.port for _, remote in tcp_ports(pid)), 5)
        assert tunnel <= tcp_ports(pid)
        got = 0
        while got < 4_000_000 and (chunk := sock.recv(1 << 20)):
            got += len(chunk)
        assert " spliced (down)" in p.log()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST, with megabytes still on their way
        close = p.wait_audit(lambda r: True, event="close")
        assert got <= close[0]["bytes_down"] < 48_000_000

        def holds_tunnel() -> bool:
            held = tcp_ports(pid)
            return bool(tunnel & held) or any(remote == server.port for _, remote in held)

        assert wait_for(lambda: not holds_tunnel(), 10), tcp_ports(pid)
    finally:
        server.close()


def test_active_spliced_tunnel_outlives_the_idle_timeout(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """Traffic on the short cut counts as activity: a tunnel in use for longer than
    --idle-timeout stays open (and an idle one is closed, see test_enforce)."""
    p = proxy(make_policy(tls_upstream.port), "--idle-timeout", "2")
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    sock.settimeout(10)
    tls = CountingTLS(sock, ssl.create_default_context(cafile=str(ca_file)), "api.test")
    end = time.monotonic() + 5
    while time.monotonic() < end:
        assert tls.get("/bytes/5") == b"xxxxx"
        time.sleep(0.5)
    tls.close()
