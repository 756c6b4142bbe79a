"""An IPv4-mapped IPv6 address is the IPv4 address, in rules as in requests (issue 17,
item 11).

Before: requests were matched in IPv4 form (``::ffff:1.2.3.4`` is ``1.2.3.4``), but a
rule written as an IPv6 network around the mapped range (``::/1``, ``::/80``,
``::fffe:0:0/95``) stayed IPv6 and denied none of the IPv4 addresses it holds; mapped
networks in ``network.allow_cidrs`` and ``clients.allow_cidrs`` were not read as IPv4 at
all. Now every network covers the IPv4 addresses it holds in mapped form, and an IPv4
network covers their mapped spellings: a denied address is denied in every spelling.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress_guard.engine import Decision, Engine, Match
from egress_guard.engine.rules.addresses import decide_addresses
from egress_guard.engine.rules.clients import check_client
from egress_guard.engine.rules.mode import apply_mode
from egress_guard.engine.rules.names import decide_target
from egress_guard.normalize import normalize_host
from egress_guard.policy import PolicyError, load_catalog, load_policy_text

P = pytest.param
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def engine(deny: str, extra: str = "") -> Engine:
    text = f"""\
version: 1
mode: audit
destinations:
  - name: api
    hosts: [api.example.com]
deny:
  - hosts: [{deny}]
{extra}"""
    return Engine(load_policy_text(text, "policy.yaml"), load_catalog())


#: deny rules that hold ``1.2.3.4`` IPv4-mapped, spelled as IPv6 networks
MAPPED_RULES = [
    P('"::/1"', id="v6-half"),
    P('"::/8"', id="v6-reserved-block"),
    P('"::/80"', id="v6-around-mapped"),
    P('"::fffe:0:0/95"', id="mapped-95"),
    P('"0:0:0:0:0:ffff::/96"', id="mapped-range-long"),
    P('"::ffff:0:0/96"', id="mapped-range"),
    P('"::/0"', id="v6-everything"),
    P('"::ffff:1.0.0.0/104"', id="mapped-104"),
    P('"::ffff:102:304/128"', id="mapped-host-hex"),
]


def _denied(eng: Engine, raw_host: str, resolved: str | None = None) -> bool:
    verdict = decide_target(eng.compiled, raw_host, 443)
    if isinstance(verdict, Decision):
        return verdict.reason == "denylisted" and not apply_mode(eng.compiled, verdict).allowed
    assert isinstance(verdict, Match)
    assert resolved is not None
    d = decide_addresses(eng.compiled, verdict, [ipaddress.ip_address(resolved)])
    return d.reason == "denylisted" and not apply_mode(eng.compiled, d).allowed


@pytest.mark.parametrize("rule", MAPPED_RULES)
@pytest.mark.parametrize(
    "spelling", ["1.2.3.4", "[::ffff:1.2.3.4]", "[::ffff:102:304]", "0x01020304", "16909060"]
)
def test_mapped_deny_rule_denies_every_spelling_of_the_ipv4_address(
    rule: str, spelling: str
) -> None:
    assert _denied(engine(rule), spelling)


@pytest.mark.parametrize("rule", MAPPED_RULES)
@pytest.mark.parametrize("resolved", ["1.2.3.4", "::ffff:1.2.3.4"])
def test_mapped_deny_rule_denies_an_allowed_name_resolving_to_it(rule: str, resolved: str) -> None:
    assert _denied(engine(rule), "api.example.com", resolved)


@pytest.mark.parametrize("rule", ['"1.2.3.0/24"', '"1.2.3.4"'])
@pytest.mark.parametrize("spelling", ["[::ffff:1.2.3.4]", "[0:0:0:0:0:ffff:102:304]"])
def test_ipv4_deny_rule_denies_the_mapped_spellings(rule: str, spelling: str) -> None:
    assert _denied(engine(rule), spelling)


def test_mapped_rule_does_not_deny_other_addresses() -> None:
    eng = engine('"::ffff:1.0.0.0/104"')
    assert not _denied(eng, "2.2.3.4")
    assert not _denied(eng, "api.example.com", "2.2.3.4")
    # an IPv6 network away from the mapped range holds no IPv4 address
    assert not _denied(engine('"2001:db8::/32"'), "api.example.com", "1.2.3.4")


def test_mapped_networks_in_allow_cidrs_and_client_acl_are_ipv4() -> None:
    eng = engine(
        '"203.0.113.9"',
        """\
network:
  allow_cidrs: ["::ffff:10.0.0.0/104"]
clients:
  allow_cidrs: ["::ffff:192.0.2.0/120"]
""",
    )
    match = decide_target(eng.compiled, "api.example.com", 443)
    assert isinstance(match, Match)
    assert decide_addresses(eng.compiled, match, [ipaddress.ip_address("10.1.2.3")]).allowed
    assert check_client(eng.compiled, "192.0.2.7") is None
    assert check_client(eng.compiled, "::ffff:192.0.2.7") is None
    assert check_client(eng.compiled, "192.0.3.7") is not None


def test_client_acl_around_the_mapped_range_covers_ipv4_clients() -> None:
    eng = engine('"203.0.113.9"', 'clients:\n  allow_cidrs: ["::/80"]\n')
    assert check_client(eng.compiled, "198.51.100.1") is None


@pytest.mark.parametrize("net", ["::/1", "::/80", "::fffe:0:0/95"])
def test_allow_host_network_around_the_mapped_range_is_refused(net: str) -> None:
    """It would allow every IPv4 address (as ::ffff:0:0/96 itself, refused already)."""
    text = f'version: 1\ndestinations:\n  - name: api\n    hosts: ["{net}"]\n'
    with pytest.raises(PolicyError, match="every IPv4 address"):
        load_policy_text(text, "policy.yaml")


def test_parse_network_writes_mapped_networks_as_ipv4() -> None:
    from egress_guard.policy.patterns import mapped_ipv4, parse_network

    assert str(parse_network("::ffff:10.0.0.0/104")) == "10.0.0.0/8"
    assert str(parse_network("::/0")) == "::/0"
    assert mapped_ipv4(ipaddress.ip_network("::/1")) == ipaddress.ip_network("0.0.0.0/0")
    assert mapped_ipv4(ipaddress.ip_network("2001:db8::/32")) is None


# -- property: a denied address is denied in every spelling ----------------------------------


def _spellings(ip: ipaddress.IPv4Address) -> list[str]:
    v = int(ip)
    hi, lo = v >> 16, v & 0xFFFF
    return [
        str(ip),
        str(v),
        f"0x{v:x}",
        f"[::ffff:{ip}]",
        f"[::ffff:{hi:x}:{lo:x}]",
        f"[0:0:0:0:0:FFFF:{hi:X}:{lo:X}]",
    ]


@st.composite
def mapped_rule(draw: st.DrawFn) -> tuple[str, ipaddress.IPv4Address]:
    """A deny network written in IPv6 form that holds some IPv4 address, and one address
    inside it."""
    ip = ipaddress.IPv4Address(draw(st.integers(1, 2**32 - 1)))
    if draw(st.booleans()):
        plen = draw(st.integers(96, 128))  # inside ::ffff:0:0/96
        net = ipaddress.IPv6Network(
            (int(ipaddress.IPv6Address(f"::ffff:{ip}")) >> (128 - plen) << (128 - plen), plen)
        )
    else:
        plen = draw(st.integers(1, 95))  # around it
        net = ipaddress.IPv6Network(
            (int(ipaddress.IPv6Address("::ffff:0:0")) >> (128 - plen) << (128 - plen), plen)
        )
    return str(net), ip


@PROPS
@given(mapped_rule())
def test_property_a_denied_address_is_denied_in_every_spelling(
    case: tuple[str, ipaddress.IPv4Address],
) -> None:
    rule, ip = case
    eng = engine(f'"{rule}"')
    for spelling in _spellings(ip):
        assert _denied(eng, spelling), (rule, spelling)
    for resolved in (str(ip), f"::ffff:{ip}"):
        assert _denied(eng, "api.example.com", resolved), (rule, resolved)


@PROPS
@given(st.integers(0, 2**32 - 1), st.integers(8, 32))
def test_property_an_ipv4_deny_rule_denies_every_mapped_spelling(value: int, plen: int) -> None:
    ip = ipaddress.IPv4Address(value)
    net = ipaddress.IPv4Network((value >> (32 - plen) << (32 - plen), plen))
    eng = engine(f'"{net}"')
    for spelling in _spellings(ip):
        assert _denied(eng, spelling), (str(net), spelling)
    assert _denied(eng, "api.example.com", f"::ffff:{ip}")
    assert normalize_host(f"[::ffff:{ip}]").value == str(ip)
