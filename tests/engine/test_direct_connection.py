"""A connection caught inside ``egress-guard sandbox`` (it ignored the proxy) is decided
by its name and by the address it was sent to: ``Target(name, port, origin=address)``
(egress_guard/engine/rules/direct.py)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from egress_guard.engine import Approved, Decision, Engine, NeedsAddresses, Target

POLICY = """\
version: 1
mode: enforce
destinations:
  - name: api
    hosts: [api.example.com]
  - name: pinned
    hosts: [pinned.example.com]
network:
  resolve:
    pinned.example.com: 1.1.1.2
"""

A = ipaddress.ip_address("1.1.1.1")
B = ipaddress.ip_address("1.1.1.2")
OTHER = ipaddress.ip_address("203.0.113.7")


@pytest.fixture(scope="module")
def make(make_engine: Callable[..., Engine]) -> Callable[[str], Engine]:
    return lambda mode: make_engine(POLICY.replace("mode: enforce", f"mode: {mode}"))


def test_an_allowed_name_at_one_of_its_addresses_is_allowed_and_pinned_there(
    make: Callable[[str], Engine],
) -> None:
    eng = make("enforce")
    assert type(eng.decide(Target("api.example.com", 443, origin=A))) is NeedsAddresses
    v = eng.decide(Target("api.example.com", 443, addresses=(B, A), origin=A))
    assert type(v) is Approved
    assert v.address == A  # where the client was going, not addrs[0]
    assert v.decision.allowed and v.decision.reason == "allowlisted"
    assert v.decision.detail and "direct connection to 1.1.1.1:443" in v.decision.detail


def test_an_allowed_name_at_another_address_is_a_direct_connection(
    make: Callable[[str], Engine],
) -> None:
    eng = make("enforce")
    v = eng.decide(Target("api.example.com", 443, addresses=(A,), origin=OTHER))
    assert type(v) is Decision
    assert (v.allowed, v.reason, v.host, v.port) == (
        False,
        "direct_connection",
        "api.example.com",
        443,
    )
    assert v.detail and "203.0.113.7:443" in v.detail
    assert "1.1.1.1" not in v.detail  # what the name resolves to is not the client's to learn
    # a network.resolve entry is the checked address too
    v = eng.decide(Target("pinned.example.com", 443, origin=A))
    assert type(v) is Decision and v.reason == "direct_connection"
    ok = eng.decide(Target("pinned.example.com", 443, origin=B))
    assert type(ok) is Approved and ok.address == B


def test_audit_mode_does_not_lift_it(
    make: Callable[[str], Engine],
) -> None:
    """direct_connection is NEVER_AUDITED (transparent mode's nameless connections share
    the reason): sent to an address its name does not have, it is refused in every mode."""
    v = make("audit").decide(Target("api.example.com", 443, addresses=(A,), origin=OTHER))
    assert type(v) is Decision and not v.allowed
    assert v.action == "block" and v.reason == "direct_connection"


def test_a_refused_name_keeps_its_reason_and_says_where_it_was_going(
    make: Callable[[str], Engine],
) -> None:
    v = make("enforce").decide(Target("203.0.113.7", 4444, origin=OTHER))
    assert type(v) is Decision and not v.allowed
    assert v.reason != "allowlisted"
    assert v.detail and "direct connection to 203.0.113.7:4444" in v.detail
