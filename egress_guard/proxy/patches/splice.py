"""Relay an allowed tunnel's bytes without walking mitmproxy's layer stack per chunk.

Once a tunnel is decided, its SNI checked and its upstream connected, every chunk it
carries would still be read by a task per connection (StreamReader, a 64 KiB slice, a
lock to drain every writer of the connection), travel down mitmproxy's layers as an
event and back up as a command. The layers have nothing left to decide for such a
tunnel, and on this machine that machinery, not the copying, is most of the proxy's CPU
per megabyte and a good part of the latency a tunnel's handshake sees.

So, for a registered tunnel, each direction's source transport gets a small protocol of
ours in place of mitmproxy's StreamReaderProtocol (``transport.set_protocol``): what the
transport reads is counted and written straight to the other side's transport.
Back-pressure is the transport's own: while the destination's write buffer is above its
high-water mark, the source is paused. The first chunk still goes through the layers (it
is what the guard checks), and so does everything that is not data: end of stream and
connection loss put mitmproxy's protocol back and hand the event to it, so close,
half-close and the idle timeout run as they always do. Only public transport and
protocol API is used, so this works the same on asyncio's own loop and on uvloop.

Rules that keep this safe:

- a direction is taken over only when nothing is buffered for it in mitmproxy (its
  StreamReader is empty, not paused, not at EOF, no chunk queued on the connection's
  event lock), so no byte can overtake another;
- flow-control calls for the transport (``pause_writing``/``resume_writing``) are
  passed on to mitmproxy's protocol, so its writers' ``drain()`` keeps working;
- the relays read into one shared buffer (``_Relay``), used again only when the
  destination has taken the whole chunk; a destination that keeps part of it to send
  later keeps that buffer and the next read gets a new one; small chunks, and every
  chunk for a destination with anything queued, are relayed as copies;
- a transport that is not a plain stream stays on mitmproxy's path; a destination found
  closing gets mitmproxy's protocol back, with the chunk in hand, to decide; an error
  while relaying (a failed write or resume) closes both ends of the tunnel.

Installed by ``egress-guard run`` only (``install()``); under ``mitmdump -s`` nothing is
registered and mitmproxy relays as usual. Only plain HTTP/1 CONNECT tunnels are
registered: a client speaking TLS or HTTP/2 to the proxy has its tunnel inside that
session, so the bytes on its socket are not the tunnel's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, TypeGuard

from mitmproxy.connection import Client, Connection, Server
from mitmproxy.proxy import events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.server import ConnectionHandler

from egress_guard.proxy.tunnel import ByteCounter

log = logging.getLogger("egress_guard")


@dataclass(slots=True, eq=False)
class _Direction:
    """One direction of a spliced tunnel: its source transport runs a _Relay."""

    handler: ConnectionHandler
    splice: Splice
    up: bool
    src_tr: asyncio.Transport
    dst_tr: asyncio.Transport
    dst_writer: asyncio.StreamWriter
    #: mitmproxy's protocol for the source transport, put back by _give_back
    orig: asyncio.BaseProtocol
    #: given back to mitmproxy: never touched again
    done: bool = False


#: bytes a relay reads per call: what uvloop reads per call anyway
_CHUNK = 256 * 1024
#: chunks smaller than this are relayed as a copy, never as a view of the shared buffer,
#: so a buffer left in a destination's queue holds at least a quarter of its size in data
_MIN_VIEW = 64 * 1024


class _Relay(asyncio.BufferedProtocol):
    """Stands in for mitmproxy's protocol on a spliced direction's source transport.

    A buffered protocol: the transport reads straight into a buffer of ours, where a
    plain protocol gets a new bytes object per read (an allocation and a copy of up to
    256 KiB); the large chunks of a bulk transfer then go to the destination without a
    copy. Every relay reads into the same buffer, as uvloop's own reads do: a read
    and its relaying run back to back on the one event loop, and the buffer is used
    again only when the destination took the whole chunk. A transport that could send
    only part of it keeps a view of the rest (uvloop and asyncio both do; neither
    copies), so that buffer is left to it and the next read gets a new one. A buffer per
    relay would cost 512 KiB per open tunnel.
    """

    __slots__ = ("d",)

    #: the buffer the next read goes into (made on first use)
    shared: memoryview | None = None

    def __init__(self, d: _Direction) -> None:
        self.d = d

    def get_buffer(self, sizehint: int) -> memoryview:
        if _Relay.shared is None:
            _Relay.shared = memoryview(bytearray(_CHUNK))
        return _Relay.shared

    def buffer_updated(self, nbytes: int) -> None:
        buf = _Relay.shared
        assert buf is not None  # get_buffer came first
        if nbytes < _MIN_VIEW or self.d.dst_tr.get_write_buffer_size():
            # A small chunk, or a destination that is behind and will queue it: a copy.
            # A view would keep the whole buffer in the queue, 256 KiB for a few bytes
            # (a client that stops reading and a server that trickles could pin one per
            # tunnel and direction); and behind a queue, every chunk would pin another.
            _relay(self.d, buf[:nbytes].tobytes())
            return
        # Not shared again until the destination is known to have taken all of it:
        # whatever goes wrong in between, the next read gets a new buffer.
        _Relay.shared = None
        if not _relay(self.d, buf[:nbytes]):
            _Relay.shared = buf

    def eof_received(self) -> bool | None:
        orig = _give_back(self.d)
        return orig.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.d.done = True  # whatever happens below, mitmproxy's protocol hears of it
        try:
            _give_back(self.d)
        finally:
            self.d.orig.connection_lost(exc)

    # The transport's own flow control (it is also the other direction's destination):
    # mitmproxy's writers wait on it in drain().
    def pause_writing(self) -> None:
        self.d.orig.pause_writing()

    def resume_writing(self) -> None:
        self.d.orig.resume_writing()


#: a direction that can never be taken over (checked once, not on every chunk)
_NEVER = "never"


@dataclass(slots=True)
class Splice:
    client: Client
    server: Server
    counter: ByteCounter
    #: per direction: None (not yet taken over), a _Direction, or _NEVER
    up: _Direction | str | None = None
    down: _Direction | str | None = None


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


# -- taking a direction over ---------------------------------------------------------------


def _take_over(handler: ConnectionHandler, sp: Splice, up: bool) -> _Direction | str | None:
    """Give one direction's source transport our protocol, if that is safe now.

    None: not now (something is still buffered in mitmproxy; try again after the next
    chunk). _NEVER: this direction stays on mitmproxy's path.
    """
    src: Connection = sp.client if up else sp.server
    dst: Connection = sp.server if up else sp.client
    src_io = handler.transports.get(src)
    dst_io = handler.transports.get(dst)
    if src_io is None or dst_io is None:
        return _NEVER
    reader, writer, dst_writer = src_io.reader, src_io.writer, dst_io.writer
    if not (
        isinstance(reader, asyncio.StreamReader)
        and isinstance(writer, asyncio.StreamWriter)
        and isinstance(dst_writer, asyncio.StreamWriter)
    ):
        return _NEVER
    src_tr, dst_tr = writer.transport, dst_writer.transport
    if not (_is_stream_transport(src_tr) and _is_stream_transport(dst_tr)):
        return _NEVER
    orig = src_tr.get_protocol()
    if not isinstance(orig, asyncio.StreamReaderProtocol):
        return _NEVER  # already ours, or something we do not know how to stand in for
    if src_tr.is_closing() or dst_tr.is_closing() or reader.at_eof():
        return _NEVER
    if reader.exception() is not None:
        return _NEVER
    if getattr(reader, "_buffer", b"x") or getattr(reader, "_paused", True):
        return None  # bytes mitmproxy already holds must go first
    lock = getattr(handler, "_server_event_lock", None)
    if not isinstance(lock, asyncio.Lock):
        return _NEVER
    if not hasattr(lock, "_waiters"):
        return _NEVER  # cannot tell whether a chunk is queued: stay on mitmproxy's path
    if lock.locked() or lock._waiters:
        # A reader task may have taken a chunk out of the StreamReader and be queued on
        # mitmproxy's event lock with it: that chunk must go first. Try again later.
        return None
    if not src_tr.is_reading():
        return None
    d = _Direction(handler, sp, up, src_tr, dst_tr, dst_writer, orig)
    src_tr.set_protocol(_Relay(d))
    log.debug("egress-guard: tunnel %s spliced (%s)", sp.client.id, "up" if up else "down")
    return d


#: what a relay needs of a transport; uvloop's transports have it without being
#: asyncio.Transport subclasses, so the check is by behaviour
_TRANSPORT_API = (
    "get_protocol",
    "set_protocol",
    "is_reading",
    "pause_reading",
    "resume_reading",
    "is_closing",
    "write",
    "get_write_buffer_size",
    "get_write_buffer_limits",
)


def _is_stream_transport(tr: object) -> TypeGuard[asyncio.Transport]:
    return all(callable(getattr(tr, name, None)) for name in _TRANSPORT_API)


def _arm(handler: ConnectionHandler, sp: Splice) -> None:
    if sp.up is None:
        sp.up = _take_over(handler, sp, True)
    if sp.down is None:
        sp.down = _take_over(handler, sp, False)


def _give_back(d: _Direction) -> Any:
    """Put mitmproxy's protocol back on the direction's source transport; returns it."""
    d.done = True
    if type(d.src_tr.get_protocol()) is _Relay:
        d.src_tr.set_protocol(d.orig)
    return d.orig


def _abort(d: _Direction) -> None:
    _abort_all(d.src_tr, d.dst_tr)


def _abort_all(*transports: Any) -> None:
    """Fail closed: end the tunnel (both transports) rather than relay it partly: a
    dropped chunk would leave a stream with a hole in it."""
    log.warning("egress-guard: a spliced tunnel failed; closing it", exc_info=True)
    for tr in transports:
        if tr is not None:
            with contextlib.suppress(Exception):
                tr.abort()


def _count(counter: ByteCounter, up: bool, n: int) -> None:
    if up:
        counter.bytes_up += n
    else:
        counter.bytes_down += n


def _relay(d: _Direction, data: bytes | memoryview) -> bool:
    """Write one chunk to the destination. False only when nothing can still refer to
    ``data``: the destination sent all of it, or mitmproxy was handed a copy. True when
    the destination queued part of it, or the write failed and the tunnel was aborted."""
    if d.done or d.dst_tr.is_closing():
        _give_back(d).data_received(bytes(data))  # mitmproxy decides what a dead end gets
        return False
    d.handler.timeout_watchdog.register_activity()
    try:
        d.dst_tr.write(data)
    except Exception:  # e.g. written after write_eof(): this chunk cannot be delivered
        try:
            _give_back(d)
        finally:
            _abort(d)
        return True
    _count(d.splice.counter, d.up, len(data))
    queued = d.dst_tr.get_write_buffer_size()  # 0 unless the destination is behind
    if not queued:
        return False
    if queued > d.dst_tr.get_write_buffer_limits()[1] and not d.dst_tr.is_closing():
        # the destination is slower: stop reading until its buffer drains
        d.src_tr.pause_reading()
        task = asyncio.ensure_future(d.dst_writer.drain())
        task.add_done_callback(functools.partial(_drained, d))
    return True


def _drained(d: _Direction, task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed drain shows up as the transport closing
    try:
        if d.dst_tr.is_closing():
            _give_back(d)  # reading again, mitmproxy's protocol sees what follows
        if not d.src_tr.is_closing():
            d.src_tr.resume_reading()
    except Exception:  # a source left paused would hang the tunnel until the idle timeout
        _abort(d)


# -- the patch -------------------------------------------------------------------------------


def install() -> None:
    """Patch ConnectionHandler.server_event once (idempotent).

    A registered tunnel's directions are taken over right after the event that
    registered it. Until a direction is taken over (mitmproxy still held bytes for it),
    its chunks are relayed straight to the other side's writer from here.
    """
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
                self.timeout_watchdog.register_activity()
                try:
                    writer.write(event.data)
                except Exception:  # a chunk that cannot be delivered: end the tunnel
                    src_io = self.transports.get(conn)
                    src = src_io.writer if src_io is not None else None
                    _abort_all(getattr(writer, "transport", None), getattr(src, "transport", None))
                    return
                _count(sp.counter, peer is sp.server, len(event.data))
                _arm_safely(self, sp)
                return
        await original(self, event)
        if (sp := SPLICES.get(self.client.id)) is not None:
            _arm_safely(self, sp)

    ConnectionHandler.server_event = server_event  # type: ignore[method-assign]
    _installed = True


def _arm_safely(handler: ConnectionHandler, sp: Splice) -> None:
    if sp.up is not None and sp.down is not None:
        return
    try:
        _arm(handler, sp)
    except Exception:  # the normal path still relays; never lose the tunnel over this
        log.exception("egress-guard: cannot splice a tunnel; relaying it the usual way")
        for attr in ("up", "down"):
            if getattr(sp, attr) is None:
                setattr(sp, attr, _NEVER)
