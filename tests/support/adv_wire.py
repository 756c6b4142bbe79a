"""Exact-bytes clients for the adversarial suite: one connection, one outcome.

Every function is bounded in time: a read that does not finish within its timeout is
reported as such, never waited for again.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field


@dataclass
class Outcome:
    """What a client saw after sending its bytes."""

    status: int | None = None
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    closed: bool = False  # the proxy closed (or reset) without a complete response
    timed_out: bool = False  # nothing conclusive within the timeout
    raw: bytes = b""
    elapsed: float = 0.0
    #: bytes read past this response (the start of a pipelined next one)
    extra: bytes = b""

    @property
    def guard_reason(self) -> str | None:
        return self.headers.get("x-egress-guard-reason")

    def short(self) -> str:
        if self.status is not None:
            r = f" reason={self.guard_reason}" if self.guard_reason else ""
            return f"{self.status}{r}"
        return "timeout" if self.timed_out else "closed"


def open_conn(
    port: int, src: str | None = None, timeout: float = 5.0, host: str = "127.0.0.1"
) -> socket.socket:
    """A TCP connection to the proxy, from source address ``src`` when given."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if src is not None:
            sock.bind((src, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def read_outcome(
    sock: socket.socket, timeout: float = 5.0, head_only: bool = False, pending: bytes = b""
) -> Outcome:
    """Read one HTTP/1 response (head, and a Content-Length body unless ``head_only``).

    ``pending``: bytes already read past the previous response (its ``extra``), where
    pipelined responses arrived in one segment."""
    start = time.monotonic()
    deadline = start + timeout
    buf = pending
    out = Outcome()

    def recv() -> bytes | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            return sock.recv(65536)
        except TimeoutError:
            return None
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return b""

    while b"\r\n\r\n" not in buf:
        chunk = recv()
        if chunk is None:
            out.timed_out = True
            break
        if not chunk:
            out.closed = True
            break
        buf += chunk
        if len(buf) > 1 << 20:
            break
    out.raw = buf
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if sep:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isdigit():
            out.status = int(parts[1])
            out.reason = parts[2] if len(parts) > 2 else ""
            out.closed = out.timed_out = False
            for line in lines[1:]:
                k, _, v = line.partition(":")
                out.headers[k.strip().lower()] = v.strip()
            if not head_only:
                length = int(out.headers.get("content-length", "0") or 0)
                while len(rest) < min(length, 1 << 20):
                    chunk = recv()
                    if not chunk:
                        break
                    rest += chunk
                out.body = rest[:length]
                out.extra = rest[length:]
            else:
                out.body = rest
    out.elapsed = time.monotonic() - start
    return out


def exchange(
    port: int,
    data: bytes,
    src: str | None = None,
    timeout: float = 5.0,
    half_close: bool = False,
) -> tuple[socket.socket | None, Outcome]:
    """Connect, send ``data``, read one response. Returns the socket (still open, for a
    tunnel) or None when it was closed; the caller closes it."""
    try:
        sock = open_conn(port, src, timeout)
    except OSError:
        return None, Outcome(closed=True)
    try:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        sock.close()
        return None, Outcome(closed=True)
    out = read_outcome(sock, timeout)
    if out.status is None:
        sock.close()
        return None, out
    return sock, out


# -- TLS ---------------------------------------------------------------------------------


def client_hello(
    sni: bytes | str | None, *, extra_sni: bytes | None = None, rand: bytes | None = None
) -> bytes:
    """A plausible TLS 1.2 ClientHello record, built by hand so the SNI can be any bytes
    (ssl refuses to send an invalid server_hostname). ``extra_sni`` adds a second
    host_name entry to the same extension."""
    if isinstance(sni, str):
        sni = sni.encode("utf-8", "surrogateescape")
    ciphers = [0xC02F, 0xC030, 0xC02B, 0xC02C, 0x009C, 0x002F, 0x00FF]
    exts = b""
    if sni is not None:
        names = struct.pack("!BH", 0, len(sni)) + sni
        if extra_sni is not None:
            names += struct.pack("!BH", 0, len(extra_sni)) + extra_sni
        sni_ext = struct.pack("!H", len(names)) + names
        exts += struct.pack("!HH", 0, len(sni_ext)) + sni_ext
    groups = struct.pack("!H3H", 6, 0x001D, 0x0017, 0x0018)
    exts += struct.pack("!HH", 10, len(groups)) + groups
    exts += struct.pack("!HHB", 11, 2, 1) + b"\x00"  # ec_point_formats: uncompressed
    algs = [0x0401, 0x0804, 0x0403, 0x0501, 0x0805, 0x0201]
    sig = struct.pack("!H", 2 * len(algs)) + b"".join(struct.pack("!H", a) for a in algs)
    exts += struct.pack("!HH", 13, len(sig)) + sig
    body = (
        b"\x03\x03"
        + (rand if rand is not None else os.urandom(32))
        + b"\x00"
        + struct.pack("!H", 2 * len(ciphers))
        + b"".join(struct.pack("!H", c) for c in ciphers)
        + b"\x01\x00"
        + struct.pack("!H", len(exts))
        + exts
    )
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


class TLSTunnel:
    """A real TLS client (ssl memory BIOs) over an already established tunnel socket, so
    the first flight can be cut into pieces with pauses in between."""

    def __init__(self, sock: socket.socket, sni: str | None, ca_file: str | None = None) -> None:
        if ca_file is not None:
            ctx = ssl.create_default_context(cafile=ca_file)
            ctx.check_hostname = sni is not None
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=sni)

    def handshake(
        self, first_chunks: tuple[int, ...] = (), pause: float = 0.3, timeout: float = 5.0
    ) -> None:
        """Raises OSError/ssl.SSLError/TimeoutError when the handshake does not complete."""
        first = True
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                pending = self.out.read()
                if pending and first and first_chunks:
                    pos = 0
                    for n in first_chunks:
                        self.sock.sendall(pending[pos : pos + n])
                        pos += n
                        time.sleep(pause)
                    self.sock.sendall(pending[pos:])
                elif pending:
                    self.sock.sendall(pending)
                first = False
                self._recv_into(deadline)

    def _flush(self) -> None:
        pending = self.out.read()
        if pending:
            self.sock.sendall(pending)

    def _recv_into(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("TLS timed out")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self.inc.write(data)

    def request(self, data: bytes, timeout: float = 5.0) -> Outcome:
        """Send one HTTP request, read one response (Content-Length framed)."""
        self.obj.write(data)
        self._flush()
        deadline = time.monotonic() + timeout
        got = b""
        out = Outcome()
        while True:
            try:
                while True:
                    piece = self.obj.read(65536)
                    if not piece:
                        break
                    got += piece
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLError):
                out.closed = True
                break
            head, sep, body = got.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ", 2)
                out.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    out.headers[k.strip().lower()] = v.strip()
                if len(body) >= int(out.headers.get("content-length", "0") or 0):
                    out.body = body
                    break
            try:
                self._recv_into(deadline)
            except TimeoutError:
                out.timed_out = True
                break
            except OSError:
                out.closed = True
                break
        out.raw = got
        return out
