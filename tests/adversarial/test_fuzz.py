# ruff: noqa: RUF001  (look-alike Unicode is what these tests are about)
"""Fuzzing: the normaliser and matcher with hypothesis, and the proxy front with raw bytes.

tests/engine/test_engine_properties.py already covers IPv4 legacy spellings, name
spellings, junk inserted into allowlisted names and the HostIndex against brute force.
This module adds what it does not: the system resolver as a differential oracle for
IPv4, IPv6 spellings and transition addresses, mitmproxy's own authority parser (what
the addon really receives) against the guard's, the SNI as mitmproxy extracts it, and
``network.resolve`` entries in legacy spellings. Then a seeded raw-socket fuzz of the
real proxy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from adversarial.stats import STATS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mitmproxy.net.http import url as mitm_url
from mitmproxy.proxy.layers.tls import parse_client_hello
from support.adv_lab import Lab, wait_for
from support.adv_wire import client_hello, open_conn, read_outcome
from support.proxy import ProxyProcess

from egress_guard.engine import Decision, Engine, Match
from egress_guard.engine.rules.addresses import decide_addresses, static_addresses
from egress_guard.engine.rules.agreement import check_host_header, check_sni
from egress_guard.engine.rules.names import decide_target
from egress_guard.normalize import (
    NormalizationError,
    normalize_host,
    normalize_port,
    parse_authority,
)
from egress_guard.policy import load_catalog, load_policy_text
from egress_guard.proxy.tunnel import sni_problem

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

POLICY = """\
version: 1
destinations:
  - name: front
    hosts: [front.test, "*.cdn.test"]
    ports: [443, 8080]
  - name: v6
    hosts: ["2001:db8::10"]
    ports: [443]
deny:
  - hosts: ["**.denied.test", "9.9.9.9"]
network:
  allow_cidrs: []
"""
ENGINE = Engine(load_policy_text(POLICY, "fuzz.yaml"), load_catalog())
FRONT = normalize_host("front.test")


def _count() -> None:
    STATS.ran.add("test_fuzz")
    STATS.fuzz_engine_examples += 1


# -- 1. the system resolver as the oracle for IPv4 ------------------------------------------

_V4ISH = st.text(alphabet="0123456789abcdefxX.", min_size=1, max_size=24)


@FUZZ
@given(_V4ISH)
@example("0x7f.1")
@example("017700000001")
@example("1.2.3.04")
def test_what_libc_reads_as_an_address_is_never_a_name(raw: str) -> None:
    """If inet_aton (what getaddrinfo uses for numeric hosts) reads ``raw`` as an address,
    the guard must read the same address or refuse it; never a name, never another
    address (a name would dodge the IP-literal and private-address rules)."""
    _count()
    try:
        libc: str | None = socket.inet_ntoa(socket.inet_aton(raw))
    except OSError:
        libc = None
    try:
        h = normalize_host(raw)
    except NormalizationError:
        return
    if libc is not None:
        assert h.kind == "ipv4" and h.value == libc, (raw, libc, h)


# -- 2. IPv6 spellings ----------------------------------------------------------------------

_PRIVATE_V6 = [
    "::1",
    "fd00:ec2::254",
    "fc00::1",
    "fe80::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:1",
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",
    "::",
    "ff02::1",
]


@st.composite
def spell_v6(draw: st.DrawFn, addr: str) -> str:
    ip = ipaddress.IPv6Address(addr)
    groups = [f"{g:x}" for g in struct.unpack("!8H", ip.packed)]
    style = draw(st.sampled_from(["compressed", "exploded", "groups", "padded", "mixed"]))
    if style == "compressed":
        text = ip.compressed
    elif style == "exploded":
        text = ip.exploded
    elif style == "padded":
        text = ":".join(g.zfill(draw(st.integers(1, 4))) for g in groups)
    elif style == "mixed" and ip.packed[:10] == b"\0" * 10:
        text = (
            "::"
            + ("ffff:" if ip.packed[10:12] == b"\xff\xff" else "")
            + str(ipaddress.IPv4Address(ip.packed[12:]))
        )
    else:
        text = ":".join(groups)
    text = "".join(draw(st.sampled_from([c.lower(), c.upper()])) for c in text)
    if draw(st.booleans()):
        text += draw(st.sampled_from(["%25lo", "%lo", "%251", "%eth0"]))
    if draw(st.booleans()):
        text = f"[{text}]"
    return text


@FUZZ
@given(st.data(), st.sampled_from(_PRIVATE_V6), st.sampled_from([443, 80, 8080]))
def test_private_ipv6_refused_in_every_spelling(data: st.DataObject, addr: str, port: int) -> None:
    _count()
    spelling = data.draw(spell_v6(addr), label="spelling")
    d = decide_target(ENGINE.compiled, spelling, port)
    assert isinstance(d, Decision) and not d.allowed, (spelling, d)
    reference = decide_target(ENGINE.compiled, addr, port)
    assert isinstance(reference, Decision)
    assert (d.reason, d.host) == (reference.reason, reference.host), (spelling, d, reference)


@FUZZ
@given(st.data())
def test_allowed_ipv6_allowed_in_every_spelling(data: st.DataObject) -> None:
    _count()
    spelling = data.draw(spell_v6("2001:db8::10"), label="spelling")
    m = decide_target(ENGINE.compiled, spelling, 443)
    assert isinstance(m, Match) and m.destination.name == "v6", (spelling, m)


# -- 3. mitmproxy's authority parser vs the guard's ------------------------------------------

_HOSTS = st.sampled_from(
    [
        "front.test", "FRONT.TEST", "front.test.", "front.test..", "[front.test]", "[::1]", "::1",
        "127.1", "0x7f000001", "[::ffff:127.0.0.1]", "a_b.test", "xn--zca.test", "x.cdn.test",
        "front.test%00", "front。test", "ｆｒｏｎｔ.test", "[v1.x]", "[fe80::1%25lo]", "",
    ]
)  # fmt: skip
_PORTS = st.one_of(
    st.sampled_from(["443", "0443", "00443", "+443", "-443", "4_43", "443 ", "65536", "0", ""]),
    st.text(alphabet="0123456789٠١٢٣٤٥٦٧٨٩०१२३४५६७८९０１２３４５６７８９", min_size=1, max_size=6),
)


def _launder_class(raw: str, host: str, port: int | None) -> str | None:
    """Why mitmproxy accepted what the guard's strict parser refuses, when it is one of
    the known (reported) ways; None for anything new."""
    hostpart, _, portpart = raw.rpartition(":") if not raw.endswith("]") else (raw, "", "")
    if hostpart.startswith("[") and ":" not in hostpart[1:-1]:
        return "brackets around a name"
    if portpart and not portpart.isascii():
        return "non-ASCII digits in the port"
    if portpart.startswith("0") and len(portpart) > 1:
        return "leading zeros in the port"
    return None


def _authorities_agree(host: str, port: str, laundered: dict[str, int]) -> None:
    """Where both parsers accept an authority they must agree; where only mitmproxy
    accepts it, the difference must be one of the known kinds (counted in ``laundered``)."""
    _count()
    raw = f"{host}:{port}"
    try:
        m_host, m_port = mitm_url.parse_authority(raw.encode("utf-8"), check=True)
    except (ValueError, UnicodeError):
        return
    try:
        g_host, g_port = parse_authority(raw)
    except NormalizationError:
        try:
            normalize_host(m_host)
            normalize_port(m_port if m_port is not None else 443)
        except NormalizationError:
            return  # the addon refuses mitmproxy's reading too: no laundering
        why = _launder_class(raw, m_host, m_port)
        assert why is not None, f"mitmproxy accepts {raw!r} as {(m_host, m_port)}, guard refuses it"
        laundered[why] = laundered.get(why, 0) + 1
        return
    try:
        via_mitm = normalize_host(m_host)
    except NormalizationError:
        return  # mitmproxy's form is refused by the addon: a block, not a disagreement
    assert (via_mitm.value, m_port) == (g_host.value, g_port), raw


def test_mitmproxy_and_guard_read_an_authority_alike() -> None:
    """The addon never sees the CONNECT line: it gets mitmproxy's (host, int port). The
    property runs over generated authorities; then every known laundering kind must have
    been reached (so the property can see them), and each goes into the report (see
    test_bypass)."""
    laundered: dict[str, int] = {}

    @FUZZ
    @given(_HOSTS, _PORTS)
    @example("[front.test]", "443")
    @example("front.test", "0443")
    @example("front.test", "٤٤٣")
    def prop(host: str, port: str) -> None:
        _authorities_agree(host, port, laundered)

    prop()
    for why, n in sorted(laundered.items()):
        note = f"mitmproxy pre-parse accepts what the guard refuses: {why} ({n} examples)"
        if note not in STATS.notes:
            STATS.notes.append(note)
    assert set(laundered) == {
        "brackets around a name",
        "leading zeros in the port",
        "non-ASCII digits in the port",
    }


# -- 4. the SNI as mitmproxy reports it ----------------------------------------------------------

_SNI = st.one_of(
    st.sampled_from(
        [b"front.test", b"FRONT.test", b"front.test.", b"other.test", b"front.test ", b"a" * 64 + b".test",
         b"front.test\x00", b"front.test..", b"fr_ont.test", b"", b"xn--zca.test", b"127.0.0.1"]
    ),
    st.binary(max_size=40),
    st.text(alphabet="abcdefront.-_ \x00", max_size=30).map(str.encode),
)  # fmt: skip


def _sni_decision(raw: bytes, extra: bytes | None = None) -> tuple[bool, str | None]:
    """What the addon does with this SNI: (allowed, sni as mitmproxy reports it)."""
    hello = parse_client_hello(client_hello(raw, extra_sni=extra))
    assert hello is not None
    sni = hello.sni
    if sni_problem(hello) is not None:  # an SNI extension the guard cannot read: refused
        return False, sni
    return check_sni(ENGINE.compiled, FRONT, 443, sni, "front") is None, sni


def _same_name(raw: bytes) -> bool:
    try:
        return normalize_host(raw.decode("ascii")).value == FRONT.value
    except (UnicodeDecodeError, NormalizationError):
        return False


@FUZZ
@given(_SNI)
def test_sni_the_guard_reads_is_judged_correctly(raw: bytes) -> None:
    """Whenever mitmproxy reports an SNI, the verdict is 'allowed' exactly when it names
    the CONNECT target."""
    _count()
    allowed, sni = _sni_decision(raw)
    if sni is not None:
        assert allowed == _same_name(sni.encode()), (raw, sni)


@FUZZ
@given(_SNI)
@example(b"other.test ")
def test_sni_that_is_present_is_never_treated_as_missing(raw: bytes) -> None:
    _count()
    allowed, _sni = _sni_decision(raw)
    if raw and not _same_name(raw):
        assert not allowed, raw


# -- 5. network.resolve entries in legacy spellings ----------------------------------------------

_RESOLVE_PRIVATE = st.sampled_from(
    ["0x7f000001", "127.1", "2130706433", "0177.0.0.1", "0xa9fea9fe", "169.254.43518", "::ffff:127.0.0.1",
     "::ffff:a9fe:a9fe", "64:ff9b::a9fe:a9fe", "012.0.0.1", "10.1", "0", "0.0.0.0", "100.64.1", "fe80::1%25lo"]
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_RESOLVE_PRIVATE, min_size=1, max_size=3), st.booleans())
def test_resolve_entries_in_any_spelling_are_checked(addrs: list[str], public_first: bool) -> None:
    """A static answer for an allowed name, written in any legacy spelling of a private
    address (alone or after a public one), is refused like the DNS answer it stands for."""
    _count()
    values = (["93.184.216.34"] if public_first else []) + addrs
    text = POLICY.replace(
        "  allow_cidrs: []\n", f"  allow_cidrs: []\n  resolve:\n    front.test: {values!r}\n"
    )
    eng = Engine(load_policy_text(text, "fuzz-resolve.yaml"), load_catalog())
    m = decide_target(eng.compiled, "front.test", 443)
    assert isinstance(m, Match)
    addresses = static_addresses(eng.compiled, m.host)
    assert addresses is not None and len(addresses) == len(values), (values, addresses)
    d = decide_addresses(eng.compiled, m, addresses)
    assert not d.allowed and d.reason == "private_address", (values, d)


# -- 6. Host header and port: refusal whenever normalisation fails ------------------------------

_HOSTHDR = st.one_of(
    st.sampled_from(["front.test:443", "front.test", "FRONT.test.:443", "front.test:0443", "[front.test]:443",
                     "front.test:443, other", "front.test:+443", "front.test :443", " front.test:443"]),
    st.text(alphabet="front.es:0-9[]%@ \t,", max_size=24),
)  # fmt: skip


@FUZZ
@given(_HOSTHDR, st.sampled_from([443, 8080]))
def test_host_header_agrees_only_when_it_names_the_authority(value: str, port: int) -> None:
    _count()
    bad = check_host_header(ENGINE.compiled, FRONT, port, [value], 443, "front")
    try:
        h, p = parse_authority(value, 443)
        same = h.value == FRONT.value and p == port
    except NormalizationError:
        same = False
    assert (bad is None) == same, (value, port, bad)


@FUZZ
@given(st.one_of(st.integers(-5, 70000), st.text(max_size=7)))
def test_port_parser_is_strict(raw: int | str) -> None:
    _count()
    try:
        port = normalize_port(raw)
    except NormalizationError:
        return
    assert 1 <= port <= 65535
    if isinstance(raw, str):
        assert raw == str(port), raw  # exactly one spelling per port


# -- 7. the proxy front with raw bytes -------------------------------------------------------------

RAW_CASES = 400
RAW_SEED = 20261125
RAW_TIMEOUT = 10.0
#: how long a case waits for a first answer before it half-closes; an answer that comes
#: later still counts (read after the half-close), so this only sets the test's pace
RAW_QUIET = 0.5

_TARGETS_ABS = [
    "http://other.test:{PF}/", "http://127.1:{PF}/", "http://[::1]:{PF}/", "http://localhost:{PF}/",
    "http://meta.test:{PF}/x?y=z", "http://x.denied.test:{PF}/", "http://0x7f000001:{PF}/",
    "http://169.254.169.254/latest/meta-data/", "https://other.test:{PF}/", "ftp://other.test:{PF}/",
    "http://other.test:{PF}", "http://other.test:{PF}@127.0.0.1:{PF}/", "http://%6ftherr.test/",
]  # fmt: skip
_TARGETS_AUTH = [
    "other.test:{PF}", "127.0.0.1:{PF}", "[::1]:{PF}", "localhost:{PF}", "meta.test:{PF}",
    "x.denied.test:{PF}", "10.0.0.1:{PF}", "[fd00:ec2::254]:{PF}", "nat64.test:{PF}", "other.test",
    "other.test:", ":{PF}", "[]:{PF}", "other.test:{PF}:{PF}",
]  # fmt: skip
_METHODS = [
    "GET",
    "POST",
    "CONNECT",
    "HEAD",
    "PUT",
    "OPTIONS",
    "DELETE",
    "PRI",
    "get",
    "CONNECT ",
    "G\x00T",
    "",
    "X" * 300,
]
_VERSIONS = [
    "HTTP/1.1",
    "HTTP/1.0",
    "HTTP/2.0",
    "HTTP/0.9",
    "",
    "http/1.1",
    "HTTP/1.1 x",
    "HTTP/1.10",
    "HTTP/",
]
_HEADER_NAMES = [
    "Host",
    "host",
    "HOST",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Upgrade",
    "Expect",
    "Proxy-Authorization",
    "X-Forwarded-For",
    "X Y",
    "Host ",
    " Host",
    "Ho\x00st",
    ":authority",
    "",
]
_HEADER_VALUES = ["other.test:{PF}", "127.1", "[::1]", "front.test", "0", "-1", "5", "99999999999999999999",
                  "chunked", "chunked, identity", "close", "Upgrade", "h2c", "100-continue", "Basic !!!!",
                  "\x00", "a\rb", "\xff\xfe", " ", ""]  # fmt: skip
_EOLS = ["\r\n", "\n", "\r", "\r\r\n"]


def _random_case(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.08:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000)))
    if kind < 0.13:
        sni = rng.choice([b"other.test", b"localhost", None, b"\xff" * 5])
        data = client_hello(sni, rand=rng.randbytes(32))
        return data[: rng.randint(1, len(data))]
    if kind < 0.55:  # well-formed: the guard, not the parser, must refuse it
        method = rng.choice(["GET", "POST", "HEAD", "CONNECT", "OPTIONS"])
        if method == "CONNECT":
            target = rng.choice(_TARGETS_AUTH[:9])
        else:
            target = rng.choice(_TARGETS_ABS[:8])
        host = target.split("//")[-1].split("/")[0]
        headers = [f"Host: {host}"] if rng.random() < 0.8 else []
        headers += rng.sample(["Accept: */*", "User-Agent: fuzz", "Content-Length: 0", "Connection: close",
                               f"Host: {rng.choice(_TARGETS_AUTH)}", "X-A: b"], rng.randint(0, 3))  # fmt: skip
        return f"{method} {target} {rng.choice(['HTTP/1.1', 'HTTP/1.0'])}\r\n{''.join(h + chr(13) + chr(10) for h in headers)}\r\n".encode()
    eol = rng.choice(_EOLS) if rng.random() < 0.3 else "\r\n"
    method = rng.choice(_METHODS)
    if method.strip().upper() == "CONNECT" or rng.random() < 0.1:
        target = rng.choice(_TARGETS_AUTH)
    else:
        target = rng.choice([*_TARGETS_ABS, "/", "*", "", "/" * 5000])
    sep = rng.choice([" ", " ", " ", "  ", "\t", ""])
    lines = [
        f"{method}{sep}{target}{sep}{rng.choice(_VERSIONS)}".rstrip(" ")
        if rng.random() < 0.9
        else method
    ]
    for _ in range(rng.choice([0, 1, 2, 3, 5, 10, 60])):
        name = rng.choice(_HEADER_NAMES)
        value = rng.choice(_HEADER_VALUES)
        if rng.random() < 0.05:
            value = "v" * rng.choice([100, 8000, 70000])
        line = f"{name}:{rng.choice([' ', '', '  ', chr(9)])}{value}"
        if rng.random() < 0.05:
            line += eol + rng.choice([" ", "\t"]) + "folded"
        lines.append(line)
    text = eol.join(lines) + eol + (eol if rng.random() < 0.85 else "")
    if rng.random() < 0.2:
        text += "".join(rng.choice("0123456789abcdef\r\n") for _ in range(rng.randint(0, 200)))
    data = text.encode("utf-8", "surrogateescape")
    if rng.random() < 0.25:  # byte-level mutation
        buf = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            pos = rng.randint(0, max(0, len(buf) - 1))
            if op < 0.4 and buf:
                buf[pos] = rng.getrandbits(8)
            elif op < 0.7:
                buf.insert(pos, rng.choice(b"\r\n\x00 :\t\x7f\xff"))
            elif buf:
                del buf[pos : pos + rng.randint(1, 8)]
        data = bytes(buf)
    if rng.random() < 0.1:
        data = data[: rng.randint(0, len(data))]
    return data


def _fill(lab: Lab, data: bytes) -> bytes:
    return lab.fill(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def _fire(port: int, data: bytes, src: str) -> str:
    """Send one case and classify what came back. A proxy may wait for the rest of an
    incomplete request, so after a short quiet spell the client half-closes; from then
    on the proxy must answer or close within RAW_TIMEOUT."""
    try:
        sock = open_conn(port, src, timeout=RAW_TIMEOUT)
    except OSError as e:
        return f"connect-failed:{type(e).__name__}"
    try:
        # the proxy may close early on garbage; what it answered still counts
        with contextlib.suppress(OSError):
            sock.sendall(data)
        out = read_outcome(sock, RAW_QUIET)
        if out.timed_out and not out.raw:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            out = read_outcome(sock, RAW_TIMEOUT)
    finally:
        sock.close()
    if out.timed_out:
        return "timeout"
    if out.status is None:
        return "closed"
    if out.guard_reason:
        return f"{out.status} {out.guard_reason}"
    return f"{out.status} (proxy)"


@pytest.fixture(scope="module")
def fuzz_guard(lab: Lab) -> ProxyProcess:
    STATS.ran.add("test_fuzz")
    return lab.proxy("fuzz")


def test_raw_front_fuzz(lab: Lab, fuzz_guard: ProxyProcess) -> None:
    """400 seeded malformed requests naming forbidden destinations, 16 at a time: the
    proxy never dies, never lets one through, always answers or closes in time, and
    still serves a normal request after every 100."""
    p = fuzz_guard
    rng = random.Random(RAW_SEED)
    cases = [_fill(lab, _random_case(rng)) for _ in range(RAW_CASES)]
    before = lab.never_contact()
    outcomes: dict[str, int] = {}
    examples: dict[str, bytes] = {}
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        for batch_start in range(0, RAW_CASES, 100):
            batch = list(range(batch_start, min(RAW_CASES, batch_start + 100)))
            results = pool.map(
                lambda i: _fire(p.port, cases[i], f"127.68.{i // 250}.{i % 250 + 1}"), batch
            )
            for i, r in zip(batch, results, strict=True):
                outcomes[r] = outcomes.get(r, 0) + 1
                examples.setdefault(r, cases[i][:200])
            assert p.proc is not None and p.proc.poll() is None, f"proxy died:\n{p.log()[-3000:]}"
            assert lab.allowed_roundtrip(p, f"/after-{batch[-1]}") == 200, "proxy stopped serving"
    elapsed = time.monotonic() - start
    STATS.fuzz_raw_cases += RAW_CASES
    for k, v in outcomes.items():
        STATS.fuzz_raw_outcomes[k] = STATS.fuzz_raw_outcomes.get(k, 0) + v
    time.sleep(0.5)
    contacted = {k: v - before[k] for k, v in lab.never_contact().items() if v != before[k]}
    assert not contacted, (contacted, lab.trap.snapshot()[:5])
    assert "timeout" not in outcomes, (outcomes, examples.get("timeout"))
    passed = {k: v for k, v in outcomes.items() if k.startswith("2")}
    assert not passed, (passed, {k: examples[k] for k in passed})
    records = wait_for(lambda: p.audit("decision"), timeout=5)
    fuzz_records = [r for r in records if str(r.get("client", "")).startswith("127.68.")]
    allows = [r for r in fuzz_records if r["decision"] != "block"]
    STATS.fuzz_internal_errors += sum(1 for r in fuzz_records if r["reason"] == "internal_error")
    STATS.notes.append(f"raw front fuzz: {RAW_CASES} cases in {elapsed:.1f} s")
    assert not allows, allows[:5]
    internal = [r for r in fuzz_records if r["reason"] == "internal_error"]
    assert not internal, internal[:5]
    assert "Traceback" not in p.log(), p.log()[-4000:]


def test_fuzz_generator_is_deterministic() -> None:
    """Seeded: a failure report's case index names the same bytes on every run."""
    rng1, rng2 = random.Random(RAW_SEED), random.Random(RAW_SEED)
    a = [_random_case(rng1) for _ in range(RAW_CASES)]
    b = [_random_case(rng2) for _ in range(RAW_CASES)]
    assert a == b
    assert len(set(a)) > RAW_CASES * 0.9  # and varied
