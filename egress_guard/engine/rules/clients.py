"""Who may use the proxy: the client ACL, then proxy authentication."""

from __future__ import annotations

from egress_guard.engine.compiled import Compiled
from egress_guard.engine.matcher import networks_contain
from egress_guard.engine.types import Decision, block
from egress_guard.engine.verdicts import proxy_auth_required
from egress_guard.normalize import socket_ip


def check_client(c: Compiled, client_ip: str) -> Decision | None:
    """None when the client may use the proxy; a block otherwise."""
    try:
        ip = socket_ip(client_ip)
    except ValueError:
        return block("client_not_allowed", "", None, detail=f"bad client address {client_ip!r}")
    if networks_contain(c.client_nets, ip):
        return None
    return block(
        "client_not_allowed",
        "",
        None,
        hint="add the client's network to clients.allow_cidrs",
        detail=str(ip),
    )


def check_access(c: Compiled, client_ip: str, authenticated: bool, host: str) -> Decision | None:
    """The client ACL, then (when clients.auth is set) the proxy's password check, whose
    result the proxy passes: it alone holds the users file. ``host`` is the target the
    client asked for, named in the refusal."""
    d = check_client(c, client_ip)
    if d is not None:
        return d._replace(host=host)
    if c.policy.clients.auth is not None and not authenticated:
        return proxy_auth_required(host)
    return None
