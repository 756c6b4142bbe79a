"""Bound the unparsed bytes mitmproxy's HTTP/1 layers hold for a peer.

mitmproxy appends every byte a peer sends over HTTP/1 to the connection's receive buffer
and parses what it can. Three shapes of input never parse, and the buffer grew without
bound (its own code says "FIXME: protect against header size DoS"): a request or
response head that never ends, a chunk-size line that never ends, and bytes a client
pipelines behind a request whose answer has not come. One local client sent 300 MiB of
one header line and the proxy grew by 295 MiB: enough to take it down for everyone.
The idle timeout does not help, since the bytes keep coming.

Here, around each chunk a layer parses:

- a head (request or response) longer than MAX_HEAD, whether or not it has ended, or a
  line inside a chunked body still unfinished after MAX_HEAD bytes, is refused: the
  client gets 431 (head) or 400 (body) and its connection closes; an upstream's
  oversized response head or chunk line ends its stream, and the client gets mitmproxy's
  502. A head of 64 KiB is what Squid accepts by default, four times nginx's default;
- bytes waiting behind a request that is still being answered are not refused (HTTP/1.1
  lets a client pipeline) but, past MAX_PIPELINED, the client is not read any more until
  the answer is out and the bytes are parsed (``backpressure.hold``): they stay in the
  client's socket, and TCP holds the client back.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Generator
from typing import Any

from mitmproxy.connection import Client
from mitmproxy.http import Request
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._http1 import (
    Http1Connection,
    Http1Server,
    make_error_response,
)

from egress_guard.proxy.patches import backpressure

log = logging.getLogger("egress_guard")

#: a request or response head, or one chunk-size or trailer line, at most
MAX_HEAD = 64 * 1024
#: bytes held behind a request whose answer has not come, before the client is paused
MAX_PIPELINED = 64 * 1024

_installed = False
#: told of every client connection refused here (the addon records it in the audit log)
on_refused: Callable[[Client, str, Request | None], None] | None = None


def _drop(layer: Http1Connection) -> None:
    layer.buf.maybe_extract_at_most(len(layer.buf))


def _state(layer: Http1Connection) -> str:
    """The layer's state by name: read_headers, read_body, wait, done, passthrough."""
    return getattr(layer.state, "__name__", "")


def _side(layer: Http1Connection) -> str:
    """What the layer's peer sends: requests (our client) or responses (an upstream)."""
    return "request" if isinstance(layer, Http1Server) else "response"


def _too_long(layer: Http1Connection, what: str) -> Generator[commands.Command, Any, None]:
    """End a connection whose peer sent more than a layer may hold unparsed."""
    yield from _refuse(layer, f"{_side(layer)} {what} longer than {MAX_HEAD // 1024} KiB")


def _refuse(layer: Http1Connection, message: str) -> Generator[commands.Command, Any, None]:
    """End the connection with a status for a client that has no answer yet, and end
    the stream; the refusal of a client's bytes is recorded (``on_refused``)."""
    server_side = isinstance(layer, Http1Server)  # the peer is our client
    log.warning("egress-guard: %s from %s; closing the connection", message, layer.conn.peername)
    if server_side and on_refused is not None:
        try:
            on_refused(layer.context.client, message, layer.request)
        except Exception:  # the refusal itself must go ahead
            log.exception("egress-guard: cannot record a refused request")
    _drop(layer)
    head_pending = _state(layer) == "read_headers"
    layer.state = layer.done
    if server_side and (layer.response is None or layer.response.status_code < 200):
        # the client has no answer yet (at most an interim 100 Continue): tell it why, as
        # mitmproxy does for a head it cannot read (the stream's own error answer would
        # find the connection closed)
        yield commands.SendData(
            layer.conn, make_error_response(431 if head_pending else 400, message)
        )
    yield commands.CloseConnection(layer.conn)
    if layer.stream_id is not None and not (head_pending and server_side):
        yield ReceiveHttp(
            layer.ReceiveProtocolError(
                layer.stream_id,
                f"HTTP/1 protocol error: {message}",
                code=layer.ReceiveProtocolError.code,
            )
        )


#: what an overlong buffer is, by the state of the layer that could not parse it
_WHAT = {"read_headers": "head", "read_body": "chunk line", "wait": "data after the answer"}


def install() -> None:
    """Patch Http1Connection._handle_event once (idempotent)."""
    global _installed
    if _installed:
        return
    original = Http1Connection._handle_event

    def _handle_event(
        self: Http1Connection, event: events.Event
    ) -> Generator[commands.Command, Any, None]:
        if (
            type(event) is events.DataReceived
            and len(self.buf) + len(event.data) > MAX_HEAD
            and _state(self) == "read_headers"
            and _head_length(bytes(self.buf) + event.data) > MAX_HEAD
        ):
            # refused before parsing: a head that ends in this chunk is as much too long
            # as one that has not ended yet
            yield from _too_long(self, "head")
            return
        try:
            yield from original(self, event)
        except NotImplementedError as e:
            # mitmproxy cannot pass HTTP trailers on ("HTTP trailers are not implemented
            # yet."): the layer would die with the connection, the client without an
            # answer and the audit log without a record
            log.debug("egress-guard: %s", e)
            yield from _refuse(self, f"{_side(self)} trailers are not supported")
            return
        if type(event) is not events.DataReceived or len(self.buf) <= _SMALLEST:
            return
        state = _state(self)
        if state == "passthrough":
            return  # the buffer is not used any more
        if state == "done":
            _drop(self)  # closing: nothing will read these
        elif state == "wait" and isinstance(self, Http1Server):
            if len(self.buf) > MAX_PIPELINED and not backpressure.hold(
                self.context.client, self, _released
            ):
                yield from _too_long(self, "pipelined data")
        elif len(self.buf) > MAX_HEAD:
            yield from _too_long(self, _WHAT.get(state, "data"))

    Http1Connection._handle_event = _handle_event  # type: ignore[method-assign]
    _installed = True


_SMALLEST = min(MAX_HEAD, MAX_PIPELINED)
#: where a head ends, as h11's ReceiveBuffer (mitmproxy's parser) finds it
_BLANK_LINE = re.compile(rb"\n\r?\n", re.MULTILINE)


def _head_length(data: bytes) -> int:
    """Bytes up to the end of the first head in ``data``; above MAX_HEAD if it has none."""
    m = _BLANK_LINE.search(data)
    return m.end() if m is not None else MAX_HEAD + 1


def _released(layer: object) -> bool:
    """A paused client may be read again: its pipelined bytes have been parsed (or the
    connection is going away)."""
    assert isinstance(layer, Http1Connection)
    return len(layer.buf) <= MAX_PIPELINED or _state(layer) != "wait"
