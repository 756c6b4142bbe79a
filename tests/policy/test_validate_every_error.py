"""``validate`` reports every error in one run, in plain words (issue 19, item 6).

Unknown keys come first, each with the key most likely meant; pydantic's own phrasing
("Input should be", "Value error") never reaches the operator; a glob such as
``a.*.example.com`` is called what it is; ``validate policies/*.yaml`` (the README's
command) checks the catalog as a catalog.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from egress_guard.policy import PolicyError, load_policy

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(sys.executable).parent / "egress-guard")

MANY_ERRORS = """\
version: 1
mode: enforc
destinations:
  - name: a
    hosts: [a.*.example.com]
    ports: [443]
  - name: b
    hostz: [b.example.com]
  - name: c
    hosts: [c.example.com]
    ports: [abc]
    methodz: [GET]
"""


def _errors(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(p)
    return [line for line in info.value.render().splitlines() if not line.startswith("  ")]


def test_every_error_is_reported_unknown_keys_first(tmp_path: Path) -> None:
    lines = _errors(tmp_path, MANY_ERRORS)
    where = [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in lines]
    text = "\n".join(lines)
    assert "more error" not in text
    # the two unknown keys first (file order), then the rest in file order
    assert "unknown key 'hostz' (did you mean 'hosts'?)" in lines[0], text
    assert "unknown key 'methodz' (did you mean 'methods'?)" in lines[1], text
    assert where[:2] == ["8", "12"], text
    rest = lines[2:]
    assert any("mode: must be 'enforce' or 'audit', not 'enforc'" in x for x in rest), text
    assert any("wildcard in a middle or last label" in x for x in rest), text
    assert any("ports.0: must be a whole number, not 'abc'" in x for x in rest), text
    assert any("missing required key 'hosts'" in x for x in rest), text
    assert [int(w) for w in where[2:]] == sorted(int(w) for w in where[2:]), text
    assert "Input should be" not in text and "Value error" not in text
    assert "regular expression" not in text


def test_errors_after_validation_are_all_reported_too(tmp_path: Path) -> None:
    """Unknown presets and catalog entries, duplicates, bad resolve entries: each one."""
    lines = _errors(
        tmp_path,
        "version: 1\ninclude: [minimel]\ndestinations:\n  - use: anthropc\n"
        "  - name: x\n    hosts: [a.example.com]\n  - name: x\n    hosts: [b.example.com]\n"
        "network:\n  resolve:\n    gw.example.com: nope\n",
    )
    text = "\n".join(lines)
    assert len(lines) == 4, text
    assert "unknown preset 'minimel' (did you mean 'minimal'?)" in lines[0]
    assert "no catalog entry named 'anthropc' (did you mean 'anthropic'?)" in lines[1]
    assert "duplicate destination name 'x'" in lines[2]
    assert "'nope' is not an IP address" in lines[3]


def test_yes_unquoted_gets_a_hint(tmp_path: Path) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text("version: 1\nmode: yes\n")
    with pytest.raises(PolicyError) as info:
        load_policy(p)
    assert "not true" in info.value.render() and "quote it" in info.value.render()


def _validate(*files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, "validate", *files], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_readme_validate_policies_glob_checks_the_catalog_as_a_catalog() -> None:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "policies").glob("*.yaml"))
    assert "policies/catalog.yaml" in files
    res = _validate(*files)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert "policies/catalog.yaml: ok (catalog; " in res.stdout


def test_a_broken_catalog_reports_every_error(tmp_path: Path) -> None:
    cat = tmp_path / "catalog.yaml"
    cat.write_text(
        "version: 1\nentries:\n  - name: a\n    purpose: x\n    required: maybe\n"
        "    source: [docs]\n    hostz: [a.example.com]\n"
    )
    res = _validate(str(cat))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if not x.startswith("  ")]
    assert lines[0] == f"{cat}:7: entries.0.hostz: unknown key 'hostz' (did you mean 'hosts'?)"
    assert any("entries.0.required: must be 'yes', 'no'" in x for x in lines), res.stderr


def test_validate_cli_prints_every_error(tmp_path: Path) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text(MANY_ERRORS)
    res = _validate(str(p))
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if not x.startswith("  ")]
    assert len(lines) == 6 and all(x.startswith(f"{p}:") for x in lines), res.stderr
