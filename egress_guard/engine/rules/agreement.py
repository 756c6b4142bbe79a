"""Other names for the same destination: the TLS SNI and the Host header (or HTTP/2's
:authority) must name the CONNECT target or URI authority, and no name a client gives
may be denied, read strictly or as a lenient server might read it."""

from __future__ import annotations

from collections.abc import Sequence

from egress_guard.engine.compiled import Compiled
from egress_guard.engine.rules.names import deny_hit
from egress_guard.engine.types import UNCHECKED_NAME_HINT, Decision, Reason, block, printable
from egress_guard.normalize import Host, NormalizationError, normalize_host, parse_authority


def check_sni(
    c: Compiled, authority: Host, port: int, sni: str | None, dest: str | None
) -> Decision | None:
    """The TLS SNI must name the CONNECT target (the CONNECT target is the authority).

    A name the SNI gives is checked against the deny rules first (``denylisted``, in
    every mode): the server routes by it, so a denied name must not reach it behind
    an address or an alias the policy does not deny."""
    if sni is None:
        return None
    try:
        sni_host = normalize_host(sni)
    except NormalizationError as e:
        denied = denied_name(c, authority, port, "SNI", sni, None, dest)
        return denied or unreadable_name("sni_mismatch", authority, port, dest, f"invalid SNI: {e}")
    if sni_host.value != authority.value:
        denied = denied_name(c, authority, port, "SNI", sni, sni_host, dest)
        if denied is not None:
            return denied
        return block(
            "sni_mismatch",
            authority.value,
            port,
            dest,
            detail=f"SNI {sni_host.value!r} does not match CONNECT {authority.value!r}",
        )
    return None


def check_host_header(
    c: Compiled,
    authority: Host,
    port: int,
    host_headers: Sequence[str],
    default_port: int,
    dest: str | None,
    also: Sequence[str] = (),
) -> Decision | None:
    """Exactly one Host header, naming the request's authority (URI or CONNECT).

    Every name given (each Host header, and ``also``: names the client supplied that
    are not compared here, e.g. Host headers beside HTTP/2's :authority) is checked
    against the deny rules first (``denylisted``, in every mode)."""
    for value in (*host_headers, *also):
        denied = _denied_authority(c, authority, port, value, default_port, dest)
        if denied is not None:
            return denied
    if len(host_headers) != 1:
        return block(
            "host_header_mismatch",
            authority.value,
            port,
            dest,
            detail=f"{len(host_headers)} Host headers (exactly one is required)",
        )
    value = host_headers[0]
    try:
        h_host, h_port = parse_authority(value, default_port)
    except NormalizationError as e:
        return unreadable_name("host_header_mismatch", authority, port, dest, f"invalid Host: {e}")
    if h_host.value != authority.value or h_port != port:
        return block(
            "host_header_mismatch",
            authority.value,
            port,
            dest,
            detail=f"Host {printable(value)!r} does not match {authority.value}:{port}",
        )
    return None


def unreadable_name(
    reason: Reason, authority: Host, port: int, dest: str | None, detail: str
) -> Decision:
    """A block for an SNI or Host the guard cannot read (or cannot trust: ECH, two SNI
    extensions, TLS records before the ClientHello). Such a name cannot be checked
    against the deny rules, so when the policy has any, audit mode does not lift it
    (see rules/mode.py): a server may read it leniently as a denied name."""
    return block(reason, authority.value, port, dest, UNCHECKED_NAME_HINT, detail)


def _denied_authority(
    c: Compiled, authority: Host, port: int, value: str, default_port: int, dest: str | None
) -> Decision | None:
    """``denylisted`` when a Host-style ``host[:port]`` names a denied host."""
    try:
        host, h_port = parse_authority(value, default_port)
    except NormalizationError:
        return denied_name(c, authority, port, "Host", value, None, dest)
    return denied_name(c, authority, port, "Host", value, host, dest, h_port)


def denied_name(
    c: Compiled,
    authority: Host,
    port: int,
    what: str,
    raw: str,
    host: Host | None,
    dest: str | None,
    named_port: int | None = None,
) -> Decision | None:
    """``denylisted`` when a name the client supplied (``raw``, read as ``host``)
    is denied on the connection's port or on the port it names.

    A name that does not normalise is read leniently as well (trimmed, without
    trailing dots, up to a NUL or space), as a lenient server might read it."""
    if not c.policy.deny:
        return None
    if host is None:
        host = lenient_host(raw)
        if host is None:
            return None
    if host.value == authority.value and named_port in (None, port):
        return None  # the authority itself: decided already
    if host.ip is None:
        ids = c.deny.match_name(host.value) if c.deny.has_names else ()
    else:
        ids = c.deny_ip_ids(host.ip)
    if not ids:
        return None
    for p in dict.fromkeys((port, named_port if named_port is not None else port)):
        hit = deny_hit(c, ids, host, p)
        if hit is not None:
            return hit._replace(
                host=authority.value,
                port=port,
                destination=dest,
                detail=f"{what} {printable(raw)!r} names a denied host",
            )
    return None


def lenient_host(raw: str) -> Host | None:
    """A name as a lenient server might read one the normaliser refuses: trimmed, cut at
    the first NUL or space, without its port, brackets and trailing dots. None if even
    that is no host."""
    text = raw.strip().split("\x00", 1)[0].split(" ", 1)[0]
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    text = text.rstrip(".")
    try:
        return normalize_host(text)
    except NormalizationError:
        return None
