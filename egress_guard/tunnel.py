"""The tunnel fast path: pass a CONNECT tunnel through as bytes, and count them.

For a tunnel that is not inspected, mitmproxy would stack a server TLS layer, a client
TLS layer and the ``tls_clienthello`` hook before deciding to pass the bytes through,
and its pass-through layer counts nothing. The guard reads the ClientHello itself (to
check the SNI), then installs this layer directly: one relay step and two integer
additions per chunk. The counts are what the audit ``close`` record and the
``egress_guard_bytes_total`` metric report.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol

from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.layers.tcp import TCPLayer
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer
from mitmproxy.tls import ClientHello


class ByteCounter(Protocol):
    bytes_up: int
    bytes_down: int


class CountingTCPLayer(TCPLayer):
    """TCPLayer(ignore=True) that adds up what it relays in each direction."""

    def __init__(
        self,
        context: Context,
        counter: ByteCounter,
        on_relaying: Callable[[Context, ByteCounter], None] | None = None,
    ) -> None:
        super().__init__(context, ignore=True)
        self.counter = counter
        #: called once, when both ends are connected and the first chunk is relayed (the
        #: guard's run mode hands the tunnel's later data to egress_guard.splice)
        self.on_relaying = on_relaying

    def relay_messages(self, event: events.Event) -> Generator[Any, Any, None]:
        if self.on_relaying is not None:
            notify, self.on_relaying = self.on_relaying, None
            notify(self.context, self.counter)
        if type(event) is events.DataReceived:
            if event.connection is self.context.client:
                self.counter.bytes_up += len(event.data)
                yield commands.SendData(self.context.server, event.data)
            else:
                self.counter.bytes_down += len(event.data)
                yield commands.SendData(self.context.client, event.data)
            return
        yield from super().relay_messages(event)


_HANDSHAKE_CLIENT_HELLO = 0x01
MAX_CLIENT_HELLO = 64 * 1024
_EXT_SERVER_NAME = 0x0000
_EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D


def tls_layers(context: Context) -> Layer:
    """mitmproxy's TLS interception stack, as its NextLayer addon would build it."""
    server_tls = ServerTLSLayer(context)
    server_tls.child_layer = ClientTLSLayer(context)
    return server_tls


def sni_problem(hello: ClientHello) -> str | None:
    """Why a ClientHello's server name cannot be trusted, or None.

    mitmproxy's ``ClientHello.sni`` is None both when there is no SNI and when the SNI
    extension is unusual (two names, a bad host name, the extension twice); an upstream
    may still read the name from such an extension, so only a true absence counts as
    "no SNI". Encrypted ClientHello hides the real server name behind a public one.
    """
    types = [t for t, _ in hello.extensions]
    if _EXT_ENCRYPTED_CLIENT_HELLO in types:
        return "encrypted ClientHello (ECH) hides the server name"
    count = types.count(_EXT_SERVER_NAME)
    if count > 1:
        return "more than one SNI extension"
    if count == 1 and hello.sni is None:
        return "SNI extension is not a single valid host name"
    return None


def client_hello_shape_problem(data: bytes) -> str | None:
    """Refuse a TLS handshake record that cannot be starting a ClientHello, as soon as its
    first bytes show it, instead of waiting for a message that will never parse."""
    if len(data) >= 2 and data[1] != 0x03:
        return "not a TLS record (bad version byte)"
    if len(data) >= 6 and data[5] != _HANDSHAKE_CLIENT_HELLO:
        return "first TLS handshake message is not a ClientHello"
    if len(data) >= 9 and int.from_bytes(data[6:9], "big") > MAX_CLIENT_HELLO:
        return "ClientHello longer than 64 KiB"
    return None
