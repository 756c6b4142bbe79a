"""The hints that tell an operator how to allow what was blocked.

They never say to edit a shipped preset (a file in ``policies/``): an upgrade replaces
it, and it is not the operator's file. When the rule or the policy in force is a
preset's, the hint says what to put in the operator's own policy instead, as YAML that
can be pasted (flow style, so a hint stays one line). Paths in hints are for the audit
log; what a client sees is rewritten (proxy/responses.py ``public_text``).
"""

from __future__ import annotations

from egress_guard.normalize import join_hostport
from egress_guard.policy import EffectivePolicy
from egress_guard.policy.loader import shipped_preset
from egress_guard.policy.model import Destination
from egress_guard.policy.writer import destination_name

#: how a user's own policy starts when the one in force is a preset
_OWN = "write your own policy and run with --policy FILE, e.g."


def _own_policy(preset: str, destination: str) -> str:
    return f"{{version: 1, include: [{preset}], destinations: [{destination}]}}"


def allow_unlisted(policy: EffectivePolicy, host: str, port: int, uses: list[str]) -> str:
    """How to allow ``host:port`` that no destination lists (``uses``: catalog entries
    that cover it)."""
    target = join_hostport(host, port)
    name = destination_name(host)
    entry = f"{{use: {uses[0]}}}" if uses else f"{{name: {name}, hosts: [{host}], ports: [{port}]}}"
    covered = f"catalog entry covers {target}" if uses else f"no catalog entry covers {target}"
    preset = shipped_preset(policy.source)
    if preset is not None:
        return f"{covered}; the policy in force is the shipped preset {preset!r}: {_OWN} {_own_policy(preset, entry)}"
    if uses:
        listed = ", ".join(f"'- use: {n}'" for n in uses)
        return f"{covered}: add {listed} to destinations in {policy.source}"
    return (
        f"{covered}; to allow it add a destination with hosts: [{host}] and ports: [{port}] "
        f"to {policy.source}"
    )


def allow_port(policy: EffectivePolicy, dest: Destination, host: str, port: int) -> str:
    """How to allow another port of a listed destination."""
    origin = policy.origins.get(dest.name, "?")
    said = f"destination {dest.name!r} ({origin}) allows ports {list(dest.ports)}"
    preset = shipped_preset(origin)
    if preset is None:
        return f"{said}; add {port} there if it is needed"
    name = destination_name(f"{dest.name}-{port}")
    entry = f"{{name: {name}, hosts: [{host}], ports: [{port}]}}"
    if shipped_preset(policy.source) is not None:
        return f"{said} in the shipped preset {preset!r}: {_OWN} {_own_policy(preset, entry)}"
    return (
        f"{said}; it comes from the shipped preset {preset!r}: to allow port {port} add a "
        f"destination of your own to {policy.source}: {entry}"
    )


def denied(origin: str, suffix: str = "") -> str:
    """Why a deny rule's block cannot be lifted by an allow, and what to do about it."""
    said = f"denied by {origin}{suffix}; deny rules win over every allow"
    preset = shipped_preset(origin)
    if preset is None:
        return said
    return (
        f"{said}, and this rule is in the shipped preset {preset!r}: to lift it, stop including "
        f"{preset!r} and copy what you need of it into your own policy "
        "(egress-guard policy show prints it)"
    )
