"""HostIndex: exact, ``*.`` (subdomains only), ``**.`` (apex and subdomains), IPs, CIDRs."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_guard.engine import HostIndex
from egress_guard.engine.matcher import networks_contain
from egress_guard.policy.patterns import parse_pattern

RULES: list[tuple[int, list[str]]] = [
    (0, ["api.example.com"]),
    (1, ["*.sub.example.com"]),
    (2, ["**.apex.example.com"]),
    (3, ["10.0.0.0/8", "172.16.0.0/12"]),
    (4, ["192.168.1.7"]),
    (5, ["2001:db8::/32"]),
    (6, ["::1"]),
    (7, ["*.example.org", "**.example.net"]),
    (8, ["api.example.com", "10.1.0.0/16"]),  # overlaps rule 0 and rule 3
    (9, ["::ffff:192.0.2.0/120"]),  # mapped form of 192.0.2.0/24
]


@pytest.fixture(scope="module")
def index() -> HostIndex:
    return HostIndex(RULES)


P = pytest.param

NAMES = [
    # exact
    P("api.example.com", (0, 8), id="exact"),
    P("example.com", (), id="exact-parent-not-matched"),
    P("x.api.example.com", (), id="exact-child-not-matched"),
    P("api.example.com.evil.net", (), id="exact-as-prefix"),
    P("xapi.example.com", (), id="exact-label-prefix"),
    # *. subdomains only, any depth, never the apex
    P("a.sub.example.com", (1,), id="sub-one-level"),
    P("a.b.c.sub.example.com", (1,), id="sub-deep"),
    P("sub.example.com", (), id="sub-not-apex"),
    P("xsub.example.com", (), id="sub-label-suffix"),
    P("sub.example.com.evil.net", (), id="sub-as-prefix"),
    # **. apex and subdomains
    P("apex.example.com", (2,), id="apex-sub-apex"),
    P("a.apex.example.com", (2,), id="apex-sub-one-level"),
    P("a.b.apex.example.com", (2,), id="apex-sub-deep"),
    P("notapex.example.com", (), id="apex-sub-label-suffix"),
    P("example.com", (), id="apex-sub-parent"),
    # several patterns in one rule
    P("www.example.org", (7,), id="rule-with-two-patterns-sub"),
    P("example.org", (), id="rule-with-two-patterns-sub-apex"),
    P("example.net", (7,), id="rule-with-two-patterns-apex-sub"),
    P("x.y.example.net", (7,), id="rule-with-two-patterns-apex-sub-deep"),
    # unrelated
    P("com", (), id="tld"),
    P("other.test", (), id="unrelated"),
]


@pytest.mark.parametrize(("name", "ids"), NAMES)
def test_match_name(index: HostIndex, name: str, ids: tuple[int, ...]) -> None:
    assert index.match_name(name) == ids


ADDRESSES = [
    P("10.1.2.3", (3, 8), id="v4-two-cidrs"),
    P("10.2.0.1", (3,), id="v4-cidr"),
    P("10.255.255.255", (3,), id="v4-cidr-last"),
    P("11.0.0.0", (), id="v4-cidr-next"),
    P("9.255.255.255", (), id="v4-cidr-prev"),
    P("172.31.255.255", (3,), id="v4-cidr-12"),
    P("172.32.0.0", (), id="v4-cidr-12-next"),
    P("192.168.1.7", (4,), id="v4-exact"),
    P("192.168.1.8", (), id="v4-exact-neighbour"),
    P("2001:db8::1", (5,), id="v6-cidr"),
    P("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", (5,), id="v6-cidr-last"),
    P("2001:db9::", (), id="v6-cidr-next"),
    P("::1", (6,), id="v6-exact"),
    P("::2", (), id="v6-exact-neighbour"),
    P("192.0.2.77", (9,), id="v4-mapped-pattern-matches-v4"),
    P("0.0.0.10", (), id="v4-not-confused-with-v6"),
]


@pytest.mark.parametrize(("addr", "ids"), ADDRESSES)
def test_match_ip(index: HostIndex, addr: str, ids: tuple[int, ...]) -> None:
    assert index.match_ip(ipaddress.ip_address(addr)) == ids


def test_names_never_match_ip_rules_and_back(index: HostIndex) -> None:
    assert index.match_name("10.1.2.3") == ()
    assert index.match_name("192.168.1.7") == ()


def test_accepts_parsed_patterns() -> None:
    idx = HostIndex([(4, [parse_pattern("*.example.com")]), (2, ["example.com"])])
    assert idx.match_name("a.example.com") == (4,)
    assert idx.match_name("example.com") == (2,)


def test_ids_are_sorted_and_unique() -> None:
    idx = HostIndex(
        [(5, ["**.example.com", "a.example.com"]), (1, ["*.example.com"]), (3, ["a.example.com"])]
    )
    assert idx.match_name("a.example.com") == (1, 3, 5)


def test_empty_index() -> None:
    idx = HostIndex([])
    assert idx.match_name("example.com") == ()
    assert idx.match_ip(ipaddress.ip_address("10.0.0.1")) == ()
    assert idx.match_ip(ipaddress.ip_address("::1")) == ()


def test_networks_contain_checks_version() -> None:
    nets = [ipaddress.ip_network("::/96")]
    # 10.0.0.1 as an integer lies inside ::/96, but it is not an IPv6 address
    assert not networks_contain(nets, ipaddress.ip_address("10.0.0.1"))
    assert networks_contain(nets, ipaddress.ip_address("::a00:1"))


# -- the index against the definition ---------------------------------------------------------

_LABELS = st.lists(st.sampled_from(["a", "b", "c", "example", "x-y"]), max_size=4)
#: several last labels, so names ending in one no rule has are asked about too
_TLDS = st.sampled_from(["com", "org", "test"])
#: under example.<tld> (a wildcard over a public suffix is refused by the pattern parser)
_BASES = st.tuples(_LABELS, _TLDS).map(lambda lt: ".".join([*lt[0], "example", lt[1]]))
_NAMES = st.one_of(
    _BASES,
    st.tuples(_LABELS, st.sampled_from(["com", "org", "test", "net"])).map(
        lambda lt: ".".join([*lt[0], lt[1]])
    ),
)
_PATTERNS = st.tuples(st.sampled_from(["", "*.", "**."]), _BASES).map("".join)


def _covers(pattern: str, name: str) -> bool:
    """The pattern language, read literally (the index must agree with this)."""
    if pattern.startswith("**."):
        base = pattern[3:]
        return name == base or name.endswith("." + base)
    if pattern.startswith("*."):
        return name.endswith("." + pattern[2:])
    return name == pattern


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_PATTERNS, min_size=1, max_size=3), max_size=6), _NAMES)
def test_match_name_is_the_pattern_language(rules: list[list[str]], name: str) -> None:
    """However deep the rules and the name, the suffixes the index skips are never ones
    a rule could cover: the answer is every rule with a covering pattern, in order."""
    idx = HostIndex(enumerate(rules))
    want = tuple(i for i, patterns in enumerate(rules) if any(_covers(p, name) for p in patterns))
    assert idx.match_name(name) == want


_V4_NETS = st.builds(
    lambda a, p: ipaddress.ip_network((a << 24 | 0xABCDEF, p), strict=False),
    st.integers(10, 12),
    st.sampled_from([8, 12, 16, 24, 30, 32]),
)
_V6_NETS = st.builds(
    lambda a, p: ipaddress.ip_network(((0x20010DB8 + a) << 96 | 0xAB, p), strict=False),
    st.integers(0, 2),
    st.sampled_from([32, 64, 120, 128]),
)
_V4_ADDRS = st.builds(
    lambda a, rest: ipaddress.ip_address(a << 24 | rest),
    st.integers(10, 12),
    st.sampled_from([0, 0xABCDEF, 0xABCDEE, 0xAB0000, 0xFFFFFF, 0xABCD00]),
)
_V6_ADDRS = st.builds(
    lambda a, low: ipaddress.ip_address((0x20010DB8 + a) << 96 | low),
    st.integers(0, 2),
    st.sampled_from([0, 0xAB, 0xAC, 1 << 40, (1 << 96) - 1]),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.lists(st.one_of(_V4_NETS, _V6_NETS), min_size=1, max_size=3), max_size=6),
    st.one_of(_V4_ADDRS, _V6_ADDRS),
)
def test_match_ip_is_containment(
    rules: list[list[ipaddress.IPv4Network | ipaddress.IPv6Network]],
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    """Single addresses, overlapping networks and both versions: the answer is every rule
    with a network that contains the address, in order, each once."""
    idx = HostIndex((i, [str(n) for n in nets]) for i, nets in enumerate(rules))
    want = tuple(
        i for i, nets in enumerate(rules) if any(networks_contain([n], addr) for n in nets)
    )
    assert idx.match_ip(addr) == want
