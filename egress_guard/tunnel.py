"""The tunnel fast path: pass a CONNECT tunnel through as bytes, and count them.

For a tunnel that is not inspected, mitmproxy would stack a server TLS layer, a client
TLS layer and the ``tls_clienthello`` hook before deciding to pass the bytes through,
and its pass-through layer counts nothing. The guard reads the ClientHello itself (to
check the SNI), then installs this layer directly: one relay step and two integer
additions per chunk. The counts are what the audit ``close`` record and the
``egress_guard_bytes_total`` metric report.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Protocol

from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tcp import TCPLayer


class ByteCounter(Protocol):
    bytes_up: int
    bytes_down: int


class CountingTCPLayer(TCPLayer):
    """TCPLayer(ignore=True) that adds up what it relays in each direction."""

    def __init__(self, context: Context, counter: ByteCounter) -> None:
        super().__init__(context, ignore=True)
        self.counter = counter

    def relay_messages(self, event: events.Event) -> Generator[Any, Any, None]:
        if type(event) is events.DataReceived:
            if event.connection is self.context.client:
                self.counter.bytes_up += len(event.data)
                yield commands.SendData(self.context.server, event.data)
            else:
                self.counter.bytes_down += len(event.data)
                yield commands.SendData(self.context.client, event.data)
            return
        yield from super().relay_messages(event)
