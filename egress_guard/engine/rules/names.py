"""A target by its name (or IP literal) and port: deny rules, then allow rules, then the
port. The checks run in this order so the reason is the most specific one."""

from __future__ import annotations

from collections.abc import Iterable

from egress_guard.engine import hints
from egress_guard.engine.addresses import special_class
from egress_guard.engine.compiled import Compiled
from egress_guard.engine.matcher import networks_contain
from egress_guard.engine.types import Decision, Match, Reason, block, new, printable
from egress_guard.normalize import (
    Host,
    NormalizationError,
    normalize_host,
    normalize_port,
)


def decide_target(c: Compiled, raw_host: str, raw_port: str | int) -> Decision | Match:
    """A target as the client wrote it, before any DNS lookup (not mode-applied). A Match
    still needs its addresses decided."""
    try:
        host = normalize_host(raw_host)
        port = normalize_port(raw_port)
    except NormalizationError as e:
        return block("invalid_host", printable(raw_host), None, detail=str(e))
    return decide_name(c, host, port)


def decide_name(c: Compiled, host: Host, port: int) -> Decision | Match:
    """A normalised target by name (not mode-applied)."""
    ip = host.ip
    if ip is None:
        deny_ids, ids = c.names.get(host.value) or c.name_ids(host.value, spelled=False)
    else:
        deny_ids, ids = c.deny_ip_ids(ip), c.allow.match_ip(ip)
    if deny_ids:
        deny = deny_hit(c, deny_ids, host, port)
        if deny is not None:
            return deny
    if not ids:
        if ip is None:
            return unlisted(c, "not_allowlisted", host, port)
        cls = special_class(ip)
        if (
            cls is not None
            and c.policy.network.block_private
            and not (networks_contain(c.allow_cidrs, ip))
        ):
            return unlisted(c, "private_address", host, port, detail=cls)
        return unlisted(c, "ip_literal_not_allowed", host, port)
    for i in ids:
        if port in c.ports[i]:
            return new(Match, (host, port, c.dests[i], i))
    first = c.dests[ids[0]]
    return block(
        "port_not_allowed",
        host.value,
        port,
        destination=first.name,
        hint=hints.allow_port(c.policy, first, host.value, port),
    )


def deny_hit(c: Compiled, deny_ids: Iterable[int], host: Host, port: int) -> Decision | None:
    for i in deny_ids:
        if c.deny_port_ok(i, port):
            return block(
                "denylisted",
                host.value,
                port,
                hint=hints.denied(c.policy.deny_origins[i]),
            )
    return None


def catalog_entries(c: Compiled, host: Host, port: int) -> list[str]:
    """Names of the usable catalog entries that cover ``host:port``."""
    ids = (
        c.catalog_index.match_ip(host.ip)
        if host.ip is not None
        else c.catalog_index.match_name(host.value)
    )
    return [c.catalog_names[i] for i in ids if port in c.catalog_ports[i]]


def unlisted(
    c: Compiled, reason: Reason, host: Host, port: int, detail: str | None = None
) -> Decision:
    """A block for a target no destination lists, with the way to allow it."""
    names = catalog_entries(c, host, port)
    hint = hints.allow_unlisted(c.policy, host.value, port, names)
    return Decision(
        False,
        "block",
        reason,
        None,
        host.value,
        port,
        hint,
        detail,
        catalog=names[0] if names else None,
    )
