"""Real upstream servers on loopback that remember what reached them.

"The upstream saw nothing" is the assertion that matters for a block, so the server
records every accepted TCP connection (before any TLS or HTTP), every SNI, and every
request line and Host header.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Seen:
    connections: int = 0
    snis: list[str | None] = field(default_factory=list)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, host
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.seen.lock:
            self.server.seen.requests.append((self.command, self.path, self.headers.get("Host")))
            self.server.seen.headers.append({k.lower(): v for k, v in self.headers.items()})
            self.server.seen.bodies.append(body)
        if self.path.endswith("/sse") or b'"stream":true' in body.replace(b" ", b""):
            self._sse()
            return
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            payload = b"x" * n
        else:
            payload = f"upstream-ok {self.command} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _sse(self) -> None:
        """Server-sent events: the second event waits until the test has seen the first,
        so a proxy that buffers the response deadlocks the exchange instead of passing."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, event in enumerate((b"data: first\n\n", b"data: second\n\n")):
            if i == 1 and not self.server.gate.wait(20):
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    seen: Seen
    tls: ssl.SSLContext | None
    gate: threading.Event

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        with self.seen.lock:
            self.seen.connections += 1
        if self.tls is not None:
            sock.settimeout(10)
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class Upstream:
    """A threaded HTTP(S) server on 127.0.0.1 (or ::1) with a random port."""

    def __init__(
        self, tls_ctx: ssl.SSLContext | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.seen = Seen()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(_Server):
            address_family = family

        self._server = Server((host, port), _Handler)
        self._server.seen = self.seen
        #: released by a test to let a streaming response continue
        self.gate = threading.Event()
        self._server.gate = self.gate
        self._server.tls = tls_ctx
        if tls_ctx is not None:

            def on_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
                with self.seen.lock:
                    self.seen.snis.append(name)

            tls_ctx.sni_callback = on_sni  # type: ignore[assignment]
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Upstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
