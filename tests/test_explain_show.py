"""``egress-guard explain`` (which rule decides, with its file:line; or the nearest one)
and ``egress-guard policy show`` (the effective policy, include and use resolved), run
as the installed command."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from support.proxy import EGRESS_GUARD

from egress_guard.policy import load_policy, load_policy_text, policies_dir

POLICY = """\
version: 1
mode: enforce
include: [minimal]
destinations:
  - name: github
    purpose: code
    hosts: [github.com, "*.api.github.com"]
    ports: [443]
  - use: npm-registry
  - name: internal
    hosts: [llm.internal.test]
    ports: [8443]
    methods: [POST]
    models: [small]
deny:
  - hosts: ["**.evil.test"]
    ports: [443]
network:
  allow_cidrs: [10.9.0.0/16]
  resolve:
    llm.internal.test: 10.9.0.5
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    p = tmp_path / "my-policy.yaml"
    p.write_text(POLICY)
    return p


def eg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EGRESS_GUARD, *args], capture_output=True, text=True, timeout=60)


def line_at(where: str) -> str:
    """The text of ``file:line``."""
    file, _, line = where.rpartition(":")
    return Path(file).read_text().splitlines()[int(line) - 1]


def explain(policy: Path, target: str) -> tuple[int, dict[str, object]]:
    res = eg("explain", "--policy", str(policy), "--json", target)
    assert "Traceback" not in res.stderr
    return res.returncode, json.loads(res.stdout)


def test_explain_names_the_matching_pattern_and_its_line(policy: Path) -> None:
    rc, ex = explain(policy, "https://x.api.github.com/repos")
    assert rc == 0 and ex["decision"] == "allow"
    (m,) = ex["matched"]  # type: ignore[misc]
    assert m.startswith(f"destination 'github' ({policy}:5): host pattern '*.api.github.com'")
    assert "name: github" in line_at(f"{policy}:5")


def test_explain_included_and_used_entries(policy: Path) -> None:
    _, ex = explain(policy, "api.anthropic.com")
    m = ex["matched"][0]  # type: ignore[index]
    where = re.search(r"\((\S+minimal\.yaml:\d+) \(included from (\S+:\d+)\)\)", m)
    assert where, m
    assert "anthropic" in line_at(where.group(1))
    assert line_at(where.group(2)).startswith("include:")
    _, ex = explain(policy, "registry.npmjs.org")
    assert f"({policy}:9)" in ex["matched"][0]  # type: ignore[index]
    assert "use: npm-registry" in line_at(f"{policy}:9")


def test_explain_port_deny_and_request_rules(policy: Path) -> None:
    rc, ex = explain(policy, "github.com:22")
    assert rc == 1 and ex["reason"] == "port_not_allowed"
    assert ex["matched"] == [
        f"destination 'github' ({policy}:5): host pattern 'github.com', ports [443]"
    ]
    rc, ex = explain(policy, "a.b.evil.test")
    assert rc == 1 and ex["reason"] == "denylisted"
    assert ex["matched"][0].startswith(f"deny rule ({policy}:16): **.evil.test (ports [443])")  # type: ignore[index]
    assert ex["nearest"] == []
    rc, ex = explain(policy, "llm.internal.test:8443")  # resolves statically: checked
    assert rc == 0 and ex["note"] is None
    assert "request rules" in ex["matched"][1]  # type: ignore[index]


def test_explain_nothing_matched_nearest_rule_and_catalog(policy: Path) -> None:
    rc, ex = explain(policy, "githb.com")
    assert rc == 1 and ex["reason"] == "not_allowlisted"
    assert ex["matched"] == [] and ex["catalog"] == []
    assert ex["nearest"][0].startswith(f"destination 'github' ({policy}:5)")  # type: ignore[index]
    assert len(ex["nearest"]) == 1, ex["nearest"]  # type: ignore[arg-type]  # no far ones
    rc, ex = explain(policy, "models.opencode.ai")
    (c,) = ex["catalog"]  # type: ignore[misc]
    where = re.search(r"\((\S+catalog\.yaml:\d+)\)", c)
    assert where and c.startswith("catalog entry 'models-catalog'"), c
    assert line_at(where.group(1)).strip() == "- name: models-catalog"
    assert "'- use: models-catalog'" in c


def test_explain_agrees_with_check(policy: Path) -> None:
    targets = ["x.api.github.com", "github.com:22", "githb.com", "a.evil.test", "[::1]:443"]
    res = eg("check", "--policy", str(policy), "--json", *targets)
    checked = [json.loads(line) for line in res.stdout.splitlines()]
    res = eg("explain", "--policy", str(policy), "--json", *targets)
    explained = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(c["decision"], c["reason"]) for c in checked] == [
        (e["decision"], e["reason"]) for e in explained
    ]


def test_explain_text_and_bad_input(policy: Path) -> None:
    res = eg("explain", "--policy", str(policy), "githb.com")
    assert res.returncode == 1
    assert res.stdout.splitlines()[:3] == [
        "githb.com: BLOCKED githb.com:443 (not_allowlisted)",
        "  matched: no destination and no deny rule lists it",
        f"  nearest rule: destination 'github' ({policy}:5): hosts ['github.com', "
        "'*.api.github.com'], ports [443]",
    ]
    res = eg("explain", "--policy", str(policy), "exa mple.com")
    assert res.returncode == 2 and "INVALID" in res.stdout
    res = eg("explain", "--policy", str(policy.parent / "missing.yaml"), "a.com")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1


def test_policy_show_is_the_effective_policy(policy: Path) -> None:
    res = eg("policy", "show", "--policy", str(policy))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "include:" not in text and "use:" not in text
    shown = load_policy_text(text, "<shown>")
    original = load_policy(policy)
    assert shown.destinations == original.destinations
    assert shown.deny == original.deny
    assert shown.network == original.network and shown.clients == original.clients
    names = [d.name for d in original.destinations]
    assert names[:2] == ["anthropic", "opencode-auth"]  # the preset's, in order
    for dest in original.destinations:  # each under a comment with its origin
        assert f"# {original.origins[dest.name]}" in text
    assert f"# {policy}:9 (catalog entry 'npm-registry')" in text
    assert f"# {policies_dir() / 'minimal.yaml'}:" in text


def test_policy_show_json_and_bad_input(policy: Path, tmp_path: Path) -> None:
    res = eg("policy", "show", "--policy", str(policy), "--json")
    doc = json.loads(res.stdout)
    internal = next(d for d in doc["destinations"] if d["name"] == "internal")
    assert internal["origin"] == f"{policy}:10" and internal["models"] == ["small"]
    assert doc["deny"][-1]["origin"] == f"{policy}:16"
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndestinations:\n  - use: no-such-entry\n")
    res = eg("policy", "show", "--policy", str(bad))
    assert res.returncode == 2 and "no catalog entry named 'no-such-entry'" in res.stderr
    assert "Traceback" not in res.stderr
