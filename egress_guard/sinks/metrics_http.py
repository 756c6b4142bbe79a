"""The HTTP endpoint Prometheus scrapes: ``/metrics`` and ``/healthz``, from a thread;
with a ``StatusBoard``, the live status page at ``/`` too (``status_page``).

Apart from the series themselves (``metrics``) because it is the only part that opens a
socket: the sink is used, and tested, without it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import urlsplit

from egress_guard.normalize import join_hostport
from egress_guard.sinks.metrics import CONTENT_TYPE, Metrics
from egress_guard.sinks.status import StatusBoard
from egress_guard.sinks.status_page import HEADERS, answer

__all__ = ["MetricsServer", "start_http_server"]

log = logging.getLogger(__name__)

#: connections served at once; more are closed at once (a scraper, a few browsers and
#: curl need far fewer). Each holds a thread and a file descriptor of the guard's own
#: process, whose proxy needs them: a client opening many must not take them all
MAX_CLIENTS: Final = 32
#: seconds a connection may last in all (request and answer); ``timeout`` bounds each
#: read, so without this a client sending a byte every few seconds held its thread forever
REQUEST_DEADLINE_S: Final = 15.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "egress-guard"
    sys_version = ""
    # HTTP/1.0: one request per connection, so no idle keep-alive thread outlives stop()
    protocol_version = "HTTP/1.0"
    #: seconds a client may take to send its request (bounds idle server threads)
    timeout = 10

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(REQUEST_DEADLINE_S, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        """The connection outlived REQUEST_DEADLINE_S: cut it (its thread then ends)."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body = self.server.metrics.render()
            except Exception:
                log.exception("metrics: render failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"error\n", head)
                return
            self._send(HTTPStatus.OK, body, head, CONTENT_TYPE)
        elif path == "/healthz":
            try:
                ok = bool(self.server.health())
            except Exception:
                log.exception("metrics: health check raised")
                ok = False
            if ok:
                self._send(HTTPStatus.OK, b"ok\n", head)
            else:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"unhealthy\n", head)
        elif self.server.status is not None:
            if not page_host_ok(self.headers.get("Host"), self.server.listen_host):
                # DNS rebinding: a web page whose name now resolves to this address is
                # "same origin" to the browser and could read the recent decisions
                self._send(HTTPStatus.MISDIRECTED_REQUEST, _REBIND_TEXT, head, extra=HEADERS)
                return
            self._status_page(path, self.server.status, head)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", head)

    def _status_page(self, path: str, board: StatusBoard, head: bool) -> None:
        try:
            page = answer(path, board, self.server.health)
        except Exception:
            log.exception("status page: render failed")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"error\n", head, extra=HEADERS)
            return
        if page is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", head, extra=HEADERS)
        else:
            self._send(page.status, page.body, head, page.content_type, extra=HEADERS)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        head: bool,
        content_type: str = "text/plain; charset=utf-8",
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics http: %s - %s", self.address_string(), format % args)


_REBIND_TEXT = (
    b"the status page answers only when addressed by IP address or localhost "
    b"(the Host header names another host: a DNS rebinding guard)\n"
)


def page_host_ok(header: str | None, listen_host: str = "") -> bool:
    """The Host a request for the status page names is one no web page can take over
    with DNS rebinding: an IP address, ``localhost`` (or a name under it), or the name
    the listener was given (``--metrics NAME:PORT``). A request without Host is no
    browser's (browsers always send it). ``/metrics`` and ``/healthz`` are not checked:
    Prometheus may scrape by any name."""
    if header is None:
        return True
    value = header.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return False
    else:
        name = value.rpartition(":")[0] if value.count(":") == 1 else value
    name = name.rstrip(".")
    if not name:
        return False
    try:
        ipaddress.ip_address(name.partition("%")[0])
        return True
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost"):
        return True
    listen = listen_host.strip("[]").lower().rstrip(".")
    return bool(listen) and name == listen


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    #: the listen backlog (socketserver's default, 5, drops a burst's SYNs: seconds of
    #: retransmission for a scraper arriving during a flood)
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        metrics: Metrics,
        health: Callable[[], bool],
        status: StatusBoard | None,
    ) -> None:
        self.address_family = family
        self.metrics = metrics
        self.health = health
        self.status = status
        #: the host the listener was given: a status page request may name it
        self.listen_host = address[0]
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection while fewer than MAX_CLIENTS are served; else
        closed at once."""
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone or cut at the deadline: a debug line, not a traceback on stderr."""
        log.debug("metrics http: connection from %s ended with an error", client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


@dataclass
class MetricsServer:
    """A running metrics server. ``port`` is the bound port (useful with port 0)."""

    host: str
    port: int
    _server: _Server
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{join_hostport(self.host, self.port)}"

    def stop(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def _family(host: str, port: int) -> socket.AddressFamily:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        return infos[0][0]
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def start_http_server(
    metrics: Metrics,
    host: str,
    port: int,
    health: Callable[[], bool],
    status: StatusBoard | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` from a daemon thread, and
    with ``status`` the status page (``/``, its assets, ``/status.json``).

    ``host`` may be an IPv4 or IPv6 literal (with or without brackets) or a name; it is
    bound exactly as given. ``/healthz`` answers 200 when ``health()`` returns True and
    503 otherwise (or when it raises). Anything else is 404.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    server = _Server((host, port), _family(host, port), metrics, health, status)
    bound_host, bound_port = server.server_address[:2]
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.1},
        name=f"egress-guard-metrics-{bound_port}",
        daemon=True,
    )
    thread.start()
    return MetricsServer(str(bound_host), int(bound_port), server, thread)
