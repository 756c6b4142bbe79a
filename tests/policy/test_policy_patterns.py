# ruff: noqa: RUF001  (look-alike Unicode is what these tests are about)
"""Host patterns: canonicalised like requests, refused when they allow more than intended."""

from __future__ import annotations

import ipaddress

import pytest

from egress_guard.policy.patterns import (
    PatternError,
    is_public_suffix,
    parse_network,
    parse_pattern,
)

P = pytest.param

ACCEPTED = [
    P("api.example.com", "exact", "api.example.com", id="exact"),
    P("API.Example.COM.", "exact", "api.example.com", id="exact-canonicalised"),
    P("bücher.de", "exact", "xn--bcher-kva.de", id="exact-idna"),
    P("com", "exact", "com", id="exact-public-suffix-is-one-host"),
    P("*.example.com", "sub", "example.com", id="sub"),
    P("*.EXAMPLE.com.", "sub", "example.com", id="sub-canonicalised"),
    P("*.example.co.uk", "sub", "example.co.uk", id="sub-under-co-uk"),
    P("*.bücher.de", "sub", "xn--bcher-kva.de", id="sub-idna"),
    P("**.example.com", "apex_sub", "example.com", id="apex-sub"),
    P("**.a.b.example.com", "apex_sub", "a.b.example.com", id="apex-sub-deep"),
    P("10.1.2.3", "ip", "10.1.2.3", id="ipv4"),
    P("0x7f.1", "ip", "127.0.0.1", id="ipv4-legacy"),
    P("::1", "ip", "::1", id="ipv6"),
    P("::ffff:127.0.0.1", "ip", "127.0.0.1", id="ipv6-mapped-is-ipv4"),
    P("10.0.0.0/8", "cidr", "10.0.0.0/8", id="cidr-v4"),
    P("127.0.0.1/32", "cidr", "127.0.0.1/32", id="cidr-v4-single"),
    P("2001:db8::/32", "cidr", "2001:db8::/32", id="cidr-v6"),
    P("::ffff:10.0.0.0/104", "cidr", "10.0.0.0/8", id="cidr-v4-mapped-is-ipv4"),
]


@pytest.mark.parametrize(("raw", "kind", "value"), ACCEPTED)
def test_parse_pattern_accepts(raw: str, kind: str, value: str) -> None:
    pat = parse_pattern(raw)
    assert (pat.kind, pat.value) == (kind, value)
    prefix = {"sub": "*.", "apex_sub": "**."}.get(kind, "")
    assert str(pat) == prefix + value
    # the canonical text parses to itself: the loader stores it and the engine re-parses it
    assert parse_pattern(str(pat)) == pat
    if kind in ("ip", "cidr"):
        assert pat.network == ipaddress.ip_network(value)
    else:
        assert pat.network is None


REJECTED = [
    P("*", "every host", id="star"),
    P("**", "every host", id="double-star"),
    P("*.", "every host", id="star-dot"),
    P("**.", "every host", id="double-star-dot"),
    P("*.com", "public suffix 'com'", id="star-com"),
    P("**.com", "public suffix 'com'", id="double-star-com"),
    P("*.com.", "public suffix 'com'", id="star-com-trailing-dot"),
    P("*.ＣＯＭ", "public suffix 'com'", id="star-fullwidth-com"),
    P("*.co.uk", "public suffix 'co.uk'", id="star-co-uk"),
    P("*.github.io", "public suffix 'github.io'", id="star-private-psl-entry"),
    P("*.рф", "public suffix 'xn--p1ai'", id="star-idn-tld"),
    P("*.internal", "public suffix 'internal'", id="star-unknown-tld"),
    P("api.*.com", "wildcard in a middle or last label", id="star-middle"),
    P("*.*.example.com", "wildcard in a middle or last label", id="two-stars"),
    P("***.example.com", "regular expression", id="three-stars"),
    P("a.*.example.com", "wildcard in a middle or last label", id="glob-mid-label"),
    P("example.*", "wildcard in a middle or last label", id="star-last"),
    P("a*.example.com", "whole leftmost label", id="star-in-label"),
    P("*a.example.com", "whole leftmost label", id="star-prefix-label"),
    P("", "empty host pattern", id="empty"),
    P(" api.example.com", "surrounding spaces", id="space"),
    P(".*\\.example\\.com", "regular expression", id="regex-dot-star"),
    P("^api", "regular expression", id="regex-caret"),
    P("api.example.com$", "regular expression", id="regex-dollar"),
    P("(a|b).example.com", "regular expression", id="regex-group"),
    P("[a-z].example.com", "regular expression", id="regex-class"),
    P("a+.example.com", "regular expression", id="regex-plus"),
    P("api?.example.com", "regular expression", id="regex-question"),
    P("10.0.0.1/8", "host bits", id="cidr-host-bits"),
    P("300.0.0.0/8", "not a valid CIDR", id="cidr-octet-300"),
    P("10.0.0.0/33", "not a valid CIDR", id="cidr-prefix-33"),
    P("1.2.3.4/", "not a valid CIDR", id="cidr-no-prefix"),
    P("0.0.0.0/0", "every address", id="cidr-all-v4"),
    P("::/0", "every address", id="cidr-all-v6"),
    P("::ffff:0.0.0.0/96", "every address", id="cidr-all-v4-mapped"),
    P("::ffff:0:0/96", "every address", id="cidr-all-v4-mapped-hex"),
    P("*.10.0.0.1", "not IP addresses", id="wildcard-ip"),
    P("example..com", "empty label", id="empty-label"),
    P("under_score.example.com", "not a valid host name", id="underscore"),
    P("a.com:443", "list the port in 'ports:'", id="port-in-pattern"),
    P("*.example.com:8443", "list the port in 'ports:'", id="port-in-wildcard"),
    P("https://a.com", "is a URL", id="url"),
    P("https://a.com/v1", "is a URL", id="url-with-path"),
    P("a:b:c", "not a valid IPv6", id="not-ipv6"),
    P(443, "must be a string", id="not-a-string"),
]


@pytest.mark.parametrize(("raw", "fragment"), REJECTED)
def test_parse_pattern_rejects(raw: object, fragment: str) -> None:
    with pytest.raises(PatternError) as info:
        parse_pattern(raw)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("name", "public"),
    [
        ("com", True),
        ("co.uk", True),
        ("github.io", True),
        ("localhost", True),
        ("example.com", False),
        ("example.co.uk", False),
        ("opncd.ai", False),
    ],
)
def test_is_public_suffix(name: str, public: bool) -> None:
    assert is_public_suffix(name) is public


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("10.0.0.0/8", True),
        ("::1/128", True),
        ("127.0.0.1", True),
        ("10.0.0.1/8", False),
        ("x", False),
    ],
)
def test_parse_network(raw: str, ok: bool) -> None:
    if ok:
        assert parse_network(raw) == ipaddress.ip_network(raw)
    else:
        with pytest.raises(PatternError):
            parse_network(raw)
