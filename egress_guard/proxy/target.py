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

from egress_guard.engine import (
    Approved,
    Client,
    Decision,
    Engine,
    HostNames,
    NeedsAddresses,
    Target,
)
from egress_guard.engine.paths import AmbiguousPath, canonical_path
from egress_guard.engine.types import printable
from egress_guard.engine.verdicts import dns_failed, invalid_host
from egress_guard.normalize import (
    Host,
    IPAddress,
    NormalizationError,
    parse_authority,
    socket_ip,
)
from egress_guard.proxy import resolver
from egress_guard.proxy.state import Approval, Blocked, ConnState, GuardState


def gate(g: GuardState, eng: Engine, state: ConnState, headers: http.Headers, host: str) -> None:
    """Client ACL, proxy auth, sink health: refuse before looking at the target. The
    user who proved itself (clients.auth) is kept on the connection for its records; a
    name that did not prove itself is never recorded (it is the client's text)."""
    state.user = _authorized(g.users, headers)
    d = eng.decide(Client(state.client, state.user is not None, host))
    if d is not None:
        raise Blocked(d)
    g.check_sinks(host)


def _authorized(users: dict[str, str], headers: http.Headers) -> str | None:
    """The clients.auth user whose password the request gave, or None."""
    value = headers.get("proxy-authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    expected = users.get(user)
    if not sep or expected is None:
        return None
    return user if _check_password(expected, password) else None


def _check_password(expected: str, given: str) -> bool:
    if expected.startswith("sha256:"):
        digest = hashlib.sha256(given.encode()).hexdigest()
        return hmac.compare_digest(expected[7:].lower(), digest)
    return hmac.compare_digest(expected.encode(), given.encode())


def raw_target(req: http.Request) -> tuple[str | Host, str | int]:
    """The target as the client wrote it, parsed strictly by our normaliser.

    mitmproxy has already split the authority, leniently (``[name]`` loses its
    brackets, full-width digits and ``0443`` become 443); the raw text is what the strict
    rules of DESIGN section 4 apply to. Returns the normalised Host and port (the engine
    does not normalise them again), or mitmproxy's host and port when there is no raw
    authority (the engine normalises those).
    """
    raw = req.authority
    if not raw:
        return req.host, req.port
    default = None if req.method == "CONNECT" else (443 if req.scheme == "https" else 80)
    try:
        return parse_authority(raw, default)
    except NormalizationError as e:
        raise Blocked(invalid_host(printable(raw), str(e))) from None


async def authorize(
    g: GuardState,
    eng: Engine,
    host: str | Host,
    port: str | int,
    *,
    tunnel: bool = False,
    origin: IPAddress | None = None,
) -> Approval:
    """Decide a target end to end (names, DNS, addresses; for a CONNECT ``tunnel``, the
    interception its destination's request rules need). Raises Blocked.

    The engine decides; the proxy only looks the name up when the engine needs its
    addresses (DNS is I/O, which the engine has none of)."""
    facts = Target(
        host,
        port,
        parent_resolves=g.parent is not None,
        opaque_tunnel=tunnel and not ctx.options.egress_guard_inspect,
        origin=origin,
    )
    verdict = eng.decide(facts)
    addrs = None
    if type(verdict) is NeedsAddresses:
        addrs = await _resolve(verdict.host, verdict.port)
        verdict = eng.decide(facts._replace(host=verdict.host, port=verdict.port, addresses=addrs))
    if type(verdict) is not Approved:
        raise Blocked(verdict)  # type: ignore[arg-type]
    ok: Approved = verdict
    approval = Approval(ok.decision, ok.host, ok.port, ok.address, ok.destination, time.monotonic())
    approval.policy_sha256 = eng.policy.sha256
    approval.addresses = addrs
    return approval


async def _resolve(host: Host, port: int) -> tuple[IPAddress, ...]:
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


def redecide_tunnel(eng: Engine, state: ConnState, approval: Approval) -> Decision:
    """The policy changed while an intercepted tunnel was open: decide its target
    again, so its requests get the new rules (a renamed destination included) and a
    target or pinned address the new policy refuses gets no more requests. A
    destination that gained request rules needs interception now (inspection_required
    without it). Raises Blocked; returns the new tunnel decision."""
    pinned = (approval.address,) if approval.address is not None else None
    verdict = eng.decide(
        Target(
            approval.host,
            approval.port,
            pinned,
            opaque_tunnel=not ctx.options.egress_guard_inspect,
            reopened=True,
        )
    )
    if type(verdict) is not Approved:
        raise Blocked(verdict)  # type: ignore[arg-type]
    final: Decision = verdict.decision
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
    bad = eng.decide(HostNames(host, port, values, default, dest, also))
    if bad is not None and not bad.allowed:
        raise Blocked(bad)
    return bad


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
