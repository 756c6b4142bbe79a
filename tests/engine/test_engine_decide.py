# ruff: noqa: RUF001  (look-alike Unicode is what these tests are about)
"""Engine decisions, stage by stage: target, addresses, other names, client, self, mode."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

import pytest

from egress_guard.engine import NEVER_AUDITED, Decision, Engine, Match
from egress_guard.engine.rules.addresses import check_self, decide_addresses, static_addresses
from egress_guard.engine.rules.agreement import check_host_header, check_sni
from egress_guard.engine.rules.clients import check_client
from egress_guard.engine.rules.mode import apply_mode
from egress_guard.engine.rules.names import decide_target
from egress_guard.engine.rules.requests import check_request
from egress_guard.normalize import normalize_host

EngineFactory = Callable[..., Engine]

P = pytest.param

POLICY = """\
version: 1
mode: enforce
destinations:
  - name: exact
    hosts: [api.example.com]
  - name: subs
    hosts: ["*.sub.example.com"]
  - name: apexsub
    hosts: ["**.apex.example.com"]
    ports: [443, 8443]
  - name: literal
    hosts: [1.1.1.1, "9.9.0.0/16", "2606:4700::/32"]
  - name: internal
    hosts: [gw.internal.example.com, "10.20.0.0/16", "fd20::/64"]
  - name: local
    hosts: ["127.0.0.1"]
    ports: [11434, 8080]
  - name: static
    hosts: [static.example.com]
deny:
  - hosts: ["**.evil.example.com", "bad.sub.example.com"]
  - hosts: ["9.9.9.0/24", "8.8.4.4"]
  - hosts: [api.example.com]
    ports: [8080]
network:
  block_private: true
  allow_cidrs: [192.168.50.0/24]
  resolve:
    STATIC.Example.com.: ["1.1.1.1", "10.9.9.9"]
clients:
  allow_cidrs: [127.0.0.0/8, "::1/128", 10.1.0.0/16]
"""

SELF = [("127.0.0.1", 8080), ("::1", 8080)]


@pytest.fixture(scope="module")
def engine(make_engine: EngineFactory) -> Engine:
    return make_engine(POLICY, self_endpoints=SELF)


@pytest.fixture(scope="module")
def audit_engine(make_engine: EngineFactory) -> Engine:
    return make_engine(POLICY.replace("mode: enforce", "mode: audit"), self_endpoints=SELF)


def ips(*addrs: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(a) for a in addrs]


def full(eng: Engine, host: str, port: int | str, addrs: Sequence[str] | None) -> Decision:
    """Stage 1 and 2 as the proxy runs them; ``addrs`` None means the static addresses."""
    d = decide_target(eng.compiled, host, port)
    if isinstance(d, Match):
        if addrs is None:
            static = static_addresses(eng.compiled, d.host)
            assert static is not None
            d = decide_addresses(eng.compiled, d, static)
        else:
            d = decide_addresses(eng.compiled, d, ips(*addrs))
    return apply_mode(eng.compiled, d)


# -- stage 1: the target by name ----------------------------------------------------------

TARGETS = [
    # exact
    P("api.example.com", 443, "exact", id="exact"),
    P("API.Example.COM.", "443", "exact", id="exact-other-spelling"),
    P("example.com", 443, "not_allowlisted", id="exact-parent"),
    P("x.api.example.com", 443, "not_allowlisted", id="exact-child"),
    P("api.example.com.evil.net", 443, "not_allowlisted", id="suffix-confusion"),
    # *.
    P("a.sub.example.com", 443, "subs", id="sub"),
    P("a.b.c.sub.example.com", 443, "subs", id="sub-deep"),
    P("sub.example.com", 443, "not_allowlisted", id="sub-not-apex"),
    # **.
    P("apex.example.com", 443, "apexsub", id="apex-sub-apex"),
    P("a.b.apex.example.com", 8443, "apexsub", id="apex-sub-deep"),
    P("notapex.example.com", 443, "not_allowlisted", id="apex-sub-label-suffix"),
    # ports
    P("api.example.com", 80, "port_not_allowed", id="port-not-allowed"),
    P("apex.example.com", 8080, "port_not_allowed", id="port-not-allowed-multi"),
    # deny wins over allow
    P("bad.sub.example.com", 443, "denylisted", id="deny-name-over-sub"),
    P("x.evil.example.com", 443, "denylisted", id="deny-apex-sub"),
    P("evil.example.com", 443, "denylisted", id="deny-apex"),
    P("api.example.com", 8080, "denylisted", id="deny-port-scoped"),
    P("9.9.9.9", 443, "denylisted", id="deny-cidr-over-allow-cidr"),
    P("8.8.4.4", 443, "denylisted", id="deny-ip"),
    P("0x8080404", 443, "denylisted", id="deny-ip-legacy-spelling"),
    P("::ffff:9.9.9.9", 443, "denylisted", id="deny-ip-mapped"),
    P("64:ff9b::909:909", 443, "denylisted", id="deny-ip-nat64"),
    # IP literals
    P("1.1.1.1", 443, "literal", id="ip-allowed"),
    P("16843009", 443, "literal", id="ip-allowed-integer"),
    P("9.9.1.1", 443, "literal", id="ip-allowed-cidr"),
    P("2606:4700::1111", 443, "literal", id="ipv6-allowed-cidr"),
    P("[2606:4700::1111]", 443, "literal", id="ipv6-allowed-bracketed"),
    P("1.0.0.1", 443, "ip_literal_not_allowed", id="ip-not-allowlisted"),
    P("2606:4701::1", 443, "ip_literal_not_allowed", id="ipv6-not-allowlisted"),
    P("10.0.0.1", 443, "private_address", id="ip-private"),
    P("127.2", 443, "private_address", id="ip-loopback-legacy"),
    P("2130706434", 443, "private_address", id="ip-loopback-integer"),
    P("127.1", 443, "port_not_allowed", id="ip-allowlisted-other-port"),
    P("169.254.169.254", 80, "private_address", id="ip-metadata"),
    P("0xa9fea9fe", 80, "private_address", id="ip-metadata-hex"),
    P("64:ff9b::a9fe:a9fe", 80, "private_address", id="ip-metadata-nat64"),
    P("192.168.50.5", 443, "ip_literal_not_allowed", id="ip-allow-cidrs-does-not-allowlist"),
    P("127.0.0.1", 11434, "local", id="ip-loopback-allowlisted"),
    P("127.1", 11434, "local", id="ip-loopback-allowlisted-legacy"),
    # input that has no canonical form
    P("exa mple.com", 443, "invalid_host", id="invalid-host"),
    P("api.example.com", "0443", "invalid_host", id="invalid-port"),
    P("api.example.com", 0, "invalid_host", id="invalid-port-zero"),
    P("api.example.com..", 443, "invalid_host", id="invalid-two-dots"),
    P("[api.example.com]", 443, "invalid_host", id="invalid-brackets"),
]


@pytest.mark.parametrize(("host", "port", "expect"), TARGETS)
def test_decide_target(engine: Engine, host: str, port: int | str, expect: str) -> None:
    d = decide_target(engine.compiled, host, port)
    if isinstance(d, Match):
        assert d.destination.name == expect
        assert d.port == int(port)
        assert engine.destination(expect) is d.destination
    else:
        assert (d.allowed, d.action, d.reason) == (False, "block", expect)


def test_port_not_allowed_names_the_destination(engine: Engine) -> None:
    d = decide_target(engine.compiled, "api.example.com", 80)
    assert isinstance(d, Decision)
    assert d.destination == "exact" and d.label == "exact"
    assert d.hint is not None and "[443]" in d.hint and "policy.yaml:4" in d.hint


def test_not_allowlisted_is_unlisted_with_a_hint(engine: Engine) -> None:
    d = decide_target(engine.compiled, "example.com", 443)
    assert isinstance(d, Decision)
    assert d.destination is None and d.label == "unlisted"
    assert d.hint is not None and "hosts: [example.com]" in d.hint


def test_hint_names_the_catalog_entry(engine: Engine) -> None:
    d = decide_target(engine.compiled, "API.anthropic.com", 443)
    assert isinstance(d, Decision) and d.reason == "not_allowlisted"
    assert d.hint is not None and "'- use: anthropic'" in d.hint


def test_denylisted_hint_points_at_the_rule(engine: Engine) -> None:
    d = decide_target(engine.compiled, "bad.sub.example.com", 443)
    assert isinstance(d, Decision)
    assert d.hint is not None and "policy.yaml:21" in d.hint


def test_invalid_host_is_printable(engine: Engine) -> None:
    d = decide_target(engine.compiled, "a\x00b\r\n.com", 443)
    assert isinstance(d, Decision) and d.reason == "invalid_host"
    assert d.host.isprintable() and "\r" not in d.host and d.port is None


# -- stage 2: addresses -------------------------------------------------------------------

ADDRESSES = [
    P("api.example.com", ["93.184.216.34"], "allowlisted", None, id="public"),
    P(
        "api.example.com",
        ["93.184.216.34", "2606:2800::1"],
        "allowlisted",
        None,
        id="public-dual-stack",
    ),
    P(
        "api.example.com",
        ["93.184.216.34", "10.0.0.1"],
        "private_address",
        "private",
        id="one-private-of-many",
    ),
    P("api.example.com", ["127.0.0.1"], "private_address", "loopback", id="loopback"),
    P("api.example.com", ["10.1.2.3"], "private_address", "private", id="rfc1918"),
    P("api.example.com", ["169.254.169.254"], "private_address", "metadata", id="metadata"),
    P("api.example.com", ["169.254.3.4"], "private_address", "link-local", id="link-local"),
    P("api.example.com", ["100.64.1.1"], "private_address", "cgnat", id="cgnat"),
    P("api.example.com", ["0.0.0.0"], "private_address", "unspecified", id="unspecified"),
    P("api.example.com", ["::1"], "private_address", "loopback", id="v6-loopback"),
    P("api.example.com", ["fd00::1"], "private_address", "ula", id="ula"),
    P("api.example.com", ["fe80::1"], "private_address", "link-local", id="v6-link-local"),
    P("api.example.com", ["::ffff:10.0.0.1"], "private_address", "private", id="v4-mapped"),
    P(
        "api.example.com",
        ["64:ff9b::a9fe:a9fe"],
        "private_address",
        "metadata",
        id="nat64-metadata",
    ),
    P("api.example.com", ["64:ff9b::a00:1"], "private_address", "private", id="nat64-private"),
    P("api.example.com", ["2002:a9fe:a9fe::1"], "private_address", "metadata", id="6to4-metadata"),
    P(
        "api.example.com",
        ["2001:0:4136:e378:8000:63bf:3f57:fefe"],
        "private_address",
        "private",
        id="teredo-private",
    ),
    P(
        "api.example.com",
        ["2001:0:4136:e378:8000:63bf:f7f7:f7f7"],
        "private_address",
        "teredo",
        id="teredo",
    ),
    P("api.example.com", ["64:ff9b::5db8:d822"], "allowlisted", None, id="nat64-public"),
    P("api.example.com", ["2002:5db8:d822::1"], "private_address", "6to4", id="6to4-public"),
    # deny by resolved address, in every form that reaches it
    P("api.example.com", ["9.9.9.9"], "denylisted", None, id="deny-resolved"),
    P("api.example.com", ["93.184.216.34", "8.8.4.4"], "denylisted", None, id="deny-one-of-many"),
    P("api.example.com", ["::ffff:9.9.9.9"], "denylisted", None, id="deny-resolved-mapped"),
    P("api.example.com", ["64:ff9b::909:909"], "denylisted", None, id="deny-resolved-nat64"),
    P("api.example.com", ["2002:909:909::1"], "denylisted", None, id="deny-resolved-6to4"),
    # network.allow_cidrs lifts the private block for every destination
    P("api.example.com", ["192.168.50.7"], "allowlisted", None, id="allow-cidrs"),
    P(
        "api.example.com",
        ["192.168.51.7"],
        "private_address",
        "private",
        id="allow-cidrs-neighbour",
    ),
    # a destination's own IP/CIDR entries lift it for that destination only
    P("gw.internal.example.com", ["10.20.3.4"], "allowlisted", None, id="own-cidr"),
    P("gw.internal.example.com", ["fd20::5"], "allowlisted", None, id="own-cidr-v6"),
    P("gw.internal.example.com", ["::ffff:10.20.3.4"], "allowlisted", None, id="own-cidr-mapped"),
    P(
        "gw.internal.example.com",
        ["10.21.0.1"],
        "private_address",
        "private",
        id="own-cidr-outside",
    ),
    P("api.example.com", ["10.20.3.4"], "private_address", "private", id="other-destinations-cidr"),
    P("127.0.0.1", ["127.0.0.1"], "allowlisted", None, id="own-ip-loopback"),
]


@pytest.mark.parametrize(("host", "addrs", "reason", "cls"), ADDRESSES)
def test_decide_addresses(
    engine: Engine, host: str, addrs: list[str], reason: str, cls: str | None
) -> None:
    port = 11434 if host == "127.0.0.1" else 443
    m = decide_target(engine.compiled, host, port)
    assert isinstance(m, Match)
    d = decide_addresses(engine.compiled, m, ips(*addrs))
    assert d.reason == reason
    assert d.allowed is (reason == "allowlisted")
    assert d.action == ("allow" if d.allowed else "block")
    assert d.destination == m.destination.name
    assert (d.host, d.port) == (m.host.value, port)
    if cls is not None:
        assert d.detail is not None and cls in d.detail
        assert d.hint is not None and "allow_cidrs" in d.hint


def test_no_addresses_is_dns_failed(engine: Engine, audit_engine: Engine) -> None:
    for eng in (engine, audit_engine):
        m = decide_target(eng.compiled, "api.example.com", 443)
        assert isinstance(m, Match)
        d = apply_mode(eng.compiled, decide_addresses(eng.compiled, m, []))
        assert (d.allowed, d.reason) == (False, "dns_failed")


def test_static_addresses(engine: Engine) -> None:
    assert static_addresses(engine.compiled, normalize_host("static.example.com")) == tuple(
        ips("1.1.1.1", "10.9.9.9")
    )
    assert static_addresses(engine.compiled, normalize_host("0x01010101")) == tuple(ips("1.1.1.1"))
    assert static_addresses(engine.compiled, normalize_host("api.example.com")) is None


def test_static_override_is_checked_like_dns(engine: Engine) -> None:
    d = full(engine, "static.example.com", 443, None)
    assert (d.allowed, d.reason) == (False, "private_address")
    assert d.detail == "10.9.9.9 is private"


def test_block_private_off(make_engine: EngineFactory) -> None:
    eng = make_engine(
        POLICY.replace("block_private: true", "block_private: false"), self_endpoints=SELF
    )
    assert full(eng, "api.example.com", 443, ["10.0.0.1"]).reason == "allowlisted"
    assert full(eng, "api.example.com", 443, ["169.254.169.254"]).reason == "allowlisted"
    # deny still wins, and a literal still has to be allowlisted
    assert full(eng, "api.example.com", 443, ["9.9.9.9"]).reason == "denylisted"
    assert full(eng, "10.0.0.1", 443, []).reason == "ip_literal_not_allowed"


# -- audit mode ---------------------------------------------------------------------------

AUDITED = [
    P("example.com", 443, ["93.184.216.34"], "not_allowlisted", id="not-allowlisted"),
    P("api.example.com", 80, ["93.184.216.34"], "port_not_allowed", id="port"),
    P("api.example.com", 443, ["10.0.0.1"], "private_address", id="private"),
    P("1.0.0.1", 443, [], "ip_literal_not_allowed", id="ip-literal"),
]


def test_audit_mode_keeps_deny_rules(engine: Engine, audit_engine: Engine) -> None:
    """Deny wins over everything, audit mode included."""
    for eng in (engine, audit_engine):
        d = full(eng, "x.evil.example.com", 443, [])
        assert (d.allowed, d.action, d.reason) == (False, "block", "denylisted")
        d = full(eng, "api.example.com", 443, ["9.9.9.9"])  # denied by resolved address
        assert (d.allowed, d.reason) == (False, "denylisted")


@pytest.mark.parametrize(("host", "port", "addrs", "reason"), AUDITED)
def test_audit_mode_would_block(
    engine: Engine, audit_engine: Engine, host: str, port: int, addrs: list[str], reason: str
) -> None:
    enforced = full(engine, host, port, addrs)
    assert (enforced.allowed, enforced.action, enforced.reason) == (False, "block", reason)
    audited = full(audit_engine, host, port, addrs)
    assert (audited.allowed, audited.action, audited.reason) == (True, "would_block", reason)


def test_audit_mode_keeps_allows(audit_engine: Engine) -> None:
    d = full(audit_engine, "api.example.com", 443, ["93.184.216.34"])
    assert (d.allowed, d.action, d.reason) == (True, "allow", "allowlisted")


@pytest.mark.parametrize("reason", sorted(NEVER_AUDITED))
def test_never_audited_reasons_stay_blocked(audit_engine: Engine, reason: str) -> None:
    d = Decision(False, "block", reason, None, "example.com", 443)  # type: ignore[arg-type]
    assert apply_mode(audit_engine.compiled, d) == d


def test_never_audited_covers_the_design() -> None:
    assert {"client_not_allowed", "proxy_auth_required", "invalid_host", "internal_error"} <= (
        NEVER_AUDITED
    )
    assert {"self_connection", "dns_failed", "denylisted"} <= NEVER_AUDITED
    assert not {"not_allowlisted", "private_address", "port_not_allowed"} & NEVER_AUDITED


def test_audit_invalid_host_and_bad_client_stay_blocked(audit_engine: Engine) -> None:
    d = apply_mode(audit_engine.compiled, decide_target(audit_engine.compiled, "exa mple.com", 443))  # type: ignore[arg-type]
    assert (d.allowed, d.reason) == (False, "invalid_host")
    c = check_client(audit_engine.compiled, "203.0.113.9")
    assert c is not None and not apply_mode(audit_engine.compiled, c).allowed


def test_enforce_finalize_is_identity(engine: Engine) -> None:
    d = decide_target(engine.compiled, "example.com", 443)
    assert isinstance(d, Decision)
    assert apply_mode(engine.compiled, d) is d


# -- stage 3: SNI and Host must name the CONNECT target -------------------------------------

API = normalize_host("api.example.com")


@pytest.mark.parametrize(
    ("sni", "ok"),
    [
        P(None, True, id="no-sni"),
        P("api.example.com", True, id="same"),
        P("API.EXAMPLE.COM.", True, id="same-other-spelling"),
        P("ａｐｉ.example.com", True, id="same-fullwidth"),
        P("other.example.com", False, id="different"),
        P("example.com", False, id="parent"),
        P("x.api.example.com", False, id="child"),
        P("api.example.com..", False, id="invalid"),
        P("", False, id="empty"),
        P("93.184.216.34", False, id="ip"),
    ],
)
def test_check_sni(engine: Engine, sni: str | None, ok: bool) -> None:
    d = check_sni(engine.compiled, API, 443, sni, "exact")
    if ok:
        assert d is None
    else:
        assert d is not None
        assert (d.allowed, d.reason, d.destination, d.host) == (
            False,
            "sni_mismatch",
            "exact",
            "api.example.com",
        )


def test_check_sni_ip_authority(engine: Engine) -> None:
    authority = normalize_host("1.1.1.1")
    assert check_sni(engine.compiled, authority, 443, "0x01010101", "literal") is None
    assert check_sni(engine.compiled, authority, 443, "one.one.one.one", "literal") is not None


@pytest.mark.parametrize(
    ("headers", "port", "ok", "detail"),
    [
        P(["api.example.com"], 443, True, None, id="same"),
        P(["API.example.com."], 443, True, None, id="same-other-spelling"),
        P(["api.example.com:443"], 443, True, None, id="explicit-default-port"),
        P(["api.example.com:8443"], 8443, True, None, id="explicit-port"),
        P(["api.example.com", "api.example.com"], 443, False, "2 Host headers", id="duplicate"),
        P(
            ["api.example.com", "other.example.com"],
            443,
            False,
            "2 Host headers",
            id="two-different",
        ),
        P([], 443, False, "0 Host headers", id="missing"),
        P(["api.example.com:8443"], 443, False, "does not match", id="port-mismatch"),
        P(["api.example.com"], 8443, False, "does not match", id="implicit-port-mismatch"),
        P(["other.example.com"], 443, False, "does not match", id="host-mismatch"),
        P(["api.example.com:0443"], 443, False, "invalid Host", id="port-leading-zero"),
        P(["api.example.com\r\n x"], 443, False, "invalid Host", id="folded"),
        P(["user@api.example.com"], 443, False, "invalid Host", id="userinfo"),
        P([""], 443, False, "invalid Host", id="empty"),
    ],
)
def test_check_host_header(
    engine: Engine, headers: list[str], port: int, ok: bool, detail: str | None
) -> None:
    d = check_host_header(engine.compiled, API, port, headers, 443, "exact")
    if ok:
        assert d is None
    else:
        assert d is not None
        assert (d.allowed, d.reason, d.destination) == (False, "host_header_mismatch", "exact")
        assert d.detail is not None and detail is not None and detail in d.detail


def test_check_host_header_plain_http_default_port(engine: Engine) -> None:
    assert check_host_header(engine.compiled, API, 80, ["api.example.com"], 80, None) is None
    assert (
        check_host_header(engine.compiled, API, 80, ["api.example.com:443"], 80, None) is not None
    )


def test_check_host_header_ipv6(engine: Engine) -> None:
    v6 = normalize_host("2606:4700::1111")
    assert check_host_header(engine.compiled, v6, 443, ["[2606:4700::1111]:443"], 443, None) is None
    assert check_host_header(engine.compiled, v6, 443, ["2606:4700::1111"], 443, None) is not None


# -- stage 0: clients -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "ok"),
    [
        P("127.0.0.1", True, id="loopback"),
        P("127.9.9.9", True, id="loopback-range"),
        P("::1", True, id="v6-loopback"),
        P("::ffff:127.0.0.1", True, id="mapped-loopback"),
        P("10.1.200.3", True, id="listed-cidr"),
        P("::ffff:10.1.0.1", True, id="mapped-listed"),
        P("10.2.0.1", False, id="unlisted"),
        P("192.168.50.7", False, id="allow-cidrs-is-not-a-client-acl"),
        P("fe80::1%eth0", False, id="v6-link-local-zone"),
        P("not-an-ip", False, id="garbage"),
        P("", False, id="empty"),
    ],
)
def test_check_client(engine: Engine, client: str, ok: bool) -> None:
    d = check_client(engine.compiled, client)
    if ok:
        assert d is None
    else:
        assert d is not None
        assert (d.allowed, d.reason) == (False, "client_not_allowed")


def test_default_clients_are_loopback_only(make_engine: EngineFactory) -> None:
    eng = make_engine("version: 1\n")
    assert check_client(eng.compiled, "127.0.0.1") is None
    assert check_client(eng.compiled, "::1") is None
    assert check_client(eng.compiled, "10.0.0.1") is not None


# -- never the proxy itself -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoints", "addr", "port", "looped"),
    [
        P(SELF, "127.0.0.1", 8080, True, id="own-address"),
        P(SELF, "::ffff:127.0.0.1", 8080, True, id="own-address-mapped"),
        P(SELF, "::1", 8080, True, id="own-address-v6"),
        P(SELF, "0.0.0.0", 8080, True, id="unspecified-reaches-loopback"),
        P(SELF, "::", 8080, True, id="v6-unspecified-reaches-loopback"),
        P(SELF, "127.0.0.1", 11434, False, id="other-port"),
        P(SELF, "127.0.0.2", 8080, False, id="other-loopback-address"),
        P(SELF, "93.184.216.34", 8080, False, id="public"),
        P([("0.0.0.0", 8080)], "127.0.0.2", 8080, True, id="any-listener-loopback"),
        P([("::", 8080)], "127.0.0.1", 8080, True, id="v6-any-listener-v4-loopback"),
        P([("::", 8080)], "93.184.216.34", 8080, False, id="any-listener-public"),
        P([("::ffff:127.0.0.1", 8080)], "127.0.0.1", 8080, True, id="endpoint-mapped-form"),
        P([("10.0.0.5", 3128)], "10.0.0.5", 3128, True, id="endpoint-lan"),
        P([("fe80::1%eth0", 3128)], "fe80::1", 3128, True, id="endpoint-zone-id"),
        P([], "127.0.0.1", 8080, False, id="no-endpoints"),
    ],
)
def test_check_self(
    make_engine: EngineFactory,
    endpoints: list[tuple[str, int]],
    addr: str,
    port: int,
    looped: bool,
) -> None:
    eng = make_engine(POLICY, self_endpoints=endpoints)
    host = normalize_host("api.example.com")
    d = check_self(eng.compiled, ips(addr), host, port, "exact")
    if looped:
        assert d is not None
        assert (d.allowed, d.reason, d.destination) == (False, "self_connection", "exact")
    else:
        assert d is None


def test_self_connection_whatever_the_policy_says(engine: Engine, audit_engine: Engine) -> None:
    # 127.0.0.1:8080 is allowlisted by the "local" destination, and it is the proxy
    for eng in (engine, audit_engine):
        m = decide_target(eng.compiled, "127.0.0.1", 8080)
        assert isinstance(m, Match) and m.destination.name == "local"
        d = apply_mode(eng.compiled, decide_addresses(eng.compiled, m, ips("127.0.0.1")))
        assert (d.allowed, d.reason) == (False, "self_connection")
        # a name that resolves to the proxy is the same loop
        m = decide_target(eng.compiled, "api.example.com", 443)
        assert isinstance(m, Match)
        assert decide_addresses(eng.compiled, m, ips("93.184.216.34")).allowed
    looped = decide_addresses(
        engine.compiled,
        Match(normalize_host("127.0.0.1"), 8080, engine.policy.destinations[5], 5),
        ips("0.0.0.0"),
    )
    assert looped.reason == "self_connection"


# -- stage 4: request rules (inspect mode) ----------------------------------------------------


def test_check_request(make_engine: EngineFactory) -> None:
    eng = make_engine(
        "version: 1\ndestinations:\n  - name: llm\n    hosts: [api.example.com]\n"
        "    methods: [POST]\n    paths: ['/v1/*']\n    models: [m1]\n"
    )
    m = decide_target(eng.compiled, "api.example.com", 443)
    assert isinstance(m, Match)
    ok = decide_addresses(eng.compiled, m, ips("93.184.216.34"))
    dest = m.destination
    assert check_request(dest, "POST", "/v1/messages?x=1", "m1", ok) is None
    assert check_request(dest, "POST", "/v1/messages", None, ok) is None
    cases = [
        ("GET", "/v1/messages", "m1", "method_not_allowed"),
        ("POST", "/v2/messages", "m1", "path_not_allowed"),
        ("POST", "/x?/v1/", "m1", "path_not_allowed"),
        ("POST", "/v1/messages", "m2", "model_not_allowed"),
        ("POST", "/v1/../admin", "m1", "path_not_allowed"),  # glob matches, server would not
        ("POST", "/v1/chat%2Fcompletions", "m1", "path_not_allowed"),
    ]
    for method, path, model, reason in cases:
        d = check_request(dest, method, path, model, ok)
        assert d is not None and (d.allowed, d.action, d.reason) == (False, "block", reason)
