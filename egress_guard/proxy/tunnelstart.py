"""A tunnel's first bytes: the TunnelStart addon (``next_layer``, ``tls_clienthello``).

An allowed CONNECT opens nothing yet: the guard reads the tunnel's first bytes (a TLS
ClientHello and its SNI, plain HTTP, or other bytes) and only then picks the layer
that carries them (mitmproxy's TLS layers when intercepting, HTTP, or the counting
relay). Until then ``server_connect`` (upstream.py) refuses the tunnel's upstream.
"""

from __future__ import annotations

import logging
import re

from mitmproxy import ctx
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode, HttpStream
from mitmproxy.proxy.layers.tcp import TCPLayer
from mitmproxy.proxy.layers.tls import ClientTLSLayer, parse_client_hello
from mitmproxy.tls import ClientHelloData

from egress_guard.engine import Decision, Reason, ServerName, UnreadableName
from egress_guard.engine.verdicts import internal_error
from egress_guard.proxy.patches import splice
from egress_guard.proxy.state import Blocked, ConnState, GuardState
from egress_guard.proxy.target import redecide_tunnel
from egress_guard.proxy.tunnel import (
    MAX_CLIENT_HELLO,
    CountingTCPLayer,
    HelloFacts,
    client_hello_shape_problem,
    read_plain_client_hello,
    sni_problem,
    tls_layers,
)

log = logging.getLogger("egress_guard")


class TunnelStart:
    """mitmproxy addon: judges an allowed tunnel's first bytes and picks its layer."""

    #: unique among mitmproxy addons (its default is the lower-cased class name, which
    #: another script's addon could take, and a clash refuses the whole guard)
    name = "egress_guard_tunnel_start"

    def __init__(self, guard: GuardState) -> None:
        self.g = guard

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        state = self.g.conns.get(context.client.id)
        if state is None or state.tunnel is None:
            return
        stream = _tunnel_stream_index(nextlayer)
        if stream is None:
            return
        # Whatever NextLayer built on top of the CONNECT stream is discarded: the guard
        # decides this layer (or "not yet").
        del context.layers[stream + 1 :]
        nextlayer.layer = None
        try:
            # So are the TLS flags its TLS layers set on both connections (TLSLayer
            # marks them): as in mitmproxy's own pass-through, the client is TLS only if
            # it speaks TLS to the proxy itself, and the tunnel's server is not (inspect
            # mode builds its TLS layers again). splice.on_relaying reads the client's flag.
            context.client.tls = any(
                isinstance(x, ClientTLSLayer) and x.conn is context.client
                for x in context.layers[:stream]
            )
            context.server.tls = False
            self.on_tunnel_start(nextlayer, state)
        except Exception:
            log.exception("egress-guard: internal error starting a tunnel; blocking")
            state.blocked = "internal_error"
            host = state.tunnel[0].value
            self.g.record(context.client.id, state, internal_error(host))
            nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused

    def on_tunnel_start(self, nextlayer: layer.NextLayer, state: ConnState) -> None:
        """Decide how an allowed tunnel's bytes are handled, from its first bytes.

        Runs after mitmproxy's NextLayer addon (see master.py) and replaces its choice:
        until the first bytes can be judged, the layer stays None so nothing is relayed.
        Where the guard runs before NextLayer (``mitmdump -s``), server_connect refuses a
        tunnel whose first bytes were not judged, which fails closed.
        """
        assert state.tunnel is not None
        context = nextlayer.context
        data = nextlayer.data_client()
        if not data:
            return  # wait for the client to speak
        approval = state.approved.get((state.tunnel[0].value, state.tunnel[1]))
        conn_id = context.client.id
        eng = self.g.current_engine()
        if approval is not None and approval.policy_sha256 != eng.policy.sha256:
            # reloaded since the CONNECT: its rules (and whether it is intercepted) are
            # the new policy's
            try:
                redecided = redecide_tunnel(eng, state, approval)
            except Blocked as b:
                self.g.record(conn_id, state, b.decision)
                state.blocked = b.decision.reason
                nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                return
            if redecided.reason == "inspection_required":
                # audit mode: relayed unchecked, but never silently (and its close record
                # says would_block, as one opened that way would)
                noted = self.g.recordable(redecided)
                self.g.record(conn_id, state, noted)
                if not noted.allowed:
                    state.blocked = noted.reason
                    nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                    return
                approval.decision = redecided
        if data[0] == _TLS_HANDSHAKE:
            problem: str | None = client_hello_shape_problem(data)
            hello: HelloFacts | None = None
            try:
                if not problem:
                    hello = read_plain_client_hello(data) or parse_client_hello(data)
            except ValueError as e:
                hello, problem = None, f"unreadable TLS ClientHello: {e}"
            else:
                if hello is None and problem is None:
                    if len(data) <= MAX_CLIENT_HELLO:
                        return  # ClientHello incomplete: ask again with more data
                    problem = "TLS ClientHello larger than 64 KiB"
                elif hello is not None:
                    problem = sni_problem(hello)
            if problem is not None:
                if not self._tunnel_check(conn_id, state, "sni_mismatch", problem):
                    nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                    return
            elif hello is not None:
                state.sni = hello.sni
                if not self._sni_ok(conn_id, state, hello.sni):
                    nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                    return
                if self._inspect(state):
                    state.first_bytes_checked = True
                    self.g.tunnel_accepted(conn_id)
                    nextlayer.layer = tls_layers(context)
                    return  # mitmproxy's TLS layers intercept; requests are checked one by one
        elif data[0] in _TLS_OTHER_RECORDS:
            # TLS, but not starting with a handshake: the ClientHello (and its SNI) would
            # come later, past the point where the guard looks. Refuse.
            problem = f"TLS record of type {data[0]} before any ClientHello"
            if not self._tunnel_check(conn_id, state, "sni_mismatch", problem):
                nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                return
        if approval is None or state.blocked:
            nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
            return
        plain = data[0] != _TLS_HANDSHAKE and data[0] not in _TLS_OTHER_RECORDS
        starts_http = http_start(data) if plain else False
        if starts_http is None:
            return  # wait for more bytes: a request line may be starting
        state.first_bytes_checked = True
        self.g.tunnel_accepted(conn_id)
        if plain and (self._inspect(state) or starts_http):
            # Plain bytes to a destination with request rules: read them as HTTP (and
            # refuse what is not), so its method, path and model rules apply here too.
            # Plain HTTP in any tunnel (allowed, or let through by audit mode) is read as
            # HTTP too, so the names its requests give (Host, an absolute URI) are checked
            # against the CONNECT target and the deny rules, request by request, as the
            # SNI of a TLS tunnel is: a server behind an allowed address may route by Host.
            nextlayer.layer = HttpLayer(context, HTTPMode.transparent)
            return
        nextlayer.layer = CountingTCPLayer(
            context, approval, splice.on_relaying if splice.installed() else None
        )

    def _tunnel_check(self, conn_id: str, state: ConnState, reason: Reason, detail: str) -> bool:
        """Record a tunnel's unreadable server name (a ClientHello the guard cannot trust,
        TLS records before it); False when it must be refused."""
        assert state.tunnel is not None
        host, port = state.tunnel
        dest = state.tunnel_decision.destination if state.tunnel_decision else None
        unreadable = UnreadableName(reason, host, port, dest, detail)
        bad = self.g.current_engine().decide(unreadable)
        assert bad is not None  # an unreadable name is always a block (maybe let through)
        return self._tunnel_verdict(conn_id, state, bad)

    def _sni_ok(self, conn_id: str, state: ConnState, sni: str | None) -> bool:
        """Check the SNI against the CONNECT target and the deny rules; record and mark
        a block."""
        assert state.tunnel is not None
        host, port = state.tunnel
        dest = state.tunnel_decision.destination if state.tunnel_decision else None
        bad = self.g.current_engine().decide(ServerName(host, port, sni, dest))
        return bad is None or self._tunnel_verdict(conn_id, state, bad)

    def _tunnel_verdict(self, conn_id: str, state: ConnState, bad: Decision) -> bool:
        """Record what a tunnel's first bytes showed wrong; False when it is refused.

        The tunnel's own record changes with it, so its close record says what became of
        the connection: ``block`` when refused (see GuardState.close_records),
        ``would_block`` when audit mode let it through."""
        assert state.tunnel is not None
        final = self.g.recordable(bad)
        self.g.record(conn_id, state, final)
        if not final.allowed:
            state.blocked = final.reason
            return False
        approval = state.approved.get((state.tunnel[0].value, state.tunnel[1]))
        if approval is not None and approval.decision.action == "allow":
            approval.decision = final
        return True

    def _inspect(self, state: ConnState) -> bool:
        if not ctx.options.egress_guard_inspect or state.tunnel_decision is None:
            return False
        destination = self.g.current_engine().destination(state.tunnel_decision.destination)
        return destination is not None and destination.needs_inspection

    def tls_clienthello(self, data: ClientHelloData) -> None:
        client = data.context.client
        state = self.g.state(client)
        try:
            self._on_clienthello(data, state)
        except Exception:
            log.exception("egress-guard: internal error in tls_clienthello; blocking")
            state.blocked = "internal_error"
            data.ignore_connection = True
            host = state.tunnel[0].value if state.tunnel else ""
            self.g.record(client.id, state, internal_error(host))

    def _on_clienthello(self, data: ClientHelloData, state: ConnState) -> None:
        """Reached when the tunnel fast path left TLS to mitmproxy (inspect mode)."""
        if state.tunnel is None:
            return  # TLS to the proxy itself; the requests inside are decided one by one
        state.sni = data.client_hello.sni
        problem = sni_problem(data.client_hello)
        if problem is not None:
            ok = self._tunnel_check(data.context.client.id, state, "sni_mismatch", problem)
        else:
            ok = self._sni_ok(data.context.client.id, state, state.sni)
        if not ok:
            data.ignore_connection = True  # and server_connect refuses it
            return
        if not state.first_bytes_checked:
            self.g.tunnel_accepted(data.context.client.id)
        state.first_bytes_checked = True
        data.ignore_connection = not self._inspect(state)
        if data.ignore_connection:
            # passed through raw: no TLS of ours towards the server (as in next_layer);
            # the flag would otherwise say a handshake is coming that never does
            data.context.server.tls = False


def _tunnel_stream_index(nextlayer: layer.NextLayer) -> int | None:
    """Where in the layer stack the CONNECT stream sits whose tunnel this NextLayer opens,
    or None when this NextLayer is not directly beneath an accepted CONNECT."""
    layers = nextlayer.context.layers
    for i in range(len(layers) - 1, -1, -1):
        candidate = layers[i]
        if isinstance(candidate, HttpStream):
            if candidate.flow.request.method == "CONNECT" and candidate.child_layer is nextlayer:
                return i
            return None
    return None


#: an HTTP/1 request line's method (a token) and the space after it
_REQUEST_START = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")
#: what a lenient server takes for blanks in a request line: Python's http.server splits
#: it with str.split() (tabs, \x0b, \x0c, \x1c-\x1f, and \x85, \xa0 in Latin-1), and
#: skips blanks (line ends included) before it
_LENIENT_BLANKS = re.compile(rb"[ \t\x0b\x0c\x1c-\x1f\x85\xa0]")
_LENIENT_START = re.compile(rb"[ \t\r\n\x0b\x0c\x1c-\x1f\x85\xa0]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: bytes a text request line may hold (no other control characters): while the first
#: bytes are all such, without a line end, they may still become a request line
_TEXT = (frozenset(range(0x20, 0x100)) - {0x7F}) | frozenset(b"\t\x0b\x0c\x1c\x1d\x1e\x1f")
#: how many bytes of text may go by without a line end before they are read as HTTP
#: anyway (and refused, if they are not): a lenient server reads lines this long
_MAX_LINE = 64 * 1024


def http_start(data: bytes) -> bool | None:
    """Whether a tunnel's first bytes start an HTTP/1 request as some server reads it;
    None while they could still become one. Empty lines first count as HTTP: a server
    skips them before a request line. Lenient readings count too: a method followed by
    another blank than a space, blanks before it, or any line naming an HTTP version (the
    guard's own reading then refuses what it cannot read strictly)."""
    if data[:1] in (b"\r", b"\n") or _REQUEST_START.match(data):
        return True
    line, newline, _ = data.partition(b"\n")
    start = _LENIENT_START.match(line)
    if start is not None and _LENIENT_BLANKS.match(line, start.end()):
        return True  # a method, then a blank of another kind
    if b"HTTP/" in line.upper():
        return True
    if not newline and all(b in _TEXT for b in data):
        return None if len(data) < _MAX_LINE else True
    return False


#: The first byte of a tunnel decides how the guard reads it: a TLS handshake record
#: must be a readable ClientHello; other TLS record types first are refused (they would
#: push the ClientHello past the guard's look); anything else is relayed as bytes to the
#: checked address.
_TLS_HANDSHAKE = 0x16
_TLS_OTHER_RECORDS = frozenset({0x14, 0x15, 0x17})  # change_cipher_spec, alert, application_data
