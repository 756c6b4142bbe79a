"""Direct connections (transparent mode): a connection a gateway or a sidecar
redirected to the guard, without CONNECT, is decided by the name its first bytes give
(TLS SNI, HTTP Host) like a CONNECT to that name, and only if it was sent to an address
that name has: the name and the destination address must agree."""

from __future__ import annotations

from collections.abc import Sequence

from egress_guard.engine.types import Decision, block
from egress_guard.normalize import Host, IPAddress, canonical_ip, join_hostport

#: how a direct connection can be made checkable
DIRECT_HINT = (
    "a connection that names no server (no TLS SNI, no HTTP Host) cannot be checked "
    "against the policy; send it through the proxy (HTTPS_PROXY) or by name"
)


def check_redirected(
    name: Host | None,
    via: str,
    original: IPAddress,
    port: int,
    checked: Sequence[IPAddress] | None,
    destination: str | None,
) -> Decision | None:
    """None when the named ``name`` was sent to one of its ``checked`` addresses; else
    the refusal: ``direct_connection`` when there is no name (or its addresses are not
    known here), ``sni_mismatch``/``host_header_mismatch`` when the name has other
    addresses than the one the connection went to (fronting: an allowed name on a
    connection to another server)."""
    where = join_hostport(str(original), port)
    if name is None:
        return block(
            "direct_connection",
            str(original),
            port,
            hint=DIRECT_HINT,
            detail=f"direct connection to {where} with no server name",
        )
    if not checked:
        return block(
            "direct_connection",
            name.value,
            port,
            destination,
            hint=DIRECT_HINT,
            detail=f"direct connection to {where}: the addresses of {name.value} are not known",
        )
    sent = canonical_ip(original)
    if any(canonical_ip(a) == sent for a in checked):
        return None
    has = ", ".join(str(a) for a in checked)
    return block(
        "sni_mismatch" if via == "sni" else "host_header_mismatch",
        name.value,
        port,
        destination,
        detail=(
            f"direct connection to {where} names {name.value} ({via}), "
            f"which is at {has}, not at {original}"
        ),
    )
