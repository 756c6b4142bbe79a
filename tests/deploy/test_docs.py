"""The operators' documentation stays true: the generated policy reference matches the
models, and the audit and metrics references name what a running guard really writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing

import pytest
from deploy.manifests import ROOT
from deploy.running import RunningGuard

from egress_guard.cli import docgen
from egress_guard.engine.decide import Reason

DOCS = ROOT / "docs"
REGENERATE = "regenerate with: python -m egress_guard.cli.docgen > docs/policy-reference.md"


def test_policy_reference_is_current() -> None:
    committed = (DOCS / "policy-reference.md").read_text(encoding="utf-8")
    assert committed == docgen.render(), f"docs/policy-reference.md is stale; {REGENERATE}"


def test_docgen_entry_point_prints_the_reference() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "egress_guard.cli.docgen"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out == (DOCS / "policy-reference.md").read_text(encoding="utf-8")
    bad = subprocess.run(
        [sys.executable, "-m", "egress_guard.cli.docgen", "--bogus"],
        capture_output=True,
        timeout=60,
    )
    assert bad.returncode == 2


def test_reference_covers_every_key() -> None:
    text = docgen.render()
    from egress_guard.policy import model as m

    for cls in (m.PolicyFile, m.Destination, m.UseRef, m.DenyRule, m.Network, m.Clients, m.Auth):
        assert f"({cls.__name__})" in text, cls.__name__
        for name in cls.model_fields:
            assert f"| `{name}` |" in text, f"{cls.__name__}.{name}"


def test_undescribed_keys_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key is described where it is declared (``Field(description=...)``); one without a
    description fails the reference instead of leaving an empty cell."""
    from egress_guard.policy import model as m

    monkeypatch.setattr(m.Network.model_fields["resolve"], "description", None)
    with pytest.raises(RuntimeError, match=r"Network\.resolve"):
        docgen.render()


def documented_fields(text: str) -> set[str]:
    return set(re.findall(r"`([a-z_0-9]+)`", text))


def test_audit_reference_names_every_field_written(running_guard: RunningGuard) -> None:
    text = (DOCS / "audit-log.md").read_text(encoding="utf-8")
    documented = documented_fields(text)
    records = [json.loads(x) for x in running_guard.proxy.audit_path.read_text().splitlines()]
    events = {r["event"] for r in records}
    assert {"startup", "policy_loaded", "decision"} <= events
    for rec in records:
        missing = set(rec) - documented
        assert not missing, f"{rec['event']} fields not in docs/audit-log.md: {missing}"
        assert f"### `{rec['event']}`" in text


def test_audit_reference_lists_every_reason() -> None:
    text = (DOCS / "audit-log.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z_]+)` \| (?:allow|block)", text, re.M))
    assert rows == set(typing.get_args(Reason))


def test_metrics_reference_names_every_series(running_guard: RunningGuard) -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    for fam in running_guard.families:
        name = fam.name + ("_total" if fam.type == "counter" else "")
        assert f"| `{name}` | {fam.type} |" in text, name
        labels = {k for s in fam.samples for k in s.labels} - {"le"}
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert set(re.findall(r"`(\w+)`", row.split("|")[3])) == labels, row


def test_relative_links_resolve() -> None:
    for page in sorted(DOCS.glob("*.md")):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"
