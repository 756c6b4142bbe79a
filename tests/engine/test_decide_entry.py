"""``Engine.decide``, the engine's one entry point: which answer each kind of facts gets,
and that audit mode is applied inside (the rules themselves are tested one by one in the
other engine tests)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from egress_guard.engine import (
    Approved,
    Client,
    Decision,
    Engine,
    HostNames,
    NeedsAddresses,
    Request,
    ServerName,
    Target,
    UnreadableName,
)
from egress_guard.normalize import normalize_host

EngineFactory = Callable[..., Engine]

POLICY = """\
version: 1
mode: enforce
destinations:
  - name: api
    hosts: [api.example.com, 1.1.1.1]
  - name: ruled
    hosts: [llm.example.com]
    models: [good-model]
  - name: pinned
    hosts: [pinned.example.com]
deny:
  - hosts: [evil.example.com, 9.9.9.9]
network:
  resolve:
    pinned.example.com: 1.1.1.2
clients:
  allow_cidrs: [127.0.0.0/8]
"""

ADDR = ipaddress.ip_address("1.1.1.1")


@pytest.fixture(scope="module", params=["enforce", "audit"])
def eng(request: pytest.FixtureRequest, make_engine: EngineFactory) -> Engine:
    return make_engine(POLICY.replace("mode: enforce", f"mode: {request.param}"))


def test_needs_addresses_exactly_when_no_address_is_known(eng: Engine) -> None:
    v = eng.decide(Target("api.example.com", "443"))
    assert type(v) is NeedsAddresses
    assert (v.host, v.port) == (normalize_host("api.example.com"), 443)
    # an IP literal and a network.resolve name have their addresses already
    lit = eng.decide(Target("1.1.1.1", 443))
    assert type(lit) is Approved and lit.address == ADDR
    pin = eng.decide(Target("pinned.example.com", 443))
    assert type(pin) is Approved and str(pin.address) == "1.1.1.2"
    # a parent proxy resolves: decided on the name, nothing to pin
    parent = eng.decide(Target("api.example.com", 443, parent_resolves=True))
    assert type(parent) is Approved and parent.address is None
    assert parent.decision.action == "allow" and parent.destination is not None
    # asked again with what DNS gave
    done = eng.decide(Target(v.host, v.port, addresses=(ADDR,)))
    assert type(done) is Approved and done.address == ADDR
    assert (done.decision.action, done.decision.destination) == ("allow", "api")


def test_refusals_are_decisions_with_the_mode_applied(eng: Engine) -> None:
    audit = eng.policy.mode == "audit"
    denied = eng.decide(Target("evil.example.com", 443))
    assert isinstance(denied, Decision) and denied.reason == "denylisted"  # never audited
    bad = eng.decide(Target("a..b", 443))
    assert isinstance(bad, Decision) and bad.reason == "invalid_host"
    unlisted = eng.decide(Target("other.example.com", 443))
    if audit:  # let through, but its addresses must still pass what no mode lifts
        assert type(unlisted) is NeedsAddresses
        alias = eng.decide(Target(unlisted.host, 443, addresses=(ipaddress.ip_address("9.9.9.9"),)))
        assert isinstance(alias, Decision) and alias.reason == "denylisted"
        ok = eng.decide(Target(unlisted.host, 443, addresses=(ADDR,)))
        assert type(ok) is Approved and ok.decision.action == "would_block"
    else:
        assert isinstance(unlisted, Decision) and unlisted.reason == "not_allowlisted"


def test_inspection_only_for_an_opaque_tunnel(eng: Engine) -> None:
    plain = eng.decide(Target("llm.example.com", 443, addresses=(ADDR,)))
    assert type(plain) is Approved and plain.decision.action == "allow"
    gap = eng.decide(Target("llm.example.com", 443, addresses=(ADDR,), opaque_tunnel=True))
    if eng.policy.mode == "audit":
        assert type(gap) is Approved
        assert (gap.decision.action, gap.decision.reason) == ("would_block", "inspection_required")
    else:
        assert isinstance(gap, Decision) and gap.reason == "inspection_required"


def test_reopened_tunnel_repinned(eng: Engine) -> None:
    """After a reload network.resolve pins the name elsewhere: refused in enforce mode;
    audit mode lets it through and decides the pinned address."""
    host = normalize_host("pinned.example.com")
    same = eng.decide(Target(host, 443, (ipaddress.ip_address("1.1.1.2"),), reopened=True))
    assert type(same) is Approved and same.decision.action == "allow"
    moved = eng.decide(Target(host, 443, (ADDR,), reopened=True))
    if eng.policy.mode == "audit":
        assert type(moved) is Approved and moved.decision.action == "allow"
    else:
        assert isinstance(moved, Decision) and "reconnect" in (moved.hint or "")
    by_name = eng.decide(Target(host, 443, None, reopened=True))
    assert type(by_name) is Approved and by_name.address is None


def test_other_facts(eng: Engine) -> None:
    audit = eng.policy.mode == "audit"
    assert eng.decide(Client("127.0.0.1", False, "api.example.com")) is None
    outsider = eng.decide(Client("10.0.0.1", True, "api.example.com"))
    assert outsider is not None and outsider.reason == "client_not_allowed"
    assert outsider.host == "api.example.com" and not outsider.allowed
    api = normalize_host("api.example.com")
    assert eng.decide(ServerName(api, 443, "api.example.com", "api")) is None
    sni = eng.decide(ServerName(api, 443, "other.example.com", "api"))
    assert sni is not None and sni.allowed is audit and sni.reason == "sni_mismatch"
    host = eng.decide(HostNames(api, 443, ["other.example.com"], 443, "api"))
    assert host is not None and host.allowed is audit
    # an unreadable name is never lifted while the policy has deny rules
    name = eng.decide(UnreadableName("sni_mismatch", api, 443, "api", "ECH"))
    assert name is not None and not name.allowed
    allow = Decision(True, "allow", "allowlisted", "ruled", "llm.example.com", 443)
    dest = eng.destination("ruled")
    assert dest is not None
    assert eng.decide(Request(dest, "POST", "/v1/chat/completions", "good-model", allow)) is None
    model = eng.decide(Request(dest, "POST", "/v1/chat/completions", "bad-model", allow))
    assert model is not None and model.allowed is audit and model.reason == "model_not_allowed"


def test_proxy_auth_is_decided_in_the_engine(make_engine: EngineFactory, tmp_path: Path) -> None:
    """The proxy checks the password and passes the result; whether one was needed
    (clients.auth) is the engine's to say, after the client ACL."""
    assert make_engine(POLICY).decide(Client("127.0.0.1", False, "x")) is None
    users = tmp_path / "users"
    users.write_text("alice:plain\n")
    eng = make_engine(POLICY.replace("clients:\n", f"clients:\n  auth:\n    users_file: {users}\n"))
    assert eng.decide(Client("127.0.0.1", True, "x")) is None
    d = eng.decide(Client("127.0.0.1", False, "x"))
    assert d is not None and (d.reason, d.host, d.allowed) == ("proxy_auth_required", "x", False)
    acl = eng.decide(Client("10.0.0.1", False, "x"))
    assert acl is not None and acl.reason == "client_not_allowed"
