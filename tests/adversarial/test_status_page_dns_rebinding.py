"""DNS rebinding against the status page (issue 19's ``/`` and ``/status.json`` on the
metrics listener).

The operator's browser opens a web page (one the agent found, a link in a report) at
``http://attacker.example:9090/``; its name then re-resolves to 127.0.0.1, where the
guard's metrics listener is. To the browser the page's own script fetching
``/status.json`` is same-origin, so it reads the recent decisions (hosts, paths, client
addresses, proxy users) and the policy's file path and sends them home. No CORS header
or CSP stops it: the only sign is the request's Host header, which still names the
attacker's host. The listener answered every Host.

Here a real listener on loopback gets requests whose Host names another host: the
status page's answers must carry none of its data. Addressed by IP or ``localhost`` it
still answers, and ``/metrics`` (Prometheus may scrape by any name) is not affected.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest

from egress_guard.engine import Decision
from egress_guard.sinks.events import DecisionEvent
from egress_guard.sinks.metrics import Metrics
from egress_guard.sinks.metrics_http import MetricsServer, start_http_server
from egress_guard.sinks.status import StatusBoard

SECRET_HOST = "internal-only.corp.example"


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    board = StatusBoard()
    d = Decision(
        allowed=False,
        action="block",
        reason="not_allowlisted",
        destination=None,
        host=SECRET_HOST,
        port=443,
    )
    board.decision(
        DecisionEvent(
            conn_id="c1", client="127.0.0.1:5000", decision=d, mode="enforce", policy_sha256="sha"
        )
    )
    srv = start_http_server(Metrics(), "127.0.0.1", 0, lambda: True, status=board)
    try:
        yield srv
    finally:
        srv.stop()


def get(srv: MetricsServer, path: str, host: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "host",
    ["attacker.example:{port}", "attacker.example", "127.0.0.1.nip.io:{port}", "ATTACKER.example."],
)
@pytest.mark.parametrize("path", ["/status.json", "/", "/status.js"])
def test_a_rebound_name_reads_nothing(server: MetricsServer, host: str, path: str) -> None:
    status, body = get(server, path, host.format(port=server.port))
    assert status != 200
    assert SECRET_HOST.encode() not in body


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "localhost"])
def test_addressed_by_ip_or_localhost_it_answers(server: MetricsServer, host: str) -> None:
    status, body = get(server, "/status.json", host.format(port=server.port))
    assert status == 200
    assert SECRET_HOST.encode() in body


def test_metrics_answers_any_name(server: MetricsServer) -> None:
    status, _ = get(server, "/metrics", f"prometheus-target.example:{server.port}")
    assert status == 200
