"""Render the adversarial suite's figures as a Markdown report, in a fixed layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adversarial.stats import Stats

NOT_RUN = "_not run in this session_"


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    out = ["| figure | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return out


def render(s: Stats) -> str:
    lines = [
        "# Adversarial suite report",
        "",
        "Written by `tests/adversarial/conftest.py` at the end of a pytest session that ran",
        "the whole suite without failures (a partial or failing run writes",
        "adversarial.partial.md instead; sections of modules that did not run say so).",
        "",
        f"Modules in this run: {', '.join(sorted(s.ran)) or 'none'}",
        "",
        "## 1. Bypass corpus (`test_bypass.py`)",
        "",
    ]
    if "test_bypass" in s.ran:
        lines += _table(
            [
                ("spellings tried", s.spellings_tried),
                ("passed through to an upstream (must be 0)", len(s.spellings_passed)),
                (
                    "blocked by the guard (403/407/502 with a reason, or a refused tunnel)",
                    s.guard_blocks,
                ),
                ("rejected by the proxy's HTTP parser (4xx) or closed", s.proxy_rejects),
                ("guard blocks joined with an audit `decision: block` record", s.audit_joined),
                ("audit disagrees with what happened (must be 0)", len(s.audit_mismatches)),
            ]
        )
        lines += ["", "Spellings per class:", "", "| class | spellings |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(s.spellings_by_class.items())]
        lines += ["", "Passed through (each is an xfail-strict regression test until fixed):", ""]
        if s.spellings_passed:
            lines += [
                f"- `{i}`: {s.known_bypasses.get(i, 'NOT A KNOWN BYPASS')}"
                for i in sorted(s.spellings_passed)
            ]
        else:
            lines += ["- none"]
        lines += [
            "",
            "Audit log disagrees (each is an xfail-strict regression test until fixed):",
            "",
        ]
        if s.audit_mismatches:
            lines += [
                f"- `{i}`: {s.known_bypasses.get(i, 'NOT A KNOWN ISSUE')}"
                for i in sorted(set(s.audit_mismatches))
            ]
        else:
            lines += ["- none"]
    else:
        lines += [NOT_RUN]
    lines += ["", "### 1a. Bypass corpus in audit mode (`test_bypass_audit_mode.py`)", ""]
    if "test_bypass_audit_mode" in s.ran:
        am = s.audit_mode
        lines += [
            "The corpus classes a `mode: audit` proxy must still refuse as `denylisted`",
            "(a denied host or address in any name the client gives).",
            "",
        ]
        lines += _table(
            [
                ("spellings tried", am.tried),
                ("passed through to an upstream (must be 0)", len(am.passed)),
                ("blocked by the guard", am.guard_blocks),
                ("rejected by the proxy's HTTP parser (4xx) or closed", len(am.proxy_rejects)),
                (
                    "guard blocks joined with an audit `decision: block` record "
                    "(`denylisted`, or the documented other reason)",
                    am.audit_joined,
                ),
                ("audit disagreements (must be 0)", len(am.mismatches)),
            ]
        )
        lines += ["", "Spellings per class:", "", "| class | spellings |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(am.by_class.items())]
        lines += ["", "Rejected before the guard decided (no decision record):", ""]
        lines += [f"- `{i}`" for i in sorted(am.proxy_rejects)] or ["- none"]
        lines += ["", "Passed through or audit disagrees (each is a hole):", ""]
        bad = sorted(set(am.passed) | set(am.mismatches))
        lines += [f"- `{i}`" for i in bad] or ["- none"]
    else:
        lines += [NOT_RUN]
    lines += ["", "## 2. Fuzzing (`test_fuzz.py`)", ""]
    if "test_fuzz" in s.ran:
        lines += _table(
            [
                (
                    "hypothesis examples (normaliser / matcher / differential)",
                    s.fuzz_engine_examples,
                ),
                ("raw proxy-front cases", s.fuzz_raw_cases),
                ("raw cases answered with internal_error", s.fuzz_internal_errors),
            ]
        )
        lines += ["", "Raw case outcomes:", "", "| outcome | cases |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(s.fuzz_raw_outcomes.items())]
    else:
        lines += [NOT_RUN]
    lines += ["", "## 3. Load and soak (`test_load.py`)", ""]
    if "test_load" in s.ran:
        lines += ["| test | concurrent tunnels held |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(s.tunnels_peak.items())]
        for name, figs in sorted(s.load.items()):
            lines += ["", f"`{name}`:", ""]
            lines += _table(sorted(figs.items()))
    else:
        lines += [NOT_RUN]
    lines += ["", "## 4. Faults (`test_faults.py`)", ""]
    if "test_faults" in s.ran:
        lines += ["| fault | injected | records lost | notes |", "|---|---|---|---|"]
        for name, f in sorted(s.faults.items()):
            lines += [
                f"| {name} | {f.get('injected', 0)} | {f.get('lost', 0)} | {f.get('notes', '')} |"
            ]
        total_lost = sum(int(f.get("lost", 0)) for f in s.faults.values())
        lines += ["", f"Records lost in total (must be 0): {total_lost}"]
    else:
        lines += [NOT_RUN]
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in s.notes] or ["- none"]
    return "\n".join(lines) + "\n"


def write_report(s: Stats, path: Path) -> None:
    path.write_text(render(s))
