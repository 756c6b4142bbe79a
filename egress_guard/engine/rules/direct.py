"""Connections that reached the guard around the proxy, decided by the name they carry
and the address they were sent to (which must agree). Two ways in:

* ``egress-guard sandbox`` catches every TCP connection its command makes around the
  proxy; the guard reads the name it carries (TLS SNI, HTTP Host; the address itself when
  it carries none) and asks about ``Target(name, port, origin=address)``
  (``decide_direct``). The name is decided by the same rules as a CONNECT; then the
  address must be one of the name's checked addresses, or the connection is refused as
  ``direct_connection``.
* ``run --transparent`` (a gateway or a sidecar redirected the connection): the proxy
  asks ``Redirected(...)`` (``check_redirected``) once the name is decided: no name at
  all is ``direct_connection``; a name whose addresses do not include the one the
  connection went to is ``sni_mismatch``/``host_header_mismatch`` (fronting).

``direct_connection`` is never lifted by audit mode (NEVER_AUDITED): a connection with no
name has nothing to check, and one sent to an address its name does not have would reach
a server the policy did not decide on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from egress_guard.engine.compiled import Compiled
from egress_guard.engine.facts import Approved, NeedsAddresses, Target
from egress_guard.engine.rules.addresses import static_addresses
from egress_guard.engine.rules.mode import apply_mode
from egress_guard.engine.types import Decision, block
from egress_guard.normalize import Host, IPAddress, canonical_ip, join_hostport

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


#: how a redirected connection without a name can be made checkable
NAMELESS_HINT = (
    "a connection that names no server (no TLS SNI, no HTTP Host) cannot be checked "
    "against the policy; send it through the proxy (HTTPS_PROXY) or by name"
)


def check_redirected(
    name: Host | None,
    via: str,
    original: IPAddress,
    port: int,
    checked: Sequence[IPAddress] | None,
    destination: str | None,
) -> Decision | None:
    """None when the named ``name`` was sent to one of its ``checked`` addresses; else
    the refusal: ``direct_connection`` when there is no name (or its addresses are not
    known here), ``sni_mismatch``/``host_header_mismatch`` when the name has other
    addresses than the one the connection went to (fronting: an allowed name on a
    connection to another server)."""
    where = join_hostport(str(original), port)
    if name is None:
        return block(
            "direct_connection",
            str(original),
            port,
            hint=NAMELESS_HINT,
            detail=f"direct connection to {where} with no server name",
        )
    if not checked:
        return block(
            "direct_connection",
            name.value,
            port,
            destination,
            hint=NAMELESS_HINT,
            detail=f"direct connection to {where}: the addresses of {name.value} are not known",
        )
    sent = canonical_ip(original)
    if any(canonical_ip(a) == sent for a in checked):
        return None
    has = ", ".join(str(a) for a in checked)
    return block(
        "sni_mismatch" if via == "sni" else "host_header_mismatch",
        name.value,
        port,
        destination,
        detail=(
            f"direct connection to {where} names {name.value} ({via}), "
            f"which is at {has}, not at {original}"
        ),
    )
