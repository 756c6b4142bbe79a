"""Request hygiene a proxy owes the origin: hop-by-hop headers removed, request shapes
that invite smuggling refused (plain HTTP; inspected tunnels strip hop-by-hop too)."""

from __future__ import annotations

from mitmproxy import http

from egress_guard.engine.decide import printable
from egress_guard.engine.verdicts import malformed_request
from egress_guard.proxy.state import Blocked

_HTTP1_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1"})

#: connection options a forwarded Connection header keeps: mitmproxy reads them from this
#: very request to manage both connections, and an upgrade (WebSocket) needs its pair
_KEPT_CONNECTION_OPTIONS = ("close", "keep-alive", "upgrade")
#: never removed because a client listed it in Connection: the message's target and
#: framing (removing Content-Length from a streamed body would desynchronise the upstream)
_NOT_HOP_BY_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade"}
)
#: for this proxy or this connection only, listed in Connection or not (RFC 9110 7.6.1;
#: Proxy-Authorization carries the client's credentials for the guard)
_HOP_BY_HOP = ("proxy-connection", "proxy-authorization", "keep-alive")


def strip_hop_by_hop(req: http.Request) -> None:
    """Remove what a proxy must not forward: the headers named in Connection, the
    well-known hop-by-hop ones, TE (but ``TE: trailers`` on HTTP/2 and 3, where it is the
    only value allowed), and an Upgrade that Connection does not announce. Connection
    itself keeps only close, keep-alive and upgrade."""
    headers = req.headers
    options: list[str] = []
    for value in headers.get_all("connection"):
        for token in value.split(","):
            token = token.strip().lower()
            if token and token not in options:
                options.append(token)
    for name in [*_HOP_BY_HOP, *(o for o in options if o not in _NOT_HOP_BY_HOP)]:
        if name in headers:
            del headers[name]
    te = headers.get_all("te")
    if te and not (
        (req.is_http2 or req.is_http3) and all(v.strip().lower() == "trailers" for v in te)
    ):
        del headers["te"]
    if "upgrade" not in options and "upgrade" in headers:
        del headers["upgrade"]
    kept = [o for o in options if o in _KEPT_CONNECTION_OPTIONS]
    if kept:
        headers["connection"] = ", ".join(kept)
    elif "connection" in headers:
        del headers["connection"]


def check_well_formed(req: http.Request) -> None:
    """Refuse request shapes a proxy should never forward (smuggling hygiene)."""
    problem = None
    if req.http_version not in _HTTP1_VERSIONS and not (req.is_http2 or req.is_http3):
        problem = f"unsupported HTTP version {printable(req.http_version)!r}"
    else:
        for name, value in req.headers.fields:
            if any(c in b"\x00\r\n" for c in name + value):
                problem = f"control character in header {printable(name.decode('latin-1'))!r}"
                break
    if problem is not None:
        raise Blocked(malformed_request(printable(req.host), None, problem))
