"""The ``reason`` label on blocks: counted once per block, with the decision, its reason
bounded to the engine's codes (a client cannot mint a label value)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from egress_guard.engine import Decision
from egress_guard.sinks.events import DecisionEvent
from egress_guard.sinks.metrics import Metrics


def _event(
    conn: str, action: str, reason: str, *, method: str | None = None, opens: bool = False
) -> DecisionEvent:
    d = Decision(
        allowed=action != "block",
        action=action,  # type: ignore[arg-type]
        reason=reason,  # type: ignore[arg-type]
        host="h.test",
        port=443,
        destination="api" if action != "block" else None,
        catalog=None,
        hint=None,
        detail=None,
    )
    return DecisionEvent(
        conn_id=conn,
        client="127.0.0.1",
        decision=d,
        mode="audit",
        policy_sha256="",
        method=method,
        opens=opens,
    )


def _blocks(m: Metrics) -> dict[tuple[str, str, str], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            if s.name == "egress_guard_blocks_total":
                out[(s.labels["destination"], s.labels["decision"], s.labels["reason"])] = s.value
    return out


def test_blocks_by_reason_pending_tunnels_and_unknown_reasons() -> None:
    m = Metrics(["api"])
    m.decision(_event("c1", "block", "not_allowlisted", method="CONNECT"))
    m.decision(_event("c2", "block", "denylisted"))
    m.decision(_event("c3", "block", "made_up_by_a_bug\nx"))
    # an audit-mode CONNECT is counted once its first bytes pass, under its own reason
    m.decision(_event("c4", "would_block", "port_not_allowed", method="CONNECT", opens=True))
    assert ("api", "would_block", "port_not_allowed") not in _blocks(m)
    m.tunnel_accepted("c4")
    m.decision(_event("c5", "allow", "allowlisted"))
    assert _blocks(m) == {
        ("unlisted", "block", "not_allowlisted"): 1.0,
        ("unlisted", "block", "denylisted"): 1.0,
        ("unlisted", "block", "other"): 1.0,
        ("api", "would_block", "port_not_allowed"): 1.0,
    }
