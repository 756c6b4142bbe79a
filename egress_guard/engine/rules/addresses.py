"""The addresses a target resolved to (or is pinned to): never the proxy itself, never
a denied address, and no private address the policy does not allow."""

from __future__ import annotations

from collections.abc import Sequence

from egress_guard.engine import hints
from egress_guard.engine.addresses import special_class
from egress_guard.engine.compiled import Compiled
from egress_guard.engine.matcher import networks_contain
from egress_guard.engine.types import Decision, Match, block
from egress_guard.normalize import Host, IPAddress, canonical_ip, join_hostport


def static_addresses(c: Compiled, host: Host) -> tuple[IPAddress, ...] | None:
    """Addresses known without DNS: an IP literal, or a ``network.resolve`` override."""
    if host.ip is not None:
        return (host.ip,)
    return c.resolve.get(host.value)


def decide_addresses(c: Compiled, match: Match, addresses: Sequence[IPAddress]) -> Decision:
    """Every address must pass; the caller must connect to one of exactly these."""
    host, port, dest = match.host, match.port, match.destination
    if not addresses:
        return block("dns_failed", host.value, port, dest.name, detail="no addresses")
    dest_nets = c.dest_nets[match.position]
    looped = check_self(c, addresses, host, port, dest.name)
    if looped is not None:
        return looped
    for raw_ip in addresses:
        ip = canonical_ip(raw_ip)
        denied = denied_address(c, ip, host, port, dest.name)
        if denied is not None:
            return denied
        if not c.policy.network.block_private:
            continue
        cls = special_class(ip)
        if cls is None:
            continue
        if networks_contain(dest_nets, ip) or networks_contain(c.allow_cidrs, ip):
            continue
        return block(
            "private_address",
            host.value,
            port,
            dest.name,
            hint=(
                f"{host.value} resolved to {ip} ({cls}); if that is intended, add it to "
                "network.allow_cidrs or to the destination's hosts"
            ),
            detail=f"{ip} is {cls}",
        )
    return Decision(True, "allow", "allowlisted", dest.name, host.value, port)


def check_unlisted_addresses(
    c: Compiled, addresses: Sequence[IPAddress], host: Host, port: int
) -> Decision | None:
    """The address checks no mode lifts, for a target audit mode lets through unlisted:
    a self-connection, and an address a deny rule covers (an unlisted alias of a denied
    host must not reach it because audit mode waved the name through)."""
    looped = check_self(c, addresses, host, port)
    if looped is not None:
        return looped
    for raw_ip in addresses:
        denied = denied_address(c, canonical_ip(raw_ip), host, port, None)
        if denied is not None:
            return denied
    return None


def denied_address(
    c: Compiled, ip: IPAddress, host: Host, port: int, dest: str | None
) -> Decision | None:
    for i in c.deny_ip_ids(ip):
        if c.deny_port_ok(i, port):
            return block(
                "denylisted",
                host.value,
                port,
                dest,
                hint=hints.denied(c.policy.deny_origins[i], f" (resolved to {ip})"),
            )
    return None


def check_self(
    c: Compiled, addresses: Sequence[IPAddress], host: Host, port: int, dest: str | None = None
) -> Decision | None:
    """Never connect to the proxy's own listening address: one request would loop
    through the proxy again and again. Checked in every mode."""
    for raw_ip in addresses:
        ip = canonical_ip(raw_ip)
        if c.is_self(ip, port):
            return block(
                "self_connection",
                host.value,
                port,
                dest,
                detail=f"{join_hostport(str(ip), port)} is egress-guard's own listening address",
            )
    return None
