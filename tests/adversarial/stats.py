"""Figures the adversarial suite collects for its report (written by conftest at the end).

One module-level registry; tests add to it, ``conftest.pytest_sessionfinish`` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AuditModeStats:
    """The bypass corpus's audit-mode run (``test_bypass_audit_mode.py``): spellings a
    ``mode: audit`` proxy must still refuse as ``denylisted``."""

    tried: int = 0
    passed: list[str] = field(default_factory=list)  # ids that reached an upstream
    by_class: dict[str, int] = field(default_factory=dict)
    guard_blocks: int = 0
    proxy_rejects: list[str] = field(default_factory=list)  # parser 4xx or closed: no record
    audit_joined: int = 0  # guard blocks found as `decision: block` with the expected reason
    mismatches: list[str] = field(default_factory=list)  # wrong reason, or a lifted record

    def count_class(self, cls: str) -> None:
        self.by_class[cls] = self.by_class.get(cls, 0) + 1


@dataclass
class Stats:
    ran: set[str] = field(default_factory=set)  # which test modules contributed
    spellings_tried: int = 0
    spellings_passed: list[str] = field(default_factory=list)  # ids that reached an upstream
    spellings_by_class: dict[str, int] = field(default_factory=dict)
    guard_blocks: int = 0  # answered by the guard (403/407/502 with a reason)
    proxy_rejects: int = 0  # 4xx from mitmproxy's own parser, or closed
    audit_joined: int = 0  # guard blocks found in the audit log by client address
    audit_mismatches: list[str] = field(
        default_factory=list
    )  # block not on record, or an allow on record
    known_bypasses: dict[str, str] = field(default_factory=dict)  # id -> reason (xfail)
    fuzz_engine_examples: int = 0
    fuzz_raw_cases: int = 0
    fuzz_raw_outcomes: dict[str, int] = field(default_factory=dict)
    fuzz_internal_errors: int = 0
    tunnels_peak: dict[str, int] = field(default_factory=dict)  # test -> concurrent tunnels held
    load: dict[str, dict[str, Any]] = field(default_factory=dict)  # test -> figures
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)  # fault -> figures
    audit_mode: AuditModeStats = field(default_factory=AuditModeStats)
    notes: list[str] = field(default_factory=list)
    #: where conftest wrote the report at the end of the session
    report_path: str | None = None

    def count_class(self, cls: str) -> None:
        self.spellings_by_class[cls] = self.spellings_by_class.get(cls, 0) + 1


STATS = Stats()
