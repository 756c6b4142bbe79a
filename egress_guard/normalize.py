"""One normaliser for every spelling of a destination.

Policy patterns, CONNECT targets, Host headers, TLS SNI and absolute URIs all pass
through these functions, so a host is compared with itself in one canonical form:
lowercase A-labels without the trailing dot, or a canonical IP address. Anything that
cannot be put in that form is an error, and the engine turns errors into blocks.

This module sits below both ``policy`` and ``engine`` (it imports neither), because the
policy loader must canonicalise patterns exactly the way the engine canonicalises
requests; two normalisers would be two chances to disagree.
"""

from __future__ import annotations

import ipaddress
import re
from socket import inet_aton, inet_ntoa
from typing import Literal, NamedTuple

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

_LDH_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Characters that never belong in a host, in any spelling. Checked before IDNA so that
# IDNA's own mapping cannot turn them into something harmless-looking.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f/\\@?#%\[\]<>\"'`{}|^,;=+$&()*!~]")
_IPV4_NUMBER_LABEL = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")


class NormalizationError(ValueError):
    """A host, port or authority that has no canonical form. Always means: block."""


class Host(NamedTuple):
    """A canonical host: ``value`` is what matching and logging use.

    A NamedTuple rather than a frozen dataclass: as immutable, and built in well under
    half the time (one is built for every CONNECT target, SNI and Host header).
    """

    kind: Literal["name", "ipv4", "ipv6"]
    value: str
    ip: IPAddress | None = None

    @property
    def is_ip(self) -> bool:
        return self.ip is not None

    def __str__(self) -> str:
        return self.value


def normalize_port(raw: str | int) -> int:
    """Strict port parsing: decimal 1-65535, no sign, no leading zeros, no spaces.

    ``int()`` alone would accept ``+443``, ``0443``, `` 443`` and full-width
    digits); each of those is a spelling a filter and a resolver may read differently.
    """
    if raw.__class__ is str and raw.isdigit() and raw.isascii() and raw[0] != "0" and len(raw) < 6:
        port = int(raw)  # the common case first: a plain decimal port
        if port <= 65535:
            return port
    if isinstance(raw, bool):
        raise NormalizationError("port must be a number")
    if isinstance(raw, int):
        if 1 <= raw <= 65535:
            return raw
        raise NormalizationError(f"port {raw} is outside 1-65535")
    if not raw or not raw.isascii() or not raw.isdigit():
        raise NormalizationError(f"port {raw!r} is not a decimal number")
    if len(raw) > 1 and raw[0] == "0":
        raise NormalizationError(f"port {raw!r} has a leading zero")
    if len(raw) > 5 or not 1 <= int(raw) <= 65535:
        raise NormalizationError(f"port {raw!r} is outside 1-65535")
    return int(raw)


def _parse_ipv4_number(part: str) -> int:
    if part.startswith(("0x", "0X")):
        digits = part[2:]
        return int(digits, 16) if digits else 0
    if len(part) > 1 and part.startswith("0"):
        if not all(c in "01234567" for c in part):
            raise NormalizationError(f"{part!r} is not a valid octal IPv4 part")
        return int(part, 8)
    return int(part, 10)


def _parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Parse IPv4 the way inet_aton and the WHATWG URL standard do.

    ``127.1``, ``2130706433``, ``0x7f000001`` and ``0177.0.0.1`` all reach 127.0.0.1
    through a system resolver. A host whose last label is numeric is an IPv4 address or
    invalid; it is never a name (there are no numeric TLDs), so it cannot slip past the
    private-address check as an unknown name.
    """
    parts = host.split(".")
    if not _IPV4_NUMBER_LABEL.match(parts[-1]):
        return None
    if len(parts) > 4 or any(not _IPV4_NUMBER_LABEL.match(p) for p in parts):
        raise NormalizationError(f"{host!r} looks like an IPv4 address but is not one")
    numbers = [_parse_ipv4_number(p) for p in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise NormalizationError(f"{host!r} is an IPv4 address out of range")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n * 256 ** (3 - i)
    return ipaddress.IPv4Address(value)


def canonical_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (``::ffff:a.b.c.d``) is the IPv4 address on a dual-stack socket."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def socket_ip(text: str) -> IPAddress:
    """The address a socket API reports (a listener, a getaddrinfo answer, a peer), as the
    engine compares addresses: without its ``%zone`` and IPv4-mapped IPv6 as IPv4.
    Raises ValueError for text that is no address."""
    return canonical_ip(ipaddress.ip_address(text.partition("%")[0]))


def join_hostport(host: str, port: object | None) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets; the host alone
    when ``port`` is None."""
    h = f"[{host}]" if ":" in host else host
    return h if port is None else f"{h}:{port}"


def _ip_host(ip: IPAddress) -> Host:
    ip = canonical_ip(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        return Host("ipv4", str(ip), ip)
    return Host("ipv6", str(ip), ip)


def _parse_ipv6(text: str) -> Host:
    addr, sep, zone = text.partition("%")
    if sep:
        # A zone id selects an interface for a link-local address; it never changes which
        # address is meant. Drop it (URI spelling "%25eth0" included) and keep the address.
        if zone.startswith("25"):
            zone = zone[2:]
        if not zone or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", zone):
            raise NormalizationError(f"invalid IPv6 zone id in {text!r}")
    try:
        return _ip_host(ipaddress.IPv6Address(addr))
    except ValueError as e:
        raise NormalizationError(f"{text!r} is not a valid IPv6 address") from e


def _is_plain_label(label: str) -> bool:
    """An ASCII letter-digit-hyphen label that IDNA has nothing to say about."""
    return label.isascii() and bool(_LDH_LABEL.match(label)) and "xn--" not in label


def _to_a_labels(name: str) -> str:
    if name.isascii():
        lowered = name.lower()
        if all(_is_plain_label(label) for label in lowered.split(".")):
            return lowered
    try:
        mapped: str = idna.uts46_remap(name, std3_rules=True, transitional=False)
        out: list[str] = []
        for label in mapped.split("."):
            if _is_plain_label(label):
                # Decided label by label, so a plain label is accepted (or refused) the same
                # whether the rest of the name is ASCII or not: "ab--c.example.com" must not
                # become invalid because another label was spelled in full-width letters.
                out.append(label)
                continue
            encoded: bytes = idna.alabel(label)
            # Round-trip: rejects xn-- labels that are not valid punycode of a valid U-label.
            idna.ulabel(encoded)
            out.append(encoded.decode("ascii").lower())
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        raise NormalizationError(f"{name!r} is not a valid host name: {e}") from e
    return ".".join(out)


def _plain_host(raw: str) -> Host | None:
    """The Host for a spelling that is already canonical, or a case fold away from it;
    None for anything else, which the full normaliser decides.

    Most hosts a proxy sees are like this, and the full path costs several times more.
    Whatever this returns, the full path returns too (a property test holds the two
    together): a plain name is LDH labels of 1-63 characters, the last one starting with
    a letter (so never an IPv4 number), no ``xn--`` (punycode is checked in full), no
    trailing dot; a plain IPv4 address is four decimal parts 0-255 without leading zeros.
    ``raw`` is a non-empty ASCII str of at most MAX_NAME_LENGTH characters.
    """
    low = raw.lower()
    if (
        low.replace("-", "").replace(".", "").isalnum()
        and low[0] not in ".-"
        and low[-1] not in ".-"
        and ".." not in low
        and ".-" not in low
        and "-." not in low
        and "xn--" not in low
    ):
        if low[low.rfind(".") + 1].isalpha():
            if len(low) <= MAX_LABEL_LENGTH or all(
                len(label) <= MAX_LABEL_LENGTH for label in low.split(".")
            ):
                return Host("name", low)
        else:
            # inet_aton reads many spellings (octal, hex, fewer parts, trailing junk after
            # a space); only the canonical dotted quad comes back unchanged through
            # inet_ntoa, and that one inet_aton reads exactly as ipaddress does
            try:
                packed = inet_aton(raw)
            except OSError:
                return None
            if inet_ntoa(packed) == raw:
                return Host("ipv4", raw, ipaddress.IPv4Address(int.from_bytes(packed)))
    return None


def normalize_host(raw: str) -> Host:
    """Canonicalise a host as it appears on its own (SNI, Host without port, URI host).

    Bare IPv6 (as mitmproxy hands it over, brackets removed) is accepted; bracketed IPv6
    is accepted; brackets around anything else are rejected.
    """
    if raw.__class__ is str and raw.isascii() and 0 < len(raw) <= MAX_NAME_LENGTH:
        plain = _plain_host(raw)
        if plain is not None:
            return plain
    return _normalize_host_full(raw)


def _normalize_host_full(raw: str) -> Host:
    """normalize_host without the shortcut for plain spellings."""
    if not isinstance(raw, str) or not raw:
        raise NormalizationError("empty host")
    if len(raw) > 1024:
        raise NormalizationError("host is too long")
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise NormalizationError(f"unbalanced brackets in {raw!r}")
        inner = raw[1:-1]
        if ":" not in inner:
            raise NormalizationError(f"brackets around a name in {raw!r}")
        return _parse_ipv6(inner)
    if ":" in raw:
        return _parse_ipv6(raw)
    if _FORBIDDEN.search(raw):
        raise NormalizationError(f"forbidden character in host {raw!r}")
    name = raw
    # IDNA maps the ideographic and full-width full stops to "."; do it before the
    # trailing-dot rule so "example.com。" and "example.com." are the same host.
    if not name.isascii():
        name = name.replace("\u3002", ".").replace("\uff0e", ".").replace("\uff61", ".")
    if name.endswith(".."):
        raise NormalizationError(f"more than one trailing dot in {raw!r}")
    if name.endswith("."):
        name = name[:-1]
    if not name or name.startswith(".") or ".." in name:
        raise NormalizationError(f"empty label in host {raw!r}")
    if name.isascii():
        ip4 = _parse_legacy_ipv4(name)
        if ip4 is not None:
            return _ip_host(ip4)
    a_labels = _to_a_labels(name)
    if len(a_labels) > MAX_NAME_LENGTH:
        raise NormalizationError(f"host name longer than {MAX_NAME_LENGTH} characters")
    labels = a_labels.split(".")
    for label in labels:
        if not _LDH_LABEL.match(label):
            raise NormalizationError(f"invalid label {label!r} in host {raw!r}")
    # UTS-46 mapping can produce a numeric last label (full-width digits): re-check.
    ip4 = _parse_legacy_ipv4(a_labels)
    if ip4 is not None:
        return _ip_host(ip4)
    return Host("name", a_labels)


def parse_authority(raw: str, default_port: int | None = None) -> tuple[Host, int]:
    """Split ``host:port`` / ``[v6]:port`` strictly (a CONNECT target, a Host header).

    A bare IPv6 address without brackets is ambiguous in an authority and rejected.
    """
    if not raw:
        raise NormalizationError("empty authority")
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise NormalizationError(f"unbalanced brackets in {raw!r}")
        host_part, rest = raw[: close + 1], raw[close + 1 :]
        if rest and not rest.startswith(":"):
            raise NormalizationError(f"garbage after ']' in {raw!r}")
        port_part: str | None = rest[1:] if rest else None
    else:
        if raw.count(":") > 1:
            raise NormalizationError(f"IPv6 address without brackets in {raw!r}")
        host_part, sep, port_str = raw.partition(":")
        port_part = port_str if sep else None
    host = normalize_host(host_part)
    if port_part is None:
        if default_port is None:
            raise NormalizationError(f"no port in {raw!r}")
        return host, default_port
    return host, normalize_port(port_part)


_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<authority>[^/?#]*)(?P<rest>.*)$")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def parse_target(raw: str, default_port: int = 443) -> tuple[Host, int]:
    """A CLI target: ``host``, ``host:port`` or a URL (userinfo in a URL is rejected)."""
    raw = raw.strip()
    m = _URL.match(raw)
    if m:
        scheme = m.group("scheme").lower()
        if scheme not in _DEFAULT_PORTS:
            raise NormalizationError(f"unsupported URL scheme {scheme!r}")
        authority = m.group("authority")
        if "@" in authority:
            raise NormalizationError("userinfo (user@host) in a URL is not allowed")
        return parse_authority(authority, _DEFAULT_PORTS[scheme])
    if raw.count(":") > 1 and not raw.startswith("["):
        # A bare IPv6 address on the command line: accept it as a host.
        return normalize_host(raw), default_port
    return parse_authority(raw, default_port)
