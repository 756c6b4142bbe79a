"""Unit tests of the guard's hook adapters, in-process with mitmproxy's ``taddons``.

The subprocess suites show what a client sees; these pin the fail-closed wiring of
each adapter directly: an engine that raises ends in a recorded block, and the choke
point (Upstream.server_connect) refuses whatever was not decided on the connection.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.addonmanager import Loader
from mitmproxy.connection import Client
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.test import taddons, tflow
from mitmproxy.tls import ClientHelloData

from egress_guard.engine.verdicts import allowed_by_name
from egress_guard.normalize import normalize_host
from egress_guard.proxy.requests import Requests
from egress_guard.proxy.state import Approval, GuardState
from egress_guard.proxy.tunnelstart import TunnelStart
from egress_guard.proxy.upstream import Upstream
from egress_guard.sinks.events import DecisionEvent


class RecordingSink:
    """Keeps the decisions the guard records (the audit log's place)."""

    healthy = True

    def __init__(self) -> None:
        self.decisions: list[DecisionEvent] = []

    def decision(self, event: DecisionEvent) -> None:
        self.decisions.append(event)

    async def admit(self, event: DecisionEvent) -> bool:
        self.decisions.append(event)
        return True

    def close(self, event: Any) -> None:
        pass

    def policy(self, event: Any) -> None:
        pass


class ExplodingEngine:
    """An engine whose every question raises (a bug, a half-built policy...); only
    the policy it records decisions under is there."""

    policy = SimpleNamespace(mode="enforce", sha256="0" * 64, source="test.yaml")

    def __getattr__(self, name: str) -> Any:
        def boom(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"engine.{name} failed")

        return boom


class GuardOptions:
    """Declares the options the adapters read (GuardSettings and PolicyReload do it in
    the proxy; their load installs process-wide mitmproxy patches, not wanted here)."""

    def load(self, loader: Loader) -> None:
        loader.add_option("egress_guard_policy", str, "", "")
        loader.add_option("egress_guard_inspect", bool, False, "")
        loader.add_option("egress_guard_max_model_body", int, 1 << 20, "")


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def guard(sink: RecordingSink) -> GuardState:
    g = GuardState([sink])
    g.engine = ExplodingEngine()  # type: ignore[assignment]
    return g


@pytest.fixture
def tctx() -> Iterator[taddons.context]:
    with taddons.context(GuardOptions()) as tctx:
        yield tctx


def run(tctx: taddons.context, coro: Coroutine[Any, Any, None]) -> None:
    """Run an async hook on the test master's loop (as mitmproxy would)."""
    tctx.master.event_loop.run_until_complete(coro)


def connect_flow(authority: str = "api.test:443") -> http.HTTPFlow:
    f = tflow.tflow()
    host, _, port = authority.rpartition(":")
    f.request.method = "CONNECT"
    f.request.host, f.request.port = host, int(port)
    f.request.authority = authority
    f.request.path = ""
    return f


def server_data(client: Client, address: tuple[str, int]) -> server_hooks.ServerConnectionHookData:
    server = tflow.tserver_conn()
    server.address = address
    return server_hooks.ServerConnectionHookData(server=server, client=client)


def test_connect_blocks_when_the_engine_raises(
    tctx: taddons.context, guard: GuardState, sink: RecordingSink
) -> None:
    f = connect_flow()
    run(tctx, Requests(guard).http_connect(f))
    assert f.response is not None and f.response.status_code == 403
    assert [e.decision.reason for e in sink.decisions] == ["internal_error"]
    assert not sink.decisions[0].decision.allowed
    state = guard.conns[f.client_conn.id]
    assert state.blocked == "internal_error" and not state.approved
    # and the choke point refuses the connection's upstream
    data = server_data(f.client_conn, ("api.test", 443))
    Upstream(guard).server_connect(data)
    assert data.server.error == "egress-guard: blocked (internal_error)"


def test_request_blocks_when_the_engine_raises(
    tctx: taddons.context, guard: GuardState, sink: RecordingSink
) -> None:
    f = tflow.tflow()
    run(tctx, Requests(guard).requestheaders(f))
    assert f.response is not None and f.response.status_code == 403
    assert [e.decision.reason for e in sink.decisions] == ["internal_error"]
    assert guard.conns[f.client_conn.id].approved == {}


def test_request_blocks_when_no_policy_is_loaded(
    tctx: taddons.context, sink: RecordingSink
) -> None:
    guard = GuardState([sink])  # engine None: the policy never loaded
    f = tflow.tflow()
    run(tctx, Requests(guard).requestheaders(f))
    assert f.response is not None and f.response.status_code == 403
    assert [e.decision.reason for e in sink.decisions] == ["internal_error"]


def test_server_connect_refuses_an_undecided_connection(
    tctx: taddons.context, guard: GuardState
) -> None:
    client = tflow.tclient_conn()
    data = server_data(client, ("api.test", 443))
    Upstream(guard).server_connect(data)
    assert data.server.error == "egress-guard: blocked (no decision)"
    # a connection with state but nothing allowed for this target
    guard.state(client)
    data = server_data(client, ("api.test", 443))
    Upstream(guard).server_connect(data)
    assert data.server.error == "egress-guard: no allowing decision for this destination"


def _approval(host: str, port: int) -> Approval:
    from egress_guard.engine import Match
    from egress_guard.policy.model import Destination

    match = Match(
        normalize_host(host), port, Destination(name="api", hosts=[host], ports=[port]), 0
    )
    return Approval(allowed_by_name(match), match.host, port, None, match.destination)


def test_server_connect_refuses_a_tunnel_whose_first_bytes_were_not_checked(
    tctx: taddons.context, guard: GuardState
) -> None:
    client = tflow.tclient_conn()
    state = guard.state(client)
    approval = _approval("api.test", 443)
    state.tunnel = (approval.host, 443)
    state.tunnel_decision = approval.decision
    state.approved[("api.test", 443)] = approval
    data = server_data(client, ("api.test", 443))
    Upstream(guard).server_connect(data)
    assert data.server.error == "egress-guard: tunnel not checked"
    state.first_bytes_checked = True
    data = server_data(client, ("api.test", 443))
    Upstream(guard).server_connect(data)
    assert data.server.error is None  # decided on the name (no address): connects


def test_server_connect_refuses_when_it_fails(tctx: taddons.context, guard: GuardState) -> None:
    class Broken(dict[tuple[str, int], Approval]):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            raise KeyError("broken")

    client = tflow.tclient_conn()
    guard.state(client).approved = Broken()
    data = server_data(client, ("api.test", 443))
    Upstream(guard).server_connect(data)
    assert data.server.error == "egress-guard: internal error (KeyError)"


def _openssl_hello(sni: str) -> bytes:
    import ssl

    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_clienthello_blocks_when_the_engine_raises(
    tctx: taddons.context, guard: GuardState, sink: RecordingSink
) -> None:
    client = tflow.tclient_conn()
    state = guard.state(client)
    approval = _approval("api.test", 443)
    state.tunnel = (approval.host, 443)
    state.tunnel_decision = approval.decision
    state.approved[("api.test", 443)] = approval
    context = Context(client, tctx.options)
    data = ClientHelloData(context, parse_client_hello(_openssl_hello("api.test")))
    TunnelStart(guard).tls_clienthello(data)
    assert data.ignore_connection
    assert state.blocked == "internal_error" and not state.first_bytes_checked
    assert [(e.decision.reason, e.decision.host) for e in sink.decisions] == [
        ("internal_error", "api.test")
    ]
    server = server_data(client, ("api.test", 443))
    Upstream(guard).server_connect(server)
    assert server.server.error == "egress-guard: blocked (internal_error)"
