"""Answer a refused HTTP/1 or HTTP/2 request at once, without taking its body first.

When an addon sets a response in ``requestheaders``, mitmproxy still reads the request's
whole body into memory and answers only at its end. For a refused request that is the
wrong way round: the body is going nowhere, and a client could send gigabytes (a
``POST`` to a host that is not allowed, a model-endpoint body over
``--max-model-body``) that the proxy would hold. Here a request the guard refused is
answered as soon as its headers are decided; the rest of its body is still read, and
dropped, and only then does the connection close or take the next request, as the
answer says (as web servers do after an early error response: closing with unread
bytes could reset the connection before the client reads the answer). A client that waits for
``100 Continue`` gets the answer instead and need not send the body at all.

HTTP/2 likewise: the answer ends the stream on the proxy's side (a server may answer
before the request is complete, RFC 9113 section 8.1) and the stream is dropped, so the
DATA frames that still come find no stream and are discarded. mitmproxy opens HTTP/2
flow-control windows to 2 GiB and credits every frame at once, so without this a
refused stream's body was held whole until the stream ended, however large its
declared length (tests/adversarial/test_memory_exhaustion_held_bodies.py). HTTP/3 keeps mitmproxy's
behaviour (the embedded proxy does not serve it).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from mitmproxy import http
from mitmproxy.proxy.layers.http import DropStream, HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import RequestHeaders, ResponseEndOfMessage

#: flow metadata key: the guard refused this request in requestheaders
REFUSED = "egress_guard_refused"

_installed = False


def mark(flow: http.HTTPFlow) -> None:
    """The guard has set ``flow.response`` to refuse this request."""
    if not flow.request.is_http3:
        flow.metadata[REFUSED] = True


def install() -> None:
    """Patch HttpStream once (idempotent)."""
    global _installed
    if _installed:
        return
    original = HttpStream.state_wait_for_request_headers

    def state_wait_for_request_headers(
        self: HttpStream, event: RequestHeaders
    ) -> Generator[Any, Any, None]:
        yield from original(self, event)
        flow = self.flow
        if (
            event.end_stream  # no body follows: answered as usual
            or flow is None
            or flow.response is None
            or not flow.metadata.get(REFUSED)
            or self.client_state != self.state_consume_request_body
        ):
            return
        self.client_state = self.state_errored  # what follows of the body is dropped
        yield from self.send_response()
        # end the exchange as flow_done would: the stream goes (the body's remaining
        # events then find none and are dropped by HttpLayer) and the response is
        # complete; once the body has been read, the connection goes on or closes as
        # the answer says (the guard's plain 403 closes, a provider-format one keeps it)
        flow.live = False
        yield DropStream(self.stream_id)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)

    HttpStream.state_wait_for_request_headers = state_wait_for_request_headers  # type: ignore[method-assign]
    _installed = True
