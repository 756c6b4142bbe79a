# ruff: noqa: RUF001  (look-alike Unicode is what these tests are about)
"""Property tests: decisions do not depend on how a host is spelled.

(a) a denied or unlisted host stays blocked in every spelling the normaliser accepts;
(b) an allowlisted host is allowed in every equivalent spelling;
(c) nothing that fails to normalise is ever allowed;
(d) HostIndex agrees with a brute-force matcher.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from egress_guard.engine import Decision, Engine, HostIndex, Match
from egress_guard.engine.addresses import embedded_ipv4
from egress_guard.engine.rules.addresses import decide_addresses, static_addresses
from egress_guard.engine.rules.agreement import check_host_header, check_sni
from egress_guard.engine.rules.mode import apply_mode
from egress_guard.engine.rules.names import decide_name, decide_target
from egress_guard.normalize import Host, NormalizationError, normalize_host, normalize_port
from egress_guard.policy import load_catalog, load_policy_text
from egress_guard.policy.patterns import HostPattern, parse_pattern

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

POLICY = """\
version: 1
destinations:
  - name: api
    hosts: [api.example.com, "*.sub.example.com", "**.bücher.example.com", "1.1.1.1", "9.9.0.0/16"]
    ports: [443, 8443]
deny:
  - hosts: ["**.evil.example.com", "blocked.sub.example.com", "9.9.9.0/24"]
"""

# Built at import: hypothesis runs many examples per test, and function-scoped fixtures
# would not be reset between them anyway.
ENGINE = Engine(load_policy_text(POLICY, "policy.yaml"), load_catalog())
AUDIT = Engine(load_policy_text("mode: audit\n" + POLICY, "audit.yaml"), load_catalog())

# -- spellings ------------------------------------------------------------------------------

_DOTS = [".", "\u3002", "\uff0e", "\uff61"]  # full stop, ideographic, full-width, half-width


def _fullwidth(c: str) -> str:
    return chr(ord(c) - 0x21 + 0xFF01)  # ASCII ! .. ~ -> U+FF01 .. U+FF5E


@st.composite
def spell_name(draw: st.DrawFn, name: str) -> str:
    """An equivalent spelling: random case, full-width letters and digits, Unicode dots,
    an optional trailing dot; non-ASCII letters change case."""
    out = []
    for c in name:
        if c == ".":
            out.append(draw(st.sampled_from(_DOTS)))
        elif c.isascii() and c.isalnum():
            c = draw(st.sampled_from([c.lower(), c.upper()]))
            out.append(_fullwidth(c) if draw(st.booleans()) else c)
        elif c.isalpha():
            out.append(draw(st.sampled_from([c.lower(), c.upper()])))
        else:
            out.append(c)
    if draw(st.booleans()):
        out.append(draw(st.sampled_from(_DOTS)))
    return "".join(out)


def _fmt_number(draw: st.DrawFn, n: int) -> str:
    style = draw(st.sampled_from(["dec", "oct", "hex"]))
    if style == "dec":
        return str(n)
    if style == "oct":
        return "0" * draw(st.integers(1, 3)) + (format(n, "o") if n else "")
    digits = format(n, "x")
    digits = "".join(draw(st.sampled_from([d, d.upper()])) for d in digits)
    return draw(st.sampled_from(["0x", "0X"])) + "0" * draw(st.integers(0, 2)) + digits


@st.composite
def spell_ipv4(draw: st.DrawFn, addr: ipaddress.IPv4Address) -> str:
    """Every legacy IPv4 spelling a resolver accepts: 1-4 parts, each decimal, octal or
    hex; IPv4-mapped IPv6; full-width digits; a trailing dot."""
    value = int(addr)
    form = draw(st.sampled_from(["legacy", "legacy", "legacy", "mapped", "mapped-hex"]))
    if form == "mapped":
        text = draw(st.sampled_from(["::ffff:", "::FFFF:", "0:0:0:0:0:ffff:"])) + str(addr)
        return f"[{text}]" if draw(st.booleans()) else text
    if form == "mapped-hex":
        text = f"::ffff:{value >> 16:x}:{value & 0xFFFF:x}"
        return f"[{text}]" if draw(st.booleans()) else text
    octets = list(addr.packed)
    parts_n = draw(st.integers(1, 4))
    head = octets[: parts_n - 1]
    tail = int.from_bytes(bytes(octets[parts_n - 1 :]), "big")
    text = ".".join(_fmt_number(draw, n) for n in [*head, tail])
    if draw(st.booleans()):
        text = "".join(_fullwidth(c) if c.isalnum() else c for c in text)
    if draw(st.booleans()):
        text += draw(st.sampled_from(_DOTS))
    return text


LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")


def _v4(net: str) -> st.SearchStrategy[ipaddress.IPv4Address]:
    n = ipaddress.IPv4Network(net)
    lo = int(n.network_address)
    return st.integers(lo, lo + n.num_addresses - 1).map(ipaddress.IPv4Address)


def _reason(host: str, port: int) -> str:
    d = decide_target(ENGINE.compiled, host, port)
    assert isinstance(d, Decision), f"{host!r} was matched: {d}"
    assert not d.allowed and d.action == "block"
    # audit mode lets it through as would_block, never as allow
    a = apply_mode(AUDIT.compiled, decide_target(AUDIT.compiled, host, port))  # type: ignore[arg-type]
    assert a.action != "allow"
    return d.reason


# -- (a) denied / unlisted stays blocked ------------------------------------------------------

DENIED_NAMES = st.one_of(
    st.sampled_from(["evil.example.com", "blocked.sub.example.com"]),
    LABEL.map(lambda lab: f"{lab}.evil.example.com"),
    st.tuples(LABEL, LABEL).map(lambda t: f"{t[0]}.{t[1]}.evil.example.com"),
)


@PROPS
@given(st.data(), DENIED_NAMES, st.sampled_from([443, 8443, 80]))
def test_denied_name_blocked_in_every_spelling(data: st.DataObject, name: str, port: int) -> None:
    spelling = data.draw(spell_name(name), label="spelling")
    assert _reason(spelling, port) == "denylisted"


UNLISTED_NAMES = st.one_of(
    st.sampled_from(
        [
            "example.com",
            "sub.example.com",
            "xapi.example.com",
            "api.example.com.evil.net",
            "api-example.com",
            "x.api.example.com",
            "xn--bcher-kva.com",
        ]
    ),
    LABEL.map(lambda lab: f"{lab}.example.net"),
    LABEL.map(lambda lab: f"{lab}sub.example.com"),
)


@PROPS
@given(st.data(), UNLISTED_NAMES)
def test_unlisted_name_blocked_in_every_spelling(data: st.DataObject, name: str) -> None:
    spelling = data.draw(spell_name(name), label="spelling")
    assert _reason(spelling, 443) == "not_allowlisted"


@PROPS
@given(st.data(), _v4("9.9.9.0/24"))
def test_denied_ip_blocked_in_every_spelling(
    data: st.DataObject, addr: ipaddress.IPv4Address
) -> None:
    spelling = data.draw(spell_ipv4(addr), label="spelling")
    assert _reason(spelling, 443) == "denylisted"


PRIVATE = st.one_of(
    _v4("127.0.0.0/8"),
    _v4("10.0.0.0/8"),
    _v4("192.168.0.0/16"),
    _v4("169.254.0.0/16"),
    _v4("100.64.0.0/10"),
    st.just(ipaddress.IPv4Address("0.0.0.0")),
)


@PROPS
@given(st.data(), PRIVATE)
def test_private_ip_blocked_in_every_spelling(
    data: st.DataObject, addr: ipaddress.IPv4Address
) -> None:
    spelling = data.draw(spell_ipv4(addr), label="spelling")
    assert _reason(spelling, 443) == "private_address"


@PROPS
@given(st.data(), _v4("11.0.0.0/8") | _v4("8.0.0.0/8") | _v4("1.0.0.0/16"))
def test_unlisted_public_ip_blocked_in_every_spelling(
    data: st.DataObject, addr: ipaddress.IPv4Address
) -> None:
    assume(addr != ipaddress.IPv4Address("1.1.1.1"))
    spelling = data.draw(spell_ipv4(addr), label="spelling")
    assert _reason(spelling, 443) == "ip_literal_not_allowed"


# -- (b) allowlisted is allowed in every spelling ---------------------------------------------

ALLOWED_NAMES = st.one_of(
    st.sampled_from(["api.example.com", "bücher.example.com", "x.bücher.example.com"]),
    LABEL.filter(lambda lab: lab != "blocked").map(lambda lab: f"{lab}.sub.example.com"),
    st.tuples(LABEL, LABEL).map(lambda t: f"{t[0]}.{t[1]}.sub.example.com"),
)


def _allowed(host: str, port: int, addrs: tuple[ipaddress.IPv4Address, ...] | None) -> str:
    m = decide_target(ENGINE.compiled, host, port)
    assert isinstance(m, Match), f"{host!r}: {m}"
    assert m.destination.name == "api"
    if addrs is None:
        addrs = static_addresses(ENGINE.compiled, m.host)  # type: ignore[assignment]
        assert addrs is not None
    d = decide_addresses(ENGINE.compiled, m, addrs)
    assert (d.allowed, d.action, d.reason, d.destination) == (True, "allow", "allowlisted", "api")
    return m.host.value


@PROPS
@given(st.data(), ALLOWED_NAMES, st.sampled_from([443, 8443]))
def test_allowlisted_name_allowed_in_every_spelling(
    data: st.DataObject, name: str, port: int
) -> None:
    spelling = data.draw(spell_name(name), label="spelling")
    canonical = _allowed(spelling, port, (ipaddress.IPv4Address("93.184.216.34"),))
    assert canonical == normalize_host(name).value
    # SNI and Host spelled differently from the CONNECT target still agree
    target = normalize_host(name)
    assert check_sni(ENGINE.compiled, target, port, spelling, "api") is None
    assert (
        check_host_header(ENGINE.compiled, target, port, [f"{spelling}:{port}"], 443, "api") is None
    )


@PROPS
@given(
    st.data(), st.just(ipaddress.IPv4Address("1.1.1.1")) | _v4("9.9.0.0/21") | _v4("9.9.128.0/17")
)
def test_allowlisted_ip_allowed_in_every_spelling(
    data: st.DataObject, addr: ipaddress.IPv4Address
) -> None:
    spelling = data.draw(spell_ipv4(addr), label="spelling")
    assert _allowed(spelling, 443, None) == str(addr)


# -- (c) nothing that fails to normalise is ever allowed --------------------------------------

_JUNK = st.sampled_from(
    [*"\x00\t\n\r /\\@%?#[]:*.-_+~'\"`<>", "\u00ad", "\u200b", "\u3002", "\uff0e", "\u202e",
     "\ufe52", "\uff20", "\uff0f", "xn--", "..", "0x", "0", "%25", "%2e"]
)  # fmt: skip


@st.composite
def mangled(draw: st.DrawFn) -> str:
    """An allowlisted host with junk inserted: the interesting near misses."""
    base = draw(st.sampled_from(["api.example.com", "a.sub.example.com", "1.1.1.1", "9.9.1.1"]))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(base)))
        base = base[:i] + draw(_JUNK) + base[i:]
    return base


HOSTS = st.one_of(mangled(), st.text(max_size=40), st.lists(_JUNK | LABEL).map("".join))
PORTS = st.one_of(
    st.integers(-2, 70000),
    st.sampled_from(["443", "0443", "+443", " 443", "４４３", "8443", "", "0x1bb"]),
    st.text(max_size=6),
)


def _allowlisted(canonical: str) -> bool:
    """Brute-force reading of POLICY's allow and deny lists."""
    host = normalize_host(canonical)
    if host.ip is not None:
        ip = host.ip
        denied = ip in ipaddress.ip_network("9.9.9.0/24")
        return not denied and (
            ip == ipaddress.ip_address("1.1.1.1") or ip in ipaddress.ip_network("9.9.0.0/16")
        )
    n = host.value
    if n.endswith(".evil.example.com") or n in ("evil.example.com", "blocked.sub.example.com"):
        return False
    return (
        n == "api.example.com"
        or n.endswith(".sub.example.com")
        or n == "xn--bcher-kva.example.com"
        or n.endswith(".xn--bcher-kva.example.com")
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HOSTS, PORTS)
def test_unnormalisable_input_is_never_allowed(raw_host: str, raw_port: str | int) -> None:
    try:
        canonical = normalize_host(raw_host).value
        port: int | None = normalize_port(raw_port)
    except NormalizationError:
        canonical, port = None, None
    for eng in (ENGINE, AUDIT):
        d = decide_target(eng.compiled, raw_host, raw_port)
        if canonical is None or port is None:
            assert isinstance(d, Decision)
            assert (d.allowed, d.reason) == (False, "invalid_host")
            assert not apply_mode(eng.compiled, d).allowed
        elif isinstance(d, Match):
            assert _allowlisted(canonical) and port in (443, 8443)
            assert d.host.value == canonical
        else:
            assert not d.allowed and d.action == "block"


# -- (d) HostIndex == brute force -----------------------------------------------------------

_NAME_LABELS = st.sampled_from(["a", "b", "c", "api", "x-y"])
BASE = st.lists(_NAME_LABELS, max_size=3).map(lambda ls: ".".join([*ls, "test", "com"]))
QUERY_NAMES = st.one_of(
    BASE,
    st.lists(_NAME_LABELS, max_size=5).map(lambda ls: ".".join([*ls, "test", "com"])),
    st.sampled_from(["com", "test.com", "atest.com", "a.test.com.evil", "test.com.test.com"]),
)

_V4 = st.integers(0, 2**32 - 1).map(lambda v: v & 0xFF00FFFF | 0x000A0000)  # x.10.y.z: dense
_V6 = st.integers(0, 2**16 - 1).map(lambda v: (0x20010DB8 << 96) | (v << 48) | v)


@st.composite
def patterns(draw: st.DrawFn) -> HostPattern:
    kind = draw(st.sampled_from(["exact", "sub", "apex_sub", "v4", "v6"]))
    if kind in ("exact", "sub", "apex_sub"):
        prefix = {"exact": "", "sub": "*.", "apex_sub": "**."}[kind]
        return parse_pattern(prefix + draw(BASE))
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    if kind == "v4":
        net = ipaddress.IPv4Network((draw(_V4), draw(st.integers(8, 32))), strict=False)
    else:
        net = ipaddress.IPv6Network((draw(_V6), draw(st.integers(16, 128))), strict=False)
    return parse_pattern(str(net) if net.num_addresses > 1 else str(net.network_address))


def _reference_name(pat: HostPattern, name: str) -> bool:
    if pat.kind == "exact":
        return name == pat.value
    if pat.kind == "sub":
        return name.endswith("." + pat.value)
    if pat.kind == "apex_sub":
        return name == pat.value or name.endswith("." + pat.value)
    return False


def _reference_ip(pat: HostPattern, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    net = pat.network
    return net is not None and net.version == ip.version and ip in net


RULES = st.lists(
    st.tuples(st.integers(0, 20), st.lists(patterns(), min_size=1, max_size=4)),
    max_size=12,
)
ADDRS = st.one_of(_V4.map(ipaddress.IPv4Address), _V6.map(ipaddress.IPv6Address))


@PROPS
@given(RULES, st.lists(QUERY_NAMES, max_size=8), st.lists(ADDRS, max_size=8))
def test_host_index_matches_brute_force(
    rules: list[tuple[int, list[HostPattern]]],
    names: list[str],
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    index = HostIndex(rules)
    for name in names:
        expect = sorted({i for i, pats in rules if any(_reference_name(p, name) for p in pats)})
        assert index.match_name(name) == tuple(expect), name
    # a rule's IP patterns, and the addresses inside them, must be found
    for _, pats in rules:
        for p in pats:
            if p.network is not None:
                addrs.append(p.network.network_address)
                addrs.append(p.network.broadcast_address)
    for ip in addrs:
        expect = sorted({i for i, pats in rules if any(_reference_ip(p, ip) for p in pats)})
        assert index.match_ip(ip) == tuple(expect), ip


def test_fixtures_are_what_they_claim() -> None:
    assert (ENGINE.policy.mode, AUDIT.policy.mode) == ("enforce", "audit")
    d = apply_mode(AUDIT.compiled, decide_target(AUDIT.compiled, "example.net", 443))  # type: ignore[arg-type]
    assert d.action == "would_block"


# -- (e) the Engine's name and address decisions against the policy read literally -----------

CATALOG = load_catalog()
_PORTS = st.lists(st.sampled_from([443, 8443]), min_size=1, max_size=2, unique=True)
_PATS = st.lists(
    patterns(), min_size=1, max_size=4, unique_by=lambda p: (p.kind, p.value, p.network)
)
DESTS = st.lists(st.tuples(_PATS, _PORTS), min_size=1, max_size=6)
DENY = st.lists(st.tuples(_PATS, st.none() | _PORTS), max_size=3)


def _yaml_hosts(pats: list[HostPattern]) -> str:
    prefix = {"exact": "", "sub": "*.", "apex_sub": "**."}
    return ", ".join(
        f'"{prefix[p.kind]}{p.value}"' if p.network is None else f'"{p.network}"' for p in pats
    )


def _covers(pats: list[HostPattern], host: Host) -> bool:
    if host.ip is not None:
        return any(_reference_ip(p, host.ip) for p in pats)
    return any(_reference_name(p, host.value) for p in pats)


def _denied_by(pats: list[HostPattern], host: Host) -> bool:
    """Deny rules also cover an IPv4 address carried inside an IPv6 one."""
    inner = embedded_ipv4(host.ip) if isinstance(host.ip, ipaddress.IPv6Address) else []
    return _covers(pats, host) or any(_reference_ip(p, ip) for p in pats for ip in inner)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DESTS, DENY, st.lists(QUERY_NAMES, max_size=6), st.lists(ADDRS, max_size=4), st.data())
def test_engine_decides_as_the_policy_reads(
    dests: list[tuple[list[HostPattern], list[int]]],
    deny: list[tuple[list[HostPattern], list[int] | None]],
    names: list[str],
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    data: st.DataObject,
) -> None:
    """Deny (on its ports) wins; otherwise the first destination in policy order that
    covers the host on the port; a host covered only on other ports is port_not_allowed.
    The names the policy spells out are asked about too: they take a precomputed path."""
    lines = ["version: 1", "network: {block_private: false}", "destinations:"]
    for k, (pats, ports) in enumerate(dests):
        lines += [f"  - name: d{k}", f"    hosts: [{_yaml_hosts(pats)}]", f"    ports: {ports}"]
    if deny:
        lines.append("deny:")
        for pats, ports in deny:
            lines.append(f"  - hosts: [{_yaml_hosts(pats)}]")
            if ports is not None:
                lines.append(f"    ports: {ports}")
    engine = Engine(load_policy_text("\n".join(lines) + "\n", "p.yaml"), CATALOG)
    listed = [p.value for pats, _ in dests for p in pats if p.network is None]
    hosts: list[str] = names + listed + [str(a) for a in addrs]
    for pats, _ in dests:
        hosts += [str(p.network.network_address) for p in pats if p.network is not None]
    for raw in hosts:
        port = data.draw(st.sampled_from([443, 8443]), label="port")
        host = normalize_host(raw)

        got = decide_name(engine.compiled, host, port)
        if any(_denied_by(pats, host) and (ps is None or port in ps) for pats, ps in deny):
            assert isinstance(got, Decision) and got.reason == "denylisted", (raw, port, got)
            continue
        on_port = [k for k, (pats, ps) in enumerate(dests) if _covers(pats, host) and port in ps]
        anywhere = [k for k, (pats, _) in enumerate(dests) if _covers(pats, host)]
        if on_port:
            assert isinstance(got, Match), (raw, port, got)
            assert got.destination.name == f"d{on_port[0]}", (raw, port)
        elif anywhere:
            assert isinstance(got, Decision), (raw, port, got)
            assert (got.reason, got.destination) == ("port_not_allowed", f"d{anywhere[0]}")
        else:
            assert isinstance(got, Decision), (raw, port, got)
            assert got.reason in ("not_allowlisted", "ip_literal_not_allowed"), (raw, got)
