"""Stop reading a client while one of its upstream connections is being opened.

mitmproxy keeps reading a client while the client's layer waits for an upstream
connection (the guard's DNS lookup, then the TCP connect) and queues every chunk in the
paused layer, with no bound: its only back-pressure is ``drain_writers``, which waits
for *write* buffers, and nothing is written while the upstream does not exist yet. A
client that kept sending during a connect that hangs (an address that drops SYNs, a full
accept queue, a slow name server) made the proxy hold all of it: 512 MiB in three
seconds in tests/proxy/test_backpressure.py, enough to take the proxy down for everyone.

Here the client's read loop waits, after handing a chunk on, until no upstream
connection of that client is opening any more. Its bytes then stay in its own socket
and TCP tells the client to hold back. The wait sits in ``drain_writers``, the step of
mitmproxy's read loop that exists for back-pressure and whose cancellation the loop
already handles, so an idle timeout or a closing client still ends the connection
cleanly.

It also fails closed where mitmproxy would hang: ``open_connection`` asserts the
upstream's peername, which a reset between connect and ``getpeername`` leaves unset.
The task then dies without telling the layer, which stays paused for good. Any such
unexpected error now closes the client.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mitmproxy.connection import Connection
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.server import ConnectionHandler

log = logging.getLogger("egress_guard")


@dataclass(slots=True, eq=False)
class _Opening:
    """The upstream connections of one client that are being opened."""

    conns: set[Connection] = field(default_factory=set)
    #: set while nothing is opening
    idle: asyncio.Event = field(default_factory=asyncio.Event)


_OPENING: weakref.WeakKeyDictionary[ConnectionHandler, _Opening] = weakref.WeakKeyDictionary()
_installed = False


def _begin(handler: ConnectionHandler, conn: Connection) -> None:
    st = _OPENING.get(handler)
    if st is None:
        st = _OPENING[handler] = _Opening()
    st.conns.add(conn)
    st.idle.clear()


def _end(handler: ConnectionHandler, conn: Connection) -> None:
    st = _OPENING.get(handler)
    if st is not None and conn in st.conns:
        st.conns.discard(conn)
        if not st.conns:
            st.idle.set()


def _is_client_reader(handler: ConnectionHandler) -> bool:
    io = handler.transports.get(handler.client)
    return io is not None and io.handler is not None and io.handler is asyncio.current_task()


def _close_client(handler: ConnectionHandler, why: str) -> None:
    io = handler.transports.get(handler.client)
    if io is not None and io.handler is not None:
        io.handler.cancel(why)  # as mitmproxy's own idle timeout ends a client


def install() -> None:
    """Patch ConnectionHandler once (idempotent); every client handled afterwards gets it."""
    global _installed
    if _installed:
        return
    open_connection = ConnectionHandler.open_connection
    server_event = ConnectionHandler.server_event
    drain_writers: Callable[[ConnectionHandler], Awaitable[None]] = (
        ConnectionHandler.drain_writers  # untyped in mitmproxy
    )

    async def opening(self: ConnectionHandler, command: commands.OpenConnection) -> None:
        _begin(self, command.connection)
        try:
            await open_connection(self, command)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.error(
                "egress-guard: an upstream connection failed inside mitmproxy; closing the "
                "client rather than leaving it waiting",
                exc_info=True,
            )
            _close_client(self, "upstream connection failed")
        finally:
            _end(self, command.connection)

    async def event(self: ConnectionHandler, event: events.Event) -> None:
        await server_event(self, event)
        if type(event) is events.OpenConnectionCompleted:
            _end(self, event.command.connection)

    async def drain(self: ConnectionHandler) -> None:
        await drain_writers(self)
        st = _OPENING.get(self)
        if st is not None and st.conns and _is_client_reader(self):
            await st.idle.wait()

    ConnectionHandler.open_connection = opening  # type: ignore[method-assign]
    ConnectionHandler.server_event = event  # type: ignore[method-assign]
    ConnectionHandler.drain_writers = drain  # type: ignore[method-assign]
    _installed = True
