"""Hints say how to allow a target without editing a shipped preset (issue 19, item 10).

A file in ``policies/`` is replaced by the next upgrade and is not the operator's: a
hint that says "add ... to .../policies/minimal.yaml" sends them to the wrong file.
When the policy in force (or the rule that decided) is a preset's, the hint gives the
YAML for the operator's own policy; that YAML is pasted here and must allow the target.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from egress_guard.engine import Approved, Decision, Engine, Target
from egress_guard.normalize import parse_target
from egress_guard.policy import load_catalog, load_policy, load_policy_text, policies_dir

MINIMAL = policies_dir() / "minimal.yaml"


def _decide(engine: Engine, target: str) -> Decision:
    host, port = parse_target(target)
    verdict = engine.decide(Target(host, port, parent_resolves=True))
    return verdict.decision if isinstance(verdict, Approved) else verdict  # type: ignore[return-value]


def _no_edit_of_a_preset(hint: str) -> None:
    presets = str(policies_dir())
    assert not re.search(rf"(add|to|there)[^;]*{re.escape(presets)}", hint), hint
    assert "there if it is needed" not in hint, hint


def _pasted_policy_allows(hint: str, target: str) -> None:
    """The ``{version: 1, ...}`` in the hint, pasted as a policy, allows ``target``."""
    m = re.search(r"\{version: 1, .*\}\]\}", hint)
    assert m, hint
    pasted = load_policy_text(m.group(0), "own.yaml")
    d = _decide(Engine(pasted, load_catalog()), target)
    assert d.allowed, (hint, d)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("example.com", "not_allowlisted"),  # no catalog entry: a destination of one's own
        ("api.openai.com", "not_allowlisted"),  # a catalog entry: '- use:'
        ("api.anthropic.com:8443", "port_not_allowed"),  # a preset's destination
    ],
)
def test_under_a_preset_the_hint_is_a_policy_of_ones_own(target: str, reason: str) -> None:
    engine = Engine(load_policy(MINIMAL), load_catalog())
    d = _decide(engine, target)
    assert (d.allowed, d.reason) == (False, reason)
    assert d.hint is not None
    _no_edit_of_a_preset(d.hint)
    assert "--policy FILE" in d.hint and "include: [minimal]" in d.hint
    _pasted_policy_allows(d.hint, target)


def test_a_preset_destination_included_in_ones_own_policy(tmp_path: Path) -> None:
    own = tmp_path / "own.yaml"
    own.write_text("version: 1\ninclude: [minimal]\n")
    engine = Engine(load_policy(own), load_catalog())
    d = _decide(engine, "api.anthropic.com:8443")
    assert d.reason == "port_not_allowed" and d.hint is not None
    _no_edit_of_a_preset(d.hint)
    assert f"to {own}:" in d.hint  # the operator's own file
    entry = re.search(r"\{name: .*\]\}", d.hint)
    assert entry, d.hint
    own.write_text(f"version: 1\ninclude: [minimal]\ndestinations: [{entry.group(0)}]\n")
    assert _decide(Engine(load_policy(own), load_catalog()), "api.anthropic.com:8443").allowed
    # unlisted: the operator's own file is named, as before
    d = _decide(Engine(load_policy(own), load_catalog()), "example.com")
    assert d.hint is not None and f"to {own}" in d.hint


def test_a_preset_deny_rule_says_it_is_the_presets() -> None:
    engine = Engine(load_policy(MINIMAL), load_catalog())
    d = _decide(engine, "169.254.169.254:80")
    assert d.reason == "denylisted" and d.hint is not None
    assert "shipped preset 'minimal'" in d.hint and "your own policy" in d.hint
    _no_edit_of_a_preset(d.hint)


def test_ones_own_rules_keep_their_file_line_hints(tmp_path: Path) -> None:
    own = tmp_path / "own.yaml"
    own.write_text(
        "version: 1\ndestinations:\n  - name: a\n    hosts: [a.example.com]\n"
        "deny:\n  - hosts: [b.example.com]\n"
    )
    engine = Engine(load_policy(own), load_catalog())
    d = _decide(engine, "a.example.com:80")
    assert d.hint == f"destination 'a' ({own}:3) allows ports [443]; add 80 there if it is needed"
    d = _decide(engine, "b.example.com")
    assert d.hint == f"denied by {own}:6; deny rules win over every allow"


def test_doctor_fixes_point_at_a_policy_of_ones_own(tmp_path: Path) -> None:
    """``doctor``'s fixes say where to allow something: under the built-in preset, a
    policy of one's own (that includes it); under one's own policy, that policy."""
    from egress_guard.opencode.config import load_config
    from egress_guard.opencode.doctor import diagnose
    from egress_guard.opencode.doctor_report import DoctorInput

    cfg = load_config(Path(__file__).parents[1] / "opencode/fixtures/doctor_bad.jsonc")
    own = tmp_path / "own.yaml"
    own.write_text("version: 1\ninclude: [minimal]\n")

    def fixes(policy: Path) -> list[str]:
        inp = DoctorInput(cfg=cfg, env={}, policy=load_policy(policy), catalog=load_catalog())
        return [f.fix for f in diagnose(inp) if "- use:" in f.fix]

    under_preset = fixes(MINIMAL)
    assert under_preset, "the fixture's providers need catalog entries"
    for fix in under_preset:
        assert "to the policy" not in fix and "a policy of your own" in fix, fix
        assert "include: [minimal]" in fix, fix
    assert all("to the policy" in fix for fix in fixes(own))
