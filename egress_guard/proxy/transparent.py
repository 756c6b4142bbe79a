"""Direct connections: the Transparent addon (``next_layer``), for ``run --transparent``.

A gateway or a sidecar redirects TCP connections to the guard (iptables/nftables
REDIRECT); they arrive without CONNECT, and mitmproxy's transparent mode gives each its
original destination (SO_ORIGINAL_DST). The guard reads the connection's first bytes
for the name they give (the TLS SNI, or the Host of a plain HTTP request), decides
that name on the original port as it decides a CONNECT (the same engine, the same
records), and lets it through only when the original address is one the name has
(``Engine.decide(Redirected(...))``). A connection that names nothing is refused as
``direct_connection``, with its destination. From there on it is a tunnel to that name
like any other (tunnelstart.py: the SNI check, interception, the counting relay).

Only the embedded master adds this addon, and only in transparent mode: regular proxy
connections never call it.
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.modes import TransparentProxy
from mitmproxy.proxy.layers.tcp import TCPLayer
from mitmproxy.proxy.layers.tls import parse_client_hello

from egress_guard.engine import Redirected
from egress_guard.engine.verdicts import internal_error
from egress_guard.normalize import IPAddress, NormalizationError, canonical_ip, socket_ip
from egress_guard.proxy.state import Blocked, ConnState, GuardState
from egress_guard.proxy.target import authorize, gate
from egress_guard.proxy.tunnel import (
    MAX_CLIENT_HELLO,
    client_hello_shape_problem,
    read_plain_client_hello,
    sni_problem,
)
from egress_guard.proxy.tunnelstart import TunnelStart, http_start

log = logging.getLogger("egress_guard")

#: the longest plain HTTP head the guard waits for to read its Host
MAX_HEAD = 64 * 1024

#: the first bytes do not show a name yet: wait for more
WAIT = ("", "")


class Transparent:
    """mitmproxy addon: decides a redirected connection from its name and destination."""

    #: unique among mitmproxy addons (its default is the lower-cased class name, which
    #: another script's addon could take, and a clash refuses the whole guard)
    name = "egress_guard_transparent"

    def __init__(self, guard: GuardState, start: TunnelStart) -> None:
        self.g = guard
        self._start = start

    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        top = context.layers
        if (
            not top
            or not isinstance(top[0], TransparentProxy)
            or top[0].child_layer is not nextlayer
        ):
            return  # not a redirected connection's start (a layer further in, or no such mode)
        # Whatever NextLayer built is discarded (its TLS layers would intercept, and mark
        # both connections TLS): the guard decides this layer, or "not yet".
        del top[1:]
        nextlayer.layer = None
        context.client.tls = False
        context.server.tls = False
        state = self.g.state(context.client)
        try:
            if state.tunnel is None and not await self._decide(nextlayer, state):
                return
            if not state.blocked:
                # a tunnel to the name: its first bytes judged as a CONNECT's are
                self._start.on_tunnel_start(nextlayer, state)
                return
        except Blocked as b:
            self.g.record(context.client.id, state, b.decision)
            state.blocked = b.decision.reason
        except Exception:
            log.exception("egress-guard: internal error deciding a direct connection; blocking")
            state.blocked = "internal_error"
            self.g.record(context.client.id, state, internal_error(_where(context.server.address)))
        nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused

    async def _decide(self, nextlayer: layer.NextLayer, state: ConnState) -> bool:
        """Decide the connection on the name its first bytes give; False: wait for more
        bytes. Raises Blocked."""
        context = nextlayer.context
        data = nextlayer.data_client()
        if not data:
            return False
        address = context.server.address
        if address is None:
            raise RuntimeError("transparent connection without its original destination")
        original, port = _original(address)
        name, via = first_name(data)
        if (name, via) == WAIT:
            return False
        eng = self.g.current_engine()
        if not name:
            refused = eng.decide(Redirected(None, "", original, port, None, None))
            assert refused is not None  # no name is always refused
            raise Blocked(refused)
        if via == "sni":
            state.sni = name  # its records name the SNI, as a CONNECT tunnel's do
        gate(self.g, eng, state, http.Headers(), name)
        approval = await authorize(self.g, eng, name, port, tunnel=True)
        checked = approval.addresses
        if checked is None and approval.address is not None:
            checked = (approval.address,)
        dest = approval.decision.destination
        bad = eng.decide(Redirected(approval.host, via, original, port, checked, dest))
        if bad is not None:
            if not bad.allowed:
                raise Blocked(bad)
            approval.decision = bad  # audit mode: to the name's checked address, recorded
        elif checked is not None:
            # the client's own choice among the addresses the engine checked
            approval.address = next(a for a in checked if _same(a, original))
        await self.g.admit(context.client.id, state, approval.decision, opens=True)
        state.tunnel = (approval.host, approval.port)
        state.tunnel_decision = approval.decision
        state.approved[(approval.host.value, approval.port)] = approval
        # the upstream is asked for by the name decided (Upstream pins the checked address)
        context.server.address = (approval.host.value, approval.port)
        return True


def first_name(data: bytes) -> tuple[str, str]:
    """The server name a connection's first bytes give, and how ("sni", "host"); ("",
    "none") when they give none, WAIT while they may still give one."""
    if data[0] == 0x16:
        if client_hello_shape_problem(data):
            return "", "none"
        try:
            hello = read_plain_client_hello(data) or parse_client_hello(data)
        except ValueError:
            return "", "none"
        if hello is None:
            return WAIT if len(data) <= MAX_CLIENT_HELLO else ("", "none")
        if sni_problem(hello) is not None or not hello.sni:
            return "", "none"
        return hello.sni, "sni"
    started = http_start(data)
    if started is None:
        return WAIT
    if not started:
        return "", "none"
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if not ends:
        return WAIT if len(data) < MAX_HEAD else ("", "none")
    for line in data[: min(ends)].split(b"\n")[1:]:
        key, sep, value = line.rstrip(b"\r").partition(b":")
        if sep and key.strip().lower() == b"host":
            return _host_part(value.strip().decode("latin-1")), "host"
    return "", "none"


def _host_part(authority: str) -> str:
    """A Host value without its port (the port decided is the original one; each
    request's Host is then checked against name and port, tunnelstart.py)."""
    if authority.startswith("["):
        return authority.partition("]")[0] + "]"
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


def _original(address: tuple[str, int] | tuple[str, int, int, int]) -> tuple[IPAddress, int]:
    try:
        return socket_ip(str(address[0])), int(address[1])
    except (NormalizationError, ValueError) as e:
        raise RuntimeError(f"unreadable original destination {address!r}") from e


def _same(a: IPAddress, b: IPAddress) -> bool:
    return canonical_ip(a) == canonical_ip(b)


def _where(address: object) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return ""
