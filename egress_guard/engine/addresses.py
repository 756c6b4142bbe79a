"""Which addresses are not the public internet.

``block_private`` exists to stop SSRF-style egress: an allowlisted name that resolves to
127.0.0.1, a cloud metadata endpoint, or an internal network. IPv6 has several ways to
carry an IPv4 address inside it (mapped, compatible, NAT64, 6to4, Teredo); each embedded
address is checked as well, or ``64:ff9b::a9fe:a9fe`` would be a way to reach
169.254.169.254 through a NAT64 gateway.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from egress_guard.normalize import IPAddress

V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network

#: Cloud instance-metadata endpoints. They are link-local or private anyway; they are
#: listed so the reason can name them and so an allow_cidrs of a whole range is visible.
METADATA: tuple[IPAddress, ...] = (
    ipaddress.IPv4Address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DO
    ipaddress.IPv4Address("169.254.170.2"),  # AWS ECS task metadata
    ipaddress.IPv4Address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.IPv4Address("192.0.0.192"),  # Oracle Cloud (legacy)
    ipaddress.IPv6Address("fd00:ec2::254"),  # AWS IPv6
)

#: RFC 6052 well-known prefix: globally routable (IANA "Global: True"); an address in it is
#: as public as the IPv4 address it carries. 64:ff9b:1::/48 (RFC 8215) is local-use.
_NAT64_WKP = V6("64:ff9b::/96")
_NAT64 = (_NAT64_WKP, V6("64:ff9b:1::/48"))
_6TO4 = V6("2002::/16")
_TEREDO = V6("2001::/32")
_COMPAT = V6("::/96")

# Ranges ipaddress does not already call non-global in every Python we support.
_EXTRA_V4 = (
    V4("0.0.0.0/8"),
    V4("100.64.0.0/10"),
    V4("192.0.0.0/24"),
    V4("198.18.0.0/15"),
    V4("224.0.0.0/4"),
    V4("240.0.0.0/4"),
)
_EXTRA_V6 = (V6("fc00::/7"), V6("fe80::/10"), V6("ff00::/8"), V6("::/128"), V6("::1/128"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries inside it, by any standard transition scheme."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    packed = int(ip)
    if ip in _COMPAT and packed > 1:
        found.append(ipaddress.IPv4Address(packed & 0xFFFFFFFF))
    for net in _NAT64:
        if ip in net:
            found.append(ipaddress.IPv4Address(packed & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)  # (server, client) — the client address is de-obfuscated
    return found


@lru_cache(maxsize=65536)
def special_class(ip: IPAddress) -> str | None:
    """Name the non-public class of ``ip``, or None when it is a public address."""
    if ip in METADATA:
        return "metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in embedded_ipv4(ip):
            cls = special_class(inner)
            if cls is not None:
                # Name the IPv4 address: str(IPv6Address) of mapped forms differs
                # between Python versions, and the IPv4 address is what matters.
                return f"{cls} ({inner} inside IPv6)"
        if ip in _NAT64_WKP:
            # A DNS64 answer for a public IPv4 host. ipaddress calls all of ::/8
            # "reserved", which would block every IPv4-only site on an IPv6-only network.
            return None
        if any(ip in net for net in _EXTRA_V6):
            return _v6_name(ip)
        if ip.ipv4_mapped is None and ip in _TEREDO:
            return "teredo"
        if ip in _6TO4:
            # Deprecated (RFC 7526) and judged differently by Python 3.12 and 3.13: say
            # so explicitly, whatever IPv4 address it carries.
            return "6to4"
    else:
        if any(ip in net for net in _EXTRA_V4):
            return _v4_name(ip)
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private:
        return "private"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


def _v4_name(ip: ipaddress.IPv4Address) -> str:
    if ip in V4("0.0.0.0/8"):
        return "unspecified"
    if ip in V4("100.64.0.0/10"):
        return "cgnat"
    if ip in V4("224.0.0.0/4"):
        return "multicast"
    return "reserved"


def _v6_name(ip: ipaddress.IPv6Address) -> str:
    if ip == ipaddress.IPv6Address("::1"):
        return "loopback"
    if ip == ipaddress.IPv6Address("::"):
        return "unspecified"
    if ip in V6("fc00::/7"):
        return "ula"
    if ip in V6("fe80::/10"):
        return "link-local"
    return "multicast"
