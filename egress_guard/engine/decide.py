"""The decision engine's one entry point: ``Engine.decide(facts)``.

No sockets, no mitmproxy, no clocks. The proxy gathers the facts it can see (engine/facts.py:
the client, the target and its addresses, the SNI, the Host headers, a request, a body's
shape), asks ``decide``, and enforces the answer. The dispatcher runs the rules
(engine/rules/) over the compiled policy (engine/compiled.py) in their fixed order and
applies the mode last, inside: the caller never applies audit mode itself. An answer
that is a Decision is final: ``allowed=False`` is a refusal, ``allowed=True`` (only
would_block outside Target) is a block audit mode let through, to be recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import overload

from egress_guard.engine.compiled import Compiled
from egress_guard.engine.facts import (
    Approved,
    BodyShape,
    Client,
    HostNames,
    ModelUnread,
    NeedsAddresses,
    Redirected,
    Request,
    ServerName,
    Target,
    UnreadableName,
)
from egress_guard.engine.rules.addresses import (
    check_unlisted_addresses,
    decide_addresses,
    static_addresses,
)
from egress_guard.engine.rules.agreement import check_host_header, check_sni, unreadable_name
from egress_guard.engine.rules.clients import check_access
from egress_guard.engine.rules.direct import check_redirected, decide_direct
from egress_guard.engine.rules.mode import apply_mode
from egress_guard.engine.rules.names import decide_name
from egress_guard.engine.rules.requests import (
    check_inspection,
    check_model_body,
    check_request,
    refuse_model,
    request_rules,
)
from egress_guard.engine.types import (
    NEVER_AUDITED,
    Action,
    Decision,
    Match,
    Reason,
    block,
    new,
    printable,
)
from egress_guard.engine.verdicts import allowed_by_name, repinned
from egress_guard.normalize import Host, NormalizationError, normalize_host, normalize_port
from egress_guard.policy.loader import EffectivePolicy
from egress_guard.policy.model import CatalogEntry, Destination

__all__ = [
    "NEVER_AUDITED",
    "Action",
    "Decision",
    "Engine",
    "Match",
    "Reason",
    "printable",
    "request_rules",
]

_Facts = (
    Client
    | ServerName
    | UnreadableName
    | HostNames
    | Request
    | ModelUnread
    | BodyShape
    | Redirected
)


@dataclass
class Engine:
    """A compiled policy and the one question it answers. Build once per policy load."""

    policy: EffectivePolicy
    catalog: Mapping[str, CatalogEntry] = field(default_factory=dict)
    #: (address, port) pairs the proxy itself listens on: never a destination
    self_endpoints: frozenset[tuple[str, int]] = frozenset()

    def __post_init__(self) -> None:
        self.compiled = Compiled(self.policy, self.catalog, self.self_endpoints)

    @overload
    def decide(self, facts: Target) -> Decision | Approved | NeedsAddresses: ...
    @overload
    def decide(self, facts: _Facts) -> Decision | None: ...

    def decide(self, facts: Target | _Facts) -> Decision | Approved | NeedsAddresses | None:
        """Decide one set of facts, audit mode applied.

        Target: a refusal (Decision), Approved, or NeedsAddresses (resolve, then ask
        again with the addresses). Anything else: None when the facts add nothing, else
        the Decision (a refusal, or a would_block audit mode let through)."""
        t = type(facts)
        if t is Target:  # the hot path: one call, no further dispatch
            if facts.origin is None:  # type: ignore[union-attr]
                return _target(self.compiled, facts)  # type: ignore[arg-type]
            return decide_direct(self.compiled, facts, facts.origin, _target)  # type: ignore[arg-type,union-attr]
        c = self.compiled
        d: Decision | None
        if t is HostNames:
            a: HostNames = facts  # type: ignore[assignment]
            d = check_host_header(
                c, a.authority, a.port, a.values, a.default_port, a.destination, a.also
            )
        elif t is Request:
            r: Request = facts  # type: ignore[assignment]
            d = check_request(
                r.destination, r.method, r.path, r.models, r.decision, upgrade=r.upgrade
            )
        elif t is Client:
            cl: Client = facts  # type: ignore[assignment]
            d = check_access(c, cl.ip, cl.authenticated, cl.host)
        elif t is ServerName:
            s: ServerName = facts  # type: ignore[assignment]
            d = check_sni(c, s.authority, s.port, s.sni, s.destination)
        elif t is UnreadableName:
            u: UnreadableName = facts  # type: ignore[assignment]
            d = unreadable_name(u.reason, u.authority, u.port, u.destination, u.detail)
        elif t is BodyShape:
            b: BodyShape = facts  # type: ignore[assignment]
            d = check_model_body(
                b.destination,
                b.decision,
                b.method,
                b.content_length,
                b.chunked,
                b.limit,
                http1=b.http1,
            )
        elif t is ModelUnread:
            m: ModelUnread = facts  # type: ignore[assignment]
            d = refuse_model(m.destination, m.decision, m.detail)
        elif t is Redirected:
            x: Redirected = facts  # type: ignore[assignment]
            d = check_redirected(x.name, x.via, x.original, x.port, x.checked, x.destination)
        else:
            raise TypeError(f"no rules for {t.__name__}")
        return None if d is None else apply_mode(c, d)

    def destination(self, name: str | None) -> Destination | None:
        return self.compiled.by_name.get(name) if name is not None else None


def _target(c: Compiled, f: Target) -> Decision | Approved | NeedsAddresses:
    """Names, deny, allow, port; then the addresses (static, resolved, or pinned);
    then the interception an opaque tunnel's request rules need. Ordered as the
    proxy asked before (names before DNS; a refusal's reason the most specific)."""
    host = f.host
    port = f.port
    if type(host) is not Host or type(port) is not int:
        try:
            host = normalize_host(host)  # type: ignore[arg-type]
            port = normalize_port(port)
        except NormalizationError as e:
            return block("invalid_host", printable(f.host), None, detail=str(e))
    verdict = decide_name(c, host, port)
    addrs = f.addresses
    if type(verdict) is not Match:
        final = apply_mode(c, verdict)  # type: ignore[arg-type]
        if not final.allowed:
            return final
        # audit mode let an unlisted target through: its addresses still must pass
        # what no mode lifts (unless a parent proxy resolves it)
        if addrs is None and not f.reopened:
            addrs = static_addresses(c, host)
            if addrs is None:
                if not f.parent_resolves:
                    return new(NeedsAddresses, (host, port))
                return new(Approved, (final, host, port, None, None))
        if addrs is not None:
            refused = check_unlisted_addresses(c, addrs, host, port)
            if refused is not None:
                return refused
        address = addrs[0] if addrs is not None else None
        return new(Approved, (final, host, port, address, None))
    match: Match = verdict
    if f.reopened:
        if addrs is None:  # a parent proxy resolves; decided on the name
            decision = allowed_by_name(match)
        else:
            static = static_addresses(c, match.host)
            if static is not None and addrs[0] not in static:
                # network.resolve now pins the name elsewhere; the open upstream
                # cannot move
                moved = apply_mode(c, repinned(match, addrs[0], static))
                if not moved.allowed:
                    return moved
            decision = apply_mode(c, decide_addresses(c, match, addrs))
    else:
        if addrs is None:
            addrs = static_addresses(c, match.host)
        if addrs is not None:
            decision = apply_mode(c, decide_addresses(c, match, addrs))
        elif f.parent_resolves:
            # A parent proxy resolves names (air-gapped sites may have no DNS here):
            # the decision is on the name; the parent must do its own address checks.
            decision = allowed_by_name(match)
        else:
            return new(NeedsAddresses, (match.host, port))
    if f.opaque_tunnel:
        gap = check_inspection(match.destination, False, decision)
        if gap is not None:
            decision = apply_mode(c, gap)
    if not decision.allowed:
        return decision
    address = addrs[0] if addrs is not None else None
    return new(Approved, (decision, match.host, port, address, match.destination))
