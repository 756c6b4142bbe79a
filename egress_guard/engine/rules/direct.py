"""A connection that ignored the proxy, caught inside ``egress-guard sandbox``.

The sandbox redirects every TCP connection its command makes around the proxy to the
guard, which reads the name it carries (TLS SNI, HTTP Host; the address itself when it
carries none) and asks about ``Target(name, port, origin=address)``. The name is decided
by the same rules as a CONNECT; then the address the connection was sent to must be one
of the name's checked addresses (what DNS answered the guard, a ``network.resolve``
entry, or the IP literal itself): a client cannot reach an allowed name's TLS at some
other address, nor an address the policy does not allow by naming an allowed host. A
mismatch is ``direct_connection``. Audit mode records it as would_block and lets it
through to the name's checked address, never to the address the client chose (that is
the one thing the check is for, and audit mode lifts policy checks, not pinning). Every
decision about a direct connection says so in its detail, with the address and port.
"""

from __future__ import annotations

from collections.abc import Callable

from egress_guard.engine.compiled import Compiled
from egress_guard.engine.facts import Approved, NeedsAddresses, Target
from egress_guard.engine.rules.addresses import static_addresses
from egress_guard.engine.rules.mode import apply_mode
from egress_guard.engine.types import Decision, block
from egress_guard.normalize import IPAddress, join_hostport

DIRECT_HINT = (
    "the connection ignored the proxy (HTTPS_PROXY): its address is not one the name "
    "resolves to; use the proxy, or a name that resolves to that address"
)

Verdict = Decision | Approved | NeedsAddresses


def decide_direct(
    c: Compiled, f: Target, origin: IPAddress, target: Callable[[Compiled, Target], Verdict]
) -> Verdict:
    """``target`` decides the name; this adds the origin check (see the module)."""
    verdict = target(c, f._replace(origin=None))
    if type(verdict) is NeedsAddresses:
        return verdict
    where = join_hostport(str(origin), f.port)
    note = f"direct connection to {where} (it ignored the proxy)"
    if type(verdict) is not Approved:
        d: Decision = verdict  # type: ignore[assignment]
        return d._replace(detail=f"{note}; {d.detail}" if d.detail else note)
    ok: Approved = verdict
    checked = f.addresses if f.addresses is not None else static_addresses(c, ok.host)
    if checked is not None and origin in checked:
        noted = ok.decision._replace(detail=ok.decision.detail or note)
        return ok._replace(decision=noted, address=origin)
    if checked is None:
        why = f"{note}; decided on the name alone (a parent proxy resolves), not checked"
    else:
        # not which addresses the name has: the refusal goes to the client, and what a
        # name resolves to is not the client's to learn (an internal-DNS oracle)
        why = f"{note}; not an address {ok.host.value} resolves to"
    refused = apply_mode(
        c,
        block(
            "direct_connection",
            ok.host.value,
            ok.port,
            ok.decision.destination,
            hint=DIRECT_HINT,
            detail=why,
        ),
    )
    if not refused.allowed:
        return refused
    return ok._replace(decision=refused)
