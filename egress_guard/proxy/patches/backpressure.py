"""Stop reading a client while its layer waits for an upstream connection or a hook.

mitmproxy keeps reading a client while the client's layer is paused: waiting for an
upstream connection (TCP connect, then the TLS handshake in inspect mode) or for a
blocking hook (the guard resolves names in ``http_connect`` and ``requestheaders``). It
queues every chunk in the paused layer, with no bound: its only back-pressure is
``drain_writers``, which waits for *write* buffers, and nothing is written meanwhile. A
client that kept sending during a connect that hangs (an address that drops SYNs, a full
accept queue) or a slow name server made the proxy hold all of it: 512 MiB in three
seconds in tests/proxy/test_backpressure.py, enough to take the proxy down for everyone.

Here the client's read loop waits, after handing a chunk on, until nothing it waits for
is pending any more. Its bytes then stay in its own socket and TCP tells the client to
hold back. The wait sits in ``drain_writers``, the step of mitmproxy's read loop that
exists for back-pressure and whose cancellation the loop already handles, so an idle
timeout or a closing client still ends the connection cleanly.

Clients that multiplex (HTTP/2, HTTP/3) are not held back: their other streams may need
the client's next frames to finish and free one of mitmproxy's five connection slots
per address that a new stream's connect waits for, so holding the client back could
deadlock it. HTTP/1 bytes pipelined behind a request whose answer has not come are held
back the same way once a layer asks for it (``hold``, from egress_guard/proxy/patches/http1limit.py).
Not covered (mitmproxy buffers, the guard does not bound it): the wait for a parent
proxy's CONNECT answer. See docs/decisions.md.

It also fails closed where mitmproxy would hang: ``open_connection`` asserts the
upstream's peername, which a reset between connect and ``getpeername`` leaves unset.
The task then dies without telling the layer, which stays paused for good. Any such
unexpected error now closes the client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mitmproxy.connection import Connection, ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.tls import TlsStartServerHook
from mitmproxy.proxy.server import ConnectionHandler

log = logging.getLogger("egress_guard")

#: what a client's layer can be waiting for: an upstream connection, a hook (by id:
#: hooks are dataclasses compared by value, and unhashable), or a layer holding too many
#: of the client's bytes (see ``hold``)
_Pending = Connection | int | object


@dataclass(slots=True, eq=False)
class _Waits:
    """What the client's layer waits for that the client itself does not provide."""

    pending: set[_Pending] = field(default_factory=set)
    #: connections whose OpenConnectionCompleted has come (their TLS may still be going)
    opened: set[Connection] = field(default_factory=set)
    #: connections whose TLS handshake has started (tls_start_server): only those are
    #: waited for; ``conn.tls`` alone does not mean a handshake will follow (a layer
    #: can pass the connection through raw)
    handshaking: set[Connection] = field(default_factory=set)
    #: layers that hold too many of the client's bytes -> "may the client be read again?"
    held: dict[object, Callable[[], bool]] = field(default_factory=dict)
    #: set while nothing is pending
    idle: asyncio.Event = field(default_factory=asyncio.Event)


_WAITS: weakref.WeakKeyDictionary[ConnectionHandler, _Waits] = weakref.WeakKeyDictionary()
#: handlers whose client has been seen multiplexing: never held back again (an inspected
#: CONNECT inside an HTTP/2 session resets the shared client's ALPN to the inner one)
_MULTIPLEXED: weakref.WeakSet[ConnectionHandler] = weakref.WeakSet()
#: client connection id -> its handler, for layers (which know only their connection)
_HANDLERS: weakref.WeakValueDictionary[str, ConnectionHandler] = weakref.WeakValueDictionary()
_installed = False


def _waits(handler: ConnectionHandler) -> _Waits:
    st = _WAITS.get(handler)
    if st is None:
        st = _WAITS[handler] = _Waits()
    return st


def _begin(handler: ConnectionHandler, what: _Pending) -> None:
    st = _waits(handler)
    st.pending.add(what)
    st.idle.clear()


def _end(handler: ConnectionHandler, what: _Pending) -> None:
    st = _WAITS.get(handler)
    if st is not None and what in st.pending:
        st.pending.discard(what)
        if isinstance(what, Connection):
            st.opened.discard(what)
            st.handshaking.discard(what)
        if not st.pending:
            st.idle.set()


def _ready(conn: Connection, st: _Waits) -> bool:
    """An opened connection no longer holds its layer back: no TLS handshake of ours
    started on it, or it is done (inspect mode), or the connection failed or closed
    (the layer then answers the client)."""
    return (
        conn not in st.handshaking
        or conn.tls_established
        or conn.error is not None
        or conn.state is ConnectionState.CLOSED
    )


def _settle(handler: ConnectionHandler, st: _Waits) -> None:
    for conn in [c for c in st.opened if _ready(c, st)]:
        _end(handler, conn)


def _client_reader(handler: ConnectionHandler) -> asyncio.Task[None] | None:
    """The task reading the client (mitmproxy's handle_connection for it), if any."""
    io = handler.transports.get(handler.client)
    return io.handler if io is not None else None


def _multiplexed(handler: ConnectionHandler) -> bool:
    if handler in _MULTIPLEXED:
        return True
    client = handler.client
    if client.transport_protocol != "tcp" or client.alpn in (b"h2", b"h3"):
        _MULTIPLEXED.add(handler)
        return True
    return False


def hold(client: Connection, layer: object, released: Callable[[object], bool]) -> bool:
    """Stop reading ``client`` until ``released(layer)`` says its bytes have been used.

    For a layer that holds too many of the client's bytes it cannot parse yet (HTTP/1
    requests pipelined behind one still being answered). Checked after every event of
    the client's handler. False when the client's read loop is not known (the caller
    then ends the connection rather than keep buffering).
    """
    handler = _HANDLERS.get(client.id)
    if handler is None or _multiplexed(handler):
        return False
    st = _waits(handler)
    if layer not in st.held:
        st.held[layer] = functools.partial(released, layer)
        _begin(handler, layer)
    return True


def _release(handler: ConnectionHandler, st: _Waits) -> None:
    for layer, released in list(st.held.items()):
        if released():
            del st.held[layer]
            _end(handler, layer)


def _close_client(handler: ConnectionHandler, why: str) -> None:
    if (reader := _client_reader(handler)) is not None:
        reader.cancel(why)  # as mitmproxy's own idle timeout ends a client


def install() -> None:
    """Patch ConnectionHandler once (idempotent); every client handled afterwards gets it."""
    global _installed
    if _installed:
        return
    open_connection = ConnectionHandler.open_connection
    hook_task = ConnectionHandler.hook_task
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
        except Exception as e:
            # a remote server can cause this at will (a reset right after connect): one
            # line, the traceback only when debugging
            log.warning(
                "egress-guard: upstream connection %s failed inside mitmproxy (%r); closing "
                "the client rather than leaving it waiting",
                command.connection.address,
                e,
            )
            log.debug("egress-guard: the failure", exc_info=True)
            _close_client(self, "upstream connection failed")
        finally:
            _end(self, command.connection)

    async def hooking(self: ConnectionHandler, hook: commands.StartHook) -> None:
        if not hook.blocking:
            await hook_task(self, hook)
            return
        if type(hook) is TlsStartServerHook:
            # started from the event that opened the connection (tasks start eagerly),
            # so _settle after that event already sees it; without eager tasks the
            # connection is released at its TCP connect: less held back, never stuck
            _waits(self).handshaking.add(hook.data.conn)
        _begin(self, id(hook))  # the hook lives (in this frame) until _end
        try:
            await hook_task(self, hook)  # ends with HookCompleted: the layer goes on
        finally:
            _end(self, id(hook))

    async def event(self: ConnectionHandler, event: events.Event) -> None:
        await server_event(self, event)
        st = _WAITS.get(self)
        if st is None or not st.pending:
            return
        if type(event) is events.OpenConnectionCompleted:
            st.opened.add(event.command.connection)
        if st.opened:
            _settle(self, st)
        if st.held:
            _release(self, st)

    async def drain(self: ConnectionHandler) -> None:
        await drain_writers(self)
        if _client_reader(self) is not asyncio.current_task() or _multiplexed(self):
            return  # checked on every client chunk: a multiplexing client is seen early
        if self.client.id not in _HANDLERS:
            _HANDLERS[self.client.id] = self
        st = _WAITS.get(self)
        if st is not None and st.pending:
            await st.idle.wait()

    ConnectionHandler.open_connection = opening  # type: ignore[method-assign]
    ConnectionHandler.hook_task = hooking  # type: ignore[method-assign]
    ConnectionHandler.server_event = event  # type: ignore[method-assign]
    ConnectionHandler.drain_writers = drain  # type: ignore[method-assign]
    _installed = True
