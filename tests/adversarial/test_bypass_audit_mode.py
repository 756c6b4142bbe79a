"""Bypass corpus in audit mode: what audit mode must still refuse.

Audit mode lets what the allowlist would block through (``would_block``), but a deny rule
holds in every mode (issue 17, items 2 and 11). This runs the corpus classes that name a
denied host or address against a second lab proxy with ``mode: audit`` (the lab's policy
otherwise): every ``denied`` spelling of the enforce corpus; the denied address in every
encoding and IPv4-mapped IPv6; unlisted aliases resolving to it; an SNI naming a denied
host inside a tunnel audit mode let through to an unlisted target; plain-HTTP requests
whose Host or absolute URI names a denied host while the other names an unlisted one;
plain HTTP inside such a tunnel.

Each spelling must be refused, no never-contact upstream may see a connection, and the
audit log must hold a ``decision: block``, ``reason: denylisted`` record from the
spelling's client address (nothing recorded as ``allow``; the only ``would_block`` is the
CONNECT to the unlisted target a tunnel case opens first).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from adversarial.corpus import AUDIT_CORPUS, UNLISTED_TARGETS
from adversarial.stats import STATS
from support.adv_lab import Lab, Spelling, Verdict, audit_barrier, run_spelling, src_for, wait_for
from support.proxy import ProxyProcess

MODULE = "test_bypass_audit_mode"
INDEX = {sp.id: i for i, sp in enumerate(AUDIT_CORPUS)}

_UNREADABLE_SNI = (
    {"sni_mismatch"},
    "an SNI that is not one valid ASCII host name (UTF-8 dots or letters, two names) "
    "cannot be shown not to be denied: refused, decision block, in audit mode too",
)
_UNREADABLE_HOST = (
    {"host_header_mismatch"},
    "a Host with userinfo is not a valid Host: refused, decision block, in audit mode too",
)

#: spellings the guard refuses with another reason than ``denylisted`` (id -> the reasons
#: allowed and why); still ``decision: block``. Everything else must say ``denylisted``.
OTHER_REASON: dict[str, tuple[set[str], str]] = {
    "denied-x.denied.test-bracketed": (
        {"invalid_host"},
        "[x.denied.test] is no host name (brackets hold an IPv6 address): refused as invalid",
    ),
    **{
        f"audit-sni-{t}-{v}": _UNREADABLE_SNI
        for t in UNLISTED_TARGETS
        for v in (
            "ideographic-dot",
            "fullwidth-dot",
            "halfwidth-dot",
            "fullwidth-letters",
            "second-name-denied",
        )
    },
    **{sp.id: _UNREADABLE_HOST for sp in AUDIT_CORPUS if sp.cls == "host-userinfo"},
    **{
        i: _UNREADABLE_HOST
        for i in (
            "audit-host-userinfo",
            "audit-host-userinfo-other",
            "audit-tunnel-http-name-host-userinfo",
            "audit-tunnel-http-addr-host-userinfo",
        )
    },
}

#: kinds that open a tunnel to an unlisted target first (recorded ``would_block``)
TUNNEL_KINDS = ("tls", "tunnel-http")


@pytest.fixture(scope="module")
def verdicts() -> dict[str, Verdict]:
    return {}


@pytest.fixture(scope="module")
def audit_guard(lab: Lab) -> Iterator[ProxyProcess]:
    STATS.ran.add(MODULE)
    p = lab.proxy("bypass-audit", policy=lab.policy(mode="audit"))
    assert lab.allowed_roundtrip(p, "/control-before") == 200, p.log()
    yield p
    assert p.proc is not None and p.proc.poll() is None, "proxy died during the corpus"


def _records(p: ProxyProcess, src: str) -> list[dict[str, Any]]:
    return [r for r in p.audit("decision") if r.get("client") == src]


def test_audit_corpus_covers_the_classes() -> None:
    classes = {sp.cls for sp in AUDIT_CORPUS}
    assert {
        "denied", "denied-address", "denied-alias", "audit-sni", "audit-host",
        "audit-uri", "audit-tunnel-http",
    } <= classes, classes  # fmt: skip
    assert len(AUDIT_CORPUS) >= 100, len(AUDIT_CORPUS)
    assert set(OTHER_REASON) <= set(INDEX), set(OTHER_REASON) - set(INDEX)


@pytest.mark.parametrize("sp", [pytest.param(sp, id=sp.id) for sp in AUDIT_CORPUS])
def test_denied_spelling_is_refused_in_audit_mode(
    lab: Lab, audit_guard: ProxyProcess, sp: Spelling, verdicts: dict[str, Verdict]
) -> None:
    src = src_for(INDEX[sp.id])
    v = run_spelling(lab, audit_guard, sp, src)
    verdicts[sp.id] = v
    am = STATS.audit_mode
    am.tried += 1
    am.count_class(sp.cls)
    if v.passed_through:
        am.passed.append(sp.id)
    elif v.guard_blocked:
        am.guard_blocks += 1
    else:
        am.proxy_rejects.append(sp.id)

    assert not v.problems, v.describe()
    assert not v.passed_through, v.describe()

    want, _why = OTHER_REASON.get(sp.id, ({"denylisted"}, ""))
    told = v.outcome.guard_reason
    if told is not None and told not in want:
        am.mismatches.append(sp.id)
        pytest.fail(f"client told {told!r}, want one of {want}: {v.describe()}")
    if v.guard_blocked:

        def blocked() -> list[dict[str, Any]]:
            return [
                r
                for r in _records(audit_guard, src)
                if r["decision"] == "block" and r["reason"] in want
            ]

        found = wait_for(blocked, timeout=5)
        if not found:
            am.mismatches.append(sp.id)
        assert found, (
            f"no audit 'block {'/'.join(sorted(want))}' record for {v.describe()}: "
            f"{_records(audit_guard, src)}"
        )
        am.audit_joined += 1
    assert audit_barrier(audit_guard, denied=True), "the audit log stopped growing"
    recs = _records(audit_guard, src)
    if sp.kind in TUNNEL_KINDS:
        # the CONNECT that opens the tunnel is let through (front.test: allow; an unlisted
        # target: would_block); nothing after it
        connects = [r for r in recs if r.get("method") == "CONNECT"]
        assert len(connects) == 1 and connects[0]["reason"] != "denylisted", recs
        recs = [r for r in recs if r is not connects[0]]
    lifted = [r for r in recs if r["decision"] != "block"]
    if lifted:
        am.mismatches.append(sp.id)
    assert not lifted, f"{v.describe()}: audit says {lifted}"


def test_audit_corpus_summary(
    lab: Lab, audit_guard: ProxyProcess, verdicts: dict[str, Verdict]
) -> None:
    """After the whole audit corpus: nothing passed, the proxy still serves, no traceback."""
    if len(verdicts) < len(AUDIT_CORPUS):
        pytest.skip("only part of the audit corpus was selected")
    time.sleep(0.5)  # late connections, if any, land now
    assert lab.trap.count == 0, list(lab.trap.snapshot())
    assert not [v.describe() for v in verdicts.values() if v.passed_through]
    assert lab.allowed_roundtrip(audit_guard, "/control-after") == 200
    assert audit_guard.proc is not None and audit_guard.proc.poll() is None
    assert "Traceback" not in audit_guard.log(), audit_guard.log()[-3000:]


def test_lab_lets_an_unlisted_target_through_in_audit_mode(
    lab: Lab, audit_guard: ProxyProcess
) -> None:
    """The control for the tunnel cases: audit mode does open a tunnel to the unlisted
    other.test (would_block), so the refusals above are about the denied name. (Last in
    this file, so pytest runs it after the corpus and its summary: it reaches the trap.)"""
    sp = Spelling(
        "control-unlisted-tunnel",
        "control",
        "tunnel-http",
        "GET / HTTP/1.1\r\nHost: other.test:{PF}\r\n\r\n",
        connect_to="other.test:{PF}",
    )
    before = lab.trap.count
    v = run_spelling(lab, audit_guard, sp, "127.68.0.1")
    assert v.tunnel and not v.problems, v.describe()
    recs = wait_for(lambda: _records(audit_guard, "127.68.0.1"), timeout=5)
    assert any(r["decision"] == "would_block" for r in recs), recs
    # the trap saw it: audit mode really lets an unlisted target through
    assert wait_for(lambda: lab.trap.count > before, timeout=5)
