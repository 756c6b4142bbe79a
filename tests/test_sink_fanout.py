"""The proxy reaches its sinks through ``Fanout``, by method, never by a method name in a
string: one failing sink must not keep an event from the others, and the audit trail's
guards hold (an admission one sink cannot record is refused; unknown health refuses)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from egress_guard.engine import Decision
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent
from egress_guard.sinks.fanout import Fanout

PROXY = Path(__file__).resolve().parents[1] / "egress_guard" / "proxy"


class Recorder:
    def __init__(self, admit: bool = True, fail: bool = False) -> None:
        self.calls: list[str] = []
        self._admit, self._fail = admit, fail

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self._fail:
            raise RuntimeError(name)

    async def admit(self, event: DecisionEvent) -> bool:
        self._call("admit")
        return self._admit

    def decision(self, event: DecisionEvent) -> None:
        self._call("decision")

    def close(self, event: CloseEvent) -> None:
        self._call("close")

    def policy(self, event: PolicyEvent) -> None:
        self._call("policy")

    def tunnel_accepted(self, conn_id: str) -> None:
        self._call("tunnel_accepted")

    @property
    def healthy(self) -> bool:
        if self._fail:
            raise RuntimeError("healthy")
        return True


def _event() -> DecisionEvent:
    d = Decision(True, "allow", "allowlisted", "api", "example.com", 443)
    return DecisionEvent(
        conn_id="c1", client="127.0.0.1", decision=d, mode="enforce", policy_sha256=""
    )


def test_a_failing_sink_does_not_keep_events_from_the_next() -> None:
    bad, good = Recorder(fail=True), Recorder()
    fan = Fanout([bad, good])
    fan.decision(_event())
    fan.close(
        CloseEvent(
            conn_id="c1",
            client="127.0.0.1",
            host="example.com",
            port=443,
            destination="api",
            decision="allow",
            bytes_up=1,
            bytes_down=2,
            duration_s=0.1,
            mode="enforce",
            policy_sha256="",
        )
    )
    fan.policy(PolicyEvent(True, "p.yaml", "ab" * 32, 1, "enforce"))
    fan.tunnel_accepted("c1")
    assert good.calls == ["decision", "close", "policy", "tunnel_accepted"]
    assert bad.calls == good.calls


def test_admit_stops_at_the_first_sink_that_cannot_record() -> None:
    refusing, later = Recorder(admit=False), Recorder()
    assert asyncio.run(Fanout([refusing, later]).admit(_event())) is False
    assert later.calls == []  # nothing further: the traffic is refused
    raising = Recorder(fail=True)
    assert asyncio.run(Fanout([raising, later]).admit(_event())) is False
    assert asyncio.run(Fanout([Recorder(), Recorder()]).admit(_event())) is True


def test_unknown_health_refuses() -> None:
    assert Fanout([Recorder(), Recorder()]).healthy is True
    assert Fanout([Recorder(), Recorder(fail=True)]).healthy is False


def test_the_proxy_names_sink_methods_directly() -> None:
    for path in PROXY.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"getattr\(\s*sinks?\b", text), path
