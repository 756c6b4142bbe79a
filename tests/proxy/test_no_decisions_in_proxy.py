"""Decisions are built only in the engine: the proxy asks, and enforces the answer.

A refusal the proxy reaches from what it sees on the wire (an unparsable request, a
name that does not resolve, an audit sink that cannot record) is built by a named
constructor in egress_guard/engine/verdicts.py, so every reason code has one grep
answer under egress_guard/engine/. Nor does the proxy apply the mode: audit mode is
applied inside ``Engine.decide``, so no ``finalize(`` and no ``_replace(allowed=...)``
(a block turned into a let-through, or back) is written under proxy/.
"""

from __future__ import annotations

import re
from pathlib import Path

PROXY = Path(__file__).resolve().parents[2] / "egress_guard" / "proxy"


def test_no_decision_is_constructed_under_proxy() -> None:
    assert (PROXY / "guard.py").is_file()
    found = [
        f"{path.relative_to(PROXY.parent)}:{n}: {line.strip()}"
        for path in sorted(PROXY.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bDecision\(", line)
    ]
    assert not found, "build it in egress_guard/engine/verdicts.py:\n" + "\n".join(found)


def test_the_proxy_does_not_apply_the_mode() -> None:
    found = [
        f"{path.relative_to(PROXY.parent)}:{n}: {line.strip()}"
        for path in sorted(PROXY.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bfinalize\(|apply_mode\(|_replace\([^)]*\ballowed\s*=", line)
    ]
    assert not found, "decide it in Engine.decide (egress_guard/engine/):\n" + "\n".join(found)
