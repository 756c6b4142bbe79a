"""Relay an allowed tunnel's bytes without walking mitmproxy's layer stack per chunk.

Once a tunnel is decided, its SNI checked and its upstream connected, every chunk it
carries would still be read by a task per connection (StreamReader, a 64 KiB slice, a
lock to drain every writer of the connection), travel down mitmproxy's layers as an
event and back up as a command. The layers have nothing left to decide for such a
tunnel, and on this machine that machinery, not the copying, is most of the proxy's CPU
per megabyte and a good part of the latency a tunnel's handshake sees.

So, for a registered tunnel, each direction's source socket is read by a callback of
the event loop itself: read what the kernel has, count it, hand it to the other side's
transport. Back-pressure is the transport's own: while the destination's write buffer
is above its high-water mark, the source is not read. The first chunk still goes
through the layers (it is what the guard checks), and so does everything that is not
data: at end of stream or on an error the source socket goes back to mitmproxy, whose
own read then sees the EOF or error and runs the normal close and half-close handling.

A direction that shows bulk traffic (one read of 64 KiB or more) gets a pipe, and from
then on its bytes move socket → pipe → socket with splice(2), never copied into Python.
The pipe is emptied before each callback returns (what the destination does not take at
once is read back and queued on its transport), so ordering, counting and back-pressure
are the copy path's, and closing the pipe can never lose a byte.

Rules that keep this safe:

- a direction is taken over only when nothing is buffered for it in mitmproxy (its
  StreamReader is empty, not paused, not at EOF), so no byte can overtake another;
- before every read the callback checks that neither transport is closing: a closing
  transport's socket may be closed and its number reused, so it is never touched, and
  its ``close()`` has already removed the callback;
- anything unexpected (a transport that is not a plain selector socket, an error while
  writing) hands the direction back to mitmproxy's normal path.

Installed by ``egress-guard run`` only (``install()``); under ``mitmdump -s`` nothing is
registered and mitmproxy relays as usual. Only plain HTTP/1 CONNECT tunnels are
registered: a client speaking TLS or HTTP/2 to the proxy has its tunnel inside that
session, so the bytes on its socket are not the tunnel's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

from mitmproxy.connection import Client, Connection, Server
from mitmproxy.proxy import events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.server import ConnectionHandler

from egress_guard.tunnel import ByteCounter

log = logging.getLogger("egress_guard")

#: bytes read per callback; asyncio's own socket transport reads this much at a time
CHUNK = 256 * 1024

#: Move bulk bytes with splice(2) through a pipe instead of copying them into Python.
#: Off where the platform lacks it; the bench's ``x_copy_relay`` experiment turns it off.
ZERO_COPY = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
#: a read this large means the sender is ahead of us: give the direction a pipe
BULK_READ = 64 * 1024
#: pipe capacity asked for (the kernel's default is 64 KiB; 1 MiB is the usual maximum)
PIPE_SIZE = 1024 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


@dataclass(slots=True, eq=False)
class _Direction:
    """One direction of a spliced tunnel, read by an event-loop callback."""

    handler: ConnectionHandler
    splice: Splice
    up: bool
    src_tr: Any
    dst_tr: Any
    dst_writer: asyncio.StreamWriter
    fd: int
    dst_fd: int
    #: given back to mitmproxy (or its transport closed): never touched again
    done: bool = False
    #: (read end, write end) once the direction has shown bulk traffic; empty between
    #: callbacks, so closing it never loses a byte
    pipe: tuple[int, int] | None = None


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
    sp = SPLICES.pop(client_id, None)
    if sp is not None:
        for d in (sp.up, sp.down):
            if isinstance(d, _Direction):
                _close_pipe(d)


# -- taking a direction over ---------------------------------------------------------------


def _take_over(handler: ConnectionHandler, sp: Splice, up: bool) -> _Direction | str | None:
    """Start reading one direction's source from the event loop, if that is safe now.

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
    loop = asyncio.get_running_loop()
    if not (
        isinstance(src_tr, asyncio.Transport)
        and isinstance(dst_tr, asyncio.Transport)
        and hasattr(loop, "_add_reader")
        and hasattr(loop, "_remove_reader")
    ):
        return _NEVER
    if src_tr.is_closing() or dst_tr.is_closing() or reader.at_eof():
        return _NEVER
    if reader.exception() is not None:
        return _NEVER
    if getattr(reader, "_buffer", b"x") or getattr(reader, "_paused", True):
        return None  # bytes mitmproxy already holds must go first
    lock = getattr(handler, "_server_event_lock", None)
    if not isinstance(lock, asyncio.Lock):
        return _NEVER
    if lock.locked() or getattr(lock, "_waiters", None):
        # A reader task may have taken a chunk out of the StreamReader and be queued on
        # mitmproxy's event lock with it: that chunk must go first. Try again later.
        return None
    if not src_tr.is_reading():
        return None
    sock, dst_sock = src_tr.get_extra_info("socket"), dst_tr.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    dst_fd = dst_sock.fileno() if dst_sock is not None else -1
    if fd < 0 or dst_fd < 0:
        return _NEVER
    d = _Direction(handler, sp, up, src_tr, dst_tr, dst_writer, fd, dst_fd)
    src_tr.pause_reading()
    loop._add_reader(fd, _on_readable, d)
    log.debug("egress-guard: tunnel %s spliced (%s)", sp.client.id, "up" if up else "down")
    return d


def _arm(handler: ConnectionHandler, sp: Splice) -> None:
    if sp.up is None:
        sp.up = _take_over(handler, sp, True)
    if sp.down is None:
        sp.down = _take_over(handler, sp, False)


def _give_back(d: _Direction, reading: bool = True) -> None:
    """Hand the direction's source socket back to mitmproxy's own reader."""
    if d.done:
        return
    d.done = True
    _close_pipe(d)
    if d.src_tr.is_closing():
        return  # its close() removed our callback; the socket may already be gone
    if reading:
        asyncio.get_running_loop()._remove_reader(d.fd)  # type: ignore[attr-defined]
    d.src_tr.resume_reading()


def _count(counter: ByteCounter, up: bool, n: int) -> None:
    if up:
        counter.bytes_up += n
    else:
        counter.bytes_down += n


def _on_readable(d: _Direction) -> None:
    if d.done:
        return
    if d.src_tr.is_closing() or d.dst_tr.is_closing():
        _give_back(d)
        return
    if d.pipe is not None and not d.dst_tr.get_write_buffer_size():
        _splice_once(d, d.pipe)
        return
    try:
        data = os.read(d.fd, CHUNK)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        _give_back(d)  # mitmproxy's own read sees the error (or the EOF that follows)
        return
    if not data:
        _give_back(d)  # end of stream: mitmproxy reads it and closes as it always does
        return
    if len(data) >= BULK_READ and d.pipe is None and ZERO_COPY:
        d.pipe = _open_pipe()
        if d.pipe is not None:
            log.debug(
                "egress-guard: tunnel %s moves bulk (%s) with splice(2)",
                d.splice.client.id,
                "up" if d.up else "down",
            )
    _forward(d, data, len(data))


def _splice_once(d: _Direction, pipe: tuple[int, int]) -> None:
    """Move what the source holds to the destination through the pipe, without copying
    it into Python. What the destination does not take at once is read back out of the
    pipe and queued on its transport, so the pipe is empty again when this returns and
    the transport's buffer and high-water mark govern back-pressure as on the copy path.
    """
    r, w = pipe
    try:
        n = os.splice(d.fd, w, PIPE_SIZE, flags=_SPLICE_FLAGS)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        _give_back(d)
        return
    if not n:
        _give_back(d)
        return
    moved = 0
    while moved < n:
        try:
            moved += os.splice(r, d.dst_fd, n - moved, flags=_SPLICE_FLAGS)
        except OSError:
            break  # full (or failed): the transport's own write below queues the rest
    try:
        rest = _drain_pipe(r, n - moved) if moved < n else b""
    except OSError:  # our own pipe: never expected, but a lost byte must not go unseen
        log.exception("egress-guard: cannot read back a tunnel's pipe; closing the tunnel")
        d.dst_tr.abort()
        _give_back(d)
        return
    _forward(d, rest, n)


def _forward(d: _Direction, data: bytes, n: int) -> None:
    """Queue ``data`` on the destination (empty when splice(2) moved it all), count the
    ``n`` bytes this callback relayed, and stop reading while the destination is slow."""
    d.handler.timeout_watchdog.register_activity()
    if data:
        try:
            d.dst_tr.write(data)
        except Exception:  # e.g. written after write_eof(): let mitmproxy decide
            log.debug("egress-guard: splice write failed; back to the normal path", exc_info=True)
            _give_back(d)
            return
    _count(d.splice.counter, d.up, n)
    high = d.dst_tr.get_write_buffer_limits()[1]
    if d.dst_tr.get_write_buffer_size() > high and not d.dst_tr.is_closing():
        # the destination is slower: stop reading until its buffer drains
        asyncio.get_running_loop()._remove_reader(d.fd)  # type: ignore[attr-defined]
        task = asyncio.ensure_future(d.dst_writer.drain())
        task.add_done_callback(functools.partial(_drained, d))


def _open_pipe() -> tuple[int, int] | None:
    """A non-blocking pipe as large as the kernel allows; None (keep copying) if the
    process is out of descriptors or the kernel refuses."""
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def _drain_pipe(r: int, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = os.read(r, n)
        if not chunk:  # cannot happen: these bytes were just spliced in
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _close_pipe(d: _Direction) -> None:
    pipe, d.pipe = d.pipe, None
    if pipe is not None:
        for fd in pipe:
            with contextlib.suppress(OSError):
                os.close(fd)


def _drained(d: _Direction, task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed drain shows up as the transport closing
    if d.done:
        return
    if d.src_tr.is_closing() or d.dst_tr.is_closing():
        _give_back(d, reading=False)
        return
    asyncio.get_running_loop()._add_reader(d.fd, _on_readable, d)  # type: ignore[attr-defined]


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
                except Exception:  # as mitmproxy's own server_event: log, do not raise
                    log.warning("egress-guard: cannot relay a tunnel chunk", exc_info=True)
                    return
                _count(sp.counter, peer is sp.server, len(event.data))
                _arm_safely(self, sp)
                return
        await original(self, event)
        if (sp := SPLICES.get(self.client.id)) is not None and (sp.up is None or sp.down is None):
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
