"""Count the body bytes that arrive for a held model-call body.

The held-body budget (egress_guard/proxy/bodybudget.py) reserves a body's declared length when
its head is decided. To tell a body that is arriving from one that is not (a client that
sends a head and then nothing, or a trickle, to keep the budget from others), each
reservation counts the bytes that actually came. mitmproxy buffers a request body in
``HttpStream.state_consume_request_body`` (``request_body_buf += event.data``, HTTP/1 and
HTTP/2 alike); here each ``RequestData`` of a flow holding a reservation adds its length
to the reservation and stamps the time.

Cheap: one metadata lookup per chunk, and two attribute updates for held flows only.
Fails closed: if the count cannot be updated, the body still goes on under its
reservation (its declared length stays counted against the budget); it only looks
slower than it is, so under pressure it may be evicted sooner, never held unaccounted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from typing import Any

from mitmproxy.proxy import events
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.layers.http._events import RequestData

from egress_guard.proxy.bodybudget import Held

log = logging.getLogger("egress_guard")

#: flow metadata key: the flow's reservation (a ``bodybudget.Held``), set by the addon
#: when it holds the body, removed when the reservation is released
PROGRESS = "egress_guard_held_progress"

_installed = False


def count(flow: Any, n: int) -> None:
    """``n`` body bytes of ``flow`` arrived."""
    entry = flow.metadata.get(PROGRESS)
    if entry is None:
        return
    if not isinstance(entry, Held):
        raise TypeError(f"{PROGRESS} holds {type(entry).__name__}")
    entry.received += n
    entry.last = time.monotonic()


def install() -> None:
    """Patch HttpStream once (idempotent)."""
    global _installed
    if _installed:
        return
    original = HttpStream.state_consume_request_body

    def state_consume_request_body(
        self: HttpStream, event: events.Event
    ) -> Generator[Any, Any, None]:
        if isinstance(event, RequestData) and self.flow is not None:
            try:
                count(self.flow, len(event.data))
            except Exception:
                # the body stays under its reservation; it just looks stalled
                log.exception("egress-guard: cannot count a held body's bytes")
        return original(self, event)  # type: ignore[no-any-return]

    HttpStream.state_consume_request_body = state_consume_request_body  # type: ignore[method-assign]
    _installed = True
