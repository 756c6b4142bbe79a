"""Named constructors for the decisions the proxy reaches from what it sees on the wire.

The proxy (egress_guard/proxy/) never builds a ``Decision`` itself: a refusal it has to
make (a request mitmproxy could not parse, a name that does not resolve, an audit sink
that cannot record) is built here, so "where is reason X decided" has one grep answer
under egress_guard/engine/ (tests/proxy/test_no_decisions_in_proxy.py keeps it so).
"""

from __future__ import annotations

from egress_guard.engine.types import Decision, Match

#: what the client is told when the audit sink cannot record its traffic (also inside
#: an inspected API call, in the provider's format)
UNRECORDED_HINT = "the audit log cannot record traffic now; retry later"


def internal_error(host: str, *, detail: str | None = None) -> Decision:
    """The guard failed while deciding: block (fail closed)."""
    return Decision(False, "block", "internal_error", None, host, None, detail=detail)


def unrecorded(
    host: str, detail: str, *, destination: str | None = None, port: int | None = None
) -> Decision:
    """Traffic the audit sink cannot record: the guard is unavailable, not the
    destination forbidden (answered 503 by the proxy)."""
    return Decision(
        False,
        "block",
        "internal_error",
        destination,
        host,
        port,
        hint=UNRECORDED_HINT,
        detail=detail,
    )


def malformed_request(host: str, port: int | None, detail: str) -> Decision:
    """A request shape no proxy should forward (or that mitmproxy already refused)."""
    return Decision(False, "block", "malformed_request", None, host, port, detail=detail)


def invalid_host(raw: str, detail: str) -> Decision:
    """A request target the strict normaliser refuses (``raw`` already printable)."""
    return Decision(False, "block", "invalid_host", None, raw, None, detail=detail)


def dns_failed(host: str, port: int, detail: str) -> Decision:
    """A name that does not resolve: not a policy block, but nothing can be sent."""
    return Decision(False, "block", "dns_failed", None, host, port, detail=detail)


def proxy_auth_required(host: str) -> Decision:
    """clients.auth is set and the request carries no valid Proxy-Authorization."""
    return Decision(
        False,
        "block",
        "proxy_auth_required",
        None,
        host,
        None,
        "send Proxy-Authorization: Basic with a user from clients.auth.users_file",
    )


def allowed_by_name(match: Match) -> Decision:
    """Allow decided on the name alone: a parent proxy resolves it and checks addresses."""
    d = match.destination
    return Decision(True, "allow", "allowlisted", d.name, match.host.value, match.port)


def repinned(match: Match, pinned: object, static: object) -> Decision:
    """After a reload network.resolve pins an open tunnel's name elsewhere: the open
    upstream cannot move (still to be finalized: audit mode may let it through)."""
    return Decision(
        False,
        "block",
        "not_allowlisted",
        match.destination.name,
        match.host.value,
        match.port,
        hint="reconnect: the policy now resolves this name to another address",
        detail=f"tunnel pinned to {pinned}, policy resolves {static}",
    )


def buffer_budget(
    base: Decision | None, host: str, port: int | None, hint: str, detail: str
) -> Decision:
    """A held request body refused or evicted for room (503, in every mode: nothing was
    checked). ``base``: the decision the request had, whose target it keeps."""
    if base is None:
        base = Decision(False, "block", "buffer_budget", None, host, port)
    return base._replace(
        allowed=False, action="block", reason="buffer_budget", hint=hint, detail=detail
    )
