"""Host patterns in a policy: exact names, ``*.`` and ``**.`` wildcards, IPs and CIDRs.

Patterns are canonicalised by the same normaliser the engine uses for requests, so a
pattern written ``API.Example.COM.`` or in Unicode matches the request spelled any other
way. Patterns that would allow far more than their author meant are refused at load.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from publicsuffixlist import PublicSuffixList

from egress_guard.normalize import NormalizationError, canonical_ip, normalize_host

PatternKind = Literal["exact", "sub", "apex_sub", "ip", "cidr"]

_REGEX_HINTS = re.compile(r"[\^$()|\\+?{}\[\]]|\.\*|\*\*\*")
#: what only a regular expression has (``.*`` alone may be a glob: ``a.*.example.com``)
_REGEX_ONLY = re.compile(r"[\^$()|\\+?{}\[\]]|\*\*\*")


class PatternError(ValueError):
    """A host pattern that the policy language refuses, with a hint on how to write it."""


@dataclass(frozen=True, slots=True)
class HostPattern:
    kind: PatternKind
    #: canonical host (exact/sub/apex_sub: A-label name without the wildcard prefix)
    value: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def __str__(self) -> str:
        if self.kind == "sub":
            return f"*.{self.value}"
        if self.kind == "apex_sub":
            return f"**.{self.value}"
        return self.value


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    # The list ships inside the publicsuffixlist wheel: no network access at run time.
    return PublicSuffixList()


def is_public_suffix(name: str) -> bool:
    """True for ``com``, ``co.uk``, ``github.io``, and any unknown TLD (PSL's ``*`` rule)."""
    return bool(_psl().is_public(name))


def parse_pattern(raw: object, *, deny: bool = False) -> HostPattern:
    """Parse and canonicalise one ``hosts:`` entry, or raise PatternError with a hint.

    ``deny``: a deny rule's entry, which may cover every address (``0.0.0.0/0``, and
    ``::ffff:0:0/96``, the same network IPv4-mapped): it allows nothing."""
    if not isinstance(raw, str):
        raise PatternError(f"host pattern must be a string, got {type(raw).__name__}")
    text = raw.strip()
    if text != raw:
        raise PatternError(f"host pattern {raw!r} has surrounding spaces")
    if not text:
        raise PatternError("empty host pattern")
    if text in ("*", "**", "*.", "**."):
        raise PatternError(
            f"{text!r} would allow every host; list the hosts you need "
            "(see policies/catalog.yaml) or use audit mode to discover them"
        )
    if not _REGEX_ONLY.search(text) and "*" in text.partition(".")[2]:
        # a.*.example.com, example.*: a glob, not a regular expression; say so
        raise PatternError(
            f"{text!r} has a wildcard in a middle or last label; a wildcard may only be "
            "the whole leftmost label: '*.example.com' (subdomains) or '**.example.com' "
            "(apex and subdomains), or list each host"
        )
    if _REGEX_HINTS.search(text):
        raise PatternError(
            f"{text!r} looks like a regular expression; patterns are host names: "
            "'api.example.com', '*.example.com' (subdomains) or '**.example.com' "
            "(apex and subdomains)"
        )
    if "://" in text:
        raise PatternError(
            f"{text!r} is a URL; hosts are names or addresses, e.g. 'api.example.com' "
            "(ports go in 'ports:', paths in 'paths:')"
        )
    if "/" in text:
        return _parse_cidr(text, deny)
    if text.count(":") == 1 and not text.startswith("["):
        raise PatternError(
            f"{text!r} has a port; write the host alone and list the port in 'ports:'"
        )
    kind: PatternKind = "exact"
    body = text
    if text.startswith("**."):
        kind, body = "apex_sub", text[3:]
    elif text.startswith("*."):
        kind, body = "sub", text[2:]
    if "*" in body:
        raise PatternError(
            f"{text!r}: a wildcard may only be the whole leftmost label ('*.' or '**.')"
        )
    try:
        host = normalize_host(body)
    except NormalizationError as e:
        raise PatternError(f"{text!r}: {e}") from e
    if host.ip is not None:
        if kind != "exact":
            raise PatternError(f"{text!r}: wildcards apply to names, not IP addresses")
        return HostPattern("ip", host.value, ipaddress.ip_network(host.ip))
    if kind != "exact" and is_public_suffix(host.value):
        raise PatternError(
            f"{text!r} covers the public suffix {host.value!r} (every domain registered "
            "under it); name the registrable domain, e.g. '*.example.com'"
        )
    return HostPattern(kind, host.value)


def _parse_cidr(text: str, deny: bool = False) -> HostPattern:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise PatternError(
            f"{text!r} is not a valid CIDR (host bits must be zero, e.g. 10.0.0.0/8): {e}"
        ) from e
    if (
        isinstance(net, ipaddress.IPv6Network)
        and net.network_address.ipv4_mapped is not None
        and net.prefixlen >= 96
    ):
        # ::ffff:a.b.c.d/N is the IPv4 network a.b.c.d/(N-96): requests are matched in
        # their canonical (IPv4) form, so the pattern must be too.
        mapped = canonical_ip(net.network_address)
        net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    # Checked after the mapping: ::ffff:0:0/96 is 0.0.0.0/0, every IPv4 address.
    if net.prefixlen == 0 and not deny:
        raise PatternError(f"{text!r} would allow every address")
    return HostPattern("cidr", str(net), net)


def parse_network(raw: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR or single address for allow_cidrs / client ACLs (an address means /32 or /128).

    An IPv4-mapped network (``::ffff:10.0.0.0/104``) is written as the IPv4 network it
    is (``10.0.0.0/8``), as host patterns are."""
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as e:
        raise PatternError(f"{raw!r} is not a valid CIDR: {e}") from e
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(MAPPED):
        return mapped_ipv4(net) or net
    return net


#: IPv4-mapped IPv6 addresses, ``::ffff:a.b.c.d``: on a dual-stack socket each one IS the
#: IPv4 address a.b.c.d (requests, DNS answers and clients are matched in IPv4 form)
MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def mapped_ipv4(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | None:
    """The IPv4 addresses an IPv6 network holds in IPv4-mapped form, as an IPv4 network:
    ``0.0.0.0/0`` for a network around all of ``::ffff:0:0/96`` (``::/1``, ``::/80``),
    ``10.0.0.0/8`` for ``::ffff:10.0.0.0/104``; None when it holds none (or is IPv4)."""
    if not isinstance(net, ipaddress.IPv6Network):
        return None
    if MAPPED.subnet_of(net):
        return ipaddress.IPv4Network("0.0.0.0/0")
    if net.subnet_of(MAPPED):
        first = net.network_address.ipv4_mapped
        assert first is not None
        return ipaddress.IPv4Network(f"{first}/{net.prefixlen - 96}")
    return None


def with_mapped(
    nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks, each IPv6 one followed by the IPv4 network it holds in IPv4-mapped
    form (``mapped_ipv4``): an address is matched in its IPv4 form, so a rule written
    as an IPv6 network covers the IPv4 addresses it maps, both ways round."""
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for net in nets:
        out.append(net)
        v4 = mapped_ipv4(net)
        if v4 is not None:
            out.append(v4)
    return tuple(out)
