"""Slow and numerous clients on the metrics listener (``/metrics``, ``/healthz`` and now
the status page), which runs inside the guard's own process.

The listener is a ``ThreadingHTTPServer``: one thread and one file descriptor per
connection, with no limit, and its 10 s ``timeout`` bounds each read, not the request.
A client that opens hundreds of connections and sends a byte every few seconds
(slowloris) held a thread and a descriptor each, for as long as it liked; the
descriptors are the guard process's, which its proxy needs for every tunnel. Real
sockets on loopback: the number of connections served at once must be bounded, and a
connection that dribbles must be cut after a deadline, after which a scrape answers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from egress_guard.sinks import metrics_http
from egress_guard.sinks.metrics import Metrics
from egress_guard.sinks.metrics_http import MetricsServer, start_http_server
from egress_guard.sinks.status import StatusBoard

FLOOD = 150


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MetricsServer]:
    # a short deadline keeps the test quick (raising=False: main has no such bound)
    monkeypatch.setattr(metrics_http, "REQUEST_DEADLINE_S", 2.0, raising=False)
    srv = start_http_server(Metrics(), "127.0.0.1", 0, lambda: True, status=StatusBoard())
    try:
        yield srv
    finally:
        srv.stop()


def open_slow(srv: MetricsServer, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.0\r\n")  # the head is never finished
        socks.append(s)
    return socks


def handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request" in t.name)


def test_many_slow_connections_hold_a_bounded_number_of_threads(server: MetricsServer) -> None:
    socks = open_slow(server, FLOOD)
    try:
        time.sleep(0.5)
        assert handler_threads() <= 40, f"{handler_threads()} threads for {FLOOD} slow clients"
    finally:
        for s in socks:
            s.close()


def test_a_dribbling_client_is_cut_at_the_deadline(server: MetricsServer) -> None:
    (s,) = open_slow(server, 1)
    cut = False
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                s.sendall(b"X")  # one byte a second: each read is well within timeout
                s.settimeout(1.0)
                with contextlib.suppress(TimeoutError):
                    if s.recv(1) == b"":
                        cut = True
                        break
            except OSError:
                cut = True
                break
    finally:
        s.close()
    assert cut, "a client dribbling a byte a second kept its connection for 8 s"


def test_scrapes_answer_again_after_a_flood(server: MetricsServer) -> None:
    socks = open_slow(server, FLOOD)
    try:
        deadline = time.monotonic() + 10
        ok = False
        while time.monotonic() < deadline and not ok:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{server.url}/healthz", timeout=2) as r,
            ):
                ok = r.status == 200
            time.sleep(0.2)
        assert ok
    finally:
        for s in socks:
            s.close()
