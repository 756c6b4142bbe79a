"""Bytes and close records: what each allowed upstream carried, recorded when the
client connection ends (or the proxy shuts down), so the audit log never holds an
allow without its close.

The Accounting addon owns ``responseheaders`` (count the answer as it streams; a held
body, forwarded by now, is let go), ``client_disconnected`` and ``done``.
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.connection import Client

from egress_guard.proxy.patches import splice
from egress_guard.proxy.state import APPROVAL_KEY, Approval, GuardState

log = logging.getLogger("egress_guard")


class Accounting:
    """mitmproxy addon: byte counts of HTTP exchanges, and close records."""

    #: unique among mitmproxy addons (its default is the lower-cased class name, which
    #: another script's addon could take, and a clash refuses the whole guard)
    name = "egress_guard_accounting"

    def __init__(self, guard: GuardState) -> None:
        self.g = guard

    def done(self) -> None:
        # Shutting down: every connection still open gets its close record now, so the
        # audit log never has an allow without its close.
        for client_id in list(self.g.conns):
            self.g.close_records(client_id, error="proxy shutting down")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            # the body was forwarded (mitmproxy sends it whole before any answer is read),
            # or the guard's refusal is being answered
            self.g.release_body(flow, drop=True)
        except Exception:
            log.exception("egress-guard: cannot release a held body")
        approval = flow.metadata.get(APPROVAL_KEY)
        resp = flow.response
        if approval is None or resp is None:
            return
        try:
            approval.bytes_down += head_size(str(resp.status_code), resp.reason, resp.headers)

            def down(chunk: bytes) -> bytes:
                approval.bytes_down += len(chunk)
                return chunk

            resp.stream = down
        except Exception:
            log.exception("egress-guard: cannot count response bytes")

    def client_disconnected(self, client: Client) -> None:
        splice.unregister(client.id)
        if self.g.bodies.release_connection(client.id):  # streams that ended without a hook
            self.g.return_memory_soon()
        self.g.close_records(client.id)


def count_http(flow: http.HTTPFlow, approval: Approval | None) -> None:
    """Count an HTTP exchange's bytes (head + body) as they stream through."""
    if approval is None:
        return
    req = flow.request
    approval.bytes_up += head_size(req.method, req.path, req.headers)
    flow.metadata[APPROVAL_KEY] = approval

    def up(chunk: bytes) -> bytes:
        approval.bytes_up += len(chunk)
        return chunk

    req.stream = up


def head_size(first: str, second: str, headers: http.Headers) -> int:
    """Bytes of an HTTP/1 message head as relayed: start line, headers, blank line."""
    size = len(first) + len(second) + 13  # " ", " HTTP/1.1", CRLF
    for k, v in headers.fields:
        size += len(k) + len(v) + 4
    return size + 2
