"""special_class: which addresses are not the public internet, embedded IPv4 included."""

from __future__ import annotations

import ipaddress

import pytest

from egress_guard.engine import special_class
from egress_guard.engine.addresses import embedded_ipv4

P = pytest.param

CLASSES = [
    # IPv4
    P("127.0.0.1", "loopback", id="loopback"),
    P("127.255.255.254", "loopback", id="loopback-range"),
    P("10.0.0.1", "private", id="rfc1918-10"),
    P("172.16.0.1", "private", id="rfc1918-172"),
    P("172.31.255.255", "private", id="rfc1918-172-last"),
    P("192.168.1.1", "private", id="rfc1918-192"),
    P("169.254.169.254", "metadata", id="metadata-aws-gcp-azure"),
    P("169.254.170.2", "metadata", id="metadata-ecs"),
    P("100.100.100.200", "metadata", id="metadata-alibaba"),
    P("192.0.0.192", "metadata", id="metadata-oracle"),
    P("169.254.1.1", "link-local", id="link-local"),
    P("100.64.0.1", "cgnat", id="cgnat-first"),
    P("100.127.255.254", "cgnat", id="cgnat-last"),
    P("0.0.0.0", "unspecified", id="unspecified"),
    P("0.1.2.3", "unspecified", id="this-network"),
    P("224.0.0.251", "multicast", id="multicast-mdns"),
    P("198.18.0.1", "reserved", id="benchmarking"),
    P("240.0.0.1", "reserved", id="class-e"),
    P("255.255.255.255", "reserved", id="broadcast"),
    P("192.0.2.1", "private", id="test-net-1"),
    # IPv6
    P("::1", "loopback", id="v6-loopback"),
    P("::", "unspecified", id="v6-unspecified"),
    P("fc00::1", "ula", id="ula-fc"),
    P("fd12:3456::1", "ula", id="ula-fd"),
    P("fd00:ec2::254", "metadata", id="metadata-aws-v6"),
    P("fe80::1", "link-local", id="v6-link-local"),
    P("ff02::fb", "multicast", id="v6-multicast-mdns"),
    P("2001:db8::1", "private", id="v6-documentation"),
    # IPv4 carried inside IPv6
    P("::ffff:127.0.0.1", "loopback (127.0.0.1 inside IPv6)", id="mapped-loopback"),
    P("::ffff:10.0.0.1", "private (10.0.0.1 inside IPv6)", id="mapped-private"),
    P("::127.0.0.1", "loopback (127.0.0.1 inside IPv6)", id="compat-loopback"),
    P("64:ff9b::7f00:1", "loopback (127.0.0.1 inside IPv6)", id="nat64-loopback"),
    P("64:ff9b::a9fe:a9fe", "metadata (169.254.169.254 inside IPv6)", id="nat64-metadata"),
    P("64:ff9b::a00:1", "private (10.0.0.1 inside IPv6)", id="nat64-private"),
    P("64:ff9b::6440:1", "cgnat (100.64.0.1 inside IPv6)", id="nat64-cgnat"),
    P("64:ff9b:1::a00:1", "private (10.0.0.1 inside IPv6)", id="nat64-local-use-private"),
    P("2002:a00:1::1", "private (10.0.0.1 inside IPv6)", id="6to4-private"),
    P("2002:7f00:1::", "loopback (127.0.0.1 inside IPv6)", id="6to4-loopback"),
    P("2002:a9fe:a9fe::", "metadata (169.254.169.254 inside IPv6)", id="6to4-metadata"),
    # Teredo: server 65.54.227.120, client 192.168.1.1 obfuscated (3f57:fefe)
    P(
        "2001:0:4136:e378:8000:63bf:3f57:fefe",
        "private (192.168.1.1 inside IPv6)",
        id="teredo-private-client",
    ),
    # Teredo with public server and client is still not a direct destination
    P("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "teredo", id="teredo-public"),
    # public
    P("8.8.8.8", None, id="public-v4"),
    P("1.1.1.1", None, id="public-v4-2"),
    P("100.63.255.255", None, id="just-below-cgnat"),
    P("100.128.0.0", None, id="just-above-cgnat"),
    P("2606:4700::1111", None, id="public-v6"),
    P("2002:808:808::1", "6to4", id="6to4-public"),
    P("64:ff9b::808:808", None, id="nat64-public"),
]


@pytest.mark.parametrize(("addr", "cls"), CLASSES)
def test_special_class(addr: str, cls: str | None) -> None:
    assert special_class(ipaddress.ip_address(addr)) == cls


@pytest.mark.parametrize(
    ("addr", "inner"),
    [
        ("::ffff:1.2.3.4", ["1.2.3.4"]),
        ("::1.2.3.4", ["1.2.3.4"]),
        ("64:ff9b::102:304", ["1.2.3.4"]),
        ("64:ff9b:1::102:304", ["1.2.3.4"]),
        ("2002:102:304::", ["1.2.3.4"]),
        ("2606:4700::1111", []),
        ("::1", []),  # loopback, not an IPv4-compatible address
    ],
)
def test_embedded_ipv4(addr: str, inner: list[str]) -> None:
    got = embedded_ipv4(ipaddress.IPv6Address(addr))
    assert [str(a) for a in got] == inner
