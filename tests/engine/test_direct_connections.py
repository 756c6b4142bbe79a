"""Direct connections (``run --transparent``): ``Engine.decide(Redirected(...))`` lets a
named connection through only when it went to an address its name has, and refuses one
that names nothing in every mode."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from egress_guard.engine import Engine, Redirected
from egress_guard.engine.types import NEVER_AUDITED
from egress_guard.normalize import normalize_host

EngineFactory = Callable[..., Engine]

POLICY = """\
version: 1
mode: enforce
destinations:
  - name: api
    hosts: [api.example.com]
"""

A = ipaddress.ip_address("203.0.113.7")
B = ipaddress.ip_address("203.0.113.8")
NAME = normalize_host("api.example.com")


@pytest.fixture(scope="module", params=["enforce", "audit"])
def eng(request: pytest.FixtureRequest, make_engine: EngineFactory) -> Engine:
    return make_engine(POLICY.replace("mode: enforce", f"mode: {request.param}"))


def test_a_name_sent_to_one_of_its_addresses_passes(eng: Engine) -> None:
    assert eng.decide(Redirected(NAME, "sni", A, 443, (B, A), "api")) is None


def test_the_same_address_spelled_as_ipv4_mapped_ipv6_passes(eng: Engine) -> None:
    mapped = ipaddress.ip_address("::ffff:203.0.113.7")
    assert eng.decide(Redirected(NAME, "sni", mapped, 443, (A,), "api")) is None


def test_no_name_is_refused_in_every_mode_with_its_destination(eng: Engine) -> None:
    d = eng.decide(Redirected(None, "", A, 8443, None, None))
    assert d is not None
    assert (d.allowed, d.action, d.reason) == (False, "block", "direct_connection")
    assert (d.host, d.port) == ("203.0.113.7", 8443)
    assert d.detail is not None and "203.0.113.7:8443" in d.detail
    assert "direct_connection" in NEVER_AUDITED


def test_unknown_addresses_are_refused(eng: Engine) -> None:
    d = eng.decide(Redirected(NAME, "sni", A, 443, None, "api"))
    assert d is not None and not d.allowed and d.reason == "direct_connection"


@pytest.mark.parametrize(
    ("via", "reason"), [("sni", "sni_mismatch"), ("host", "host_header_mismatch")]
)
def test_a_name_sent_elsewhere_is_a_mismatch(eng: Engine, via: str, reason: str) -> None:
    d = eng.decide(Redirected(NAME, via, B, 443, (A,), "api"))
    assert d is not None and d.reason == reason
    assert d.detail is not None and "203.0.113.8" in d.detail and "203.0.113.7" in d.detail
    if eng.policy.mode == "audit":
        assert (d.allowed, d.action) == (True, "would_block")
    else:
        assert (d.allowed, d.action) == (False, "block")
