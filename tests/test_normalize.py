# ruff: noqa: RUF001  (look-alike Unicode is what these tests are about)
"""The one normaliser: every spelling of a destination reaches one canonical form or an error.

Each table row is one category from DESIGN.md section 4. Accepted rows name the canonical
value; rejected rows name a fragment of the error so a row cannot pass for the wrong reason.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress_guard.normalize import (
    Host,
    NormalizationError,
    _normalize_host_full,
    join_hostport,
    normalize_host,
    normalize_port,
    parse_authority,
    parse_target,
    socket_ip,
)

A = pytest.param

# -- accepted hosts: (raw, kind, canonical value) ---------------------------------------

ACCEPTED = [
    # lowercase
    A("Example.COM", "name", "example.com", id="lower-mixed"),
    A("API.EXAMPLE.COM", "name", "api.example.com", id="lower-upper"),
    A("localhost", "name", "localhost", id="single-label"),
    A("ab--c.example.com", "name", "ab--c.example.com", id="double-hyphen-ascii"),
    A("1.com", "name", "1.com", id="numeric-first-label"),
    A("1e3", "name", "1e3", id="not-a-number"),
    # one trailing dot stripped
    A("example.com.", "name", "example.com", id="trailing-dot"),
    A("LOCALHOST.", "name", "localhost", id="trailing-dot-upper"),
    A("127.0.0.1.", "ipv4", "127.0.0.1", id="trailing-dot-ipv4"),
    # IDNA / UTS-46 to A-labels
    A("bücher.de", "name", "xn--bcher-kva.de", id="idna-umlaut"),
    A("BÜCHER.de", "name", "xn--bcher-kva.de", id="idna-upper-umlaut"),
    A("例え.jp", "name", "xn--r8jz45g.jp", id="idna-cjk"),
    A("faß.de", "name", "xn--fa-hia.de", id="idna-nontransitional-sharp-s"),
    A("xn--bcher-kva.de", "name", "xn--bcher-kva.de", id="idna-a-label-kept"),
    A("XN--BCHER-KVA.DE", "name", "xn--bcher-kva.de", id="idna-a-label-upper"),
    A("ex\u00adample.com", "name", "example.com", id="idna-soft-hyphen-ignored"),
    A("ⓔxample.com", "name", "example.com", id="idna-circled-letter"),
    # a plain label is judged the same whether the rest of the name is ASCII or not
    A("ab--c.ｅxample.com", "name", "ab--c.example.com", id="idna-plain-label-in-unicode-name"),
    A("ａb--c.example.com", "name", "ab--c.example.com", id="idna-double-hyphen-fullwidth"),
    # ideographic / full-width / half-width full stops
    A("example\u3002com", "name", "example.com", id="ideographic-dot"),
    A("example\uff0ecom", "name", "example.com", id="fullwidth-dot"),
    A("example\uff61com", "name", "example.com", id="halfwidth-ideographic-dot"),
    A("example.com\u3002", "name", "example.com", id="ideographic-trailing-dot"),
    A("ｅｘａｍｐｌｅ．ｃｏｍ．", "name", "example.com", id="fullwidth-name-and-dots"),
    A("ＡＰＩ.example.com", "name", "api.example.com", id="fullwidth-upper"),
    # full-width digits: an IPv4 address after mapping
    A("１２７.０.０.１", "ipv4", "127.0.0.1", id="fullwidth-digits-ipv4"),
    A("１２７.１", "ipv4", "127.0.0.1", id="fullwidth-digits-short-ipv4"),
    A("０ｘ７ｆ０００００１", "ipv4", "127.0.0.1", id="fullwidth-hex-ipv4"),
    # legacy IPv4 encodings (inet_aton / WHATWG)
    A("127.0.0.1", "ipv4", "127.0.0.1", id="ipv4-dotted"),
    A("127.1", "ipv4", "127.0.0.1", id="ipv4-two-parts"),
    A("127.0.1", "ipv4", "127.0.0.1", id="ipv4-three-parts"),
    A("2130706433", "ipv4", "127.0.0.1", id="ipv4-decimal-integer"),
    A("0x7f000001", "ipv4", "127.0.0.1", id="ipv4-hex-integer"),
    A("0X7F000001", "ipv4", "127.0.0.1", id="ipv4-hex-integer-upper"),
    A("0177.0.0.1", "ipv4", "127.0.0.1", id="ipv4-octal-part"),
    A("0x7f.1", "ipv4", "127.0.0.1", id="ipv4-hex-short"),
    A("0x7f.0.0.0x1", "ipv4", "127.0.0.1", id="ipv4-mixed-hex-decimal"),
    A("0177.0x0.00.1", "ipv4", "127.0.0.1", id="ipv4-mixed-octal-hex"),
    A("010.0.0.1", "ipv4", "8.0.0.1", id="ipv4-leading-zero-is-octal"),
    A("0xa9fea9fe", "ipv4", "169.254.169.254", id="ipv4-metadata-hex"),
    A("0251.0376.0251.0376", "ipv4", "169.254.169.254", id="ipv4-metadata-octal"),
    A("4294967295", "ipv4", "255.255.255.255", id="ipv4-max-integer"),
    A("0", "ipv4", "0.0.0.0", id="ipv4-zero"),
    # IPv6
    A("::1", "ipv6", "::1", id="ipv6-bare"),
    A("[::1]", "ipv6", "::1", id="ipv6-bracketed"),
    A("2001:0DB8:0000::0001", "ipv6", "2001:db8::1", id="ipv6-compressed-lower"),
    A("::ffff:127.0.0.1", "ipv4", "127.0.0.1", id="ipv6-mapped-dotted"),
    A("::FFFF:7f00:1", "ipv4", "127.0.0.1", id="ipv6-mapped-hex"),
    A("[::ffff:127.0.0.1]", "ipv4", "127.0.0.1", id="ipv6-mapped-bracketed"),
    A("fe80::1%eth0", "ipv6", "fe80::1", id="ipv6-zone-id"),
    A("fe80::1%25eth0", "ipv6", "fe80::1", id="ipv6-zone-id-uri-escaped"),
    A("[fe80::1%25eth0]", "ipv6", "fe80::1", id="ipv6-zone-id-bracketed"),
]


@pytest.mark.parametrize(("raw", "kind", "value"), ACCEPTED)
def test_normalize_host_accepts(raw: str, kind: str, value: str) -> None:
    h = normalize_host(raw)
    assert (h.kind, h.value) == (kind, value)
    assert str(h) == value
    if kind == "name":
        assert h.ip is None and not h.is_ip
    else:
        assert h.ip == ipaddress.ip_address(value) and h.is_ip
    # canonical is a fixed point
    assert normalize_host(h.value) == h


# -- rejected hosts: (raw, error fragment) -------------------------------------------------

LONG_LABEL = "a" * 64
LONG_NAME = ".".join(["a" * 63] * 4) + ".com"  # 4*64 + 3 = 259 > 253

REJECTED = [
    A("", "empty", id="empty"),
    A("example.com..", "more than one trailing dot", id="two-trailing-dots"),
    A("example.com\u3002\u3002", "more than one trailing dot", id="two-ideographic-dots"),
    A(".", "empty label", id="just-a-dot"),
    A("..", "more than one trailing dot", id="two-dots"),
    A("a..b", "empty label", id="empty-inner-label"),
    A(".example.com", "empty label", id="leading-dot"),
    A("\u3002", "empty label", id="ideographic-dot-alone"),
    # brackets around names
    A("[example.com]", "brackets around a name", id="brackets-name"),
    A("[1.2.3.4]", "brackets around a name", id="brackets-ipv4"),
    A("[]", "brackets", id="brackets-empty"),
    A("[::1", "unbalanced", id="brackets-unbalanced"),
    A("::1]", "not a valid IPv6", id="brackets-close-only"),
    # invalid punycode
    A("xn--zz.com", "not a valid host name", id="punycode-invalid"),
    A("xn--a.com", "not a valid host name", id="punycode-decodes-to-control"),
    A("xn--.com", "not a valid host name", id="punycode-empty"),
    A("xn--ss.de", "not a valid host name", id="punycode-not-canonical"),
    A("xn--ls8h.la", "not a valid host name", id="punycode-emoji"),
    A("💩.la", "not a valid host name", id="unicode-emoji"),
    A("a\u202eb.com", "not a valid host name", id="unicode-rlo"),
    A("a\uff0fb.com", "not a valid host name", id="fullwidth-solidus"),
    A("a\uff20b.com", "not a valid host name", id="fullwidth-at"),
    A("example\ufe52com", "not a valid host name", id="small-full-stop"),
    # forbidden characters
    A("user@example.com", "forbidden character", id="at-sign"),
    A("example.com/path", "forbidden character", id="slash"),
    A("example.com\\evil", "forbidden character", id="backslash"),
    A("example%2ecom", "forbidden character", id="percent"),
    A("exa mple.com", "forbidden character", id="space-inside"),
    A(" example.com", "forbidden character", id="space-leading"),
    A("example.com ", "forbidden character", id="space-trailing"),
    A("example.com\t", "forbidden character", id="tab"),
    A("example.com\r\nx-injected", "forbidden character", id="crlf"),
    A("exa\x00mple.com", "forbidden character", id="nul"),
    A("exa\x1fmple.com", "forbidden character", id="control-0x1f"),
    A("exa\x7fmple.com", "forbidden character", id="del"),
    A("example.com?x", "forbidden character", id="question-mark"),
    A("example.com#x", "forbidden character", id="hash"),
    A("*.example.com", "forbidden character", id="asterisk"),
    A("1.2.3.4%eth0", "forbidden character", id="zone-on-ipv4"),
    A("a:b", "not a valid IPv6", id="colon-in-name"),
    # over-long
    A(f"{LONG_LABEL}.com", "not a valid host name", id="label-64"),
    A(LONG_NAME, "longer than 253", id="name-259"),
    A("a" * 1025, "too long", id="raw-over-1024"),
    # underscore and bad hyphens
    A("under_score.com", "not a valid host name", id="underscore"),
    A("_dmarc.example.com", "not a valid host name", id="underscore-leading"),
    A("-a.example.com", "not a valid host name", id="hyphen-leading"),
    A("a-.example.com", "not a valid host name", id="hyphen-trailing"),
    # IPv4 out of range / malformed numeric hosts
    A("256.0.0.1", "out of range", id="ipv4-octet-256"),
    A("1.2.3.256", "out of range", id="ipv4-last-octet-256"),
    A("1.2.65536", "out of range", id="ipv4-three-part-overflow"),
    A("4294967296", "out of range", id="ipv4-integer-overflow"),
    A("0x100000000", "out of range", id="ipv4-hex-overflow"),
    A("1.2.3.4.5", "not one", id="ipv4-five-parts"),
    A("08.0.0.1", "octal", id="ipv4-bad-octal"),
    A("0x7g.1", "not one", id="ipv4-bad-hex"),
    A("example.123", "not one", id="numeric-tld"),
    A("a.0x1", "not one", id="hex-tld"),
    # IPv6 malformed / zone ids
    A("fe80::1%", "zone id", id="zone-empty"),
    A("fe80::1%25", "zone id", id="zone-escaped-empty"),
    A("fe80::1%eth0%1", "zone id", id="zone-with-percent"),
    A("1::2::3", "not a valid IPv6", id="ipv6-double-compression"),
    A("::1 ", "not a valid IPv6", id="ipv6-trailing-space"),
    A("::ffff:127.0.0.01", "not a valid IPv6", id="ipv6-mapped-leading-zero"),
]


@pytest.mark.parametrize(("raw", "fragment"), REJECTED)
def test_normalize_host_rejects(raw: str, fragment: str) -> None:
    with pytest.raises(NormalizationError) as info:
        normalize_host(raw)
    assert fragment in str(info.value)


@pytest.mark.parametrize("raw", [None, 443, b"example.com"], ids=["none", "int", "bytes"])
def test_normalize_host_rejects_non_strings(raw: object) -> None:
    with pytest.raises(NormalizationError):
        normalize_host(raw)  # type: ignore[arg-type]


EQUIVALENT = [
    A(
        ["example.com", "EXAMPLE.com.", "ｅｘａｍｐｌｅ．ｃｏｍ", "example\u3002com\u3002"],
        id="name",
    ),
    A(
        [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "0x7f.1",
            "::ffff:127.0.0.1",
            "[::ffff:7f00:1]",
            "１２７.０.０.１",
        ],
        id="loopback-v4",
    ),
    A(["fe80::1", "[fe80::1]", "fe80::1%eth0", "FE80::0001%25eth0"], id="link-local-v6"),
    A(["bücher.de", "BÜCHER.DE.", "xn--bcher-kva.de", "XN--BCHER-KVA.de"], id="idna"),
]


@pytest.mark.parametrize("spellings", EQUIVALENT)
def test_equivalent_spellings_share_one_canonical_form(spellings: list[str]) -> None:
    assert len({normalize_host(s) for s in spellings}) == 1


# -- ports ---------------------------------------------------------------------------------

PORTS_OK = [
    A("1", 1, id="min"),
    A("443", 443, id="https"),
    A("65535", 65535, id="max"),
    A(8080, 8080, id="int"),
]


@pytest.mark.parametrize(("raw", "port"), PORTS_OK)
def test_normalize_port_accepts(raw: str | int, port: int) -> None:
    assert normalize_port(raw) == port


PORTS_BAD = [
    A("0", id="zero"),
    A("65536", id="65536"),
    A("99999", id="99999"),
    A("100000", id="six-digits"),
    A("+443", id="plus-sign"),
    A("-443", id="minus-sign"),
    A("0443", id="leading-zero"),
    A("00443", id="leading-zeros"),
    A(" 443", id="leading-space"),
    A("443 ", id="trailing-space"),
    A("4 43", id="inner-space"),
    A("４４３", id="fullwidth-digits"),
    A("٤٤٣", id="arabic-indic-digits"),
    A("https", id="name"),
    A("", id="empty"),
    A("0x1bb", id="hex"),
    A("1e3", id="exponent"),
    A("443.0", id="decimal-point"),
    A("4_43", id="underscore"),
    A(0, id="int-zero"),
    A(65536, id="int-65536"),
    A(-1, id="int-negative"),
    A(True, id="bool"),
]


@pytest.mark.parametrize("raw", PORTS_BAD)
def test_normalize_port_rejects(raw: str | int) -> None:
    with pytest.raises(NormalizationError):
        normalize_port(raw)


# -- authorities (CONNECT target, Host header) -----------------------------------------------

AUTHORITY_OK = [
    A("example.com:443", None, "example.com", 443, id="name-port"),
    A("EXAMPLE.com.:8443", None, "example.com", 8443, id="name-upper-trailing-dot"),
    A("example.com", 80, "example.com", 80, id="default-port"),
    A("[::1]:443", None, "::1", 443, id="ipv6-port"),
    A("[::1]", 443, "::1", 443, id="ipv6-default-port"),
    A("[::ffff:127.0.0.1]:80", None, "127.0.0.1", 80, id="ipv6-mapped"),
    A("127.1:11434", None, "127.0.0.1", 11434, id="legacy-ipv4"),
    A("bücher.de:443", None, "xn--bcher-kva.de", 443, id="idna"),
]


@pytest.mark.parametrize(("raw", "default", "host", "port"), AUTHORITY_OK)
def test_parse_authority_accepts(raw: str, default: int | None, host: str, port: int) -> None:
    h, p = parse_authority(raw, default)
    assert (h.value, p) == (host, port)


AUTHORITY_BAD = [
    A("", 443, id="empty"),
    A("example.com", None, id="no-port-no-default"),
    A("example.com:", 443, id="empty-port"),
    A("example.com:0443", 443, id="port-leading-zero"),
    A("example.com:+443", 443, id="port-sign"),
    A("example.com:0", 443, id="port-zero"),
    A("example.com:65536", 443, id="port-65536"),
    A("example.com:443:1", 443, id="two-colons"),
    A("::1:443", 443, id="bare-ipv6"),
    A("[example.com]:443", 443, id="brackets-name"),
    A("[::1]x", 443, id="garbage-after-bracket"),
    A("[::1", 443, id="unbalanced"),
    A("user@example.com:443", 443, id="userinfo"),
    A(" example.com:443", 443, id="leading-space"),
    A("example.com: 443", 443, id="port-space"),
]


@pytest.mark.parametrize(("raw", "default"), AUTHORITY_BAD)
def test_parse_authority_rejects(raw: str, default: int | None) -> None:
    with pytest.raises(NormalizationError):
        parse_authority(raw, default)


# -- CLI targets ----------------------------------------------------------------------------

TARGET_OK = [
    A("https://api.anthropic.com/v1/messages", "api.anthropic.com", 443, id="https-url"),
    A("http://localhost:11434/api", "localhost", 11434, id="http-url-port"),
    A("http://example.com", "example.com", 80, id="http-default"),
    A("HTTPS://API.Example.COM?x=1", "api.example.com", 443, id="upper-scheme-query"),
    A("wss://example.com/socket", "example.com", 443, id="wss"),
    A("http://[::1]:8080/x", "::1", 8080, id="ipv6-url"),
    A("::1", "::1", 443, id="bare-ipv6"),
    A("example.com:8443", "example.com", 8443, id="host-port"),
    A("example.com", "example.com", 443, id="host"),
    A("  example.com  ", "example.com", 443, id="surrounding-space-stripped"),
]


@pytest.mark.parametrize(("raw", "host", "port"), TARGET_OK)
def test_parse_target_accepts(raw: str, host: str, port: int) -> None:
    h, p = parse_target(raw)
    assert (h.value, p) == (host, port)


TARGET_BAD = [
    A("ftp://example.com/", "unsupported URL scheme", id="ftp"),
    A("https://user@example.com/", "userinfo", id="userinfo"),
    A("https://user:pw@example.com/", "userinfo", id="userinfo-password"),
    A("https://example.com\\@evil.com/", "userinfo", id="backslash-userinfo"),
    A("https://evil.com\\.example.com/", "forbidden character", id="backslash-host"),
    A("https://", "empty authority", id="empty-authority"),
    A("https://example.com:0443/", "leading zero", id="url-port-leading-zero"),
    A("https://example.com:/", "not a decimal", id="url-empty-port"),
]


@pytest.mark.parametrize(("raw", "fragment"), TARGET_BAD)
def test_parse_target_rejects(raw: str, fragment: str) -> None:
    with pytest.raises(NormalizationError) as info:
        parse_target(raw)
    assert fragment in str(info.value)


# -- properties ---------------------------------------------------------------------------

_HOSTISH = st.lists(
    st.sampled_from(
        [*"abcxyz019-._:[]%@/\\ ", "\u3002", "\uff0e", "Ａ", "１", "ü", "\x00", "xn--", "0x"]
    ),
    max_size=20,
).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_HOSTISH, st.text(max_size=40)))
def test_normalize_host_is_idempotent(raw: str) -> None:
    """Whatever is accepted is canonical: normalising the canonical value changes nothing,
    and it is plain ASCII without anything that could split or extend a host."""
    try:
        h = normalize_host(raw)
    except NormalizationError:
        return
    assert normalize_host(h.value) == h
    assert h.value.isascii()
    assert h.value == h.value.lower()
    assert not any(c in h.value for c in "@/\\%[] \t\r\n\x00#?")
    if h.kind == "name":
        assert 0 < len(h.value) <= 253 and not h.value.endswith(".")


# -- the shortcut for plain spellings ------------------------------------------------------

_LABELISH = st.lists(
    st.sampled_from([*"aZ0-9.x", "xn--", "-.", ".-", "..", "a" * 30, "b" * 33, "0x", "256"]),
    min_size=1,
    max_size=14,
).map("".join)


@pytest.mark.parametrize(
    "raw",
    [
        "a",
        "A.B.C",
        "a-b.c",
        "ab--c.example.com",
        "1.2.3.4",
        "255.255.255.255",
        "0.0.0.0",
        "a" * 63 + ".com",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 3) + "." + "b" * 61,  # 253 characters
        "a.1com",
        "a.com1",
        "a.b-",
        "-a.b",
        "a..b",
        "a.-b.c",
        "a-.b.c",
        "a.",
        "xn--bcher-kva.example",
        "xn--zz.example",
        "1.2.3",
        "1.2.3.04",
        "1.2.3.256",
        "01.2.3.4",
        "a.0x10",
        "a.123",
    ],
)
def test_plain_shortcut_boundaries(raw: str) -> None:
    """At the edges of the shortcut: whatever normalize_host says, the full path says."""
    _assert_same_as_full_path(raw)


_DOTTED = st.lists(
    st.one_of(
        st.text(alphabet="aZ09-x", max_size=66),
        st.sampled_from(["xn--", "xn--bcher-kva", "256", "0x1f", "0", "-", "", "-a", "a-"]),
    ),
    min_size=1,
    max_size=5,
).map(".".join)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_DOTTED, _LABELISH, _HOSTISH))
def test_plain_shortcut_agrees_with_the_full_path(raw: str) -> None:
    """The shortcut for plain spellings never decides differently from the full
    normaliser: same Host (kind, value, address) or the same refusal."""
    _assert_same_as_full_path(raw)


def _assert_same_as_full_path(raw: str) -> None:
    try:
        want: object = _normalize_host_full(raw)
    except NormalizationError:
        want = NormalizationError
    try:
        got: object = normalize_host(raw)
    except NormalizationError:
        got = NormalizationError
    assert got == want
    if isinstance(got, Host):
        assert isinstance(want, Host)
        assert (got.kind, got.value, got.ip) == (want.kind, want.value, want.ip)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),  # a dual-stack socket's IPv4 peer is the IPv4 address
        ("fe80::1%eth0", "fe80::1"),  # the zone names an interface, not another address
        ("::1", "::1"),
    ],
)
def test_socket_ip_is_the_address_the_engine_compares(text: str, expected: str) -> None:
    assert str(socket_ip(text)) == expected


def test_socket_ip_refuses_a_name() -> None:
    with pytest.raises(ValueError):
        socket_ip("localhost")


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("example.com", 443, "example.com:443"),
        ("::1", 8080, "[::1]:8080"),
        ("10.0.0.1", None, "10.0.0.1"),
        ("2001:db8::1", None, "[2001:db8::1]"),
    ],
)
def test_join_hostport_brackets_ipv6(host: str, port: int | None, expected: str) -> None:
    assert join_hostport(host, port) == expected
