# ruff: noqa: RUF001  (look-alike Unicode is what this corpus is about)
"""The bypass corpus: generated and hand-written spellings of forbidden destinations.

Every spelling names a destination the policy of ``support.adv_lab`` forbids (or an
allowed one through a malformed or disagreeing request) on a port where a never-contact
upstream listens. Templates use ``{PF}`` (trap port), ``{PA}``/``{PH}`` (front.test TLS /
HTTP), ``{PT}`` (porthost.test's one allowed port) and a few derived values; the lab
fills them in at run time, so ids are stable while ports are not.

The list is built deterministically (no randomness): the same ids in the same order on
every run, so an id in a failure report names one exact request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from support.adv_lab import DENIED_ADDR, DENIED_ALIASES, PRIVATE_NAMES, Spelling

# -- IPv4 legacy encodings ------------------------------------------------------------------


def _oct(n: int) -> str:
    return "0" + format(n, "o") if n else "0"


def ipv4_spellings(addr: str) -> dict[str, str]:
    """Every legacy form a resolver (inet_aton / WHATWG) reads as ``addr``."""
    ip = ipaddress.IPv4Address(addr)
    v = int(ip)
    a, b, c, d = ip.packed
    forms = {
        "dotted": addr,
        "decimal": str(v),
        "hex": f"0x{v:x}",
        "HEX": f"0X{v:X}",
        "hex-padded": f"0x{v:010x}",
        "octal": f"0{v:o}",
        "octal-padded": f"000{v:o}",
        "octal-octets": ".".join(_oct(x) for x in (a, b, c, d)),
        "hex-octets": ".".join(f"0x{x:x}" for x in (a, b, c, d)),
        "two-part": f"{a}.{(b << 16) | (c << 8) | d}",
        "three-part": f"{a}.{b}.{(c << 8) | d}",
        "mixed": f"0x{a:x}.{_oct(b)}.{c}.0x{d:02x}",
        "mixed-two-part": f"{_oct(a)}.0x{(b << 16) | (c << 8) | d:x}",
        "zero-padded-dec": ".".join(f"{x:03d}" for x in (a, b, c, d)),
        "trailing-dot": addr + ".",
    }
    if addr == "127.0.0.1":
        forms["short"] = "127.1"
        forms["short-2"] = "127.0.1"
    return forms


def ipv6_wrappers(addr: str) -> dict[str, str]:
    """IPv6 addresses that carry the IPv4 address ``addr`` (bracketed for an authority)."""
    ip = ipaddress.IPv4Address(addr)
    v = int(ip)
    hi, lo = v >> 16, v & 0xFFFF
    return {
        "v4mapped": f"[::ffff:{addr}]",
        "v4mapped-hex": f"[::ffff:{hi:x}:{lo:x}]",
        "v4mapped-long": f"[0:0:0:0:0:FFFF:{addr}]",
        "v4compat": f"[::{addr}]",
        "nat64": f"[64:ff9b::{hi:x}:{lo:x}]",
        "nat64-dotted": f"[64:ff9b::{addr}]",
        "6to4": f"[2002:{hi:x}:{lo:x}::1]",
    }


IPV6_FORMS = {
    "loopback": "[::1]",
    "loopback-long": "[0:0:0:0:0:0:0:1]",
    "loopback-padded": "[0000:0000:0000:0000:0000:0000:0000:0001]",
    "loopback-zone-uri": "[::1%25lo]",
    "loopback-zone": "[::1%lo]",
    "loopback-zone-num": "[::1%251]",
    "unspecified": "[::]",
    "metadata-aws6": "[fd00:ec2::254]",
    "ula": "[fc00::1]",
    "ula-upper": "[FC00::1]",
    "nat64-local": "[64:ff9b:1::a00:1]",
    "teredo": "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
    "link-local-zone": "[fe80::1%25lo]",
    "bare-v6": "::1",
    "bare-v6-port-ambiguous": "::ffff:127.0.0.1",
}


# -- names ------------------------------------------------------------------------------

NAME_VARIANTS = {
    "lower": lambda n: n,
    "upper": lambda n: n.upper(),
    "mixed-case": lambda n: "".join(c.upper() if i % 2 else c for i, c in enumerate(n)),
    "trailing-dot": lambda n: n + ".",
    "double-trailing-dot": lambda n: n + "..",
    "leading-dot": lambda n: "." + n,
    "ideographic-dot": lambda n: n.replace(".", "\u3002"),
    "fullwidth-dot": lambda n: n.replace(".", "\uff0e"),
    "halfwidth-dot": lambda n: n.replace(".", "\uff61"),
    "fullwidth-letters": lambda n: "".join(
        chr(ord(c) - 0x21 + 0xFF01) if c.isascii() and c.isalnum() else c for c in n
    ),
    "bracketed": lambda n: f"[{n}]",
}


def _connect(host: str, port: str = "{PF}", version: str = "HTTP/1.1") -> str:
    return f"CONNECT {host}:{port} {version}\r\nHost: {host}:{port}\r\n\r\n"


def _get(url: str, host: str | None, version: str = "HTTP/1.1", extra: str = "") -> str:
    head = f"GET {url} {version}\r\n"
    if host is not None:
        head += f"Host: {host}\r\n"
    return head + extra + "\r\n"


def generate() -> Iterator[Spelling]:
    # 1. IPv4 literals, every encoding, three classes (CONNECT), plus IPv6 wrappers
    for cls, addr in (
        ("loopback", "127.0.0.1"),
        ("metadata", "169.254.169.254"),
        ("rfc1918", "10.0.0.1"),
    ):
        for form, text in ipv4_spellings(addr).items():
            yield Spelling(f"{cls}-v4-{form}", cls, "connect", _connect(text))
        for form, text in ipv6_wrappers(addr).items():
            yield Spelling(f"{cls}-{form}", cls, "connect", _connect(text))
    for cls, addr in (
        ("metadata", "169.254.170.2"),
        ("metadata", "100.100.100.200"),
        ("metadata", "192.0.0.192"),
        ("rfc1918", "172.16.0.1"),
        ("rfc1918", "192.168.1.1"),
        ("cgnat", "100.64.0.1"),
        ("unspecified", "0.0.0.0"),
    ):
        yield Spelling(f"{cls}-v4-{addr}", cls, "connect", _connect(addr))
        yield Spelling(
            f"{cls}-v4-{addr}-decimal",
            cls,
            "connect",
            _connect(str(int(ipaddress.IPv4Address(addr)))),
        )
    yield Spelling("unspecified-v4-zero", "unspecified", "connect", _connect("0"))
    yield Spelling("loopback-v4-other-in-8", "loopback", "connect", _connect("127.0.0.2"))
    yield Spelling("loopback-v4-high-in-8", "loopback", "connect", _connect("127.255.255.254"))
    yield Spelling("loopback-v4-overflow-part", "loopback", "connect", _connect("127.0.0.256"))
    yield Spelling("loopback-v4-five-parts", "loopback", "connect", _connect("127.0.0.0.1"))
    yield Spelling(
        "loopback-v4-fullwidth-digits", "loopback", "connect", _connect("１２７.０.０.１")
    )
    yield Spelling("loopback-v4-ideographic-dots", "loopback", "connect", _connect("127。0。0。1"))
    for form, text in IPV6_FORMS.items():
        yield Spelling(f"v6-{form}", "ipv6", "connect", _connect(text))

    # 2. names that resolve to non-public addresses (network.resolve), and localhost
    for name in PRIVATE_NAMES:
        yield Spelling(f"dns-private-{name}", "dns-private", "connect", _connect(name))
    for variant, f in NAME_VARIANTS.items():
        yield Spelling(
            f"dns-private-private.test-{variant}",
            "dns-private",
            "connect",
            _connect(f("private.test")),
        )
    for variant in (
        "lower",
        "upper",
        "trailing-dot",
        "ideographic-dot",
        "fullwidth-letters",
        "bracketed",
    ):
        yield Spelling(
            f"dns-localhost-{variant}",
            "dns-localhost",
            "connect",
            _connect(NAME_VARIANTS[variant]("localhost")),
        )
    yield Spelling("dns-localhost-sub", "dns-localhost", "connect", _connect("foo.localhost"))

    # 3. unlisted and denied names in every name spelling
    for variant, f in NAME_VARIANTS.items():
        yield Spelling(
            f"unlisted-other.test-{variant}", "unlisted", "connect", _connect(f("other.test"))
        )
        yield Spelling(
            f"denied-x.denied.test-{variant}", "denied", "connect", _connect(f("x.denied.test"))
        )
    for host in (
        "denied.test",
        "a.b.x.denied.test",
        "api.test.other.test",
        "front.test.evil.test",
        "fronttest",
        "front-test",
        "xn--other.test",
        "xn--.test",
        "other.test%2e",
        "%6f%74%68%65%72.test",
        "other\u00ad.test",  # soft hyphen: IDNA maps it to nothing
        "oth\u200ber.test",  # zero-width space
        "ＯＴＨＥＲ.ＴＥＳＴ",
        "evil.test",
        "api.test\u2024other.test",  # one dot leader
        "api.test\ufe52other.test",  # small full stop
    ):
        yield Spelling(
            f"unlisted-{host.encode('unicode_escape').decode()}",
            "unlisted",
            "connect",
            _connect(host),
        )

    # 4. authority shapes: userinfo, brackets, paths, absolute URIs, junk
    for ident, target in (
        ("userinfo", "user@other.test:{PF}"),
        ("userinfo-allowed-name", "api.test@127.0.0.1:{PF}"),
        ("userinfo-allowed-name-port", "front.test:{PA}@127.0.0.1:{PF}"),
        ("userinfo-front", "user@front.test:{PA}"),
        ("bracket-name-front", "[front.test]:{PA}"),
        ("bracket-name-porthost", "[porthost.test]:{PT}"),
        ("bracket-v4", "[127.0.0.1]:{PF}"),
        ("path", "front.test:{PA}/x"),
        ("path-forbidden", "other.test:{PF}/api.test"),
        ("query", "front.test:{PA}?x"),
        ("fragment", "front.test:{PA}#x"),
        ("fragment-forbidden", "other.test:{PF}#@front.test"),
        ("absolute-uri", "http://front.test:{PA}/"),
        ("absolute-uri-https", "https://other.test:{PF}/"),
        ("backslash-userinfo", "other.test:{PF}\\@front.test"),
        ("nul", "other.test\x00front.test:{PF}"),
        ("space-in-host", "other.test front.test:{PF}"),
        ("tab-in-host", "front.test\t:{PA}"),
        ("percent-host", "%66ront.test:{PA}"),
        ("comma-hosts", "front.test,other.test:{PF}"),
        ("double-port", "front.test:{PA}:{PF}"),
        ("empty-host", ":{PF}"),
        ("only-brackets", "[]:{PF}"),
        ("unbalanced-bracket", "[::1:{PF}"),
        ("garbage-after-bracket", "[::1]x:{PF}"),
        ("invalid-utf8", "other\udcff.test:{PF}"),
        ("very-long-host", "a" * 300 + ".test:{PF}"),
        ("long-label", "a" * 64 + ".test:{PF}"),
    ):
        yield Spelling(
            f"authority-{ident}", "authority", "connect", f"CONNECT {target} HTTP/1.1\r\n\r\n"
        )
    yield Spelling(
        "authority-connect-http10-no-host",
        "authority",
        "connect",
        "CONNECT other.test:{PF} HTTP/1.0\r\n\r\n",
    )

    # 5. ports: porthost.test is allowed on {PT} only
    for ident, port in (
        ("leading-zero", "0{PT}"),
        ("many-leading-zeros", "0000{PT}"),
        ("plus", "+{PT}"),
        ("minus", "-{PT}"),
        ("wrap-16", "{PTW}"),
        ("wrap-32", "{PTX}"),
        ("zero", "0"),
        ("65536", "65536"),
        ("99999", "99999"),
        ("name-https", "https"),
        ("name-http", "http"),
        ("hex", "0x{PTx}"),
        ("space", " {PT}"),
        ("decimal-point", "{PT}.0"),
        ("empty", ""),
        ("fullwidth-digits", "{PT_FW}"),
        ("arabic-indic-digits", "{PT_AR}"),
        ("devanagari-digits", "{PT_DEV}"),
        ("exponent", "4.43e2"),
        ("underscore", "4_43"),
    ):
        yield Spelling(
            f"port-{ident}", "port", "connect", f"CONNECT porthost.test:{port} HTTP/1.1\r\n\r\n"
        )
    yield Spelling("port-missing", "port", "connect", "CONNECT porthost.test HTTP/1.1\r\n\r\n")
    yield Spelling(
        "port-other-allowed-host-port", "port", "connect", _connect("porthost.test", "{PA}")
    )

    # 6. plain HTTP: absolute-URI targets, Host disagreements, HTTP/1.0
    for ident, host in (
        ("loopback-short", "127.1"),
        ("loopback-hex", "0x7f000001"),
        ("loopback-v6", "[::1]"),
        ("loopback-v4mapped", "[::ffff:7f00:1]"),
        ("metadata", "169.254.169.254"),
        ("metadata-decimal", "2852039166"),
        ("localhost", "localhost"),
        ("unlisted", "other.test"),
        ("unlisted-upper-scheme", "OTHER.TEST"),
        ("denied", "x.denied.test"),
        ("dns-private", "meta.test"),
        ("dns-private-nat64", "nat64meta.test"),
    ):
        yield Spelling(
            f"http-uri-{ident}",
            "http-uri",
            "http",
            _get(f"http://{host}:{{PF}}/", f"{host}:{{PF}}"),
        )
    yield Spelling(
        "http-uri-scheme-upper",
        "http-uri",
        "http",
        _get("HTTP://other.test:{PF}/", "other.test:{PF}"),
    )
    yield Spelling(
        "http-uri-userinfo",
        "http-uri",
        "http",
        _get("http://front.test:{PH}@other.test:{PF}/", "other.test:{PF}"),
    )
    yield Spelling(
        "http-uri-userinfo-front",
        "http-uri",
        "http",
        _get("http://user@front.test:{PH}/", "front.test:{PH}"),
    )
    yield Spelling(
        "http-uri-backslash",
        "http-uri",
        "http",
        _get("http://other.test:{PF}\\@front.test:{PH}/", "front.test:{PH}"),
    )
    yield Spelling(
        "http-uri-ftp", "http-uri", "http", _get("ftp://front.test:{PH}/", "front.test:{PH}")
    )
    yield Spelling(
        "http-uri-http10-no-host",
        "http-uri",
        "http",
        _get("http://other.test:{PF}/", None, "HTTP/1.0"),
    )
    yield Spelling(
        "http-uri-leading-zero-port",
        "http-uri",
        "http",
        _get("http://front.test:0{PH}/", "front.test:0{PH}"),
    )
    yield Spelling(
        "http-uri-arabic-port",
        "http-uri",
        "http",
        _get("http://front.test:{PH_AR}/", "front.test:{PH_AR}"),
    )
    yield Spelling(
        "http-uri-arabic-port-ascii-host",
        "http-uri",
        "http",
        _get("http://front.test:{PH_AR}/", "front.test:{PH}"),
    )
    for ident, uri, host in (
        ("front-uri-other-host", "http://front.test:{PH}/", "other.test:{PF}"),
        ("front-uri-ip-host", "http://front.test:{PH}/", "127.0.0.1:{PF}"),
        ("front-uri-metadata-host", "http://front.test:{PH}/", "169.254.169.254"),
        ("front-uri-port-differs", "http://front.test:{PH}/", "front.test:{PA}"),
        ("front-uri-default-port-host", "http://front.test:{PH}/", "front.test"),
        ("front-uri-empty-host", "http://front.test:{PH}/", ""),
        ("front-uri-host-userinfo", "http://front.test:{PH}/", "x@front.test:{PH}"),
        ("front-uri-host-bracket", "http://front.test:{PH}/", "[front.test]:{PH}"),
        ("front-uri-host-path", "http://front.test:{PH}/", "front.test:{PH}/x"),
        ("front-uri-host-comma", "http://front.test:{PH}/", "front.test:{PH}, other.test"),
        ("other-uri-front-host", "http://other.test:{PF}/", "front.test:{PH}"),
        ("origin-form-other-host", "/", "other.test:{PF}"),
        ("origin-form-ip-host", "/", "127.1:{PF}"),
    ):
        yield Spelling(f"hostmismatch-{ident}", "host-mismatch", "http", _get(uri, host))
    yield Spelling(
        "hostmismatch-http10-no-host",
        "host-mismatch",
        "http",
        _get("http://front.test:{PH}/", None, "HTTP/1.0"),
    )
    yield Spelling(
        "hostmismatch-http11-no-host",
        "host-mismatch",
        "http",
        _get("http://front.test:{PH}/", None),
    )
    yield Spelling(
        "hostmismatch-duplicate-same",
        "host-mismatch",
        "http",
        _get("http://front.test:{PH}/", "front.test:{PH}", extra="Host: front.test:{PH}\r\n"),
    )
    yield Spelling(
        "hostmismatch-duplicate-other",
        "host-mismatch",
        "http",
        _get("http://front.test:{PH}/", "front.test:{PH}", extra="Host: other.test:{PF}\r\n"),
    )
    yield Spelling(
        "hostmismatch-duplicate-case",
        "host-mismatch",
        "http",
        _get("http://front.test:{PH}/", "front.test:{PH}", extra="HOST: other.test:{PF}\r\n"),
    )

    # 7. request smuggling shapes towards the allowed front.test (must not reach it)
    u = "http://front.test:{PH}/"
    h = "Host: front.test:{PH}\r\n"
    smuggled = "GET http://other.test:{PF}/ HTTP/1.1\r\nHost: other.test:{PF}\r\n\r\n"
    for ident, data in (
        (
            "cl-te",
            f"POST {u} HTTP/1.1\r\n{h}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
        ),
        (
            "te-cl",
            f"POST {u} HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{smuggled}",
        ),
        (
            "two-cl",
            f"POST {u} HTTP/1.1\r\n{h}Content-Length: 0\r\nContent-Length: 80\r\n\r\n{smuggled}",
        ),
        ("cl-list", f"POST {u} HTTP/1.1\r\n{h}Content-Length: 0, 80\r\n\r\n{smuggled}"),
        ("cl-negative", f"POST {u} HTTP/1.1\r\n{h}Content-Length: -1\r\n\r\n{smuggled}"),
        ("cl-plus", f"POST {u} HTTP/1.1\r\n{h}Content-Length: +0\r\n\r\n{smuggled}"),
        (
            "te-xchunked",
            f"POST {u} HTTP/1.1\r\n{h}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}",
        ),
        (
            "te-space-name",
            f"POST {u} HTTP/1.1\r\n{h}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{smuggled}",
        ),
        (
            "te-two",
            f"POST {u} HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "obs-fold-host",
            f"GET {u} HTTP/1.1\r\nHost: front.test:{{PH}}\r\n other.test:{{PF}}\r\n\r\n",
        ),
        (
            "obs-fold-tab-host",
            f"GET {u} HTTP/1.1\r\nHost: front.test:{{PH}}\r\n\tother.test\r\n\r\n",
        ),
        ("obs-fold-into-host", f"GET {u} HTTP/1.1\r\nHost:\r\n front.test:{{PH}}\r\n\r\n"),
        ("bare-lf-host-mismatch", f"GET {u} HTTP/1.1\nHost: other.test:{{PF}}\n\n"),
        ("bare-lf-dup-host", f"GET {u} HTTP/1.1\r\n{h}Host: other.test:{{PF}}\n\r\n"),
        ("bare-cr-host", f"GET {u} HTTP/1.1\r\nHost: front.test:{{PH}}\rHost: other.test\r\n\r\n"),
        ("space-before-colon-host", f"GET {u} HTTP/1.1\r\nHost : front.test:{{PH}}\r\n\r\n"),
        ("space-in-header-name", f"GET {u} HTTP/1.1\r\n{h}X Forwarded: a\r\n\r\n"),
        ("nul-in-header", f"GET {u} HTTP/1.1\r\n{h}X-A: a\x00b\r\n\r\n"),
        ("nul-in-host", f"GET {u} HTTP/1.1\r\nHost: front.test:{{PH}}\x00other.test\r\n\r\n"),
        ("header-no-colon", f"GET {u} HTTP/1.1\r\n{h}Garbage\r\n\r\n"),
        ("http09", f"GET {u}\r\n\r\n"),
        ("http2-preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("version-junk", f"GET {u} HTTP/9.9\r\n{h}\r\n"),
        ("two-spaces", "GET  http://other.test:{PF}/  HTTP/1.1\r\n" + h + "\r\n"),
        ("tab-separator", "GET\thttp://other.test:{PF}/\tHTTP/1.1\r\n" + h + "\r\n"),
        ("lowercase-method-connect", "connect other.test:{PF} HTTP/1.1\r\n\r\n"),
    ):
        yield Spelling(f"smuggle-{ident}", "smuggling", "http", data)

    # 8. SNI disagreements inside an allowed tunnel to front.test
    for ident, sni, extra, split in (
        ("other", b"other.test", None, ()),
        ("denied", b"x.denied.test", None, ()),
        ("localhost", b"localhost", None, ()),
        ("ip-literal", b"127.0.0.1", None, ()),
        ("suffix", b"front.test.other.test", None, ()),
        ("prefix", b"xfront.test", None, ()),
        ("underscore", b"other_x.test", None, ()),
        ("double-dot", b"front.test..", None, ()),
        ("nul", b"front.test\x00other.test", None, ()),
        ("trailing-space", b"other.test ", None, ()),
        ("long-label", b"a" * 70 + b".test", None, ()),
        ("two-names-other-first", b"other.test", b"front.test", ()),
        ("two-names-front-first", b"front.test", b"other.test", ()),
        ("split-3", b"other.test", None, (3,)),
        ("split-5", b"other.test", None, (5,)),
        ("split-40", b"other.test", None, (40,)),
        ("split-1", b"other.test", None, (1,)),
        ("split-2", b"other.test", None, (2,)),
        ("split-1-1-1", b"other.test", None, (1, 1, 1)),
    ):
        yield Spelling(f"sni-{ident}", "sni", "tls", sni=sni, extra_sni=extra, split=split)
    yield Spelling(
        "sni-garbage-record",
        "sni",
        "tls",
        raw_tls=b"\x16\x03\x01\x00\x05hello",
        note="not a ClientHello",
    )
    yield Spelling(
        "sni-ccs-then-hello",
        "sni",
        "tls",
        raw_tls=b"\x14\x03\x01\x00\x01\x01" + b"",  # completed with a hello below
    )

    # 9. a denied address (deny rule by address, 10.200.0.15): every encoding, IPv4-mapped
    #    IPv6 (the IPv4 address, decisions.md), plain HTTP, and unlisted aliases of it
    yield from denied_address_spellings()

    # 10. Host headers with userinfo, IPv4-mapped Hosts and URIs of private addresses
    for ident, uri, host in (
        ("userinfo-denied", "http://front.test:{PH}/", "user@x.denied.test:{PH}"),
        ("userinfo-denied-noport", "http://front.test:{PH}/", "user@x.denied.test"),
        ("userinfo-front-at-denied", "http://front.test:{PH}/", "front.test:{PH}@x.denied.test"),
        ("userinfo-denied-at-front", "http://front.test:{PH}/", "x.denied.test@front.test:{PH}"),
        ("userinfo-denied-addr", "http://front.test:{PH}/", f"u:p@{DENIED_ADDR}:{{PH}}"),
        ("userinfo-empty", "http://front.test:{PH}/", "@front.test:{PH}"),
    ):
        yield Spelling(f"host-userinfo-{ident}", "host-userinfo", "http", _get(uri, host))
    for ident, host in (
        ("rfc1918", "[::ffff:10.0.0.1]"),
        ("rfc1918-hex", "[::ffff:a00:1]"),
        ("rfc1918-long", "[0:0:0:0:0:ffff:10.0.0.1]"),
        ("metadata", "[::ffff:169.254.169.254]"),
        ("metadata-hex", "[::ffff:a9fe:a9fe]"),
        ("loopback-upper", "[::FFFF:127.0.0.1]"),
    ):
        yield Spelling(
            f"v4mapped-uri-{ident}",
            "v4mapped",
            "http",
            _get(f"http://{host}:{{PF}}/", f"{host}:{{PF}}"),
        )
        yield Spelling(
            f"v4mapped-host-{ident}",
            "v4mapped",
            "http",
            _get("http://front.test:{PH}/", f"{host}:{{PH}}"),
        )


def denied_address_spellings() -> Iterator[Spelling]:
    """The lab's address deny rule, in every spelling of the address and through every
    unlisted alias of it: refused as ``denylisted`` in every mode."""
    for form, text in ipv4_spellings(DENIED_ADDR).items():
        if form == "zero-padded-dec":
            continue  # 010.200.000.015 is octal for 8.200.0.13: another address
        yield Spelling(f"denied-addr-v4-{form}", "denied-address", "connect", _connect(text))
    for form in ("v4mapped", "v4mapped-hex", "v4mapped-long"):
        text = ipv6_wrappers(DENIED_ADDR)[form]
        yield Spelling(f"denied-addr-{form}", "denied-address", "connect", _connect(text))
    yield Spelling(
        "denied-addr-v4mapped-upper",
        "denied-address",
        "connect",
        _connect(f"[::FFFF:{DENIED_ADDR}]"),
    )
    yield Spelling(
        "denied-addr-v4mapped-zero-padded",
        "denied-address",
        "connect",
        _connect(f"[0000:0000:0000:0000:0000:ffff:{DENIED_ADDR}]"),
    )
    for form in ("dotted", "decimal", "hex"):
        text = ipv4_spellings(DENIED_ADDR)[form]
        yield Spelling(
            f"denied-addr-http-uri-{form}",
            "denied-address",
            "http",
            _get(f"http://{text}:{{PF}}/", f"{text}:{{PF}}"),
        )
    for form in ("v4mapped", "v4mapped-hex"):
        text = ipv6_wrappers(DENIED_ADDR)[form]
        yield Spelling(
            f"denied-addr-http-uri-{form}",
            "denied-address",
            "http",
            _get(f"http://{text}:{{PF}}/", f"{text}:{{PF}}"),
        )
    for name in DENIED_ALIASES:
        for variant in ("lower", "upper", "trailing-dot"):
            yield Spelling(
                f"denied-alias-{name}-{variant}",
                "denied-alias",
                "connect",
                _connect(NAME_VARIANTS[variant](name)),
            )
        yield Spelling(
            f"denied-alias-{name}-http-uri",
            "denied-alias",
            "http",
            _get(f"http://{name}:{{PF}}/", f"{name}:{{PF}}"),
        )


def corpus() -> list[Spelling]:
    out: list[Spelling] = []
    seen: set[str] = set()
    for sp in generate():
        if sp.id == "sni-ccs-then-hello":
            from support.adv_wire import client_hello

            sp = Spelling(
                sp.id,
                sp.cls,
                sp.kind,
                raw_tls=b"\x14\x03\x01\x00\x01\x01" + client_hello(b"other.test"),
            )
        assert sp.id not in seen, f"duplicate spelling id {sp.id}"
        seen.add(sp.id)
        out.append(sp)
    return out


CORPUS = corpus()


# -- the audit-mode corpus ----------------------------------------------------------------
#
# Audit mode lets what the allowlist would block through (``would_block``), but never a
# denied destination: not by name, not by address, not through another name the client
# gives (SNI, Host, an absolute URI) while the target itself is merely unlisted. These
# spellings run against a second lab proxy with ``mode: audit``; each must be refused and
# recorded ``decision: block``, ``reason: denylisted``.

#: the unlisted targets audit mode lets through (both are the trap's address, .13)
UNLISTED_TARGETS = {"name": "other.test:{PF}", "addr": "10.200.0.13:{PF}"}

#: names the lab's deny rules cover, in the spellings a server might still read as them
DENIED_NAME_SPELLINGS = {
    **{
        v: NAME_VARIANTS[v]("x.denied.test")
        for v in (
            "lower",
            "upper",
            "mixed-case",
            "trailing-dot",
            "ideographic-dot",
            "fullwidth-dot",
            "halfwidth-dot",
            "fullwidth-letters",
        )
    },
    "apex": "denied.test",
    "deeper": "a.b.x.denied.test",
    "apex-upper-dot": "DENIED.TEST.",
    "addr": DENIED_ADDR,
}


def audit_generate() -> Iterator[Spelling]:
    # every enforce-mode spelling that names a denied host or address
    for sp in CORPUS:
        if "denied" in sp.id or sp.cls in ("denied-address", "denied-alias"):
            yield sp

    # SNI naming a denied host inside a tunnel to an unlisted target
    for tident, target in UNLISTED_TARGETS.items():
        for ident, name in DENIED_NAME_SPELLINGS.items():
            yield Spelling(
                f"audit-sni-{tident}-{ident}",
                "audit-sni",
                "tls",
                sni=name.encode(),
                connect_to=target,
            )
        for ident, sni, split in (
            ("split-3", b"x.denied.test", (3,)),
            ("split-1-1-1", b"x.denied.test", (1, 1, 1)),
            ("v4mapped-addr", f"::ffff:{DENIED_ADDR}".encode(), ()),
        ):
            yield Spelling(
                f"audit-sni-{tident}-{ident}",
                "audit-sni",
                "tls",
                sni=sni,
                split=split,
                connect_to=target,
            )
        yield Spelling(
            f"audit-sni-{tident}-second-name-denied",
            "audit-sni",
            "tls",
            sni=b"other.test",
            extra_sni=b"x.denied.test",
            connect_to=target,
        )

    # plain HTTP: Host names a denied host while the URI names an unlisted one, and the
    # other way round; Host with userinfo; a denied address in Host, IPv4-mapped too
    hosts = {
        **{ident: f"{name}:{{PF}}" for ident, name in DENIED_NAME_SPELLINGS.items()},
        "noport": "x.denied.test",
        "userinfo": "user@x.denied.test:{PF}",
        "userinfo-other": "other.test:{PF}@x.denied.test",
        "addr-v4mapped": f"[::ffff:{DENIED_ADDR}]:{{PF}}",
        "addr-decimal": f"{ipv4_spellings(DENIED_ADDR)['decimal']}:{{PF}}",
    }
    for ident, host in hosts.items():
        yield Spelling(
            f"audit-host-{ident}",
            "audit-host",
            "http",
            _get("http://other.test:{PF}/", host),
        )
    yield Spelling(
        "audit-host-origin-form",
        "audit-host",
        "http",
        _get("/", "x.denied.test:{PF}"),
    )
    for ident in ("lower", "upper", "trailing-dot", "addr"):
        name = DENIED_NAME_SPELLINGS[ident]
        yield Spelling(
            f"audit-uri-{ident}",
            "audit-uri",
            "http",
            _get(f"http://{name}:{{PF}}/", "other.test:{PF}"),
        )
    yield Spelling(
        "audit-uri-v4mapped-addr",
        "audit-uri",
        "http",
        _get(f"http://[::ffff:{DENIED_ADDR}]:{{PF}}/", "other.test:{PF}"),
    )

    # plain HTTP inside a tunnel audit mode let through (read as HTTP: decisions.md)
    for tident, target in UNLISTED_TARGETS.items():
        for ident, data in (
            ("host", _get("/", "x.denied.test")),
            ("host-upper", _get("/", "X.DENIED.TEST")),
            ("host-addr", _get("/", DENIED_ADDR)),
            ("host-userinfo", _get("/", "user@x.denied.test")),
            ("uri", _get("http://x.denied.test/", "other.test")),
            ("uri-addr", _get(f"http://{DENIED_ADDR}/", "other.test")),
            # (a keep-alive second request needs an HTTP server at the unlisted address,
            # which the lab does not have: test_audit_mode_sni_deny.py covers it)
        ):
            yield Spelling(
                f"audit-tunnel-http-{tident}-{ident}",
                "audit-tunnel-http",
                "tunnel-http",
                data,
                connect_to=target,
            )


def audit_corpus() -> list[Spelling]:
    out = list(audit_generate())
    ids = [sp.id for sp in out]
    assert len(ids) == len(set(ids)), "duplicate audit spelling id"
    return out


AUDIT_CORPUS = audit_corpus()
