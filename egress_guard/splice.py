"""Relay an allowed tunnel's bytes without walking mitmproxy's layer stack per chunk.

Once a tunnel is decided, its SNI checked and its upstream connected, every chunk it
carries would still travel down mitmproxy's layers (proxy mode, HTTP layer, CONNECT
stream, next-layer, our counting layer) as an event and back up as a command: on this
machine that machinery, not the copying, is most of the proxy's CPU per megabyte. The
layers have nothing left to decide for such a tunnel, so the connection handler hands
its data straight to the other side's writer and counts it.

Only data takes the short cut. Opening, closing and half-closing still go through the
layers, so connection state, close records and timeouts work as before. Anything the
short cut is not sure about (no registered tunnel, a peer that is not an open transport
of this handler, a parent proxy in between) takes mitmproxy's normal path.

Installed by ``egress-guard run`` only (``install()``); under ``mitmdump -s`` nothing is
registered and mitmproxy relays as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mitmproxy.connection import Client, Server
from mitmproxy.proxy import events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.server import ConnectionHandler

from egress_guard.tunnel import ByteCounter


@dataclass(slots=True)
class Splice:
    client: Client
    server: Server
    counter: ByteCounter


#: client connection id -> its spliced tunnel
SPLICES: dict[str, Splice] = {}
_installed = False


def installed() -> bool:
    return _installed


def register(client: Client, server: Server, counter: ByteCounter) -> None:
    if _installed and server.via is None:
        SPLICES[client.id] = Splice(client, server, counter)


def on_relaying(context: Context, counter: ByteCounter) -> None:
    """CountingTCPLayer callback: both ends are connected, the tunnel may be spliced.

    Only when the CONNECT came over plain HTTP/1: a client that speaks TLS (an HTTPS
    proxy URL) or HTTP/2 to the proxy has its tunnel inside that session, so the bytes
    on its socket are not the tunnel's bytes.
    """
    if context.client.tls or context.client.alpn:
        return
    register(context.client, context.server, counter)


def unregister(client_id: str) -> None:
    SPLICES.pop(client_id, None)


def install() -> None:
    """Patch ConnectionHandler.server_event once (idempotent)."""
    global _installed
    if _installed:
        return
    original = ConnectionHandler.server_event

    async def server_event(self: ConnectionHandler, event: events.Event) -> None:
        if type(event) is events.DataReceived and (sp := SPLICES.get(self.client.id)):
            conn = event.connection
            peer: Any = sp.server if conn is sp.client else sp.client if conn is sp.server else None
            io = self.transports.get(peer) if peer is not None else None
            writer = io.writer if io is not None else None
            if writer is not None and not writer.is_closing():
                if peer is sp.server:
                    sp.counter.bytes_up += len(event.data)
                else:
                    sp.counter.bytes_down += len(event.data)
                self.timeout_watchdog.register_activity()
                writer.write(event.data)
                return
        await original(self, event)

    ConnectionHandler.server_event = server_event  # type: ignore[method-assign]
    _installed = True
