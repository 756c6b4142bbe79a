"""Asking the engine about a target: the steps a CONNECT, a plain-HTTP request and a
tunnel after a policy reload share (client gate, names, DNS, addresses, Host header).

Functions over the shared GuardState, not hooks: the hook adapters (requests.py,
tunnelstart.py) call them and turn a ``Blocked`` into a recorded refusal.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from mitmproxy import ctx, http

from egress_guard.engine import Decision, Engine, Match
from egress_guard.engine.decide import printable
from egress_guard.engine.paths import AmbiguousPath, canonical_path
from egress_guard.engine.verdicts import (
    allowed_by_name,
    dns_failed,
    invalid_host,
    proxy_auth_required,
    repinned,
)
from egress_guard.normalize import (
    Host,
    IPAddress,
    NormalizationError,
    normalize_host,
    normalize_port,
    parse_authority,
    socket_ip,
)
from egress_guard.proxy import resolver
from egress_guard.proxy.state import Approval, Blocked, ConnState, GuardState


def gate(g: GuardState, eng: Engine, state: ConnState, headers: http.Headers, host: str) -> None:
    """Client ACL, proxy auth, sink health: refuse before looking at the target."""
    d = eng.check_client(state.client)
    if d is not None:
        raise Blocked(d._replace(host=host))
    if eng.policy.clients.auth is not None and not _authorized(g.users, headers):
        raise Blocked(proxy_auth_required(host))
    g.check_sinks(host)


def _authorized(users: dict[str, str], headers: http.Headers) -> bool:
    value = headers.get("proxy-authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic" or not token:
        return False
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    expected = users.get(user)
    if not sep or expected is None:
        return False
    return _check_password(expected, password)


def _check_password(expected: str, given: str) -> bool:
    if expected.startswith("sha256:"):
        digest = hashlib.sha256(given.encode()).hexdigest()
        return hmac.compare_digest(expected[7:].lower(), digest)
    return hmac.compare_digest(expected.encode(), given.encode())


def raw_target(req: http.Request) -> tuple[str, str | int]:
    """The target as the client wrote it, parsed strictly by our normaliser.

    mitmproxy has already split the authority, leniently (``[name]`` loses its
    brackets, full-width digits and ``0443`` become 443); the raw text is what the strict
    rules of DESIGN section 4 apply to.
    """
    raw = req.authority
    if not raw:
        return req.host, req.port
    default = None if req.method == "CONNECT" else (443 if req.scheme == "https" else 80)
    try:
        host, port = parse_authority(raw, default)
    except NormalizationError as e:
        raise Blocked(invalid_host(printable(raw), str(e))) from None
    return host.value, port


async def authorize(g: GuardState, eng: Engine, raw_host: str, raw_port: str | int) -> Approval:
    """Decide a target end to end (names, DNS, addresses). Raises Blocked."""
    approval = await _decide_target(g, eng, raw_host, raw_port)
    approval.policy_sha256 = eng.policy.sha256
    return approval


async def _decide_target(
    g: GuardState, eng: Engine, raw_host: str, raw_port: str | int
) -> Approval:
    verdict = eng.decide_target(raw_host, raw_port)
    if isinstance(verdict, Decision):
        final = eng.finalize(verdict)
        if not final.allowed:
            raise Blocked(final)
        # audit mode: let it through, but it still needs checked, pinned addresses
        host, port = normalize_host(raw_host), normalize_port(raw_port)
        if g.parent is not None and eng.static_addresses(host) is None:
            return Approval(final, host, port, None, None, time.monotonic())
        addrs = await _addresses(eng, host, port)
        refused = eng.check_unlisted_addresses(addrs, host, port)
        if refused is not None:
            raise Blocked(refused)
        return Approval(final, host, port, addrs[0], None, time.monotonic())
    match: Match = verdict
    if g.parent is not None and eng.static_addresses(match.host) is None:
        # A parent proxy resolves names (air-gapped sites may have no DNS here): the
        # decision is on the name; the parent must do its own address checks.
        d = allowed_by_name(match)
        return Approval(d, match.host, match.port, None, match.destination, time.monotonic())
    addrs = await _addresses(eng, match.host, match.port)
    final = eng.finalize(eng.decide_addresses(match, addrs))
    if not final.allowed:
        raise Blocked(final)
    return Approval(final, match.host, match.port, addrs[0], match.destination, time.monotonic())


async def _addresses(eng: Engine, host: Host, port: int) -> tuple[IPAddress, ...]:
    static = eng.static_addresses(host)
    if static is not None:
        return static
    try:
        infos = await resolver.lookup(host.value, port)
    except (OSError, TimeoutError) as e:
        raise _dns_failed(host, port, f"DNS lookup failed: {e or 'timeout'}") from None
    out: list[IPAddress] = []
    for info in infos:
        ip = socket_ip(str(info[4][0]))
        if ip not in out:
            out.append(ip)
    if not out:
        raise _dns_failed(host, port, "DNS returned no addresses")
    return tuple(out)


def _dns_failed(host: Host, port: int, detail: str) -> Blocked:
    """A name that does not resolve: not a policy block, but nothing can be sent (502)."""
    return Blocked(dns_failed(host.value, port, detail))


def require_inspection(eng: Engine, approval: Approval) -> None:
    """A tunnel to a destination with request rules opens only when it is intercepted
    (raises Blocked). Audit mode lets it through as would_block: recorded, never
    silent, but its request rules go unchecked."""
    gap = eng.check_inspection(
        approval.destination, bool(ctx.options.egress_guard_inspect), approval.decision
    )
    if gap is None:
        return
    final = eng.finalize(gap)
    if not final.allowed:
        raise Blocked(final)
    approval.decision = final


def redecide_tunnel(eng: Engine, state: ConnState, approval: Approval) -> Decision:
    """The policy changed while an intercepted tunnel was open: decide its target
    again, so its requests get the new rules (a renamed destination included) and a
    target or pinned address the new policy refuses gets no more requests. A
    destination that gained request rules needs interception now (inspection_required
    without it). Raises Blocked; returns the new tunnel decision."""
    verdict = eng.decide_target(approval.host.value, approval.port)
    if isinstance(verdict, Decision):
        final = eng.finalize(verdict)
        if final.allowed and approval.address is not None:
            # audit mode: the pinned address must still pass what no mode lifts
            refused = eng.check_unlisted_addresses(
                (approval.address,), approval.host, approval.port
            )
            final = refused if refused is not None else final
    elif approval.address is None:  # a parent proxy resolves; decided on the name
        final = allowed_by_name(verdict)
    else:
        static = eng.static_addresses(verdict.host)
        if static is not None and approval.address not in static:
            # network.resolve now pins the name elsewhere; the open upstream cannot move
            moved = eng.finalize(repinned(verdict, approval.address, static))
            if not moved.allowed:
                raise Blocked(moved)
        final = eng.finalize(eng.decide_addresses(verdict, (approval.address,)))
    if not isinstance(verdict, Decision):
        gap = eng.check_inspection(
            verdict.destination, bool(ctx.options.egress_guard_inspect), final
        )
        if gap is not None:
            final = eng.finalize(gap)
    if not final.allowed:
        raise Blocked(final)
    state.tunnel_decision = final
    approval.policy_sha256 = eng.policy.sha256
    return final


def check_host_header(
    eng: Engine,
    flow: http.HTTPFlow,
    host: Host,
    port: int,
    dest: str | None,
    values: list[str] | None = None,
) -> Decision | None:
    """The request's Host (or the given authority ``values``) must name host:port,
    and no name the request gives may be denied. Raises Blocked; returns the
    would_block to record in audit mode, or None."""
    req = flow.request
    also: list[str] = []
    if values is None and (req.is_http2 or req.is_http3):
        hosts = req.headers.get_all("host")
        values = [req.authority] if req.authority else hosts
        also = hosts if req.authority else []  # beside :authority: deny rules only
    elif values is None:
        values = req.headers.get_all("host")
    default = 443 if req.scheme == "https" else 80
    bad = eng.check_host_header(host, port, values, default, dest, also=also)
    if bad is None:
        return None
    final = eng.finalize(bad)
    if not final.allowed:
        raise Blocked(final)
    return final


def audited(decision: Decision, mismatch: Decision | None) -> Decision:
    """The decision to record for a request audit mode let through despite a name
    mismatch: the would_block, unless the target's own decision is one already."""
    if mismatch is None or decision.action != "allow":
        return decision
    return mismatch


def rule_path(raw: str) -> str:
    """The path the rules were checked on (the raw one when it was refused as ambiguous,
    which only audit mode lets through)."""
    try:
        return canonical_path(raw)
    except AmbiguousPath:
        return raw
